"""Step time with DeepSpeed's ``overlap_comm`` on and off: the real trainer on gloo ranks.

    python benchmarks/bench_overlap.py [--nproc 2] [--steps 30] [--rounds 2] [--json out.json] [override ...]

Each round trains ``configs/tiny_cpu.yaml`` (the embedded corpus) for ``--steps`` steps with
``train.overlap_comm`` true, then false, in fresh run folders, logging every step; the loop
count T follows the seed, so step i runs the same T in both.  Printed: the median step time of
each setting (the first 3 steps of a run left out: warm-up) and the median over steps of the
per-step ratio on/off.  On CPU there is no side stream: DeepSpeed's overlap only changes when
buckets are reduced, so a ratio near 1 is what to expect here; the figure that matters is a
GPU node's (run this there with NCCL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def run(nproc: int, steps: int, overlap: bool, out_dir: Path, overrides: list[str]) -> dict[int, float]:
    cmd = [sys.executable, "-m", "mythos_scale.train", "--nproc", str(nproc), "--config", str(REPO / "configs/tiny_cpu.yaml"),
           f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "train.checkpoint.every=100000",
           f"train.overlap_comm={str(overlap).lower()}", f"train.out_dir={out_dir}", "train.name=bench", *overrides]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out_dir / "bench" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["time/step_s"] for r in rows if "time/step_s" in r and r["step"] > WARMUP}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    times: dict[bool, list[dict[int, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for overlap in (True, False):
                times[overlap].append(run(args.nproc, args.steps, overlap, Path(tmp) / f"{r}_{overlap}", args.overrides))
                print(f"round {r + 1}/{args.rounds} overlap_comm={overlap}: done", flush=True)
    medians = {o: statistics.median(t for rnd in times[o] for t in rnd.values()) for o in (True, False)}
    ratios = [on[s] / off[s] for on, off in zip(times[True], times[False]) for s in on if s in off]
    result = {"nproc": args.nproc, "steps": args.steps, "rounds": args.rounds, "overrides": args.overrides,
              "median_step_s_overlap_on": medians[True], "median_step_s_overlap_off": medians[False],
              "median_ratio_on_over_off": statistics.median(ratios),
              "ratio_range": [min(ratios), max(ratios)]}
    print(f"{args.nproc} gloo ranks, {args.steps} steps x {args.rounds} rounds: median step "
          f"{medians[True]:.3f} s with overlap_comm, {medians[False]:.3f} s without; per-step ratio on/off "
          f"median {result['median_ratio_on_over_off']:.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
