"""Reasoning probe: do more loops solve deeper problems than training showed?

    python benchmarks/reasoning_probe.py [--task p_hop] [--max-difficulty 3] [--steps 600]
                                         [--seeds 0,1] [--out benchmarks/results/reasoning_probe] [override ...]
    python benchmarks/reasoning_probe.py --quick --out /tmp/probe      a few steps, tiny data (the test suite)
    python benchmarks/reasoning_probe.py --combine A/reasoning_probe.json B/reasoning_probe.json --out DIR

Generates a synthetic reasoning dataset (:mod:`mythos_scale.data.synthetic`: train on difficulties
1..D, held-out items of each difficulty 1..2D) and trains on it, with the real trainer in this
process (as ``benchmarks/loop_scaling.py``), for the same steps and batch:

- ``looped``: the config's loop recipe (``train.loops``);
- ``single_loop``: the same model trained at a fixed T = 1;
- ``dense``: FLOP-matched, one loop through ``core_layers x loops.mean`` unique core layers.

Each is evaluated (exact-match accuracy of the answer, teacher-forced greedy) on every held-out
difficulty at test-time loops 1 .. 4x the looped model's training mean, and with the KL early
exit at 4x the mean (loops used at the answer, by difficulty).  Per seed and as mean +- spread
(population std over seeds).  Writes ``reasoning_probe.json`` and ``reasoning_probe.png`` (one
heat-map of difficulty x loops per model, seed mean) under ``--out`` and prints the tables.
Extra arguments are config overrides applied to all three models.  To train the models in
parallel, run ``--models looped,single_loop`` and ``--models dense`` in two processes (each with its
own ``--out``; the same seeds and data arguments) and merge them with ``--combine``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from loop_scaling import SINGLE_LOOP, combined_or_exit, train

from mythos_scale.config import load_config
from mythos_scale.data.synthetic import TASKS, write_synthetic_dataset
from mythos_scale.eval.reasoning import accuracy_table, difficulty_batches, format_accuracy, plot_accuracy_heatmaps
from mythos_scale.parallel import init_distributed

MODELS = ("looped", "single_loop", "dense")


def model_overrides(name: str, core_layers: int, mean_loops: int) -> list[str]:
    """The overrides that make ``name`` out of the config's looped model."""
    if name == "looped":
        return []
    if name == "single_loop":
        return SINGLE_LOOP
    return [*SINGLE_LOOP, f"model.core_layers={core_layers * mean_loops}"]


def summarize(per_seed: list[list[dict]]) -> list[dict]:
    """Rows of the first seed with ``accuracy`` / ``mean_loops`` the seed mean, plus ``*_std`` and the per-seed values."""
    rows = []
    for group in zip(*per_seed):
        row = dict(group[0])
        for key in ("accuracy", "mean_loops"):
            values = [r[key] for r in group]
            row.update({key: statistics.fmean(values), f"{key}_std": statistics.pstdev(values),
                        f"{key}_seeds": values})
        rows.append(row)
    return rows


def mean_accuracy(rows: list[dict], difficulties: range, loops: int, seed: int | None = None) -> float:
    """Mean over ``difficulties`` of the accuracy at ``loops`` (all loops run), for one seed or the mean."""
    values = [r["accuracy_seeds"][seed] if seed is not None else r["accuracy"] for r in rows
              if r["exit_threshold"] is None and r["loops"] == loops and r["difficulty"] in difficulties]
    return statistics.fmean(values)


