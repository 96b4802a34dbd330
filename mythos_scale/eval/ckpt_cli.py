"""`mythos ckpt`: look inside a checkpoint, or export it for use without DeepSpeed.

    mythos ckpt inspect runs/tiny_cpu                  the newest usable checkpoint of a run
    mythos ckpt inspect runs/tiny_cpu/checkpoints/step_00000300 --json
    mythos ckpt export runs/tiny_cpu --out exported/tiny_cpu
    mythos ckpt export runs/tiny_cpu --out hf/tiny_cpu --format hf --dtype bf16
    mythos ckpt import-hf hf/tiny_cpu --out exported/from_hf

inspect: step, tokens seen, the layout and ZeRO stage that wrote it, sizes, the model config.
export: one consolidated model.safetensors (full logical tensors from any ZeRO stage and any
DP/TP/EP layout), config.yaml and the run's tokenizer.json: `mythos eval --checkpoint` and
`mythos generate --checkpoint` load it.  --format hf: a folder transformers loads
(AutoModelForCausalLM / AutoTokenizer, trust_remote_code=True, offline); import-hf turns such a
folder back into an export (mythos eval / generate also read HF folders directly).
Exit status 2 for a path that is not a usable checkpoint or HF folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos ckpt", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    inspect = sub.add_parser("inspect", help="step, tokens, layout, ZeRO stage, sizes, config")
    inspect.add_argument("path", help="a run folder, its checkpoints/ folder, one checkpoint or an export")
    inspect.add_argument("--json", action="store_true")
    export = sub.add_parser("export", help="one model.safetensors + config.yaml + tokenizer.json")
    export.add_argument("path", help="a run folder, its checkpoints/ folder or one checkpoint")
    export.add_argument("--out", required=True, help="a new folder")
    export.add_argument("--format", choices=["native", "hf"], default="native",
                        help="hf: config.json, modeling code, tokenizer files, (sharded) safetensors")
    export.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights dtype (--format hf)")
    export.add_argument("--max-shard-mb", type=float, default=5000, help="shard size limit (--format hf)")
    import_hf = sub.add_parser("import-hf", help="an HF folder (--format hf) back to an export")
    import_hf.add_argument("path", help="a folder written by `mythos ckpt export --format hf`")
    import_hf.add_argument("--out", required=True, help="a new folder")
    return parser


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def inspect(path: Path) -> dict:
    from mythos_scale.eval.load import CONFIG_NAME, EXPORT_INFO_NAME, WEIGHTS_NAME, checkpoint_config, find_checkpoint, is_export

    if is_export(path):
        import yaml

        info = json.loads((path / EXPORT_INFO_NAME).read_text()) if (path / EXPORT_INFO_NAME).is_file() else {}
        config = yaml.safe_load((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else None
        size = (path / WEIGHTS_NAME).stat().st_size if (path / WEIGHTS_NAME).is_file() else 0
        return {"kind": "export", "path": str(path), **info, "bytes": size, "config": config}
    tag_dir = find_checkpoint(path)
    cfg, info = checkpoint_config(tag_dir)
    params = sum(math.prod(shape) for shape in info["params"].values())
    return {"kind": "checkpoint", "path": str(tag_dir), "step": info["step"], "tokens_seen": info["tokens_seen"],
            "world_size": info["world_size"], "layout": info["layout"], "zero_stage": info["zero_stage"],
            "parameters": params, "bytes": info["bytes"], "files": info["files"],
            "optimizer": info["optimizer"], "config": cfg.model_dump(mode="json")}


def _print_inspect(info: dict) -> None:
    print(f"{info['kind']} {info['path']}")
    print(f"  step {info.get('step')}, tokens seen {info.get('tokens_seen')}")
    layout = info.get("layout") or {}
    if layout:
        print(f"  written by {layout.get('world_size')} ranks: dp {layout.get('dp')} tp {layout.get('tp')} "
              f"ep {layout.get('ep')}, ZeRO stage {info.get('zero_stage')}")
    if "parameters" in info:
        print(f"  {info['parameters']:,} parameters; {_human(info['bytes'])} on disk"
              + (f" in {len(info['files'])} files" if "files" in info else ""))
    model = (info.get("config") or {}).get("model") or {}
    if model:
        att, moe = model["attention"], model["moe"]
        ffn = (f"MoE {moe['n_routed_experts']} routed (top {moe['top_k']}) + {moe['n_shared_experts']} shared"
               if moe["enabled"] else "dense FFN")
        print(f"  model: dim {model['dim']}, {model['n_heads']} heads ({att['type']}), vocab {model['vocab_size']}, "
              f"prelude {model['prelude_layers']} + core {model['core_layers']} x up to {model['max_loops']} loops + "
              f"coda {model['coda_layers']}; {ffn}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mythos_scale.eval.load import ModelLoadError

    path = Path(args.path).expanduser()
    try:
        if not path.is_dir():
            raise ModelLoadError(f"{path} is not a folder: give a run folder, a checkpoint folder or an export")
        if args.action == "inspect":
            info = inspect(path)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                _print_inspect(info)
            return EXIT_OK
        from mythos_scale.eval.export import export_checkpoint, import_hf

        start = time.perf_counter()
        if args.action == "import-hf":
            record = import_hf(path, args.out)
            print(f"{args.out}: {record['parameters']:,} parameters from {path} in {time.perf_counter() - start:.2f}s")
            return EXIT_OK
        hf = ({"dtype": args.dtype, "max_shard_bytes": int(args.max_shard_mb * 2**20)}
              if args.format == "hf" else None)
        record = export_checkpoint(path, args.out, hf)
    except ModelLoadError as exc:
        print(f"mythos ckpt: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"{args.out}: step {record['step']}, {record['parameters']:,} parameters, {size / 2**20:.1f} MiB "
          f"{args.format} safetensors{' + tokenizer' if record['tokenizer'] else ''} in "
          f"{time.perf_counter() - start:.2f}s (read {record['read_s']:.2f}s)")
    return EXIT_OK
