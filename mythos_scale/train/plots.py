"""PNG plots of a run, drawn from its ``metrics.jsonl``: what people would rather look at than read.

- ``loss.png``: training (and validation) loss against step;
- ``loss_vs_loops.png``: mean training loss (+- standard error) for each loop count T drawn,
  late in training, on a y-axis fitted to those means (differences between T are the point);
- ``expert_load.png``: max/mean expert load per loop depth against step (1 = balanced); a depth
  is only reached on steps with a larger T, so each line is broken where its depth was absent;
- ``state_norms.png``: mean ||h_t|| and ||h_{t+1} - h_t|| per loop iteration, over the last steps.

The trainer writes them at the end of a run; ``mythos plot RUN_DIR`` redraws them any time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402

from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK

log = logging.getLogger("mythos_scale.train")


class RunFolderError(ValueError):
    """The folder holds no readable training history; the message says what is missing."""


def read_history(run_dir: str | Path) -> list[dict]:
    """The metrics rows of a run, one per step (the last row wins where a resume repeated a step).
    Damaged lines (e.g. the last one, cut by a crash) are skipped with a warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path} not found: {run_dir} is not a run folder (train.out_dir/"
                             f"train.name of a run that logged at least one step)")
    rows, damaged = {}, []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            rows[int(row["step"])] = row
        except (ValueError, KeyError, TypeError):
            damaged.append(lineno)
    if damaged:
        log.warning("%s: skipped %d damaged line(s) (line %s)", path, len(damaged),
                    ", ".join(map(str, damaged[:5])) + (" ..." if len(damaged) > 5 else ""))
    if not rows:
        raise RunFolderError(f"{path} holds no readable metrics rows")
    return [rows[s] for s in sorted(rows)]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _gapped_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Every step, NaN where ``key`` is absent: matplotlib breaks a line at NaN."""
    return [r["step"] for r in rows], [r.get(key, math.nan) for r in rows]


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


def plot_loss_vs_loops(rows: list[dict]) -> Figure | None:
    """Mean training loss +- standard error for each loop count T among ``rows``."""
    by_loops = defaultdict(list)
    for row in rows:
        if "loops/T" in row and "train/loss" in row:
            by_loops[int(row["loops/T"])].append(row["train/loss"])
    if not by_loops:
        return None
    loops = sorted(by_loops)
    means = [sum(by_loops[t]) / len(by_loops[t]) for t in loops]
    errors = [math.sqrt(sum((x - m) ** 2 for x in by_loops[t]) / (len(by_loops[t]) - 1) / len(by_loops[t]))
              if len(by_loops[t]) > 1 else 0.0 for t, m in zip(loops, means)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(loops, means, yerr=errors, fmt="o-", capsize=3)
    for t, m in zip(loops, means):
        ax.annotate(f"n={len(by_loops[t])}", (t, m), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.margins(x=0.1, y=0.2)
    ax.set_xticks(loops)
    ax.set(xlabel="loop count T of the step", ylabel="mean training loss (+- s.e.)",
           title="loss vs loop count (second half of the run)")
    return fig


def plot_expert_load(rows: list[dict]) -> Figure | None:
    """Max/mean expert load per loop depth against step; lines break where a depth was absent."""
    depths = _indexed_keys(rows, r"moe/load_max_over_mean/depth_(\d+)")
    if not depths:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for depth, key in depths.items():
        ax.plot(*_gapped_series(rows, key), ".-", label=f"depth {depth}", lw=1, ms=3)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="step", ylabel="max / mean tokens per expert",
           title="expert load per loop depth (1 = perfectly balanced)")
    ax.legend(fontsize=8, ncol=2)
    return fig


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
    for figure, name in ((plot_loss_vs_loops(late), "loss_vs_loops"), (plot_expert_load(rows), "expert_load")):
        if figure is not None:
            written.append(_save(figure, out / f"{name}.png"))

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
    except RunFolderError as exc:
        print(f"mythos plot: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK
