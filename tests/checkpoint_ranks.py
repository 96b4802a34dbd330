"""Ranks that tests/test_checkpoint.py starts as separate processes (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT set by it):

    python tests/checkpoint_ranks.py sharded FOLDER ZERO_STAGE
        real DeepSpeed engines on gloo: a hand-sharded tensor-parallel model (TP=2, as the
        parallelize pass marks it: ``param.mythos_shard``) takes an AdamW step and is saved; the
        checkpoint is resumed at DP=2 (whole parameters), which steps and saves again; that one
        is resumed at TP=2.  After each load the master weights and Adam moments are compared
        with AdamW run on the logical tensors.
    python tests/checkpoint_ranks.py stale-view TAG_DIR SECONDS TRAIN_ARGS...
        one trainer rank whose view of the checkpoint folder lacks TAG_DIR: directory listings
        never show it, and looking it up finds nothing for SECONDS after the first try (the delayed
        visibility of a shared file system, simulated in this process only).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHAPES = {"col": ((8, 6), 0), "row": ((6, 8), 1), "norm": ((6,), None)}  # logical shape, TP-split dim
LR, WD = 0.01, 0.1


def logical_values() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Initial weights and the gradients of two steps, by parameter name."""
    gen = torch.Generator().manual_seed(7)
    init = {f"{n}.weight": torch.randn(shape, generator=gen) for n, (shape, _) in SHAPES.items()}
    grads = [{name: torch.randn(w.shape, generator=gen) for name, w in init.items()} for _ in range(2)]
    return init, grads


