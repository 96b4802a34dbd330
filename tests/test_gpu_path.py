"""The GPU path without a GPU: the 770M config in bf16 on fake CUDA tensors, at seq 4096.

Fake tensors (``torch._subclasses.FakeTensorMode``) carry shapes, dtypes and devices but no data,
so a forward runs here and raises on what would break the first real GPU step: a CPU tensor
mixed into a CUDA op, and a data-dependent host sync (``.tolist()``, ``.item()``, ``bincount``).
:class:`GpuPathChecks` adds what fake tensors alone do not refuse: a collective on a tensor
whose device has no backend in the process group (NCCL has no CPU backend: reproduced with a
real ``cuda:gloo`` group), and an accumulating scatter in the forward (CUDA atomics make its sum
order, and so an activation-checkpointing recompute, non-deterministic).

The autograd engine needs a CUDA context to run a backward on CUDA tensors, so the backward is
traced (``make_fx``) on the meta device, where the model takes the same path (grouped GEMMs,
reference ops) and data-dependent syncs and CPU tensors raise as well.

Each check is shown to fire (adversarially) on the defects the first GPU review found: a host
sync in the MoE forward, a CPU tensor in a collective, a CPU tensor mixed in, a scatter-add
combine.  The tensor- and expert-parallel paths are checked the same way (their collectives on
the device; EP's one host sync per MoE call is where it is said to be).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _resolve_process_group as resolve_process_group
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mythos_scale.checkpoint import Checkpointer
from mythos_scale.config import load_config
from mythos_scale.kernels import reference
from mythos_scale.model import MythosModel, update_balance_bias
from mythos_scale.parallel import sum_over_ranks
from mythos_scale.parallel.compile import compile_blocks, graph_breaks
from mythos_scale.parallel.distributed import LaunchError, ParallelLayout, cuda_device
from mythos_scale.train.lm_loss import lm_head_loss
from mythos_scale.train.trainer import Trainer

from conftest import REPO, TINY_TRAIN, free_port, subprocess_env

CONFIG = REPO / "configs" / "mythos_770m.yaml"
wait_tensor_op = torch.ops._c10d_functional.wait_tensor.default
SEQ = 4096
aten = torch.ops.aten

# Ops that add into a destination at indices: on CUDA, atomics in arbitrary order.
ACCUMULATING = {aten.index_add.default, aten.index_add_.default, aten.scatter_add.default,
                aten.scatter_add_.default, aten.scatter_reduce.two, aten.scatter_reduce_.two,
                aten.put.default, aten.put_.default}
ACCUMULATING_IF_FLAGGED = {aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class GpuPathChecks(TorchDispatchMode):
    """Refuses, on (fake) CUDA tensors, a collective whose tensor device has no backend in its
    process group (c10d's own lookup raises) and an accumulating scatter; counts collectives."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        group = None
        if func.namespace == "c10d":  # torch.distributed's collectives take the group object
            group = dist.ProcessGroup.unbox(next(a for a in leaves if isinstance(a, torch.ScriptObject)
                                                 and "ProcessGroup" in a._type().qualified_name()))
        elif func.namespace.startswith("_c10d_functional") and func is not wait_tensor_op:
            group = resolve_process_group(leaves[-1])  # functional collectives: the group's name, last
        if group is not None:
            for t in tensors:
                group._get_backend(t.device)
            self.collectives += 1
        accumulate = func in ACCUMULATING or (
            func in ACCUMULATING_IF_FLAGGED and (kwargs.get("accumulate") or (len(args) > 3 and args[3])))
        if accumulate and any(t.device.type == "cuda" for t in tensors):
            raise RuntimeError(f"{func} accumulates with CUDA atomics: its result depends on their order")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def meta_model(cfg) -> MythosModel:
    """The 770M model on the meta device (no memory), cast to bf16 there."""
    with torch.device("meta"):
        model = MythosModel(cfg.model)
    return model.bfloat16()


@pytest.fixture(scope="module")
def fake_gpu(cfg):
    """(mode, model): the meta-built 770M model materialized as fake CUDA tensors in bf16."""
    model = meta_model(cfg)
    mode = FakeTensorMode()
    with mode:
        mode.allow_non_fake_inputs = True  # the meta parameters themselves
        model.to_empty(device="cuda")
        mode.allow_non_fake_inputs = False
        model.reset_parameters()
    return mode, model.train()


def fake_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader hands the trainer: CPU token ids, moved to the device by the trainer."""
    tokens = torch.randint(0, cfg.model.vocab_size, (1, SEQ + 1))
    return tokens[:, :-1], tokens[:, 1:]


def training_loss(cfg, model, out, labels: torch.Tensor) -> torch.Tensor:
    """The trainer's loss (Trainer._loss) from a ``logits=False`` forward: the chunked LM head +
    cross-entropy + z-loss (never the full logits), MoE aux and ponder cost."""
    lm = lm_head_loss(out.hidden, model.head_weight, labels, cfg.train.loss_chunk_tokens, cfg.train.z_loss_coef)
    return lm.total + out.moe_aux_loss + out.ponder_cost


# ---------------------------------------------------------------- the forward on fake CUDA


def test_770m_forward_at_4096_in_bf16_on_fake_cuda(cfg, fake_gpu):
    """Truncated backprop as the trainer runs it (1 no-grad iteration, 2 checkpointed ones):
    no CPU tensor, no host sync, no accumulating scatter anywhere in the forward."""
    mode, model = fake_gpu
    checks = GpuPathChecks()
    with mode, checks:
        inputs, labels = (t.to("cuda") for t in fake_batch(cfg))
        out = model(inputs, n_loops=3, backprop_depth=2, eos_id=0, logits=False)  # document mask on
        loss = training_loss(cfg, model, out, labels)
    assert out.hidden.shape == (1, SEQ, cfg.model.dim) and out.hidden.dtype == torch.bfloat16
    assert loss.device.type == "cuda" and loss.requires_grad
    assert all(t.device.type == "cuda" for t in [*model.parameters(), *model.buffers()])
    moe = model.core[0].ffn
    assert moe.experts.w_gate.dtype == torch.bfloat16 and moe.balance_bias.dtype == torch.float32
    assert moe.expert_counts.device.type == "cuda"  # balance counts stay on the GPU
    assert checks.collectives == 0


def moe_inputs(cfg, moe):
    """A core MoE layer's routing plan for a 4096-token micro-batch, on fake CUDA."""
    x = torch.randn(SEQ, cfg.model.dim, device="cuda", dtype=torch.bfloat16)
    _, chosen, gates = moe.route(x, 0)
    rows, group_end = moe.dispatch_plan(chosen)
    return x, chosen, gates, rows, group_end


def test_fake_cuda_catches_a_host_sync_in_the_moe(cfg, fake_gpu):
    """The per-expert loop (counts.tolist() to split the rows) and bincount counts, as the MoE
    forward had them, raise; the grouped-GEMM forward does not."""
    mode, model = fake_gpu
    moe = model.core[0].ffn
    with mode, GpuPathChecks():
        x, chosen, _, rows, group_end = moe_inputs(cfg, moe)
        x_sorted = reference.moe_permute(x, rows)
        assert moe.experts(x_sorted, group_end).shape == x_sorted.shape
        with pytest.raises(DataDependentOutputException):
            moe.experts.per_expert_loop(x_sorted, group_end)
        with pytest.raises(DynamicOutputShapeException):
            torch.bincount(chosen.flatten(), minlength=moe.n_experts)


def test_fake_cuda_catches_a_cpu_tensor_mixed_in(cfg, fake_gpu):
    """A buffer left on the CPU (what a device-dropping cast of balance_bias would do) fails the
    routing on CUDA."""
    mode, model = fake_gpu
    moe = model.core[0].ffn
    with mode:
        x = torch.randn(8, cfg.model.dim, device="cuda", dtype=torch.bfloat16)
        saved = moe.balance_bias
        moe.balance_bias = torch.zeros(saved.shape)
        try:
            with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cpu"):
                moe.route(x, 0)
        finally:
            moe.balance_bias = saved


def test_fake_cuda_catches_a_scatter_add_combine(cfg, fake_gpu):
    """The old combine (index_add of gate-weighted rows) is refused; ours (a gather and a fixed
    order sum over k) passes."""
    mode, model = fake_gpu
    moe = model.core[0].ffn
    with mode, GpuPathChecks():
        x, chosen, gates, rows, _ = moe_inputs(cfg, moe)
        y_sorted = reference.moe_permute(x, rows)
        assert reference.moe_unpermute(y_sorted, rows, gates).shape == x.shape
        token_of_row = torch.empty_like(rows.flatten()).index_copy_(
            0, rows.flatten(), torch.arange(rows.numel(), device="cuda") // moe.top_k)
        weighted = y_sorted * torch.zeros(rows.numel(), 1, device="cuda", dtype=x.dtype)
        with pytest.raises(RuntimeError, match="accumulates with CUDA atomics"):
            torch.zeros_like(x).index_add(0, token_of_row, weighted)


# ---------------------------------------------------------------- the backward, traced on meta


@pytest.mark.slow
def test_770m_backward_traced_on_meta(cfg):
    """Forward, activation-checkpointing recompute and backward of a truncated-backprop step
    (T=2, k=1) traced into one graph: every gradient has its parameter's shape and bf16 dtype,
    the experts' backward runs as grouped GEMMs, and nothing reads tensor data on the host."""
    model = meta_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(inputs, labels):
        out = model(inputs, n_loops=2, backprop_depth=1, eos_id=0, logits=False)
        return torch.autograd.grad(training_loss(cfg, model, out, labels), params, allow_unused=True)

    inputs, labels = (t.to("meta") for t in fake_batch(cfg))
    graph = make_fx(step)(inputs, labels)
    ops = Counter(node.target for node in graph.graph.nodes if node.op == "call_function")
    grads = [n for n in graph.graph.output_node().args[0]]
    assert len(grads) == len(params)
    for node, p in zip(grads, params):
        if node is not None:
            assert tuple(node.meta["val"].shape) == tuple(p.shape) and node.meta["val"].dtype == p.dtype
    moe_calls = cfg.model.core_layers * (2 + 1)  # forward (T=2) + the recompute of the grad iteration
    backward_calls = cfg.model.core_layers * 1
    assert ops[aten._grouped_mm.default] == 3 * moe_calls + 2 * 3 * backward_calls
    assert not any(op in ops for op in (aten._local_scalar_dense.default, aten.nonzero.default))


@pytest.mark.slow
def test_770m_compiled_step_traces_on_meta_without_graph_breaks(cfg):
    """``model.compile`` at the 770M shapes in bf16 with every hot-path option on (document mask,
    truncated backprop with per-iteration activation checkpointing, the MoE's grouped GEMM, the
    chunked LM loss): dynamo traces each block forward and backward (aot_eager: no code is
    generated for the meta device) with no graph break, and every parameter gets its gradient."""
    model = meta_model(cfg).train()
    compile_blocks(model, backend="aot_eager")
    before = sum(graph_breaks().values())
    inputs, labels = (t.to("meta") for t in fake_batch(cfg))
    out = model(inputs, n_loops=3, backprop_depth=2, eos_id=0, logits=False)
    training_loss(cfg, model, out, labels).backward()
    assert sum(graph_breaks().values()) == before, graph_breaks()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype, name


# ---------------------------------------------------------------- the trainer's collectives


@pytest.fixture(scope="module")
def nccl_only_group():
    """A real process group with a backend for CUDA tensors only: NCCL's situation, with gloo
    standing in for NCCL (no GPU here).  Plus a `cpu:gloo,cuda:gloo` group, the fixed layout."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("cuda:gloo", rank=0, world_size=1)
    try:
        yield dist.new_group([0], backend="cpu:gloo,cuda:gloo")
    finally:
        dist.destroy_process_group()


def test_cpu_collectives_fail_on_an_nccl_only_group(nccl_only_group):
    """The crash the first GPU step would hit: the stop flag all-reduced as a CPU tensor."""
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        dist.all_reduce(torch.zeros(1), op=dist.ReduceOp.MAX)
    both = torch.zeros(1)
    dist.all_reduce(both, group=nccl_only_group)  # the cpu:gloo,cuda:... group takes CPU tensors
    layout = ParallelLayout(rank=0, world_size=1, local_rank=0, tp=1, ep=1, device=torch.device("cuda", 0))
    assert layout.backend == "cpu:gloo,cuda:nccl"
    cpu_layout = ParallelLayout(rank=0, world_size=1, local_rank=0, tp=1, ep=1, device=torch.device("cpu"))
    assert cpu_layout.backend == "cpu:gloo,cuda:gloo"  # what every multi-rank CPU test runs DeepSpeed with


def test_trainer_collectives_run_on_the_layout_device(cfg, fake_gpu, nccl_only_group, tmp_path):
    """Stop flag and checkpoint-writer poll, metrics, evaluation and balance counts: every collective is legal on the
    NCCL-only group; each then fails only where it reads the (fake) result on the host."""
    mode, model = fake_gpu
    layout = ParallelLayout(rank=0, world_size=1, local_rank=0, tp=1, ep=1, device=torch.device("cuda", 0))
    trainer = Trainer.__new__(Trainer)  # the collective methods need the layout, model and config only
    trainer.layout, trainer.engine, trainer.model, trainer.cfg = layout, model, model, cfg.model_copy(deep=True)
    trainer.eos_id = 0  # packed documents: evaluation runs with the document mask
    trainer.cfg.train.eval_batches, trainer.cfg.train.loops.mean = 1, 1
    trainer.checkpointer = Checkpointer(tmp_path, trainer.cfg, layout)  # no save in flight
    checks = GpuPathChecks()
    with mode, checks:
        trainer.val_loader = [fake_batch(cfg)]
        calls = [lambda: trainer.checkpointer.poll(stop_requested=False), trainer.evaluate,
                 lambda: sum_over_ranks([torch.ones((), device="cuda"), 2.0], layout.device),
                 lambda: update_balance_bias(model, 1e-3, all_reduce=dist.all_reduce)]
        for expected, call in enumerate(calls, start=1):
            with pytest.raises(DataDependentOutputException):
                call()
            assert checks.collectives == expected
        assert model.training  # evaluate switched it back
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            sum_over_ranks([1.0], torch.device("cpu"))  # the old code: CPU tensors in collectives


# ---------------------------------------------------------------- TP and EP on fake CUDA


def test_tp_and_ep_collectives_on_fake_cuda(cfg, nccl_only_group):
    """The 770M model with TP and EP applied over the NCCL-like world group (no CPU backend; one
    rank, so shards are whole): a prelude block's TP forward runs its two all-reduces (attention
    and FFN outputs) on the device with no host sync.  A core block's EP dispatch exchanges the
    expert counts on the device, then reads the split sizes: its one host sync per MoE call
    (``all_to_all_single`` takes them as Python ints).  Given the sizes, the rest of the dispatch
    (local expert order, token all-to-all) runs on fake CUDA without another."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    from mythos_scale.parallel.ep import local_expert_order, shard_experts
    from mythos_scale.parallel.tp import shard_tensor_parallel

    group = dist.group.WORLD  # "cuda:gloo": a collective on a CPU tensor fails, as on NCCL
    model = meta_model(cfg)
    shard_tensor_parallel(model, 0, 1, group)
    shard_experts(model, 0, 1, group)
    mode = FakeTensorMode()
    with mode:
        mode.allow_non_fake_inputs = True
        model.to_empty(device="cuda")
        mode.allow_non_fake_inputs = False
        model.reset_parameters()
    checks = GpuPathChecks()
    with mode, checks:
        x = torch.randn(1, SEQ, cfg.model.dim, device="cuda", dtype=torch.bfloat16)
        assert model.prelude[0](x, model.rope)[0].shape == x.shape
        assert checks.collectives == 2
        with pytest.raises(DataDependentOutputException):
            model.core[0](x, model.rope, loop=0)
        assert checks.collectives == 2 + 2  # the core attention's all-reduce, then the count exchange
        experts = model.core[0].ffn.experts.w_gate.shape[0]
        counts = torch.randint(0, 64, (1, experts), device="cuda")
        rows, group_end = local_expert_order(counts, SEQ)
        tokens = all_to_all_single_autograd(x[0], [SEQ], [SEQ], group) + 0
        assert rows.shape == (SEQ, 1) and group_end.shape == (experts,) and tokens.shape == (SEQ, cfg.model.dim)
        assert checks.collectives == 5


def test_gpu_bound_by_local_rank():
    """LOCAL_RANK names the GPU (as DeepSpeed binds it); a rank without its GPU is a launch error."""
    with pytest.raises(LaunchError, match=r"LOCAL_RANK=0 but this process sees 0 GPU\(s\)"):
        cuda_device(0)


# ---------------------------------------------------------------- launch/gpu_smoke.sh


@pytest.mark.slow
def test_gpu_smoke_script_saves_resumes_and_reports(tmp_path, tiny_dataset):
    """The one-node check users run before submitting, on CPU with the tiny config: 5 steps, save,
    stop, resume, 10 steps, figures.  Without a GPU and without NPROC it refuses (status 2)."""
    script = REPO / "launch" / "gpu_smoke.sh"
    env = subprocess_env()
    refused = subprocess.run(["bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "gpu_smoke: no GPU visible" in refused.stderr
    env.update(CONFIG=str(REPO / "configs" / "tiny_cpu.yaml"), NPROC="1", DATA=str(tiny_dataset),
               RUN_ROOT=str(tmp_path), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(script), *TINY_TRAIN], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"gpu_smoke: OK: saved at step 5, resumed, reached step 10 \| ([\d,]+) tokens/s .* "
                        r"MFU ([\d.]+)% \| peak memory ([\d.]+) GiB", proc.stdout)
    assert summary, proc.stdout[-2000:]
    assert float(summary.group(1).replace(",", "")) > 0 and float(summary.group(2)) > 0
    assert list(tmp_path.glob("smoke_*/checkpoints/step_*"))
    assert (tiny_dataset / "train" / "verified_xxh64.json").is_file()  # hashed once, recorded
