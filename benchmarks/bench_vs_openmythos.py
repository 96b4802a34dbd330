"""Forward+backward tokens/s of this model against the public OpenMythos model, side by side.

    python benchmarks/bench_vs_openmythos.py --openmythos /path/to/OpenMythos/open_mythos/main.py
    python benchmarks/bench_vs_openmythos.py                  # our figures alone (shapes printed)

Both models are built at the same shapes (the ``SHAPES`` below: d512, MLA, 16 routed experts
top-2, one looped core block, T=4 loops, batch 4 x 256 tokens), fp32, and timed in the same
process, alternating one step of each so that load from other processes hits both alike.  A
step is forward, cross-entropy on the logits, backward through all T loops (no truncation,
no activation checkpointing: OpenMythos has neither) and ``zero_grad``; no optimizer.
OpenMythos's ACT early exit is disabled (``act_threshold`` above 1) so both run exactly T loops.

OpenMythos (kyegomez/OpenMythos) is not a dependency: pass the path of its
``open_mythos/main.py`` from a checkout.  ``--profile`` prints the top ops of our step by
self CPU time (torch.profiler).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mythos_scale.config import config_from_dict
from mythos_scale.model import build_model

# OpenMythos's README example (vocab 1000, 8 heads, MLA ranks 64 / 32, head dims 16, 1 prelude and
# 1 coda block, LoRA rank 8, top-2) at dim 512 with 16 experts, its fine-grained expert width
# dim // (n_experts // top_k) = 64, T = 4 loops, 4 sequences of 256 tokens.
SHAPES = dict(vocab_size=1000, dim=512, n_heads=8, prelude_layers=1, coda_layers=1, loops=4,
              q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
              n_experts=16, top_k=2, expert_dim=64, lora_rank=8, batch=4, seq_len=256)


def ours(kernels: str) -> torch.nn.Module:
    """This project's model at SHAPES: the shared expert's width equals OpenMythos's
    (``expert_dim * top_k``), the dense FFN too (``dim * 4 // 3``)."""
    s = SHAPES
    cfg = config_from_dict({"model": {
        "vocab_size": s["vocab_size"], "dim": s["dim"], "n_heads": s["n_heads"],
        "prelude_layers": s["prelude_layers"], "core_layers": 1, "coda_layers": s["coda_layers"],
        "max_loops": max(8, s["loops"]), "max_seq_len": s["seq_len"], "dense_ffn_hidden": s["dim"] * 4 // 3,
        "lora_rank": s["lora_rank"], "activation_checkpointing": False, "kernels": kernels,
        "attention": {"type": "mla", "q_lora_rank": s["q_lora_rank"], "kv_lora_rank": s["kv_lora_rank"],
                      "qk_rope_head_dim": s["qk_rope_head_dim"], "qk_nope_head_dim": s["qk_nope_head_dim"],
                      "v_head_dim": s["v_head_dim"]},
        "moe": {"n_routed_experts": s["n_experts"], "top_k": s["top_k"], "expert_hidden": s["expert_dim"],
                "n_shared_experts": s["top_k"]},
    }}).model
    return build_model(cfg, seed=0).train()


def openmythos(main_py: str) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("openmythos_main", main_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s = SHAPES
    cfg = module.MythosConfig(
        vocab_size=s["vocab_size"], dim=s["dim"], n_heads=s["n_heads"], n_kv_heads=s["n_heads"],
        max_seq_len=s["seq_len"], max_loop_iters=s["loops"], prelude_layers=s["prelude_layers"],
        coda_layers=s["coda_layers"], attn_type="mla", kv_lora_rank=s["kv_lora_rank"],
        q_lora_rank=s["q_lora_rank"], qk_rope_head_dim=s["qk_rope_head_dim"],
        qk_nope_head_dim=s["qk_nope_head_dim"], v_head_dim=s["v_head_dim"], n_experts=s["n_experts"],
        n_shared_experts=1, n_experts_per_tok=s["top_k"], expert_dim=s["expert_dim"],
        lora_rank=s["lora_rank"], act_threshold=2.0)  # never halts: exactly T loops
    torch.manual_seed(0)
    return module.OpenMythos(cfg).train()


def step_fn(model: torch.nn.Module, is_ours: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    loops = SHAPES["loops"]

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if is_ours:
            out = model(inputs, n_loops=loops)
            logits, extra = out.logits, out.moe_aux_loss + out.ponder_cost
        else:
            logits, extra = model(inputs, n_loops=loops), 0.0
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + extra
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def profile_table(step: Callable, inputs: torch.Tensor, targets: torch.Tensor, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(inputs, targets)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openmythos", help="path of OpenMythos's open_mythos/main.py")
    parser.add_argument("--kernels", choices=["auto", "fused", "reference"], default="auto")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print the top ROWS ops of one step of ours (and of OpenMythos's)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.kernels == "fused":
        from mythos_scale.kernels.build import load_extension

        load_extension()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPES["vocab_size"], (SHAPES["batch"], SHAPES["seq_len"] + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    models = {"mythos_scale": step_fn(ours(args.kernels), True)}
    if args.openmythos:
        models["openmythos"] = step_fn(openmythos(args.openmythos), False)

    for step in models.values():
        for _ in range(args.warmup):
            step(inputs, targets)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.steps):  # alternate, so that background load hits both alike
        for name, step in models.items():
            start = time.perf_counter()
            step(inputs, targets)
            seconds[name].append(time.perf_counter() - start)

    tokens_per_step = SHAPES["batch"] * SHAPES["seq_len"]
    result: dict = {"shapes": SHAPES, "threads": args.threads, "kernels": args.kernels, "models": {}}
    print("shapes: " + ", ".join(f"{k}={v}" for k, v in SHAPES.items()) + f"; fp32, {args.threads} threads")
    for name, times in seconds.items():
        median, best = statistics.median(times), min(times)
        result["models"][name] = {"median_step_s": median, "best_step_s": best,
                                  "tokens_per_s": tokens_per_step / median}
        print(f"{name:>13}: {tokens_per_step / median:9.0f} tokens/s  (median step {median * 1e3:.1f} ms, "
              f"best {best * 1e3:.1f} ms, of {len(times)})")
    if "openmythos" in result["models"]:
        ratio = result["models"]["openmythos"]["median_step_s"] / result["models"]["mythos_scale"]["median_step_s"]
        result["speedup_vs_openmythos"] = ratio
        print(f"      speedup: {ratio:.2f}x OpenMythos")
    if args.profile:
        for name, step in models.items():
            print(f"\n--- {name}: one step, top {args.profile} ops by self CPU time")
            print(profile_table(step, inputs, targets, args.profile))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
