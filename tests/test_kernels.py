"""The fused ``mythos::`` kernels against their PyTorch references (mythos_scale/kernels/reference.py).

CPU kernels: the installed ``mythos_scale._C`` when present, else built once into a cache folder
(build.default_build_dir: $MYTHOS_KERNEL_CACHE, default ~/.cache/mythos_scale).  CUDA sources: compiled here with nvcc for
sm_90 (nothing runs them without a GPU); the GPU parity tests run only where a GPU is present.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch._subclasses import FakeTensorMode

from mythos_scale import kernels
from mythos_scale.kernels import build, reference

OPS = ("inject_rmsnorm", "act_step", "moe_permute", "moe_unpermute", "swiglu", "apply_rope")


def _load_fused(cuda: bool = False):
    try:
        from mythos_scale.kernels import fused
    except ImportError:
        build.load_extension(cuda=cuda)
        from mythos_scale.kernels import fused
    return fused


@pytest.fixture(scope="module")
def fused():
    torch.set_num_threads(2)
    return _load_fused()


def _grads(fn, inputs: list[torch.Tensor], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of fn(*inputs) and the gradients of a fixed random projection of them."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    wrt = [t for t in leaves if t.requires_grad]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, wrt))


def _assert_parity(fused_fn, ref_fn, inputs, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    f_out, f_grad = _grads(fused_fn, inputs)
    r_out, r_grad = _grads(ref_fn, inputs)
    for name, fs, rs in (("output", f_out, r_out), ("grad", f_grad, r_grad)):
        assert len(fs) == len(rs)
        for i, (f, r) in enumerate(zip(fs, rs)):
            assert f.dtype == r.dtype and f.shape == r.shape, \
                f"{name} {i}: {f.dtype}{tuple(f.shape)} vs {r.dtype}{tuple(r.shape)}"
            torch.testing.assert_close(f, r, atol=atol, rtol=rtol, msg=lambda m: f"{name} {i}: {m}")


# ---------------------------------------------------------------- inputs

def _inject_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    return [torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype),
            torch.rand(d, generator=g, dtype=dtype) * 0.9 + 0.05, torch.randn(d, generator=g, dtype=dtype),
            1 + 0.1 * torch.randn(d, generator=g, dtype=dtype)]


def _act_inputs(lead, dim, dtype=torch.float32, seed=0):
    """Positions still running (cum 0 or 0.3), one halted (cum 1); p away from the halting edge."""
    g = torch.Generator().manual_seed(seed)
    cum = torch.tensor([0.0, 0.3, 1.0], dtype=dtype)[torch.randint(0, 3, lead, generator=g)]
    p = torch.tensor([0.1, 0.25, 0.9], dtype=dtype)[torch.randint(0, 3, lead, generator=g)]
    return [p, cum, torch.randn(*lead, dim, generator=g, dtype=dtype), torch.randn(*lead, dim, generator=g, dtype=dtype)]


def _routing(num_tokens, top_k, num_experts, seed=0):
    """rows (N, k) of a top-k routing sorted by expert (the MoE's dispatch plan), and gates (N, k)."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]
                          or [torch.empty(0, top_k, dtype=torch.long)]).view(num_tokens, top_k)
    order = torch.argsort(experts.flatten(), stable=True)
    rows = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel())).view(num_tokens, top_k)
    return rows, torch.rand(num_tokens, top_k, generator=g)


# ---------------------------------------------------------------- parity with the references (CPU)

@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 33), (4, 3, 130)])
def test_inject_rmsnorm_matches_reference(fused, shape):
    inputs = _inject_inputs(shape)
    _assert_parity(lambda *t: fused.inject_rmsnorm(*t, 1e-6), lambda *t: reference.inject_rmsnorm(*t, 1e-6), inputs)


def test_inject_rmsnorm_gradcheck(fused):
    inputs = [t.double().requires_grad_() for t in _inject_inputs((3, 4, 9))]
    assert torch.autograd.gradcheck(lambda *t: fused.inject_rmsnorm(*t, 1e-6), inputs)


def test_inject_rmsnorm_promotes_like_reference(fused):
    """bf16 state with fp32 parameters: both compute (and return) fp32."""
    h, e, a, loop, w = _inject_inputs((2, 3, 16))
    args = (h.bfloat16(), e.bfloat16(), a, loop, w, 1e-6)
    z, out = fused.inject_rmsnorm(*args)
    assert z.dtype == out.dtype == torch.float32
    torch.testing.assert_close((z, out), reference.inject_rmsnorm(*args))


def test_inject_rmsnorm_bf16_close_to_reference(fused):
    inputs = [t.bfloat16() for t in _inject_inputs((8, 64))]
    z, out = fused.inject_rmsnorm(*inputs, 1e-6)
    ref_z, ref_out = reference.inject_rmsnorm(*[t.float() for t in inputs], 1e-6)
    assert z.dtype == out.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), ref_z, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
    # the norm is of z as returned (rounded once to bf16), as the block that adds to z sees it
    torch.testing.assert_close(out.float(), reference.inject_rmsnorm(
        z.float(), torch.zeros_like(ref_z), torch.ones(64), torch.zeros(64), inputs[4].float(), 1e-6)[1],
        atol=1e-2, rtol=1e-2)


def test_inject_rmsnorm_gradient_of_one_output(fused):
    """Only the normalized copy used, or only z: the unused output's gradient counts as zero."""
    inputs = _inject_inputs((3, 17))
    _assert_parity(lambda *t: fused.inject_rmsnorm(*t, 1e-6)[1], lambda *t: reference.inject_rmsnorm(*t, 1e-6)[1],
                   inputs)
    h, e, a, loop, w = [t.requires_grad_() for t in inputs]
    grads = [torch.autograd.grad(op.inject_rmsnorm(h, e, a, loop, w, 1e-6)[0].pow(2).sum(), (h, e, a, loop, w),
                                 allow_unused=True) for op in (fused, reference)]
    for f, r in zip(grads[0][:4], grads[1][:4]):
        torch.testing.assert_close(f, r)
    assert grads[1][4] is None and torch.count_nonzero(grads[0][4]) == 0  # weight: unused


@pytest.mark.parametrize("is_last", [False, True])
@pytest.mark.parametrize("lead,dim", [((1,), 1), ((5,), 3), ((2, 7), 17)])
def test_act_step_matches_reference(fused, lead, dim, is_last):
    inputs = _act_inputs(lead, dim)
    _assert_parity(lambda *t: fused.act_step(*t, 0.99, is_last), lambda *t: reference.act_step(*t, 0.99, is_last),
                   inputs)


def test_act_step_gradcheck(fused):
    p, cum, acc, h = _act_inputs((3, 5), 4, dtype=torch.float64)
    cum = cum.clamp(max=0.3)  # finite differences must not cross cum = 1 (a halted position)
    inputs = [t.requires_grad_() for t in (p, cum, acc, h)]
    assert torch.autograd.gradcheck(lambda *t: fused.act_step(*t, 0.99, False), inputs)


def test_act_step_weights_sum_to_one(fused):
    """Run every step of a halting process: each position's weights add up to exactly 1."""
    g = torch.Generator().manual_seed(1)
    cum, acc = torch.zeros(4, 6), torch.zeros(4, 6, 8)
    total = torch.zeros(4, 6)
    for step in range(5):
        p = torch.rand(4, 6, generator=g) * 0.5
        w, cum, acc = fused.act_step(p, cum, acc, torch.randn(4, 6, 8, generator=g), 0.99, step == 4)
        total += w
    torch.testing.assert_close(total, torch.ones(4, 6))


