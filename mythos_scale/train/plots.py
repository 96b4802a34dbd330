"""PNG plots of a run, drawn from its ``metrics.jsonl``: what people would rather look at than read.

- ``loss.png``: training (and validation) loss against step;
- ``loss_vs_loops.png``: mean training loss for each loop count T drawn, late in training;
- ``expert_load.png``: max/mean expert load per loop depth against step (1 = balanced);
- ``state_norms.png``: mean ||h_t|| and ||h_{t+1} - h_t|| per loop iteration, over the last steps.

The trainer writes them at the end of a run; ``mythos plot RUN_DIR`` redraws them any time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def read_history(run_dir: Path) -> list[dict]:
    """The metrics rows of a run, one per step (the last row wins where a resume repeated a step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder?")
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _indexed_keys(rows: list[dict], pattern: str) -> dict[int, str]:
    """Keys like ``moe/load_max_over_mean/depth_3`` found in any row, by their index."""
    regex = re.compile(pattern)
    found = {}
    for row in rows:
        for key in row:
            match = regex.fullmatch(key)
            if match:
                found[int(match.group(1))] = key
    return dict(sorted(found.items()))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draw every plot the run's history supports into ``<run_dir>/plots``; returns the files."""
    run_dir = Path(run_dir)
    rows = read_history(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(rows, "train/loss"), label="train", lw=1)
    steps, val = _series(rows, "val/loss")
    if steps:
        ax.plot(steps, val, "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
    ax.legend()
    written.append(_save(fig, out / "loss.png"))

    late = rows[len(rows) // 2:]  # the second half: early steps would dominate every T's mean
    by_loops = defaultdict(list)
    for row in late:
        by_loops[int(row["loops/T"])].append(row["train/loss"])
    if by_loops:
        loops = sorted(by_loops)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar(loops, [sum(by_loops[t]) / len(by_loops[t]) for t in loops])
        for t in loops:
            ax.annotate(f"n={len(by_loops[t])}", (t, 0), ha="center", va="bottom", fontsize=8)
        ax.set(xlabel="loop count T of the step", ylabel="mean training loss",
               title="loss vs loop count (second half of the run)")
        written.append(_save(fig, out / "loss_vs_loops.png"))

    depths = _indexed_keys(rows, r"moe/load_max_over_mean/depth_(\d+)")
    if depths:
        fig, ax = plt.subplots(figsize=(7, 4))
        for depth, key in depths.items():
            ax.plot(*_series(rows, key), label=f"depth {depth}", lw=1)
        ax.axhline(1.0, color="gray", ls="--", lw=0.8)
        ax.set(xlabel="step", ylabel="max / mean tokens per expert",
               title="expert load per loop depth (1 = perfectly balanced)")
        ax.legend(fontsize=8, ncol=2)
        written.append(_save(fig, out / "expert_load.png"))

    norms = {name: _indexed_keys(late, rf"model/{name}/iter_(\d+)") for name in ("h_norm", "update_norm")}
    if norms["h_norm"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, keys in norms.items():
            means = {i: [r[k] for r in late if k in r] for i, k in keys.items()}
            ax.plot(list(means), [sum(v) / len(v) for v in means.values()], "o-", label=name)
        ax.set(xlabel="loop iteration t", ylabel="mean norm per token",
               title="recurrent state: ||h_t|| and ||h_{t+1} - h_t||")
        ax.legend()
        written.append(_save(fig, out / "state_norms.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mythos plot", description="Draw a run's PNG plots from its metrics.")
    parser.add_argument("run_dir", help="the run folder (train.out_dir/train.name), e.g. runs/tiny_cpu")
    args = parser.parse_args(argv)
    try:
        for path in write_plots(args.run_dir):
            print(path)
    except FileNotFoundError as exc:
        print(f"mythos plot: error: {exc}", file=sys.stderr)
        return 2
    return 0
