"""Exact-match accuracy by difficulty and loop count on a synthetic reasoning dataset
(:mod:`mythos_scale.data.synthetic`): does the model solve deeper problems with more loops?

Teacher-forced: the model reads each item once; at every answer position (labels not
IGNORE_INDEX) the greedy prediction (argmax) must equal the label, and an item is correct when
all its answer tokens are.  With the KL early exit (``exit_threshold``) each row also reports the
mean loops run at the answer positions: an adaptive model should spend more on harder items.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mythos_scale.config import DataConfig
from mythos_scale.data.manifest import IGNORE_INDEX, DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def difficulty_batches(path: str, data: DataConfig, vocab_size: int, batch_size: int) -> dict[int, list[Batch]]:
    """The val split of the synthetic dataset at ``path`` as ``(inputs, labels)`` batches per
    difficulty (labels IGNORE_INDEX off the answer)."""
    from mythos_scale.data.loader import open_reader, read_rows
    from mythos_scale.data.sources import open_source

    source = open_source(path, 1.0, data, vocab_size)
    counts = source.manifest.inputs.get("val_difficulties")
    if not counts:
        raise DataError(f"{path}: not a synthetic reasoning dataset (its manifest has no val_difficulties; "
                        f"make one with `mythos data synthetic`)")
    reader = open_reader([source], "val", data)
    out, start = {}, 0
    for difficulty, n in counts.items():
        ids = np.arange(start, start + n)
        out[int(difficulty)] = [read_rows(reader, ids[i:i + batch_size]) for i in range(0, n, batch_size)]
        start += n
    return out


def exact_match(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: every answer position (label not IGNORE_INDEX) predicted right.  A row with no
    answer position is an error (it would count as solved)."""
    answer = labels != IGNORE_INDEX
    if not answer.any(1).all():
        raise ValueError("a row has no answer tokens (labels all IGNORE_INDEX): not a synthetic task batch")
    return ((predictions == labels) | ~answer).all(1)


@torch.no_grad()
def accuracy_by_difficulty(model: torch.nn.Module, batches: dict[int, list[Batch]], n_loops: int,
                           exit_threshold: float | None = None, progress: tqdm | None = None) -> list[dict]:
    """One row per difficulty: exact-match ``accuracy``, ``items`` and ``mean_loops`` (loops run at
    the answer positions) of ``model`` at ``n_loops`` (with the KL exit at ``exit_threshold``)."""
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for difficulty, parts in sorted(batches.items()):
        correct, items, loops = 0, 0, 0.0
        for inputs, labels in parts:
            inputs, labels = inputs.to(device), labels.to(device)
            out = model(inputs, n_loops=n_loops, exit_threshold=exit_threshold)
            correct += int(exact_match(out.logits.argmax(-1), labels).sum())
            items += labels.shape[0]
            answer = labels != IGNORE_INDEX
            loops += out.loops_used[answer].float().mean().item() * labels.shape[0]
            if progress is not None:
                progress.update()
        rows.append({"difficulty": difficulty, "loops": n_loops, "exit_threshold": exit_threshold,
                     "accuracy": correct / items, "items": items, "mean_loops": loops / items})
    return rows


def accuracy_table(batches: dict[int, list[Batch]], model: torch.nn.Module, loop_counts: list[int],
                   exit_thresholds: list[float] = (), desc: str = "accuracy") -> list[dict]:
    """:func:`accuracy_by_difficulty` at every loop count, then with the KL exit at the largest
    loop count for each threshold, with one progress bar."""
    runs = [(t, None) for t in loop_counts] + [(max(loop_counts), tau) for tau in exit_thresholds]
    rows = []
    with tqdm(total=len(runs) * sum(map(len, batches.values())), desc=desc, unit="batch") as progress:
        for n_loops, tau in runs:
            rows += accuracy_by_difficulty(model, batches, n_loops, tau, progress)
    return rows


def format_accuracy(rows: list[dict]) -> str:
    """Accuracy (%) with difficulty down and loops across; then loops used under each exit."""
    difficulties = sorted({r["difficulty"] for r in rows})
    plain = {(r["difficulty"], r["loops"]): r for r in rows if r["exit_threshold"] is None}
    loops = sorted({t for _, t in plain})
    lines = ["accuracy (%), difficulty x loops", "diff " + "".join(f"{'T=' + str(t):>7}" for t in loops)]
    lines += [f"{d:>4} " + "".join(f"{100 * plain[d, t]['accuracy']:7.1f}" for t in loops) for d in difficulties]
    for tau in sorted({r["exit_threshold"] for r in rows if r["exit_threshold"] is not None}):
        mine = {r["difficulty"]: r for r in rows if r["exit_threshold"] == tau}
        lines.append(f"KL exit {tau:g} at T={next(iter(mine.values()))['loops']}: difficulty: accuracy %, mean loops")
        lines += [f"{d:>4}  {100 * mine[d]['accuracy']:6.1f}  {mine[d]['mean_loops']:5.2f}" for d in difficulties]
    return "\n".join(lines)


def plot_accuracy_heatmaps(panels: dict[str, dict[tuple[int, int], float]], path: Path, title: str,
                           trained_max: int | None = None) -> Path:
    """One heat-map per model: accuracy by (difficulty, loops); a line under the deepest trained difficulty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, (name, acc) in zip(axes[0], panels.items()):
        difficulties = sorted({d for d, _ in acc})
        loops = sorted({t for _, t in acc})
        grid = [[acc[d, t] for t in loops] for d in difficulties]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(loops)), [str(t) for t in loops])
        ax.set_yticks(range(len(difficulties)), [str(d) for d in difficulties])
        if trained_max is not None:
            ax.axhline(difficulties.index(trained_max) + 0.5, color="red", linewidth=1)
        ax.set_xlabel("loops at evaluation (T)")
        ax.set_ylabel("difficulty")
        ax.set_title(name)
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-match accuracy")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
