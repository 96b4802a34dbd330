"""Held-out loss, perplexity and bits per byte of a model at several loop counts.

At each loop count T a model is measured in each of its modes (:func:`eval_modes`):

- ``loops``: every position runs all T iterations (an ACT model without its halting);
- ``act``: an ACT model halting per token (``model.act.enabled``);
- ``kl<threshold>``: Huginn's per-token KL early exit (a position stops once its prediction
  moves by less than the threshold, in nats, between two iterations).

Each row: ``loss`` (nats per token), ``perplexity``, ``bits_per_byte`` (when the tokens' bytes
are known, see :mod:`.text_bytes`) and ``mean_loops`` (iterations per token actually run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mythos_scale.data.manifest import IGNORE_INDEX


@dataclass(frozen=True)
class EvalMode:
    """How the loop runs: ``act`` (the halting unit on; ACT models only) or the KL exit at
    ``exit_threshold`` (None: off)."""

    name: str
    act: bool = False
    exit_threshold: float | None = None


def eval_modes(model: torch.nn.Module, exit_thresholds: Iterable[float] = ()) -> list[EvalMode]:
    """The modes a model is measured in: all loops; ACT halting when it has ACT; the KL exit at
    each threshold (with ACT off: the two exits are alternatives)."""
    modes = [EvalMode("loops")]
    if model.halting is not None:
        modes.append(EvalMode("act", act=True))
    modes += [EvalMode(f"kl{tau:g}", exit_threshold=tau) for tau in exit_thresholds]
    return modes


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], n_loops: int,
             mode: EvalMode = EvalMode("loops"), byte_lengths: torch.Tensor | None = None,
             progress: tqdm | None = None, eos_id: int | None = None) -> dict[str, float]:
    """Loss over ``batches`` (``(inputs, labels)`` pairs) of ``model`` run at ``n_loops`` in ``mode``:
    summed over every token, then divided once (so batches of any size weigh by their tokens).
    ``eos_id``: the end-of-document token of packed batches, so a document-masked model
    (``model.attention.document_mask``) sees each document alone, as in training."""
    model.eval()
    device = next(model.parameters()).device
    nats, n_bytes, loops_used, n_tokens = 0.0, 0.0, 0.0, 0
    for inputs, labels in batches:
        inputs, labels = inputs.to(device), labels.to(device)
        out = model(inputs, n_loops=n_loops, act=mode.act, exit_threshold=mode.exit_threshold, eos_id=eos_id)
        nats += F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), reduction="sum").item()
        counted = labels != IGNORE_INDEX  # all but a synthetic task's prompts
        if byte_lengths is not None:
            n_bytes += byte_lengths[labels[counted].cpu()].sum().item()
        loops_used += out.loops_used.float()[counted].sum().item()
        n_tokens += int(counted.sum())
        if progress is not None:
            progress.update()
    loss = nats / n_tokens
    row = {"loops": n_loops, "mode": mode.name, "exit_threshold": mode.exit_threshold, "loss": loss,
           "perplexity": math.exp(min(loss, 700.0)), "mean_loops": loops_used / n_tokens, "tokens": n_tokens}
    if byte_lengths is not None:
        row["bits_per_byte"] = nats / math.log(2) / n_bytes
        row["bytes_per_token"] = n_bytes / n_tokens
    return row


def evaluate_loops(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], loop_counts: list[int],
                   modes: list[EvalMode], byte_lengths: torch.Tensor | None = None,
                   desc: str = "eval", eos_id: int | None = None) -> list[dict[str, float]]:
    """:func:`evaluate` at every loop count in every mode, with one progress bar."""
    rows = []
    with tqdm(total=len(loop_counts) * len(modes) * len(batches), desc=desc, unit="batch") as progress:
        for n_loops in loop_counts:
            for mode in modes:
                rows.append(evaluate(model, batches, n_loops, mode, byte_lengths, progress, eos_id))
    return rows


def format_table(rows: list[dict]) -> str:
    have_bpb = all("bits_per_byte" in r for r in rows)
    head = f"{'loops':>5}  {'mode':<10} {'loss':>8} {'ppl':>9} " + (f"{'bits/byte':>9} " if have_bpb else "")
    lines = [head + f"{'mean loops':>10}"]
    for r in rows:
        lines.append(f"{r['loops']:>5}  {r['mode']:<10} {r['loss']:8.4f} {r['perplexity']:9.2f} "
                     + (f"{r['bits_per_byte']:9.4f} " if have_bpb else "") + f"{r['mean_loops']:10.2f}")
    return "\n".join(lines)


def plot_loss_vs_loops(rows: list[dict], path: Path, title: str) -> Path:
    """Loss (and bits per byte, when known) against the loop count, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["loss"] + (["bits_per_byte"] if all("bits_per_byte" in r for r in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.0), squeeze=False)
    loops = sorted({r["loops"] for r in rows})
    for ax, metric in zip(axes[0], metrics):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["loops"])
            ax.plot([r["loops"] for r in mine], [r[metric] for r in mine], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(loops)
        ax.set_xticklabels([str(t) for t in loops])
        ax.set_xlabel("loops at evaluation (T)")
        ax.set_ylabel({"loss": "held-out loss (nats / token)", "bits_per_byte": "held-out bits / byte"}[metric])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
