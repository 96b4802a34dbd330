"""Load a trained model for evaluation or sampling: one process, no DeepSpeed, no process group.

:func:`load_model` takes any of

- an exported folder (``mythos ckpt export``): ``model.safetensors`` + ``config.yaml`` (+ ``tokenizer.json``);
- a Hugging Face folder (``mythos ckpt export --format hf``): ``config.json`` + safetensors (+ tokenizer);
- a run folder (``runs/<name>``) or its ``checkpoints/`` folder: the newest committed checkpoint
  whose files are whole, never newer than ``latest``;
- one checkpoint (``runs/<name>/checkpoints/step_N``), whatever ZeRO stage and DP/TP/EP layout wrote it.

Weights are read with safetensors only (no pickle).  What cannot be loaded raises
:class:`ModelLoadError`, naming the path and what is wrong with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mythos_scale.config import Config, ConfigError, config_from_dict, load_config
from mythos_scale.data.manifest import TOKENIZER_NAME, DataError
from mythos_scale.data.tokenizer import LoadedTokenizer, load_tokenizer
from mythos_scale.model import MythosModel, build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
EXPORT_INFO_NAME = "export.json"
CHECKPOINT_RECORD = "COMPLETE.json"


class ModelLoadError(ValueError):
    """A path that does not hold a loadable model; the message names it and why."""


@dataclass
class LoadedModel:
    model: MythosModel
    cfg: Config
    tokenizer: LoadedTokenizer | None  # None when neither the folder nor the run's data has one
    source: dict[str, Any] = field(default_factory=dict)  # kind, path, step, tokens_seen, ...


# --------------------------------------------------------------------------- finding it


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder ``path`` names: itself (a checkpoint), or the newest usable one of a
    run folder or a ``checkpoints/`` folder (never newer than ``latest``)."""
    from mythos_scale.checkpoint import validate_checkpoint

    if (path / CHECKPOINT_RECORD).is_file():
        problem = validate_checkpoint(path)
        if problem:
            raise ModelLoadError(f"checkpoint {path} cannot be read: {problem}")
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    tags = sorted(p for p in folder.glob("step_*") if p.is_dir())
    latest = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else ""
    if re.fullmatch(r"step_\d+", latest):
        tags = [p for p in tags if p.name <= latest]
    rejected = []
    for tag_dir in reversed(tags):
        problem = validate_checkpoint(tag_dir)
        if problem is None:
            return tag_dir
        rejected.append(f"{tag_dir.name}: {problem}")
    if rejected:
        raise ModelLoadError(f"{path}: no usable checkpoint:\n  " + "\n  ".join(rejected))
    raise ModelLoadError(
        f"{path} is not a model mythos_scale can load: expected an exported folder ({WEIGHTS_NAME} + "
        f"{CONFIG_NAME}), a run folder with checkpoints/, or a checkpoint folder holding {CHECKPOINT_RECORD}")


def is_export(path: Path) -> bool:
    return (path / WEIGHTS_NAME).is_file() or (path / EXPORT_INFO_NAME).is_file()


# --------------------------------------------------------------------------- building it


def model_from_state(cfg: Config, state: dict[str, torch.Tensor], where: str) -> MythosModel:
    """The plain model of ``cfg`` holding ``state``: every parameter and persistent buffer
    present, with its shape, and nothing else."""
    model = build_model(cfg.model, seed=0)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{n}: {tuple(state[n].shape)}, the config's model has {tuple(expected[n].shape)}"
             for n in sorted(set(state) & set(expected)) if state[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "",
                 f"not in the model {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "",
                 "wrong shapes: " + "; ".join(wrong[:8]) if wrong else ""]
        raise ModelLoadError(f"{where} does not match its config's model: "
                             + "; ".join(p for p in parts if p))
    model.load_state_dict({n: t.to(expected[n].dtype) for n, t in state.items()})
    return model.eval()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (no pickle); ModelLoadError when it is not a whole one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file (truncated or foreign?): {exc}") from None


def run_tokenizer(cfg: Config) -> LoadedTokenizer | None:
    """The tokenizer of the data a run was trained on (None when that dataset is not here)."""
    from mythos_scale.data.sources import resolve_dataset

    source = cfg.data.sources[0].path
    try:
        dataset = resolve_dataset(source, cfg.data.cache_dir, cfg.data.seq_len, cfg.model.vocab_size)
        return load_tokenizer(dataset / TOKENIZER_NAME)
    except (DataError, OSError):
        return None


def _load_export(path: Path) -> LoadedModel:
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (path / name).is_file():
            raise ModelLoadError(f"exported folder {path} lacks {name} (an export that did not finish?)")
    try:
        cfg = load_config(path / CONFIG_NAME)
    except ConfigError as exc:
        raise ModelLoadError(f"{path / CONFIG_NAME}: {exc}") from None
    model = model_from_state(cfg, read_weights(path / WEIGHTS_NAME), str(path / WEIGHTS_NAME))
    tokenizer = None
    if (path / TOKENIZER_NAME).is_file():
        try:
            tokenizer = load_tokenizer(path / TOKENIZER_NAME)
        except DataError as exc:
            raise ModelLoadError(str(exc)) from None
    info = json.loads((path / EXPORT_INFO_NAME).read_text()) if (path / EXPORT_INFO_NAME).is_file() else {}
    return LoadedModel(model, cfg, tokenizer, {**info, "kind": "export", "path": str(path)})


def checkpoint_config(tag_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The config and the info (step, tokens, layout, ...) a checkpoint was written with."""
    from mythos_scale.checkpoint import read_checkpoint_info

    try:
        info = read_checkpoint_info(tag_dir)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"checkpoint {tag_dir}: {exc}") from None
    try:
        cfg = config_from_dict(info["config"], f"{tag_dir / CHECKPOINT_RECORD} config")
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    return cfg, info


def _load_checkpoint(tag_dir: Path) -> LoadedModel:
    from mythos_scale.checkpoint import CheckpointError, read_model_state

    cfg, info = checkpoint_config(tag_dir)
    try:
        state = read_model_state(tag_dir)
    except (CheckpointError, ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"checkpoint {tag_dir} cannot be read: {exc}") from None
    model = model_from_state(cfg, state, f"checkpoint {tag_dir}")
    source = {"kind": "checkpoint", "path": str(tag_dir), "step": info["step"],
              "tokens_seen": info["tokens_seen"], "layout": info["layout"]}
    return LoadedModel(model, cfg, run_tokenizer(cfg), source)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The model at ``path`` (see the module docstring), in eval mode on ``device``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist")
    if path.is_file():
        raise ModelLoadError(f"{path} is a file: give the exported folder, the run folder or the checkpoint folder")
    from mythos_scale.eval.hf_format import is_hf_folder, load_hf_folder

    if is_hf_folder(path):
        loaded = load_hf_folder(path)
    else:
        loaded = _load_export(path) if is_export(path) else _load_checkpoint(find_checkpoint(path))
    loaded.model.to(device)
    return loaded