def checks(results: dict) -> dict:
    """The issue's targets, each as per-seed values and mean +- spread."""
    D, E, mean = results["max_difficulty"], results["eval_max_difficulty"], results["looped_training_mean"]
    seen, beyond, seeds = range(1, D + 1), range(D + 1, E + 1), range(len(results["seeds"]))
    models = results["models"]
    out = {}

    def record(name: str, values: list[float]) -> None:
        out[name] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "seeds": values}

    if {"looped", "single_loop"} <= set(models):
        record("seen: looped@mean - single_loop@1 (accuracy)",
               [mean_accuracy(models["looped"]["rows"], seen, mean, s)
                - mean_accuracy(models["single_loop"]["rows"], seen, 1, s) for s in seeds])
    if "dense" in models and "looped" in models:
        record("seen: looped@mean - dense@1 (accuracy)",
               [mean_accuracy(models["looped"]["rows"], seen, mean, s)
                - mean_accuracy(models["dense"]["rows"], seen, 1, s) for s in seeds])
    trained = {"looped": mean, "single_loop": 1, "dense": 1}
    for name, res in models.items():
        if beyond:
            top = max(r["loops"] for r in res["rows"] if r["exit_threshold"] is None)
            record(f"beyond: {name}@{top} - {name}@{trained[name]} (accuracy)",
                   [mean_accuracy(res["rows"], beyond, top, s) - mean_accuracy(res["rows"], beyond, trained[name], s)
                    for s in seeds])
        exits = [r for r in res["rows"] if r["exit_threshold"] is not None]
        for tau in sorted({r["exit_threshold"] for r in exits}):
            mine = sorted((r for r in exits if r["exit_threshold"] == tau), key=lambda r: r["difficulty"])
            record(f"exit {tau:g}: {name} loops used at difficulty {mine[-1]['difficulty']} - at 1",
                   [mine[-1]["mean_loops_seeds"][s] - mine[0]["mean_loops_seeds"][s] for s in seeds])
    return out


def report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, res in results["models"].items():
        print(f"\n== {name} (trained at T {res['train_loops']}; seed mean of {len(results['seeds'])})")
        print(format_accuracy(res["rows"]))
    results["checks"] = checks(results)
    print("\ntargets (mean +- std over seeds; per seed):")
    for key, value in results["checks"].items():
        print(f"  {key}: {value['mean']:+.3f} +- {value['std']:.3f}  {[round(v, 3) for v in value['seeds']]}")
    (out / "reasoning_probe.json").write_text(json.dumps(results, indent=2))
    panels = {name: {(r["difficulty"], r["loops"]): r["accuracy"] for r in res["rows"] if r["exit_threshold"] is None}
              for name, res in results["models"].items()}
    plot_accuracy_heatmaps(panels, out / "reasoning_probe.png",
                           f"{results['task']}: exact match, trained on difficulty 1..{results['max_difficulty']} "
                           f"(red line), {results['steps']} steps, seeds {results['seeds']}",
                           trained_max=results["max_difficulty"])
    print(f"wrote {out / 'reasoning_probe.json'} and {out / 'reasoning_probe.png'}")


# What runs merged by --combine must share: the same items, training and evaluation.
COMBINE_KEYS = ("config", "overrides", "task", "steps", "max_difficulty", "eval_max_difficulty", "n_train",
                "n_val_per_difficulty", "seq_len", "tokens_per_step", "seeds", "looped_training_mean", "eval_loops")


