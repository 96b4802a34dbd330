"""Export and load times of a run's checkpoint (``mythos ckpt export`` / ``load_model``), in one process.

    python benchmarks/bench_export.py runs/tiny_cpu [--repeats 3] [--hf] [--json out.json]

Times, each the best of ``--repeats`` after one warm-up (imports and the tokenizer lookup paid
once, outside the timings): exporting the run's newest checkpoint (hash check, read of every
piece, consolidation, write of ``model.safetensors``), loading the exported folder, and loading
the checkpoint directly (reading the per-rank pieces); each load builds the model and checks
every name and shape.  ``--hf`` (needs the ``hf`` extra): also the Hugging Face format
(``--format hf``): its export time, ``AutoModelForCausalLM.from_pretrained`` +
``AutoTokenizer.from_pretrained`` time (offline, the bundled code), and the largest logit
difference between transformers and ``load_model`` at each loop count 1..``max_loops`` on a
probe batch (0 where bitwise equal).  Prints the figures and the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mythos_scale.eval.export import export_checkpoint
from mythos_scale.eval.load import find_checkpoint, load_model


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_figures(tag_dir: Path, work: Path, repeats: int) -> dict:
    """The Hugging Face export's figures (see the module docstring)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    counter = iter(range(10**6))

    def export() -> None:
        export_checkpoint(tag_dir, work / f"hf{next(counter)}", {"dtype": "fp32"})

    export_s = best_of(repeats, export)
    folder = work / "hf0"
    loaded = {}

    def load() -> None:
        loaded["model"] = transformers.AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
        transformers.AutoTokenizer.from_pretrained(str(folder))

    load()  # warm-up: transformers' imports and the remote-code module
    load_s = best_of(repeats, load)
    hf_model, ours = loaded["model"].eval(), load_model(tag_dir).model.eval()
    probe = torch.randint(0, ours.cfg.vocab_size, (2, min(256, ours.cfg.max_seq_len)),
                          generator=torch.Generator().manual_seed(0))
    diffs = {}
    with torch.no_grad():
        for loops in range(1, ours.cfg.max_loops + 1):
            diffs[loops] = (hf_model(probe, n_loops=loops).logits - ours(probe, loops).logits).abs().max().item()
    return {"export_s": export_s, "load_s": load_s, "files": sorted(p.name for p in folder.iterdir()),
            "logits_max_abs_diff": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder or a checkpoint folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", action="store_true", help="also the Hugging Face format and transformers' load")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    tag_dir = find_checkpoint(Path(args.run))
    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    try:
        counter = iter(range(10**6))

        def export() -> None:
            export_checkpoint(tag_dir, work / f"export{next(counter)}")

        export()  # warm-up: imports, the tokenizer lookup
        export_s = best_of(args.repeats, export)
        folder = work / "export0"
        load_model(folder)
        figures = {
            "checkpoint": str(tag_dir), "checkpoint_bytes": sum(p.stat().st_size for p in tag_dir.iterdir()),
            "export_bytes": (folder / "model.safetensors").stat().st_size,
            "export_s": export_s,
            "load_export_s": best_of(args.repeats, lambda: load_model(folder)),
            "load_checkpoint_s": best_of(args.repeats, lambda: load_model(tag_dir)),
            "repeats": args.repeats,
        }
        if args.hf:
            figures["hf"] = hf_figures(tag_dir, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{tag_dir}: {figures['checkpoint_bytes'] / 2**20:.1f} MiB of checkpoint (weights + optimizer state) -> "
          f"{figures['export_bytes'] / 2**20:.1f} MiB model.safetensors")
    print(f"export {figures['export_s']:.3f}s | load export {figures['load_export_s']:.3f}s | "
          f"load checkpoint {figures['load_checkpoint_s']:.3f}s (best of {args.repeats})")
    if args.hf:
        hf = figures["hf"]
        print(f"--format hf: export {hf['export_s']:.3f}s | transformers load {hf['load_s']:.3f}s | largest logit "
              "difference to load_model by loop count: " + ", ".join(
                  f"T={t}: {d:.1e}" for t, d in hf["logits_max_abs_diff"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
