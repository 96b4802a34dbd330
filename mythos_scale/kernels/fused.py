"""The fused ops: the ``mythos::`` custom operators of the compiled extension (csrc/).

Same names and signatures as :mod:`mythos_scale.kernels.reference`, and the same results up to
float rounding (the kernels accumulate in float32 and round once).  Inputs are first promoted to
one dtype, as the reference's arithmetic would promote them.  Autograd and the fake (shape-only)
implementations used by ``torch.compile`` are registered here, on import.

Importing this module raises ImportError when the operators are not registered, i.e. when
``mythos_scale._C`` is not built and :func:`mythos_scale.kernels.build.load_extension` was not called.
"""

from __future__ import annotations

import functools

import torch

if not hasattr(torch.ops.mythos, "inject_rmsnorm"):  # not yet loaded by build.load_extension()
    try:
        import mythos_scale._C  # noqa: F401  (registers torch.ops.mythos)
    except ImportError:
        pass

if not hasattr(torch.ops.mythos, "inject_rmsnorm"):
    raise ImportError(
        "the mythos kernel extension is not built: install it with "
        "`MYTHOS_BUILD_EXT=cpu pip install --no-build-isolation -e .` (MYTHOS_BUILD_EXT=cuda for GPUs), "
        "or call mythos_scale.kernels.build.load_extension(build_dir)"
    )

_ops = torch.ops.mythos


def _common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- public ops (reference signatures)

def inject_rmsnorm(h: torch.Tensor, e_inj: torch.Tensor, a_bar: torch.Tensor, loop_emb: torch.Tensor,
                   weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = a_bar * h + e_inj + loop_emb`` and ``rmsnorm(z) * weight`` in one pass."""
    dtype = _common_dtype(h, e_inj, a_bar, loop_emb, weight)
    z, out, _ = _ops.inject_rmsnorm(h.to(dtype), e_inj.to(dtype), a_bar.to(dtype), loop_emb.to(dtype),
                                    weight.to(dtype), eps)
    return z, out


def act_step(p: torch.Tensor, cum: torch.Tensor, acc: torch.Tensor, h: torch.Tensor,
             threshold: float, is_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ACT step: ``(w, cum + w, acc + w * h)`` (see the reference for the halting rule)."""
    dtype = _common_dtype(p, cum, acc, h)
    return tuple(_ops.act_step(p.to(dtype), cum.to(dtype), acc.to(dtype), h.to(dtype), threshold, is_last))


def moe_permute(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[rows[t, j]] = x[t]``: each token copied to its k expert-sorted rows."""
    return _ops.moe_permute(x, rows)


def moe_unpermute(y: torch.Tensor, rows: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """``out[t] = sum_j gate[t, j] * y[rows[t, j]]``, summed in a fixed order (deterministic)."""
    return _ops.moe_unpermute(y, rows, None if gate is None else gate.to(y.dtype))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    dtype = _common_dtype(gate, up)
    return _ops.swiglu(gate.to(dtype), up.to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x (B, S, H, R) by cos, sin (S, R/2); x may be a last-dim slice."""
    return _ops.apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


# ---------------------------------------------------------------- autograd

def _inject_rmsnorm_setup(ctx, inputs, output) -> None:
    h, e_inj, a_bar, loop_emb, weight, _eps = inputs
    ctx.save_for_backward(h, e_inj, a_bar, loop_emb, weight, output[2])


def _inject_rmsnorm_backward(ctx, grad_z, grad_out, _grad_rstd):
    return (*_ops.inject_rmsnorm_backward(grad_z, grad_out, *ctx.saved_tensors), None)


def _act_step_setup(ctx, inputs, output) -> None:
    p, cum, _acc, h, threshold, is_last = inputs
    ctx.threshold, ctx.is_last = threshold, is_last
    ctx.save_for_backward(p, cum, h)


def _act_step_backward(ctx, grad_w, grad_cum, grad_acc):
    p, cum, h = ctx.saved_tensors
    grad_p, grad_cum_in, grad_h = _ops.act_step_backward(grad_w, grad_cum, grad_acc, p, cum, h,
                                                         ctx.threshold, ctx.is_last)
    return grad_p, grad_cum_in, grad_acc, grad_h, None, None


def _moe_permute_setup(ctx, inputs, output) -> None:
    _x, rows = inputs
    ctx.save_for_backward(rows)


def _moe_permute_backward(ctx, grad_out):
    (rows,) = ctx.saved_tensors
    return _ops.moe_unpermute(grad_out, rows, None), None


def _moe_unpermute_setup(ctx, inputs, output) -> None:
    y, rows, gate = inputs
    ctx.save_for_backward(y if gate is not None else None, rows, gate)


def _moe_unpermute_backward(ctx, grad_out):
    y, rows, gate = ctx.saved_tensors
    if gate is None:  # the gate-less form (permute's backward): its backward is the permute
        return _ops.moe_permute(grad_out, rows), None, None
    grad_y, grad_gate = _ops.moe_unpermute_backward(grad_out, y, rows, gate)
    return grad_y, None, grad_gate


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad_out):
    return tuple(_ops.swiglu_backward(grad_out, *ctx.saved_tensors))


def _apply_rope_setup(ctx, inputs, output) -> None:
    x, cos, sin = inputs
    # x is only needed for the gradients of cos / sin, which are usually constant buffers.
    ctx.table_grads = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, x if ctx.table_grads else None)