def combine(paths: list[Path]) -> dict:
    """One probe from runs that each trained some of the models (``--models``), e.g. in parallel processes."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    results = dict(runs[0], models={})
    results.pop("checks", None)
    for run, path in zip(runs, paths):
        for key in COMBINE_KEYS:
            if run[key] != results[key]:
                raise ValueError(f"{path} has {key} = {run[key]!r}, {paths[0]} has {results[key]!r}")
        for name, res in run["models"].items():
            if name in results["models"]:
                raise ValueError(f"{path}: model {name} is in more than one of the runs")
            results["models"][name] = res
    results["models"] = {name: results["models"][name] for name in MODELS if name in results["models"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--task", default="p_hop", choices=TASKS)
    parser.add_argument("--max-difficulty", type=int, default=3, help="D: trained on 1..D, evaluated on 1..2D")
    parser.add_argument("--n-train", type=int, default=30000)
    parser.add_argument("--n-val", type=int, default=200, help="held-out items per difficulty")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", default="0,1", help="training seeds (init, loop draws, data order)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--exit-thresholds", default="5e-4,1e-2", help="KL exit thresholds at 4x the mean ('' for none)")
    parser.add_argument("--out", default="benchmarks/results/reasoning_probe")
    parser.add_argument("--work-dir", help="dataset and run folders (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="4 steps on tiny data, 2 difficulties: a smoke test")
    parser.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                        help="train nothing: merge the reasoning_probe.json of runs that each trained some of the "
                             "models (--models) into one probe under --out")
    parser.add_argument("overrides", nargs="*", help="config overrides for all models, e.g. train.lr=2e-3")
    args = parser.parse_args()
    if args.combine:
        report(combined_or_exit(parser, combine, args.combine), Path(args.out))
        return
    if args.quick:
        args.max_difficulty, args.n_train, args.n_val, args.steps, args.seeds = 1, 64, 4, 4, "0"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="reasoning_probe-"))
    manifest = write_synthetic_dataset(args.task, work / "data", n_train=args.n_train, n_val=args.n_val,
                                       max_difficulty=args.max_difficulty, seed=1000, overwrite=True)
    seq_len, seeds = manifest.seq_len, [int(s) for s in args.seeds.split(",")]
    base = load_config(args.config, args.overrides)
    mean, core = base.train.loops.mean, base.model.core_layers
    eval_loops = sorted({1, 2, mean, 2 * mean, 4 * mean} if not args.quick else {1, mean})
    thresholds = [float(x) for x in args.exit_thresholds.split(",") if x.strip()]
    common = [f"data.sources=[{{path: {json.dumps(str(work / 'data'))}}}]", f"data.seq_len={seq_len}",
              f"model.max_seq_len={seq_len}", f"model.vocab_size={manifest.vocab_size}",
              f"train.max_steps={args.steps}", "train.eval_every=0", f"train.out_dir={work}",
              f"train.checkpoint.every={args.steps}", f"train.warmup_steps={min(base.train.warmup_steps, args.steps)}",
              *args.overrides]

    layout = init_distributed()
    torch.set_num_threads(args.threads)
    first = load_config(args.config, common)
    batches = difficulty_batches(str(work / "data"), first.data, first.model.vocab_size, first.train.micro_batch_size)
    results = {"config": args.config, "overrides": args.overrides, "task": args.task, "steps": args.steps,
               "max_difficulty": args.max_difficulty, "eval_max_difficulty": manifest.inputs["eval_max_difficulty"],
               "n_train": args.n_train, "n_val_per_difficulty": args.n_val, "seq_len": seq_len,
               "tokens_per_step": first.train.global_batch_size * seq_len, "seeds": seeds,
               "looped_training_mean": mean, "eval_loops": eval_loops, "models": {}}
    for name in args.models.split(","):
        per_seed, seconds = [], []
        for seed in seeds:
            cfg = load_config(args.config, [*common, *model_overrides(name, core, mean), f"train.seed={seed}",
                                            f"data.shuffle_seed={seed}", f"train.name={name}_s{seed}"])
            model, took = train(cfg, layout)
            seconds.append(took)
            per_seed.append(accuracy_table(batches, model, eval_loops,
                                           thresholds if not cfg.model.act.enabled else [], desc=f"{name} s{seed}"))
            del model
        loops = cfg.train.loops
        results["models"][name] = {
            "train_loops": loops.mean if loops.sampler == "fixed" else
            f"~{loops.sampler}(mean {loops.mean}, {loops.min}..{loops.max}), k={loops.backprop_depth}",
            "core_layers": cfg.model.core_layers, "train_seconds": seconds, "rows": summarize(per_seed)}
    if not args.work_dir:
        shutil.rmtree(work)
    report(results, Path(args.out))


if __name__ == "__main__":
    main()
