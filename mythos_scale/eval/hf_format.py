"""The Hugging Face format: export a model as a folder ``transformers`` loads, and read one back.

``write_hf_folder`` writes, into a folder being built (see :func:`mythos_scale.eval.export.write_export`):

- ``config.json``: ``model_type`` ``mythos_rdt``, ``auto_map`` to the bundled code, the RDT's
  settings under ``rdt``, the default loop count ``n_loops`` and the rest of the training config
  (``mythos_config``, for warm starts);
- ``configuration_mythos.py`` / ``modeling_mythos.py`` (from ``hf_remote/``) and ``rdt_*.py``: the
  package's model modules, copied from the installed package at export time with their
  ``mythos_scale`` imports made relative, so the folder runs without mythos_scale installed;
- ``generation_config.json``; ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``;
- the weights as ``model.safetensors``, or, above ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors``
  shards and ``model.safetensors.index.json``; names are the plain model's, prefixed ``model.``.

:func:`load_hf_folder` reads such a folder back into a :class:`~mythos_scale.eval.load.LoadedModel`
(``mythos eval`` / ``generate`` / ``ckpt import-hf`` and warm starts), refusing anything else with
:class:`~mythos_scale.eval.load.ModelLoadError`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mythos_scale.config import Config, ConfigError, config_from_dict

MODEL_TYPE = "mythos_rdt"
HF_CONFIG_NAME = "config.json"
HF_INDEX_NAME = "model.safetensors.index.json"
HF_WEIGHTS_NAME = "model.safetensors"
WEIGHT_PREFIX = "model."
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
PACKAGE = Path(__file__).resolve().parent.parent
REMOTE_TEMPLATES = Path(__file__).resolve().parent / "hf_remote"
# bundled module name -> the package module it is generated from
BUNDLED_MODULES = {
    "rdt_layers": "model/layers.py", "rdt_cache": "model/cache.py", "rdt_attention": "model/attention.py",
    "rdt_moe": "model/moe.py", "rdt_recurrence": "model/recurrence.py", "rdt_model": "model/model.py",
    "rdt_doc_attention": "model/doc_attention.py", "rdt_recompute": "model/recompute.py",
}
_IMPORT_REWRITES = (
    (re.compile(r"^from mythos_scale\.model\.(\w+) import", re.M), r"from .rdt_\1 import"),
    (re.compile(r"^from mythos_scale\.kernels import", re.M), "from .rdt_kernels import"),
    (re.compile(r"^from mythos_scale\.config import", re.M), "from .configuration_mythos import"),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP32_ALWAYS = ("injection.",)  # DESIGN.md: A_log, dt_bias, B stay fp32 in every dtype


def is_hf_folder(path: Path) -> bool:
    return (path / HF_CONFIG_NAME).is_file()


def bundled_source(relative: str) -> str:
    """A package module's source with its ``mythos_scale`` imports made relative to the folder."""
    text = (PACKAGE / relative).read_text()
    for pattern, replacement in _IMPORT_REWRITES:
        text = pattern.sub(replacement, text)
    leftover = re.search(r"^\s*(from|import) mythos_scale\b.*$", text, re.M)
    if leftover:
        raise RuntimeError(f"mythos_scale/{relative} imports {leftover.group(0).strip()!r}, which the HF "
                           "export does not bundle: add it to BUNDLED_MODULES or to the rewrites")
    return text


def write_code(folder: Path) -> None:
    modeling = (REMOTE_TEMPLATES / "modeling_mythos.py").read_text()
    unnamed = [name for name in [*BUNDLED_MODULES, "rdt_kernels"] if f"from .{name} import" not in modeling]
    if unnamed:
        raise RuntimeError(f"hf_remote/modeling_mythos.py must import {unnamed} (transformers copies only "
                           "the modules it imports)")
    for name in ("configuration_mythos.py", "modeling_mythos.py"):
        shutil.copyfile(REMOTE_TEMPLATES / name, folder / name)
    (folder / "rdt_kernels.py").write_text(bundled_source("kernels/reference.py") + "\n\n"
                                           + (REMOTE_TEMPLATES / "kernel_dispatch.py").read_text())
    for name, relative in BUNDLED_MODULES.items():
        (folder / f"{name}.py").write_text(bundled_source(relative))


