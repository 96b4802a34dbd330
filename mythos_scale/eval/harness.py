"""lm-evaluation-harness over a loaded model, at several loop counts (``mythos eval --tasks``).

:class:`MythosLM` is an ``lm_eval`` LM over :func:`~mythos_scale.eval.load.load_model`'s model and
tokenizer at one loop count: ``loglikelihood`` (multiple-choice and cloze tasks),
``loglikelihood_rolling`` (perplexity tasks, lm-eval's rolling windows of ``max_seq_len``) and
``generate_until`` (greedy, the model's KV cache).  Requests run one at a time (small eval sets;
no padding in the model).  Tasks are lm-eval's names or local YAML files (their folders are added
to the task search path), so offline compute nodes can run tasks whose ``dataset_kwargs.data_files``
are local files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mythos_scale.eval.generate import Sampling, generate
from mythos_scale.eval.load import LoadedModel


class TaskFileError(ValueError):
    """A --tasks entry that is not a usable task name or task YAML file."""


class MythosLM(LM):
    """The loaded model at ``n_loops`` loop iterations, as lm-eval sees it."""

    def __init__(self, loaded: LoadedModel, n_loops: int) -> None:
        super().__init__()
        if loaded.tokenizer is None:
            raise TaskFileError("the model has no tokenizer (its dataset is not here): lm-eval needs one")
        self.model, self.tok, self.n_loops = loaded.model, loaded.tokenizer, n_loops
        self.max_len = loaded.cfg.model.max_seq_len
        self.model_device = next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tok.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.no_grad()
    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether every continuation token is the argmax;
        the context is cut from the left to fit ``max_seq_len``."""
        tokens = (context + continuation)[-(self.max_len + 1):]
        ids = torch.tensor([tokens[:-1]], device=self.model_device)
        logprobs = F.log_softmax(self.model(ids, self.n_loops).logits[0, -len(continuation):].float(), dim=-1)
        target = torch.tensor(continuation, device=self.model_device)
        picked = logprobs.gather(1, target[:, None])[:, 0]
        return picked.sum().item(), bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            spaces = len(context) - len(context.rstrip())  # a context's trailing space goes with the continuation
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            context_ids = self.encode(context) if context else [self.tok.eos_id]
            whole = self.encode(context + continuation) if context else context_ids + self.encode(continuation)
            results.append(self.score(whole[:len(context_ids)], whole[len(context_ids):]))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            windows = get_rolling_token_windows(self.encode(request.args[0]), self.tok.eos_id, self.max_len, 1)
            results.append(sum(self.score(*make_disjoint_window(w))[0] for w in windows))
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            context, kwargs = request.args
            until = [u for u in ([kwargs.get("until")] if isinstance(kwargs.get("until"), str)
                                 else kwargs.get("until") or [])]
            prompt = self.encode(context)[-(self.max_len - 1):]
            budget = min(int(kwargs.get("max_gen_toks", 64)), self.max_len - len(prompt))
            out = generate(self.model, torch.tensor([prompt], device=self.model_device), budget, self.n_loops,
                           Sampling(temperature=0.0), eos_id=self.tok.eos_id)
            text = self.tok.tokenizer.decode(out.tokens[0, :out.lengths[0]].tolist())
            cut = min([text.index(u) for u in until if u in text], default=len(text))
            results.append(text[:cut])
        return results


def resolve_tasks(entries: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to add to lm-eval's search path) for --tasks: names or YAML files."""
    import yaml

    names, folders = [], []
    for entry in entries:
        path = Path(entry).expanduser()
        if entry.endswith((".yaml", ".yml")) or path.exists():
            if not path.is_file():
                raise TaskFileError(f"task file {path} does not exist")
            try:
                spec = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise TaskFileError(f"task file {path} is not valid YAML: {exc}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
                raise TaskFileError(f"task file {path} has no 'task: NAME' (an lm-eval task YAML)")
            names.append(spec["task"])
            folders.append(str(path.resolve().parent))
        else:
            names.append(entry)
    return names, sorted(set(folders))


def run_harness(loaded: LoadedModel, entries: list[str], loops: list[int], limit: int | None = None
                ) -> list[dict[str, Any]]:
    """One row per (task, loop count): lm-eval's metrics (``acc``, ``word_perplexity``, ...) and,
    per sample, what it computed (``samples``: the per-item metric values in document order)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names, folders = resolve_tasks(entries)
    manager = TaskManager(include_path=folders or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise TaskFileError(f"unknown lm-eval task(s) {unknown} (task names, or local task YAML files)")
    rows = []
    for n_loops in loops:
        out = simple_evaluate(model=MythosLM(loaded, n_loops), tasks=names, task_manager=manager, limit=limit,
                              log_samples=True, bootstrap_iters=0)
        for task, metrics in out["results"].items():
            values = {k.split(",")[0]: v for k, v in metrics.items()
                      if "," in k and isinstance(v, (int, float)) and "_stderr" not in k}
            samples = sorted(out["samples"].get(task, []), key=lambda s: s["doc_id"])
            rows.append({"task": task, "loops": n_loops, **values,
                         "samples": [{m: s[m] for m in values if m in s} for s in samples]})
    return rows


def format_harness_table(rows: list[dict[str, Any]]) -> str:
    metrics = sorted({k for r in rows for k in r} - {"task", "loops", "samples"})
    lines = [f"{'task':<24}{'loops':>6}" + "".join(f"{m:>18}" for m in metrics)]
    for r in rows:
        lines.append(f"{r['task']:<24}{r['loops']:>6}"
                     + "".join(f"{r[m]:>18.4f}" if m in r else f"{'':>18}" for m in metrics))
    return "\n".join(lines)


def plot_harness(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One line per (task, metric) against loop count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        for metric in sorted(set(mine[0]) - {"task", "loops", "samples"}):
            ax.plot([r["loops"] for r in mine], [r[metric] for r in mine], marker="o", label=f"{task} {metric}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loop count")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def harness_command(args, loaded: LoadedModel) -> int:
    """``mythos eval --tasks``: the table (or --json) and the PNG; exit 2 for unusable tasks."""
    import json
    import sys

    from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_OK

    try:
        rows = run_harness(loaded, [t for t in args.tasks.split(",") if t.strip()], args.loops, args.limit or None)
    except (TaskFileError, FileNotFoundError, ValueError) as exc:
        print(f"mythos eval: error: --tasks {args.tasks}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    title = f"{args.run or args.checkpoint}: lm-eval {args.tasks}"
    plot = Path(args.plot) if args.plot else Path("eval_tasks.png")
    plot_harness(rows, plot, title)
    if args.json:
        print(json.dumps({"model": loaded.source, "tasks": args.tasks, "loops": args.loops, "rows": rows,
                          "plot": str(plot)}, indent=2))
    else:
        print(f"{title}\n{format_harness_table(rows)}\nplot: {plot}")
    return EXIT_OK
