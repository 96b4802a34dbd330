"""Loop-scaling study: do more loops give better predictions on held-out text?

    python benchmarks/loop_scaling.py [--steps 600] [--out benchmarks/results/loop_scaling]
                                      [--eval-loops 1,2,4,8,16] [override ...]

Trains two models of ``configs/tiny_cpu.yaml`` with the real trainer (in this process: the
DeepSpeed engine, the loop sampler, the training loss, the data loader of ``mythos train``), on
the embedded corpus's training split, for the same number of steps and the same batch:

- ``looped``: the config's loop recipe (``train.loops``: random T per step, truncated backprop);
- ``single_loop``: the same model (same parameters, same init) trained at a fixed T = 1;
- ``dense``: the FLOP-matched dense model: the same model with ``core_layers x`` the looped
  model's training mean unique core layers (:func:`dense_overrides`), trained and evaluated at one loop.

``--seeds 0,1`` trains each model once per seed (``train.seed``: init and loop draws;
``data.shuffle_seed``: data order) and reports the mean and the spread (max - min) per cell.
After training, the looped model's per-iteration statistics on held-out batches
(:func:`iteration_study`): ``core_change``, the state's relative distance to its fixed point
``||h_t - h_ref|| / ||h_ref||`` (``h_ref``: the state after ``--fixed-point-loops`` iterations),
``update_norm``, ``h_norm``, and the routing entropy per iteration (mean per-token entropy of the
normalized router scores; ``route_overlap``: the fraction of top-k experts a token shares with its
previous iteration).  ``--tag`` names a variant (``looped+window``): the models of the run are
reported under ``name+tag``, so variants and seeds run in separate processes merge with ``--combine``.

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
from collections.abc import Callable
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
MODELS = ("looped", "single_loop", "dense")


def dense_overrides(cfg: Config) -> list[str]:
    """Config overrides turning ``cfg``'s looped model into the FLOP-matched dense model: one loop
    over ``core_layers x train.loops.mean`` unique core layers (everything else shared).
    ``max_loops = 1`` gives it no unused per-depth tables and the init of its real depth."""
    return [*SINGLE_LOOP, f"model.core_layers={cfg.model.core_layers * cfg.train.loops.mean}", "model.max_loops=1"]


def seed_overrides(seed: int, base: Config) -> list[str]:
    """Seed ``seed``: a different init and loop draws (``train.seed``) and data order (``data.shuffle_seed``)."""
    return [f"train.seed={base.train.seed + seed}", f"data.shuffle_seed={base.data.shuffle_seed + seed}"]


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def iteration_study(model: torch.nn.Module, batches: list, n_loops: int, reference_loops: int,
                    eos_id: int | None = None) -> dict[str, list]:
    """Per-iteration statistics of one forward at ``reference_loops`` iterations over ``batches``,
    the first ``n_loops`` reported (see the module docstring): the model's own ``stats`` plus the
    distance to the fixed point and the routing entropy, read by hooks on the last core block
    (its output is the state h_{t+1}) and on each MoE (its input and loop index)."""
    from mythos_scale.model.moe import MoE

    model.eval()
    states: list[torch.Tensor] = []
    routing: dict[int, list] = {}  # iteration -> [(entropy sum, overlap sum, tokens)] per MoE layer
    previous: dict[int, torch.Tensor] = {}

    def route_hook(layer: int):
        def hook(module: MoE, args: tuple) -> None:
            x, loop = args
            scores, chosen, _ = module.route(x.reshape(-1, x.shape[-1]), loop)
            probs = scores / scores.sum(-1, keepdim=True)
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
            overlap = (chosen & previous[layer]).sum(-1).float() / module.top_k if loop > 0 else torch.ones(1)
            previous[layer] = chosen
            routing.setdefault(loop, []).append((_entropy(probs).mean(), overlap.mean()))
        return hook

    moes = [b.ffn for b in model.core if isinstance(b.ffn, MoE)]
    hooks = [m.register_forward_pre_hook(route_hook(i)) for i, m in enumerate(moes)]
    hooks.append(model.core[-1].register_forward_hook(lambda mod, args, out: states.append(out[0].float())))
    totals: dict[str, torch.Tensor] = {}
    distance = torch.zeros(n_loops)
    try:
        for inputs, _ in batches:
            states.clear()
            out = model(inputs, n_loops=reference_loops, eos_id=eos_id)
            for key in ("core_change", "update_norm", "h_norm", "state_to_input"):
                totals[key] = totals.get(key, 0) + out.stats[key][:n_loops]
            ref = states[-1]
            distance += torch.stack([((h - ref).norm(dim=-1) / ref.norm(dim=-1)).mean() for h in states[:n_loops]])
    finally:
        for h in hooks:
            h.remove()
    result = {k: (v / len(batches)).tolist() for k, v in totals.items()}
    result["fixed_point_distance"] = (distance / len(batches)).tolist()
    rows = [routing[t] for t in range(n_loops)] if moes else []
    result["routing_entropy"] = [float(torch.stack([e for e, _ in r]).mean()) for r in rows]
    result["route_overlap"] = [float(torch.stack([o for _, o in r]).mean()) for r in rows]
    result["reference_loops"] = reference_loops
    return result


def summarize(runs: dict[str, dict]) -> dict[str, dict]:
    """Per loop count: bits/byte mean over the seeds' runs, spread (max - min) and the values."""
    loops = sorted({t for r in runs.values() for t in r["eval"]}, key=int)
    out = {}
    for t in loops:
        values = [r["eval"][t]["bits_per_byte"] for r in runs.values() if t in r["eval"]]
        out[t] = {"bits_per_byte": sum(values) / len(values), "spread": max(values) - min(values),
                  "seeds": len(values), "values": values}
    return out


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
        y = [res["eval"][str(t)]["bits_per_byte"] for t in loops]
        err = [res["eval"][str(t)].get("spread", 0) / 2 for t in loops]
        if len(loops) == 1:  # the dense model: one loop, drawn across the axis
            ax.axhline(y[0], linestyle="--", linewidth=1, color="black",
                       label=f"{name} (T 1, {res['eval'][str(loops[0])].get('seeds', 1)} seeds)")
            continue
        ax.errorbar(loops, y, yerr=err, marker="o", capsize=3,
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
    width = max(20, *map(len, names))

    def cell(name: str, t: int) -> str:
        row = results["models"][name]["eval"].get(str(t))
        text = "-" if row is None else f"{row['bits_per_byte']:.4f} ±{row.get('spread', 0) / 2:.4f}"
        return f"{text:>{width}}"

    print("(mean ± half the spread over seeds)")
    print("loops  " + "  ".join(f"{n:>{width}}" for n in names))
    for t in eval_loops:
        print(f"{t:>5}  " + "  ".join(cell(n, t) for n in names))
    checks, paired = {}, {}
    models = results["models"]

    def bpb(name: str, seed: str, t: int) -> float | None:
        row = models[name]["runs"].get(seed, {}).get("eval", {}).get(str(t))
        return None if row is None else row["bits_per_byte"]

    def compare(label: str, a: tuple[str, int], b: tuple[str, int]) -> None:
        """Relative difference (%) of the seed means, and per seed where both ran it (same init and data)."""
        ea, eb = models[a[0]]["eval"].get(str(a[1])), models[b[0]]["eval"].get(str(b[1]))
        if ea is None or eb is None:
            return
        checks[label] = 100 * (ea["bits_per_byte"] / eb["bits_per_byte"] - 1)
        paired[label] = {seed: 100 * (bpb(a[0], seed, a[1]) / bpb(b[0], seed, b[1]) - 1)
                         for seed in models[a[0]]["runs"] if bpb(a[0], seed, a[1]) and bpb(b[0], seed, b[1])}

    for name in names:
        if not name.startswith("looped"):
            continue
        compare(f"{name}: 2x mean vs mean (%)", (name, 2 * mean), (name, mean))
        compare(f"{name}: 4x mean vs mean (%)", (name, 4 * mean), (name, mean))
        for base in ("single_loop", "dense", "looped"):
            if base in models and base != name:
                t = mean if base == "looped" else 1
                compare(f"{name}@mean vs {base}@{t} (%)", (name, mean), (base, t))
    results["checks"], results["checks_per_seed"] = checks, paired
    for k, v in checks.items():
        print(f"{k}: {v:+.2f}  (per seed: " + ", ".join(f"{s}: {d:+.2f}" for s, d in paired[k].items()) + ")")
    for name, res in results["models"].items():
        for seed, run in res["runs"].items():
            it = run.get("iterations")
            if it:
                print(f"\n{name} seed {seed}: per iteration (reference state after {it['reference_loops']} loops)")
                for key in ("fixed_point_distance", "core_change", "update_norm", "routing_entropy", "route_overlap"):
                    print(f"  {key:>20}: " + " ".join(f"{v:.3f}" for v in it[key]))
    (out / "loop_scaling.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "loop_scaling.png")
    kl = next((r.get("kl_exit") for r in results["models"].get("looped", {}).get("runs", {}).values()), None)
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
    models: dict[str, dict] = {}
    for run, path in sorted(zip(runs, paths), key=lambda rp: "looped" not in rp[0]["models"]):
        for name, res in run["models"].items():
            # a run of the study before --seeds held one seed's results at the top level
            seeds = res.get("runs") or {"0": {k: v for k, v in res.items() if k in ("eval", "train_seconds", "kl_exit")}}
            merged = models.setdefault(name, {k: v for k, v in res.items() if k not in ("runs", "eval")} | {"runs": {}})
            for seed, seed_run in seeds.items():
                if seed in merged["runs"]:
                    raise ValueError(f"{path}: {name} seed {seed} is in more than one of the runs")
                merged["runs"][seed] = seed_run
    for res in models.values():
        res["eval"] = summarize(res["runs"])
    results = dict(first, overrides=sorted({o for r in runs for o in r["overrides"]}),
                   looped_training_mean=(looped or runs)[0]["looped_training_mean"],
                   eval_loops=sorted({t for r in runs for t in r["eval_loops"]}), models=models)
    results.pop("checks", None)
    return results


def combined_or_exit(parser: argparse.ArgumentParser, combine_runs: Callable[[list[Path]], dict],
                     paths: list[Path]) -> dict:
    """``combine_runs(paths)``, or exit 2 with the parser's usage and what did not match (``--combine``)."""
    try:
        return combine_runs(paths)
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"--combine: {err!r}" if isinstance(err, KeyError) else f"--combine: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-loops", default="1,2,4,8,16")
    parser.add_argument("--eval-sequences", type=int, default=0, help="cap on held-out sequences (0: all)")
    parser.add_argument("--models", default="looped,single_loop,dense", help="which of looped,single_loop,dense to train")
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0,1: each model is trained once per seed")
    parser.add_argument("--tag", default="", help="variant name: the models are reported as NAME+TAG")
    parser.add_argument("--stats-batches", type=int, default=2,
                        help="held-out batches for the looped model's per-iteration statistics (0: skip)")
    parser.add_argument("--fixed-point-loops", type=int, default=32,
                        help="iterations of the reference state h_ref the fixed-point distance is measured to")
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
        report(combined_or_exit(parser, combine, args.combine), Path(args.out))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="loop_scaling-"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.max_steps={args.steps}", "train.eval_every=0", f"train.out_dir={work}",
              f"train.checkpoint.every={args.steps}", *args.overrides]
    base = load_config(args.config, common)
    model_overrides = {"looped": [], "single_loop": SINGLE_LOOP, "dense": dense_overrides(base)}
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {MODELS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = {(name, seed): load_config(args.config, [*common, *model_overrides[name], *seed_overrides(seed, base),
                                                        f"train.name={name}{args.tag}-seed{seed}"])
               for name in args.models.split(",") for seed in seeds}
    mean = base.train.loops.mean
    eval_loops = sorted({*map(int, args.eval_loops.split(",")), mean, 2 * mean, 4 * mean})

    layout = init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    first = base
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
    for (name, seed), cfg in configs.items():
        model, seconds = train(cfg, layout)
        loops = cfg.train.loops
        res = results["models"].setdefault(name + args.tag, {
            "train_loops": loops.mean if loops.sampler == "fixed" else
            f"~{loops.sampler}(mean {loops.mean}, {loops.min}..{loops.max}), k={loops.backprop_depth}",
            "loops": loops.model_dump(), "core_layers": cfg.model.core_layers, "model_overrides": model_overrides[name],
            "runs": {}})
        run = res["runs"][str(seed)] = {"train_seconds": seconds, "eval": {}}
        model_loops = [1] if name == "dense" else eval_loops
        with tqdm(total=len(model_loops) * len(batches), desc=f"eval {name} seed {seed}", unit="batch") as progress:
            for t in model_loops:
                run["eval"][str(t)] = evaluate(model, batches, t, EvalMode("loops"), byte_lengths, progress, eos_id)
        if name == "looped" and args.stats_batches:
            run["iterations"] = iteration_study(model, batches[: args.stats_batches], 4 * mean, args.fixed_point_loops,
                                                eos_id)
        if name == "looped" and not cfg.model.act.enabled and args.exit_thresholds:
            run["kl_exit"] = exit_study(model, batches, byte_lengths, 4 * mean,
                                        [float(x) for x in args.exit_thresholds.split(",")], eos_id)
        res["eval"] = summarize(res["runs"])
        del model
    if not args.work_dir:
        shutil.rmtree(work)

    report(results, out)


if __name__ == "__main__":
    main()