def write_weights(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int,
                  metadata: dict[str, str]) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` (a larger tensor alone) + index."""
    from safetensors.torch import save_file

    tensors = {WEIGHT_PREFIX + n: (t.to(dtype) if t.is_floating_point() and not n.startswith(FP32_ALWAYS) else t)
               .detach().cpu().contiguous() for n, t in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(folder / HF_WEIGHTS_NAME), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / HF_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2) + "\n")


def write_tokenizer(folder: Path, tokenizer_file: Path, max_len: int) -> int:
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json; returns the EOS id."""
    from mythos_scale.data.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer_file)
    eos = loaded.tokenizer.id_to_token(loaded.eos_id)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    special = {"eos_token": eos, "bos_token": eos, "unk_token": eos, "pad_token": eos}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
         "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return loaded.eos_id


def write_hf_folder(folder: Path, state: dict[str, torch.Tensor], cfg: Config, tokenizer_file: Path | None,
                    dtype: str = "fp32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    step: int | None = None) -> None:
    """Write the HF format of ``state`` (the plain model's state dict) into the existing ``folder``."""
    model = cfg.model
    eos_id = write_tokenizer(folder, tokenizer_file, model.max_seq_len) if tokenizer_file is not None else None
    config = {
        "architectures": ["MythosForCausalLM"], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_mythos.MythosConfig",
                     "AutoModelForCausalLM": "modeling_mythos.MythosForCausalLM"},
        "rdt": model.model_dump(mode="json"), "n_loops": max(1, model.max_loops // 2), "exit_threshold": None,
        "vocab_size": model.vocab_size, "hidden_size": model.dim, "max_position_embeddings": model.max_seq_len,
        "tie_word_embeddings": False, "torch_dtype": str(DTYPES[dtype]).removeprefix("torch."),
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "mythos_config": cfg.model_dump(mode="json", exclude={"model"}),
    }
    (folder / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False,
         "max_length": model.max_seq_len}, indent=2) + "\n")
    write_code(folder)
    write_weights(folder, state, DTYPES[dtype], max_shard_bytes, {"format": "pt", "step": str(step)})


# --------------------------------------------------------------------------- reading one back


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _error(f"{path} is not readable JSON: {exc}") from None


def _error(message: str):
    from mythos_scale.eval.load import ModelLoadError

    return ModelLoadError(message)


def hf_config(path: Path) -> Config:
    """The training config an HF folder was exported with (``mythos_config``; ``rdt`` is its model section)."""
    config = _read_json(path / HF_CONFIG_NAME)
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise _error(f"{path / HF_CONFIG_NAME}: model_type is {found!r}, not {MODEL_TYPE!r}: only HF folders "
                     "written by `mythos ckpt export --format hf` can be read")
    if not isinstance(config.get("rdt"), dict):
        raise _error(f"{path / HF_CONFIG_NAME} has no 'rdt' section (the model's settings)")
    if not isinstance(config.get("mythos_config"), dict):
        raise _error(f"{path / HF_CONFIG_NAME} has no 'mythos_config' section (the training config)")
    try:
        return config_from_dict({**config["mythos_config"], "model": config["rdt"]},
                                f"{path / HF_CONFIG_NAME} mythos_config")
    except ConfigError as exc:
        raise _error(str(exc)) from None


def read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """The plain model's state dict from the folder's single file or index + shards."""
    from mythos_scale.eval.load import read_weights

    if (path / HF_INDEX_NAME).is_file():
        weight_map = _read_json(path / HF_INDEX_NAME).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _error(f"{path / HF_INDEX_NAME} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (path / HF_WEIGHTS_NAME).is_file():
        files = [HF_WEIGHTS_NAME]
    else:
        raise _error(f"HF folder {path} has neither {HF_WEIGHTS_NAME} nor {HF_INDEX_NAME}")
    state = {}
    for file in files:
        if not (path / file).is_file():
            raise _error(f"HF folder {path}: {file}, listed in {HF_INDEX_NAME}, is missing")
        state.update(read_weights(path / file))
    foreign = [n for n in state if not n.startswith(WEIGHT_PREFIX)]
    if foreign:
        raise _error(f"HF folder {path}: weights not under {WEIGHT_PREFIX!r}: {foreign[:5]}")
    return {n.removeprefix(WEIGHT_PREFIX): t for n, t in state.items()}


def load_hf_folder(path: Path):
    """A :class:`~mythos_scale.eval.load.LoadedModel` from an HF folder this package exported."""
    from mythos_scale.data.manifest import DataError
    from mythos_scale.data.tokenizer import load_tokenizer
    from mythos_scale.eval.load import LoadedModel, model_from_state

    cfg = hf_config(path)
    model = model_from_state(cfg, read_hf_state(path), f"HF folder {path}")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        try:
            tokenizer = load_tokenizer(path)
        except DataError as exc:
            raise _error(str(exc)) from None
    return LoadedModel(model, cfg, tokenizer, {"kind": "hf", "path": str(path)})