def reference(steps: int) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW on the logical tensors: weights and moments after ``steps`` steps."""
    init, grads = logical_values()
    params = {name: nn.Parameter(w.clone()) for name, w in init.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR, weight_decay=WD)
    for g in grads[:steps]:
        for name, p in params.items():
            p.grad = g[name].clone()
        opt.step()
    return {name: {"master": p.detach(), **{k: opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")}}
            for name, p in params.items()}


def local_slice(name: str, tensor: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    dim = SHAPES[name.split(".")[0]][1]
    if dim is None or tp == 1:
        return tensor
    n = tensor.shape[dim] // tp
    return tensor.narrow(dim, tp_rank * n, n)


class HandSharded(nn.Module):
    """col (column-parallel, split on dim 0), row (row-parallel, split on dim 1), norm (replicated)."""

    def __init__(self, tp_rank: int, tp: int):
        super().__init__()
        from mythos_scale.parallel.shard import ShardSpec

        init, _ = logical_values()
        for module, (shape, dim) in SHAPES.items():
            name = f"{module}.weight"
            param = nn.Parameter(local_slice(name, init[name], tp_rank, tp).clone())
            if dim is not None and tp > 1:
                param.mythos_shard = ShardSpec(dim, shape, tp_rank * param.shape[dim], "tp")
            self.add_module(module, nn.Module())
            getattr(self, module).weight = param


class TensorParallelMPU:
    """What DeepSpeed's ``mpu`` argument reads: ``get_<kind>_group`` / ``_rank`` / ``_world_size``
    for the TP group (kinds ``model_parallel``, ``tensor_model_parallel``) and the data-parallel
    group (``data_parallel``)."""

    def __init__(self, tp_group, dp_group):
        for kind, group in (("model_parallel", tp_group), ("tensor_model_parallel", tp_group),
                            ("data_parallel", dp_group)):
            setattr(self, f"get_{kind}_group", lambda g=group: g)
            setattr(self, f"get_{kind}_rank", lambda g=group: dist.get_rank(g))
            setattr(self, f"get_{kind}_world_size", lambda g=group: dist.get_world_size(g))


def sharded(folder: Path, zero_stage: int) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from mythos_scale.checkpoint import Checkpointer
    from mythos_scale.config import config_from_dict
    from mythos_scale.parallel import ParallelLayout
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()  # as the trainer does: no minute of JIT compiling on a fresh machine
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    everyone = dist.new_group(list(range(world)))
    alone = [dist.new_group([r]) for r in range(world)]
    # DeepSpeed keeps the last mpu it was given for later engines: give every engine its own
    mpus = {2: TensorParallelMPU(tp_group=everyone, dp_group=alone[rank]),  # TP=2, DP=1
            1: TensorParallelMPU(tp_group=alone[rank], dp_group=everyone)}  # TP=1, DP=2
    cfg = config_from_dict({"train": {"zero_stage": zero_stage}})
    _, grads = logical_values()

    def engine_for(tp: int):
        model = HandSharded(rank % tp, tp)
        layout = ParallelLayout(rank=rank, world_size=world, local_rank=rank, tp=tp, ep=1, device=torch.device("cpu"))
        ds = {"train_batch_size": layout.dp, "train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 1 << 30}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR,
                                                                                    weight_decay=WD),
                                          config=ds, mpu=mpus[tp])
        return engine, layout

    def step(engine, layout, g) -> None:
        loss = sum((p * local_slice(n, g[n], layout.rank % layout.tp, layout.tp)).sum()
                   for n, p in engine.module.named_parameters())
        engine.backward(loss)
        engine.step()

    def check(engine, layout, steps: int) -> None:
        expected = reference(steps)
        for name, p in engine.module.named_parameters():
            want = {k: local_slice(name, v, layout.rank % layout.tp, layout.tp) for k, v in expected[name].items()}
            torch.testing.assert_close(safe_get_full_fp32_param(p), want["master"], msg=f"{name} master")
            torch.testing.assert_close(p.detach(), want["master"], msg=f"{name} module weight")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(safe_get_full_optimizer_state(p, key), want[key], msg=f"{name} {key}")

    def step_and_save(engine, layout, steps: int, run: str) -> None:
        step(engine, layout, grads[steps - 1])
        check(engine, layout, steps)
        saver = Checkpointer(folder / run, cfg, layout)
        saver.save(engine, steps, {"tokens_seen": steps})
        saver.commit()
        saver.close()

    step_and_save(*engine_for(tp=2), 1, "tp2")  # TP=2: step 1, save
    engine, layout = engine_for(tp=1)  # DP=2: resume, step 2, save
    Checkpointer(folder / "dp2", cfg, layout).load(engine, folder / "tp2" / "checkpoints" / "step_00000001")
    check(engine, layout, 1)
    step_and_save(engine, layout, 2, "dp2")

    engine, layout = engine_for(tp=2)  # TP=2 again: resume
    Checkpointer(folder / "tp2_again", cfg, layout).load(engine, folder / "dp2" / "checkpoints" / "step_00000002")
    check(engine, layout, 2)
    dist.barrier()
    print(f"rank {rank}: all checks passed", flush=True)


def stale_view(hidden: Path, seconds: float, train_args: list[str]) -> int:
    hidden = hidden.resolve()
    invisible_until = []  # the clock starts at the first look-up (after the imports, which take longer)
    real_scandir, real_listdir, real_stat = os.scandir, os.listdir, os.stat

    def absolute(path) -> Path:
        """The path made absolute without touching the file system (``resolve`` calls ``stat``)."""
        return Path(os.path.normpath(os.path.abspath(os.fspath(path))))

    class _Listing:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            return (e for e in self.inner if absolute(e.path) != hidden)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def close(self):
            self.inner.close()

    def scandir(path="."):
        return _Listing(real_scandir(path))

    def listdir(path="."):
        return [n for n in real_listdir(path) if absolute(os.path.join(path, n)) != hidden]

    def stat(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)):
            target = absolute(path)
            if target == hidden or hidden in target.parents:
                invisible_until[:] = invisible_until or [time.monotonic() + seconds]
                if time.monotonic() < invisible_until[0]:
                    raise FileNotFoundError(2, "No such file or directory (not visible here yet)", str(path))
        return real_stat(path, *args, **kwargs)

    os.scandir, os.listdir, os.stat = scandir, listdir, stat
    print(f"stale view: {hidden.parent.name} lists {sorted(os.listdir(hidden.parent))}", flush=True)
    from mythos_scale.train.train_cli import main

    return main(train_args)


if __name__ == "__main__":
    if sys.argv[1] == "sharded":
        sharded(Path(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "stale-view":
        sys.exit(stale_view(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]))
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
