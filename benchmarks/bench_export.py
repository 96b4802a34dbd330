"""Export and load times of a run's checkpoint (``mythos ckpt export`` / ``load_model``), in one process.

    python benchmarks/bench_export.py runs/tiny_cpu [--repeats 3] [--json out.json]

Times, each the best of ``--repeats`` after one warm-up (imports and the tokenizer lookup paid
once, outside the timings): exporting the run's newest checkpoint (hash check, read of every
piece, consolidation, write of ``model.safetensors``), loading the exported folder, and loading
the checkpoint directly (reading the per-rank pieces); each load builds the model and checks
every name and shape.  Prints the figures and the sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from mythos_scale.eval.export import export_checkpoint
from mythos_scale.eval.load import find_checkpoint, load_model


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder or a checkpoint folder")
    parser.add_argument("--repeats", type=int, default=3)
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{tag_dir}: {figures['checkpoint_bytes'] / 2**20:.1f} MiB of checkpoint (weights + optimizer state) -> "
          f"{figures['export_bytes'] / 2**20:.1f} MiB model.safetensors")
    print(f"export {figures['export_s']:.3f}s | load export {figures['load_export_s']:.3f}s | "
          f"load checkpoint {figures['load_checkpoint_s']:.3f}s (best of {args.repeats})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