def test_act_step_backward_with_unused_outputs(fused):
    p, cum, acc, h = [t.requires_grad_() for t in _act_inputs((6,), 5)]
    _, _, new_acc = fused.act_step(p, cum, acc, h, 0.99, False)
    new_acc.sum().backward()
    _, _, ref_acc = reference.act_step(*[t.detach().requires_grad_() for t in (p, cum, acc, h)], 0.99, False)
    assert p.grad is not None and h.grad is not None
    torch.testing.assert_close(new_acc, ref_acc)


# (0, 1, ...): an expert-parallel rank that receives no rows this step.
@pytest.mark.parametrize("num_tokens,top_k,num_experts,dim", [(0, 1, 4, 8), (1, 1, 1, 1), (7, 2, 5, 3), (33, 4, 16, 65)])
def test_moe_permute_unpermute_match_reference(fused, num_tokens, top_k, num_experts, dim):
    rows, gate = _routing(num_tokens, top_k, num_experts)
    x = torch.randn(num_tokens, dim)
    _assert_parity(lambda x: fused.moe_permute(x, rows), lambda x: reference.moe_permute(x, rows), [x])
    y = torch.randn(rows.numel(), dim)
    _assert_parity(lambda y, g: fused.moe_unpermute(y, rows, g), lambda y, g: reference.moe_unpermute(y, rows, g),
                   [y, gate])
    _assert_parity(lambda y: fused.moe_unpermute(y, rows, None), lambda y: reference.moe_unpermute(y, rows, None), [y])


def test_moe_permute_then_unpermute_is_a_weighted_copy(fused):
    """Every token comes back as the gate-weighted sum of its own k copies; int32 rows work too."""
    rows, gate = _routing(9, 3, 5, seed=2)
    x = torch.randn(9, 4)
    for impl in (fused, reference):
        out = impl.moe_unpermute(impl.moe_permute(x, rows.int()), rows.int(), gate)
        torch.testing.assert_close(out, x * gate.sum(-1, keepdim=True))


def test_moe_gradcheck(fused):
    rows, gate = _routing(6, 2, 4, seed=3)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(rows.numel(), 5, dtype=torch.float64, requires_grad=True)
    gate = gate.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fused.moe_permute(x, rows), [x])
    assert torch.autograd.gradcheck(lambda y, g: fused.moe_unpermute(y, rows, g), [y, gate])
    # permute's backward is the gate-less un-permute, whose backward is the permute again
    assert torch.autograd.gradgradcheck(lambda x: fused.moe_permute(x, rows), [x])


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 131)])
def test_swiglu_matches_reference(fused, shape):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)]
    _assert_parity(fused.swiglu, reference.swiglu, inputs)


def test_swiglu_gradcheck(fused):
    inputs = [torch.randn(3, 11, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(fused.swiglu, inputs)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 5, 3, 8), (3, 9, 2, 14)])