def _apply_rope_backward(ctx, grad_out):
    cos, sin, x = ctx.saved_tensors
    grad_x = _ops.apply_rope_backward(grad_out, cos, sin)
    if not ctx.table_grads:
        return grad_x, None, None
    g1, g2 = grad_out.chunk(2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return grad_x, (g1 * x1 + g2 * x2).sum((0, 2)), (g2 * x1 - g1 * x2).sum((0, 2))


torch.library.register_autograd("mythos::inject_rmsnorm", _inject_rmsnorm_backward,
                                setup_context=_inject_rmsnorm_setup)
torch.library.register_autograd("mythos::act_step", _act_step_backward, setup_context=_act_step_setup)
torch.library.register_autograd("mythos::moe_permute", _moe_permute_backward, setup_context=_moe_permute_setup)
torch.library.register_autograd("mythos::moe_unpermute", _moe_unpermute_backward,
                                setup_context=_moe_unpermute_setup)
torch.library.register_autograd("mythos::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
torch.library.register_autograd("mythos::apply_rope", _apply_rope_backward, setup_context=_apply_rope_setup)


# ---------------------------------------------------------------- fake (shape-only) kernels for torch.compile

@torch.library.register_fake("mythos::inject_rmsnorm")
def _inject_rmsnorm_fake(h, e_inj, a_bar, loop_emb, weight, eps):
    return h.new_empty(h.shape), h.new_empty(h.shape), h.new_empty(h.shape[:-1], dtype=_acc_dtype(h.dtype))


@torch.library.register_fake("mythos::inject_rmsnorm_backward")
def _inject_rmsnorm_backward_fake(grad_z, grad_out, h, e_inj, a_bar, loop_emb, weight, rstd):
    return (h.new_empty(h.shape), h.new_empty(h.shape), a_bar.new_empty(a_bar.shape),
            loop_emb.new_empty(loop_emb.shape), weight.new_empty(weight.shape))


@torch.library.register_fake("mythos::act_step")
def _act_step_fake(p, cum, acc, h, threshold, is_last):
    return p.new_empty(p.shape), cum.new_empty(cum.shape), acc.new_empty(acc.shape)


@torch.library.register_fake("mythos::act_step_backward")
def _act_step_backward_fake(grad_w, grad_cum, grad_acc, p, cum, h, threshold, is_last):
    return p.new_empty(p.shape), cum.new_empty(cum.shape), h.new_empty(h.shape)


@torch.library.register_fake("mythos::moe_permute")
def _moe_permute_fake(x, rows):
    return x.new_empty(rows.shape[0] * rows.shape[1], x.shape[1])


@torch.library.register_fake("mythos::moe_unpermute")
def _moe_unpermute_fake(y, rows, gate):
    return y.new_empty(rows.shape[0], y.shape[1])


@torch.library.register_fake("mythos::moe_unpermute_backward")
def _moe_unpermute_backward_fake(grad_out, y, rows, gate):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


@torch.library.register_fake("mythos::swiglu")
def _swiglu_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("mythos::swiglu_backward")
def _swiglu_backward_fake(grad_out, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@torch.library.register_fake("mythos::apply_rope")
def _apply_rope_fake(x, cos, sin):
    return x.new_empty(x.shape)


@torch.library.register_fake("mythos::apply_rope_backward")
def _apply_rope_backward_fake(grad_out, cos, sin):
    return grad_out.new_empty(grad_out.shape)
