"""Loop-scaling study: do more loops give better predictions on held-out text?

    python benchmarks/loop_scaling.py [--steps 600] [--out benchmarks/results/loop_scaling]
                                      [--eval-loops 1,2,4,8,16] [override ...]

Trains two models of ``configs/tiny_cpu.yaml`` with the real trainer (in this process: the
DeepSpeed engine, the loop sampler, the training loss, the data loader of ``mythos train``), on
the embedded corpus's training split, for the same number of steps and the same batch:

- ``looped``: the config's loop recipe (``train.loops``: random T per step, truncated backprop);
- ``single_loop``: the same model (same parameters, same init) trained at a fixed T = 1.

Each is then evaluated on the whole held-out split at the loop counts of ``--eval-loops`` plus
the looped model's training mean and 2x / 4x that mean, in **bits per byte** of the source text:
the sum of the token losses (nats) / ln 2 / the number of UTF-8 bytes the predicted tokens decode
to (byte-level BPE: each token is a fixed byte string; the end-of-document token is 0 bytes).
The looped model is also run with Huginn's per-token KL early exit at 4x its mean loops
(``--exit-thresholds``): held-out bits/byte and mean loops used per threshold, and greedy decoding
speed with and without the exit.  Writes ``loop_scaling.json`` (config, per-model bits/byte by
loop count, the exit study) and ``loop_scaling.png`` (bits/byte against loops, one line per
model) under ``--out``, and prints a table.  Extra arguments are config overrides applied to both
models (``train.loops.backprop_depth=4``...).  On this 2-core CPU, 600 steps of both models take
about 20-30 minutes on a quiet machine; use ``--steps 200`` to explore.  To train the two models in
parallel, run ``--models looped`` and ``--models single_loop`` in two processes (each with its own
``--out``) and merge them with ``--combine A/loop_scaling.json B/loop_scaling.json --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mythos_scale.config import Config, load_config
from mythos_scale.data.loader import build_val_loader
from mythos_scale.data.manifest import TOKENIZER_NAME, read_manifest
from mythos_scale.data.sources import resolve_dataset
from mythos_scale.data.tokenizer import load_tokenizer
from mythos_scale.eval.evaluate import EvalMode, evaluate
from mythos_scale.eval.generate import Sampling, generate
from mythos_scale.eval.text_bytes import token_byte_lengths
from mythos_scale.parallel import init_distributed
from mythos_scale.train.trainer import Trainer

SINGLE_LOOP = ["train.loops.sampler=fixed", "train.loops.mean=1", "train.loops.min=1", "train.loops.max=1",
               "train.loops.backprop_depth=1"]


def decode_speed(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, n_loops: int,
                 exit_threshold: float) -> dict[str, float]:
    """Greedy decoding through the KV cache: tokens/s and mean loops per decoded token."""
    out = generate(model, prompts, new_tokens, n_loops, Sampling(temperature=0.0), exit_threshold=exit_threshold)
    return {"exit_threshold": exit_threshold, "tokens_per_s": out.decode_tokens_per_s, "mean_loops": out.mean_loops}


def train(cfg: Config, layout) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    trainer = Trainer(cfg, layout)
    status = trainer.fit()
    if status != 0:
        raise RuntimeError(f"training {cfg.train.name} ended with status {status}")
    return trainer.model, time.perf_counter() - start


def exit_study(model: torch.nn.Module, batches: list, byte_lengths: torch.Tensor, n_loops: int,
               thresholds: list[float], eos_id: int) -> dict:
    """The KL early exit at ``n_loops``: held-out bits/byte and mean loops per threshold, and the
    decoding speed with and without it (4 held-out prompts of 32 tokens, 32 new tokens each)."""
    rows = []
    with tqdm(total=len(thresholds) * len(batches), desc="KL exit", unit="batch") as progress:
        for tau in thresholds:
            rows.append(evaluate(model, batches, n_loops, EvalMode(f"kl{tau:g}", exit_threshold=tau), byte_lengths,
                                 progress, eos_id))
    prompts = torch.cat([b[0] for b in batches])[:4, :32]
    speed = [decode_speed(model, prompts, 32, n_loops, tau) for tau in (0.0, *[t for t in thresholds if t > 0])]
    return {"loops": n_loops, "held_out": rows, "decode": speed}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, res in results["models"].items():
        loops = sorted(int(t) for t in res["eval"])
        ax.plot(loops, [res["eval"][str(t)]["bits_per_byte"] for t in loops], marker="o",
                label=f"{name} (trained at T {res['train_loops']})")
    mean = results["looped_training_mean"]
    ax.axvline(mean, color="grey", linestyle=":", linewidth=1)
    ax.annotate("training mean", (mean, ax.get_ylim()[1]), textcoords="offset points", xytext=(3, -12),
                fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["eval_loops"])
    ax.set_xticklabels([str(t) for t in results["eval_loops"]])
    ax.set_xlabel("loops at evaluation (T)")
    ax.set_ylabel("held-out bits / byte")
    ax.set_title(f"tiny_cpu, {results['steps']} steps x {results['tokens_per_step']} tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict, out: Path) -> None:
    """Write ``loop_scaling.json`` (with the target checks) and ``loop_scaling.png`` under ``out``; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    names, mean, eval_loops = list(results["models"]), results["looped_training_mean"], results["eval_loops"]
    print(f"\nheld-out bits/byte ({results['eval_sequences']} sequences, {results['eval_tokens']} tokens); "
          f"training mean T = {mean}")
    print("loops  " + "  ".join(f"{n:>12}" for n in names))
    for t in eval_loops:
        print(f"{t:>5}  " + "  ".join(f"{results['models'][n]['eval'][str(t)]['bits_per_byte']:12.4f}"
                                     if str(t) in results["models"][n]["eval"] else f"{'-':>12}" for n in names))
    if "looped" in results["models"]:
        ev = {int(t): r["bits_per_byte"] for t, r in results["models"]["looped"]["eval"].items()}
        checks = {"2x mean vs mean (%)": 100 * (ev[2 * mean] / ev[mean] - 1),
                  "4x mean vs mean (%)": 100 * (ev[4 * mean] / ev[mean] - 1)}
        if "single_loop" in results["models"]:
            checks["looped@mean vs single_loop@1 (%)"] = 100 * (
                ev[mean] / results["models"]["single_loop"]["eval"]["1"]["bits_per_byte"] - 1)
        results["checks"] = checks
        for k, v in checks.items():
            print(f"{k}: {v:+.2f}")
    (out / "loop_scaling.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "loop_scaling.png")
    kl = results["models"].get("looped", {}).get("kl_exit")
    if kl:
        print(f"\nKL early exit at T = {kl['loops']}: threshold, bits/byte, mean loops (held-out); decoding tokens/s")
        for row in kl["held_out"]:
            print(f"{row['exit_threshold']:>8g}  {row['bits_per_byte']:.4f}  {row['mean_loops']:.2f}")
        for row in kl["decode"]:
            print(f"decode {row['exit_threshold']:>8g}: {row['tokens_per_s']:.1f} tokens/s, {row['mean_loops']:.2f} loops")
    print(f"wrote {out / 'loop_scaling.json'} and {out / 'loop_scaling.png'}")


def combine(paths: list[Path]) -> dict:
    """One study from runs that each trained some of the models (``--models``), e.g. in parallel
    processes: same config, steps and held-out set; the training mean is the looped run's."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for run, path in zip(runs, paths):
        for key in ("config", "steps", "tokens_per_step", "eval_sequences"):
            if run[key] != first[key]:
                raise ValueError(f"{path} has {key} = {run[key]!r}, {paths[0]} has {first[key]!r}")
    looped = [r for r in runs if "looped" in r["models"]]
    results = dict(first, overrides=sorted({o for r in runs for o in r["overrides"]}),
                   looped_training_mean=(looped or runs)[0]["looped_training_mean"],
                   eval_loops=sorted({t for r in runs for t in r["eval_loops"]}),
                   models={name: res for r in sorted(runs, key=lambda r: "looped" not in r["models"])
                           for name, res in r["models"].items()})
    results.pop("checks", None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-loops", default="1,2,4,8,16")
    parser.add_argument("--eval-sequences", type=int, default=0, help="cap on held-out sequences (0: all)")
    parser.add_argument("--models", default="looped,single_loop", help="which of looped,single_loop to train")
    parser.add_argument("--exit-thresholds", default="0,1e-4,5e-4,2e-3",
                        help="KL early-exit thresholds tried on the looped model at 4x its mean loops ('' to skip)")
    parser.add_argument("--out", default="benchmarks/results/loop_scaling")
    parser.add_argument("--work-dir", help="run folders (default: a temporary folder, removed at the end)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the trainer's choice, all cores)")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="train nothing: merge the loop_scaling.json of runs that each trained some of the "
                             "models (--models, e.g. two processes in parallel) into one study under --out")
    parser.add_argument("overrides", nargs="*", help="config overrides for both models, e.g. train.lr=2e-3")
    args = parser.parse_args()
    if args.combine:
        try:
            results = combine(args.combine)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--combine: {err!r}" if isinstance(err, KeyError) else f"--combine: {err}")
        report(results, Path(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="loop_scaling-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", f"train.out_dir={work}",
              f"train.checkpoint.every={args.steps}", *args.overrides]
    configs = {"looped": load_config(args.config, [*common, "train.name=looped"]),
               "single_loop": load_config(args.config, [*common, *SINGLE_LOOP, "train.name=single_loop"])}
    configs = {name: configs[name] for name in args.models.split(",")}
    mean = configs.get("looped", next(iter(configs.values()))).train.loops.mean
    eval_loops = sorted({*map(int, args.eval_loops.split(",")), mean, 2 * mean, 4 * mean})

    layout = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = next(iter(configs.values()))
    dataset = resolve_dataset(first.data.sources[0].path, first.data.cache_dir, first.data.seq_len,
                              first.model.vocab_size)
    byte_lengths = token_byte_lengths(load_tokenizer(dataset / TOKENIZER_NAME).tokenizer, first.model.vocab_size)
    eos_id = read_manifest(dataset).eos_id  # document boundaries, for the document-masked attention
    val = build_val_loader(first.data, micro_batch_size=first.train.micro_batch_size, dp_rank=0, dp_world=1,
                           vocab_size=first.model.vocab_size)
    batches = list(val)
    if args.eval_sequences:
        batches = batches[: max(1, args.eval_sequences // first.train.micro_batch_size)]
    n_seq = sum(b[0].shape[0] for b in batches)

    results = {"config": args.config, "overrides": args.overrides, "steps": args.steps,
               "tokens_per_step": first.train.global_batch_size * first.data.seq_len,
               "eval_sequences": n_seq, "eval_tokens": n_seq * first.data.seq_len, "eval_loops": eval_loops,
               "looped_training_mean": mean, "threads": torch.get_num_threads(), "models": {}}
    for name, cfg in configs.items():
        model, seconds = train(cfg, layout)
        loops = cfg.train.loops
        res = {"train_loops": loops.mean if loops.sampler == "fixed" else
               f"~{loops.sampler}(mean {loops.mean}, {loops.min}..{loops.max}), k={loops.backprop_depth}",
               "train_seconds": seconds, "loops": loops.model_dump(), "eval": {}}
        with tqdm(total=len(eval_loops) * len(batches), desc=f"eval {name}", unit="batch") as progress:
            for t in eval_loops:
                res["eval"][str(t)] = evaluate(model, batches, t, EvalMode("loops"), byte_lengths, progress, eos_id)
        if name == "looped" and not cfg.model.act.enabled and args.exit_thresholds:
            res["kl_exit"] = exit_study(model, batches, byte_lengths, 4 * mean,
                                        [float(x) for x in args.exit_thresholds.split(",")], eos_id)
        results["models"][name] = res
        del model
    if not args.work_dir:
        shutil.rmtree(work)

    report(results, out)


if __name__ == "__main__":
    main()