def test_apply_rope_matches_reference(fused, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    angles = torch.rand(shape[1], shape[3] // 2, generator=g) * 6
    _assert_parity(lambda x: fused.apply_rope(x, angles.cos(), angles.sin()),
                   lambda x: reference.apply_rope(x, angles.cos(), angles.sin()), [x])


def test_apply_rope_on_a_slice_and_with_table_grads(fused):
    """The rope part of a query (a strided last-dim slice); gradients also reach cos and sin."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 20, dtype=torch.float64, generator=g)
    angles = torch.rand(6, 4, dtype=torch.float64, generator=g)
    rope_part = q[..., 12:]
    assert not rope_part.is_contiguous()
    torch.testing.assert_close(fused.apply_rope(rope_part, angles.cos(), angles.sin()),
                               reference.apply_rope(rope_part, angles.cos(), angles.sin()))
    inputs = [q.requires_grad_(), angles.cos().requires_grad_(), angles.sin().requires_grad_()]
    assert torch.autograd.gradcheck(lambda q, cos, sin: fused.apply_rope(q[..., 12:], cos, sin), inputs)


# ---------------------------------------------------------------- operator registration, torch.compile

def test_opcheck_all_operators(fused):
    """Schema, autograd registration, fake tensors and AOT dispatch (static and dynamic shapes)."""
    rows, gate = _routing(5, 2, 4)
    x = torch.randn(2, 3, 2, 6, requires_grad=True)
    cases = {
        "inject_rmsnorm": (*[t.requires_grad_() for t in _inject_inputs((3, 5))], 1e-6),
        "act_step": (*[t.requires_grad_() for t in _act_inputs((4,), 3)], 0.99, False),
        "moe_permute": (torch.randn(5, 3, requires_grad=True), rows),
        "moe_unpermute": (torch.randn(10, 3, requires_grad=True), rows, gate.requires_grad_()),
        "swiglu": (torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)),
        "apply_rope": (x, torch.rand(3, 3), torch.rand(3, 3)),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.mythos, name).default, args)


def test_torch_compile_forward_and_backward(fused):
    def block(h, e, a, loop, w, up):
        z, normed = fused.inject_rmsnorm(h, e, a, loop, w, 1e-6)
        return (z + fused.swiglu(normed, up)).sum()

    inputs = [*_inject_inputs((2, 4, 8)), torch.randn(2, 4, 8)]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager_out, eager_grads = _grads(block, inputs)
    compiled_out, compiled_grads = _grads(compiled, inputs)
    torch.testing.assert_close(compiled_out, eager_out)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


# ---------------------------------------------------------------- bad input: clear errors

def test_bad_inputs_name_the_argument(fused):
    h, e, a, loop, w = _inject_inputs((2, 8))
    with pytest.raises(RuntimeError, match=r"inject_rmsnorm: a_bar must have shape \(8,\)"):
        fused.inject_rmsnorm(h, e, a[:4], loop, w, 1e-6)
    with pytest.raises(RuntimeError, match=r"moe_permute: rows\[1, 0\] = 9 is outside \[0, 4\)"):
        fused.moe_permute(torch.randn(2, 2), torch.tensor([[0, 1], [9, 2]]))
    with pytest.raises(RuntimeError, match="moe_permute: rows is not a permutation: row 1 appears twice"):
        fused.moe_permute(torch.randn(2, 2), torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"moe_unpermute: rows\[0, 1\] = 7 is outside \[0, 4\)"):
        fused.moe_unpermute(torch.randn(4, 2), torch.tensor([[0, 7], [1, 2]]), None)
    with pytest.raises(RuntimeError, match=r"moe_unpermute: y has 3 rows but rows has 2 x 2 = 4 entries"):
        fused.moe_unpermute(torch.randn(3, 2), torch.tensor([[0, 3], [1, 2]]), None)
    with pytest.raises(RuntimeError, match="apply_rope: cos must have shape"):
        fused.apply_rope(torch.randn(1, 4, 2, 6), torch.rand(4, 2), torch.rand(4, 3))
    with pytest.raises(RuntimeError, match="act_step: p must have shape"):
        fused.act_step(torch.rand(3), torch.zeros(4), torch.zeros(4, 2), torch.randn(4, 2), 0.99, False)


# ---------------------------------------------------------------- the model on either implementation

@pytest.mark.parametrize("act", [False, True])
def test_model_with_fused_ops_equals_reference(fused, act):
    """The whole RDT (injection + first pre-norm, ACT steps, MoE dispatch, rope, swiglu) on the
    fused ops: the same loss and gradients as on the reference ops; ACT inference too.  The two
    models live in one process, each with its own choice (``model.kernels``)."""
    from mythos_scale.config import ModelConfig
    from mythos_scale.model import build_model

    cfg = ModelConfig(vocab_size=61, dim=32, n_heads=2, max_loops=4, max_seq_len=16, dense_ffn_hidden=32,
                      lora_rank=2, act=dict(enabled=act, halt_bias_init=0.0),
                      attention=dict(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
                      moe=dict(n_routed_experts=4, top_k=2, expert_hidden=16))
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in (fused, reference):
        model = build_model(cfg.model_copy(update={"kernels": "fused" if impl is fused else "reference"}), seed=0)
        assert all(m.kernels.implementation("cpu") is impl for m in model.modules() if hasattr(m, "kernels"))
        out = model(ids[:, :-1], n_loops=3, backprop_depth=2)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()) + out.ponder_cost
        loss.backward()
        with torch.no_grad():
            inference = model.eval()(ids, n_loops=3)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, inference))
    (f_loss, f_grads, f_inf), (r_loss, r_grads, r_inf) = results
    torch.testing.assert_close(f_loss, r_loss, atol=1e-5, rtol=1e-5)
    for name, grad in r_grads.items():
        torch.testing.assert_close(f_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(f_inf.logits, r_inf.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(f_inf.loops_used, r_inf.loops_used)


# ---------------------------------------------------------------- selection

def test_select_kernels_modes(fused, caplog):
    with caplog.at_level(logging.INFO, logger="mythos_scale.kernels"):
        chosen = kernels.select_kernels("fused")
        assert chosen.implementation("cpu") is fused
        assert kernels.select_kernels("auto").implementation("cpu") is fused
        assert kernels.select_kernels("reference").implementation("cpu") is reference
        x = torch.randn(3, 4)
        assert torch.equal(kernels.select_kernels("reference").swiglu(x, x), reference.swiglu(x, x))
    assert "fused mythos:: operators on cpu (mode=fused)" in caplog.text
    assert "PyTorch reference ops on cpu (mode=reference)" in caplog.text
    with pytest.raises(ValueError, match="model.kernels: unknown mode 'fast'"):
        kernels.select_kernels("fast")
    assert all(callable(getattr(fused, name)) for name in OPS)


def test_cpu_only_build_is_never_chosen_for_cuda_tensors(fused, caplog):
    """This extension was built without CUDA: the dispatcher has no CUDA kernel for its ops, so
    CUDA tensors (fake ones here) get the reference ops under auto, and a clear error under fused."""
    assert kernels.fused_devices() == ("cpu",)
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("mythos::moe_permute", "CUDA")
    with caplog.at_level(logging.INFO, logger="mythos_scale.kernels"):
        auto = kernels.select_kernels("auto")
        assert auto.implementation("cuda") is reference and auto.implementation("cpu") is fused
        with FakeTensorMode():
            gate, up = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda")
            assert auto.swiglu(gate, up).device.type == "cuda"
    assert "reference ops on cuda (mode=auto: the mythos kernel extension has no cuda kernels " \
           "(built for: cpu); rebuild it with MYTHOS_BUILD_EXT=cuda)" in caplog.text
    strict = kernels.select_kernels("fused")
    with pytest.raises(RuntimeError, match="model.kernels=fused but the mythos kernel extension has no cuda"):
        strict.implementation("cuda")


def test_select_kernels_without_the_extension():
    """In a process where the extension cannot load: auto falls back, fused fails with a clear message."""
    code = (
        "import sys, logging; sys.modules['mythos_scale._C'] = None\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from mythos_scale import kernels\n"
        "assert kernels.select_kernels('auto').implementation('cpu') is kernels.reference\n"
        "try:\n    kernels.select_kernels('fused')\nexcept RuntimeError as err:\n    print('ERR', err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert "the fused extension is unavailable" in result.stderr
    assert "PyTorch reference ops on cpu (mode=auto)" in result.stderr
    assert "ERR model.kernels=fused but the mythos kernel extension is not built" in result.stdout
    assert "MYTHOS_BUILD_EXT=cpu pip install --no-build-isolation -e ." in result.stdout


def test_build_ext_cuda_fails_the_install_when_it_cannot_build_cuda(tmp_path):
    """MYTHOS_BUILD_EXT=cuda with no usable nvcc: pip exits non-zero and says why, instead of
    quietly installing CPU-only kernels (which auto would then use for CUDA tensors too)."""
    env = dict(os.environ, MYTHOS_BUILD_EXT="cuda", CUDA_HOME=str(tmp_path / "no-cuda-here"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                             "--disable-pip-version-check", "-q", "-w", str(tmp_path / "wheels"),
                             str(build.CSRC.parent)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "MYTHOS_BUILD_EXT=cuda cannot build the CUDA kernels: no nvcc found" in result.stdout + result.stderr
    assert not (tmp_path / "wheels").exists() or not any((tmp_path / "wheels").iterdir())


# ---------------------------------------------------------------- CUDA sources: a real compile with nvcc

def _nvcc_command(source: Path, obj: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"],
                *build.include_dirs()]
    return ["nvcc", "-c", str(source), "-o", str(obj), "-std=c++20", "-arch=sm_90", "-Xcompiler", "-fPIC",
            *cpp_extension.COMMON_NVCC_FLAGS, *build.NVCC_FLAGS,
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
            *[f"-I{d}" for d in includes]]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA sources were NOT compiled")
def test_cuda_sources_compile_for_sm90(tmp_path):
    """All .cu files in one translation unit (the torch headers are parsed once: ~30 s instead of ~110 s)."""
    sources = [build.CSRC.parent / s for s in build.sources(cuda=True) if s.endswith(".cu")]
    assert len(sources) >= 3
    unity = tmp_path / "all_kernels.cu"
    unity.write_text("".join(f'#include "{s}"\n' for s in sources))
    obj = tmp_path / "all_kernels.o"
    result = subprocess.run(_nvcc_command(unity, obj), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    assert obj.stat().st_size > 0
    if shutil.which("cuobjdump"):
        elf = subprocess.run(["cuobjdump", "--list-elf", str(obj)], capture_output=True, text=True, check=True)
        assert "sm_90" in elf.stdout, elf.stdout


# ---------------------------------------------------------------- GPU parity (only where a GPU is present)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the CUDA kernels were not run")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    fused = _load_fused(cuda=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    dev = torch.device("cuda")

    def on_gpu(tensors):
        return [t.to(dev, dtype if t.is_floating_point() else t.dtype) for t in tensors]

    _assert_parity(lambda *t: fused.inject_rmsnorm(*t, 1e-6), lambda *t: reference.inject_rmsnorm(*t, 1e-6),
                   on_gpu(_inject_inputs((4, 37, 515))), **tol)
    for is_last in (False, True):
        _assert_parity(lambda *t: fused.act_step(*t, 0.99, is_last), lambda *t: reference.act_step(*t, 0.99, is_last),
                       on_gpu(_act_inputs((3, 41), 257)), **tol)
    rows, gate = _routing(300, 4, 32)
    rows = rows.to(dev)
    _assert_parity(lambda x: fused.moe_permute(x, rows), lambda x: reference.moe_permute(x, rows),
                   on_gpu([torch.randn(300, 129)]), **tol)
    _assert_parity(lambda y, g: fused.moe_unpermute(y, rows, g), lambda y, g: reference.moe_unpermute(y, rows, g),
                   on_gpu([torch.randn(1200, 129), gate]), **tol)
    _assert_parity(fused.swiglu, reference.swiglu, on_gpu([torch.randn(5, 1001), torch.randn(5, 1001)]), **tol)
    angles = torch.rand(17, 32, device=dev) * 6
    q = on_gpu([torch.randn(2, 17, 4, 96)])[0][..., 32:]
    _assert_parity(lambda x: fused.apply_rope(x, angles.cos(), angles.sin()),
                   lambda x: reference.apply_rope(x, angles.cos(), angles.sin()), [q], **tol)
