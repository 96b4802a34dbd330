"""Export a checkpoint as one consolidated, layout-free model folder.

``out/`` receives ``model.safetensors`` (every parameter as its full logical tensor and every
persistent buffer, by the plain model's names, fp32), ``config.yaml`` (the run's config),
``tokenizer.json`` (the run's tokenizer, when its dataset is here) and ``export.json`` (where it
came from: step, tokens seen, the layout and ZeRO stage that wrote it).  The folder is written
under a temporary name and renamed when complete, so a folder named ``out`` is always whole.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from mythos_scale.config import Config, dump_config
from mythos_scale.data.manifest import TOKENIZER_NAME
from mythos_scale.eval.load import (
    CONFIG_NAME,
    EXPORT_INFO_NAME,
    WEIGHTS_NAME,
    ModelLoadError,
    checkpoint_config,
    find_checkpoint,
    model_from_state,
    run_tokenizer,
)


def verify_hashes(tag_dir: Path, files: dict[str, Any]) -> None:
    """Hash every file of a checkpoint against its commit record (the xxh3-64 recorded at save)."""
    import xxhash

    for name, entry in files.items():
        hasher = xxhash.xxh3_64()
        with open(tag_dir / name, "rb") as f:
            while chunk := f.read(16 << 20):
                hasher.update(chunk)
        if hasher.hexdigest() != entry["xxh3"]:
            raise ModelLoadError(f"checkpoint {tag_dir}: {name} differs from what was saved (xxh3 "
                                 f"{hasher.hexdigest()}, recorded {entry['xxh3']}): damaged after the save")


def write_export(out: Path, state: dict[str, torch.Tensor], cfg: Config, tokenizer_file: Path | None,
                 record: dict[str, Any], hf: dict[str, Any] | None = None) -> None:
    """Write an exported folder: under a temporary name, renamed to ``out`` once complete.
    ``hf``: write the Hugging Face format instead (keyword arguments of ``write_hf_folder``)."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if hf is not None:
            from mythos_scale.eval.hf_format import write_hf_folder

            write_hf_folder(tmp, state, cfg, tokenizer_file, step=record.get("step"), **hf)
        else:
            save_file({n: t.detach().cpu().contiguous() for n, t in state.items()}, str(tmp / WEIGHTS_NAME),
                      metadata={"format": "pt", "step": str(record.get("step"))})
            (tmp / CONFIG_NAME).write_text(dump_config(cfg))
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / TOKENIZER_NAME)
        (tmp / EXPORT_INFO_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # an empty folder (export_checkpoint refuses any other)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(path: str | Path, out: str | Path, hf: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the checkpoint ``path`` names (a run folder, its checkpoints/ or one checkpoint) to
    the folder ``out`` (which must not exist, or be empty).  Returns what ``export.json`` holds.
    ``hf``: the Hugging Face format (see :mod:`mythos_scale.eval.hf_format`) with these options."""
    from mythos_scale.checkpoint import CheckpointError, read_model_state
    from mythos_scale.checkpoint.format import read_record

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{out} already exists and is not an empty folder: export to a new folder")
    tag_dir = find_checkpoint(Path(path).expanduser())
    start = time.perf_counter()
    cfg, info = checkpoint_config(tag_dir)
    verify_hashes(tag_dir, read_record(tag_dir)["files"])
    try:
        state = read_model_state(tag_dir)
    except (CheckpointError, ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"checkpoint {tag_dir} cannot be read: {exc}") from None
    model_from_state(cfg, state, f"checkpoint {tag_dir}")  # refuse what the config's model cannot hold
    read_s = time.perf_counter() - start

    tokenizer = run_tokenizer(cfg)
    record = {"source": str(tag_dir.resolve()), "step": info["step"], "tokens_seen": info["tokens_seen"],
              "layout": info["layout"], "zero_stage": info["zero_stage"],
              "parameters": sum(t.numel() for n, t in state.items() if n in info["params"]),
              "tokenizer": tokenizer is not None, "read_s": round(read_s, 4)}
    write_export(out, state, cfg, tokenizer.path if tokenizer is not None else None, record, hf)
    record["write_s"] = round(time.perf_counter() - start - read_s, 4)
    return record


def import_hf(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the HF folder ``path`` (``mythos ckpt export --format hf``) as an exported folder
    ``out`` (new or empty): the native format a warm start or any command reads."""
    from mythos_scale.eval.hf_format import is_hf_folder, load_hf_folder

    path, out = Path(path).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelLoadError(f"{out} already exists and is not an empty folder: import to a new folder")
    if not is_hf_folder(path):
        raise ModelLoadError(f"{path} is not a Hugging Face folder: it has no config.json")
    loaded = load_hf_folder(path)
    state = loaded.model.state_dict()
    record = {"source": str(path.resolve()), "kind": "hf", "step": None,
              "parameters": sum(p.numel() for p in loaded.model.parameters()),
              "tokenizer": loaded.tokenizer is not None}
    write_export(out, state, loaded.cfg, loaded.tokenizer.path if loaded.tokenizer is not None else None, record)
    return record
