"""DeepSeekMoE: dropless sorted dispatch equals a naive reference, grouped-GEMM experts equal a
per-expert loop, the combine is deterministic (a recompute is bitwise the forward, against an
adversarial accumulation order), bias-based selection, per-depth routing, balance statistics,
the auxiliary-loss-free bias update, dtype casts and meta-device builds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import small_cfg, tokens
from torch.utils.checkpoint import CheckpointError, checkpoint

from mythos_scale.kernels import reference
from mythos_scale.model import MoE, MythosModel, build_model, update_balance_bias
from mythos_scale.model import moe as mythos_moe

torch.set_num_threads(2)


def make_moe(**moe) -> MoE:
    cfg = small_cfg(moe=dict(n_routed_experts=6, top_k=2) | moe)
    layer = MoE(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor, loop: int) -> torch.Tensor:
    """Every token, every one of its chosen experts, one at a time."""
    flat = x.reshape(-1, x.shape[-1])
    _, chosen, gates = layer.route(flat, loop)
    e = layer.experts
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(layer.top_k):
            i = int(chosen[n, j])
            hidden = F.silu(flat[n] @ e.w_gate[i].T) * (flat[n] @ e.w_up[i].T)
            out[n] += gates[n, j] * (hidden @ e.w_down[i].T)
    out = out + layer.shared(flat)
    return out.view_as(x)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_sorted_dispatch_equals_naive_reference(score_func):
    layer = make_moe(score_func=score_func)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    y, _, counts = layer(x, loop=1)
    assert torch.allclose(y, naive_moe(layer, x, 1), atol=1e-5)
    assert counts.sum() == 3 * 7 * layer.top_k  # dropless: every (token, expert) pair ran


def test_dropless_under_extreme_imbalance():
    layer = make_moe()
    with torch.no_grad():
        layer.balance_bias[0] = torch.tensor([100.0, 100.0, 0, 0, 0, 0])  # everyone picks experts 0 and 1
    x = torch.randn(40, 1, 32, generator=torch.Generator().manual_seed(2))
    y, _, counts = layer(x, loop=0)
    assert counts.tolist() == [40, 40, 0, 0, 0, 0]
    assert torch.allclose(y, naive_moe(layer, x, 0), atol=1e-5)


def test_balance_bias_changes_selection_not_gates():
    layer = make_moe(score_func="sigmoid", route_scale=1.5)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(3))
    scores, chosen, gates = layer.route(x, 0)
    with torch.no_grad():
        layer.balance_bias[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 5.0])
    biased_scores, biased_chosen, biased_gates = layer.route(x, 0)
    assert torch.equal(scores, biased_scores)
    assert not torch.equal(chosen, biased_chosen)
    assert (biased_chosen.sort(-1).values == torch.tensor([4, 5])).all()
    picked = scores.gather(-1, biased_chosen)
    assert torch.allclose(biased_gates, 1.5 * picked / picked.sum(-1, keepdim=True))


def test_per_depth_routing_differs():
    layer = make_moe()
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(4))
    _, chosen_0, _ = layer.route(x, 0)
    _, chosen_1, _ = layer.route(x, 1)
    _, chosen_far, _ = layer.route(x, 100)  # beyond max_loops: the last depth's row
    _, chosen_last, _ = layer.route(x, layer.balance_bias.shape[0] - 1)
    assert not torch.equal(chosen_0, chosen_1)
    assert torch.equal(chosen_far, chosen_last)


def test_sequence_aux_loss_is_differentiable():
    layer = make_moe(aux_loss_coef=0.1)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(5))
    _, aux, _ = layer(x, loop=0)
    assert aux > 0
    aux.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_balance_counts_per_depth_and_bias_update():
    cfg = small_cfg(moe=dict(n_routed_experts=4, top_k=2))
    model = build_model(cfg, seed=0).train()
    ids = tokens(cfg, batch=2, seq=10)
    model(ids, n_loops=3)
    counts = torch.stack([b.ffn.expert_counts for b in model.core])  # (layers, max_loops, E)
    assert torch.equal(counts.sum(-1), torch.tensor([[40, 40, 40, 0]] * 2))
    before = torch.stack([b.ffn.balance_bias.clone() for b in model.core])

    seen_shapes = []

    def double(t: torch.Tensor) -> None:  # stands in for an all-reduce over 2 identical ranks
        seen_shapes.append(tuple(t.shape))
        t.mul_(2)

    stats = update_balance_bias(model, rate=0.01, all_reduce=double)
    assert seen_shapes == [(2, cfg.max_loops, 4)]
    after = torch.stack([b.ffn.balance_bias for b in model.core])
    counts = counts.float()
    expected = 0.01 * torch.sign(counts.mean(-1, keepdim=True) - counts)
    expected[:, 3] = 0  # depth 3 saw no tokens: untouched
    assert torch.allclose(after - before, expected)
    assert all(b.ffn.expert_counts.sum() == 0 for b in model.core)
    ratios = counts.amax(-1) / counts.mean(-1)
    for t in range(3):
        assert stats[f"moe/load_max_over_mean/depth_{t}"] == pytest.approx(float(ratios[:, t].max()))
    assert "moe/load_max_over_mean/depth_3" not in stats

    model.eval()
    model(ids, n_loops=3)
    assert all(b.ffn.expert_counts.sum() == 0 for b in model.core)  # eval forwards do not count


def test_balance_bias_is_persistent_state():
    model = build_model(small_cfg(), seed=0)
    keys = model.state_dict().keys()
    assert "core.0.ffn.balance_bias" in keys and "core.0.ffn.expert_counts" not in keys


# ---------------------------------------------------------------- grouped GEMM experts

def plain_expert_loop(experts, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert on its slice with its own weights, one at a time."""
    out = [F.linear(F.silu(F.linear(r, experts.w_gate[e])) * F.linear(r, experts.w_up[e]), experts.w_down[e])
           for e, r in enumerate(x_sorted.split(counts))]
    return torch.cat(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_experts_equal_a_per_expert_loop(dtype):
    """Forward and every gradient, with empty experts, against a plain loop; fp64 (no grouped_mm)
    takes the per-expert fallback, which must agree too."""
    experts = make_moe().experts.to(dtype)
    counts = [5, 0, 9, 1, 0, 7]
    group_end = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(0), dtype=dtype)
    grad = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    params = list(experts.parameters())

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        return [out, *torch.autograd.grad(out, [xi, *params], grad)]

    assert mythos_moe.grouped_mm_supported(x, experts.w_gate)
    grouped = run(lambda xi: experts(xi, group_end))
    looped = run(lambda xi: plain_expert_loop(experts, xi, counts))
    for name, g, ref in zip(["out", "x", "w_gate", "w_up", "w_down"], grouped, looped):
        # bf16: a few ulps of the largest entry (the two sum in different orders)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2 * ref.abs().max().item(),
                                                                              rtol=2e-2)
        torch.testing.assert_close(g, ref, **tol, msg=lambda m: f"{name}: {m}")
    assert grouped[3][1].abs().sum() == 0  # expert 1 saw no token: zero gradient

    experts64 = experts.double()
    assert not mythos_moe.grouped_mm_supported(x.double(), experts64.w_gate)
    torch.testing.assert_close(experts64(x.double(), group_end), plain_expert_loop(experts64, x.double(), counts))


def test_dispatch_plan_is_a_permutation_grouped_by_expert():
    layer = make_moe(n_routed_experts=5, top_k=3)
    chosen = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(i))[:3] for i in range(11)])
    rows, group_end = layer.dispatch_plan(chosen)
    assert rows.shape == (11, 3) and group_end.dtype == torch.int32
    assert torch.equal(rows.flatten().sort().values, torch.arange(33))
    sorted_expert = torch.empty(33, dtype=torch.long).index_copy_(0, rows.flatten(), chosen.flatten())
    assert torch.equal(sorted_expert, sorted_expert.sort().values)  # rows grouped by expert
    assert group_end.tolist() == torch.bincount(chosen.flatten(), minlength=5).cumsum(0).tolist()


# ---------------------------------------------------------------- deterministic combine and recompute

def near_tie_chain(seed: int, n_layers: int = 2) -> list[MoE]:
    """bf16 MoE layers whose router rows are almost equal: most tokens have near-tie top-k choices,
    so a 1-ulp change in a layer's input flips some of them (top_k 4: an order-dependent sum)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        layer = make_moe(n_routed_experts=8, top_k=4, depth_routing=False)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            base = torch.randn(1, 32, generator=gen)
            layer.router.weight.copy_(base + 1e-3 * torch.randn(8, 32, generator=gen))
        layers.append(layer.bfloat16())
    return layers


def atomic_order_forward(arrivals: torch.Generator):
    """The MoE as it ran before (experts as a per-expert loop, so shapes follow the routing;
    outputs scatter-added), with the combine CUDA's ``index_add`` does: bf16 atomic adds
    arriving in an arbitrary order, a new one on every call (and so on every recompute)."""
    def forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, chosen, gates = layer.route(flat, 0)
        rows, group_end = layer.dispatch_plan(chosen)
        y_sorted = layer.experts.per_expert_loop(reference.moe_permute(flat, rows), group_end)
        pairs = y_sorted[rows] * gates[..., None].to(flat.dtype)  # (N, k, D), each token's k outputs
        arrival = torch.rand(chosen.shape, generator=arrivals).argsort(dim=-1)
        combined = flat.new_zeros(flat.shape)
        for j in range(layer.top_k):  # one bf16 atomic add per (token, slot), in arrival order
            combined = combined + pairs.gather(1, arrival[:, j, None, None].expand(-1, 1, flat.shape[-1]))[:, 0]
        return (combined + layer.shared(flat)).view_as(x)
    return forward


def our_forward(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    return layer(x, 0)[0]


def run_chain(layers: list[MoE], x: torch.Tensor, forward) -> torch.Tensor:
    for layer in layers:
        x = x + forward(layer, x)
    return x


def chain_input(seed: int) -> torch.Tensor:
    return torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(100 + seed)).bfloat16()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recompute_reproduces_the_forward_bitwise(seed):
    """Ours: a second forward (what activation checkpointing recomputes) is bitwise the first,
    and a checkpointed backward gives bitwise the plain backward.  The adversary (the old
    scatter-add combine in CUDA's arbitrary atomic order, bf16 rounding per add) changes the
    output bits and flips near-tie routing in the next layer, which the same check catches."""
    layers, x = near_tie_chain(seed), chain_input(seed)
    with torch.no_grad():
        assert torch.equal(run_chain(layers, x, our_forward), run_chain(layers, x, our_forward))
        adversary = atomic_order_forward(torch.Generator().manual_seed(seed))
        first, second = run_chain(layers[:1], x, adversary), run_chain(layers[:1], x, adversary)
        assert not torch.equal(first, second)
        flat = lambda t: t.reshape(-1, 32)  # noqa: E731
        assert not torch.equal(layers[1].route(flat(first), 0)[1], layers[1].route(flat(second), 0)[1])

    params = [p for layer in layers for p in layer.parameters()]

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_()
        fn = lambda t: run_chain(layers, t, our_forward)  # noqa: E731
        out = checkpoint(fn, xi, use_reentrant=False) if checkpointed else fn(xi)
        return list(torch.autograd.grad(out.float().pow(2).sum(), [xi, *params], allow_unused=True))

    for plain, recomputed in zip(grads(False), grads(True)):
        assert (plain is None and recomputed is None) or torch.equal(plain, recomputed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checkpointed_backward_at_near_ties_raises_only_with_the_old_combine(seed):
    """What the first GPU backward of the 770M config would have hit: the recompute routes
    differently, the per-expert slices change shape and non-reentrant checkpointing raises
    CheckpointError.  Ours recomputes the same routing, so the backward runs."""
    layers, x = near_tie_chain(seed), chain_input(seed).requires_grad_()
    adversary = atomic_order_forward(torch.Generator().manual_seed(seed))
    out = checkpoint(lambda t: run_chain(layers, t, adversary), x, use_reentrant=False)
    with pytest.raises(CheckpointError, match="different metadata"):
        out.float().pow(2).sum().backward()
    x.grad = None
    out = checkpoint(lambda t: run_chain(layers, t, our_forward), x, use_reentrant=False)
    out.float().pow(2).sum().backward()
    assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- dtype casts and meta-device builds

def test_balance_bias_stays_fp32_through_casts_and_to_empty():
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.core[0].ffn.balance_bias.fill_(1e-3)
    model.bfloat16()
    moe = model.core[0].ffn
    assert moe.balance_bias.dtype == torch.float32 and moe.balance_bias[0, 0].item() == pytest.approx(1e-3, rel=1e-6)
    assert moe.experts.w_gate.dtype == torch.bfloat16 and moe.expert_counts.dtype == torch.long
    model.to(torch.float32)
    assert moe.balance_bias.dtype == torch.float32

    with torch.device("meta"):
        meta = MythosModel(cfg)
    meta.bfloat16().to_empty(device="cpu")  # failed before: the fp32 bias was copied out of meta
    assert meta.core[0].ffn.balance_bias.device.type == "cpu"
    assert meta.core[0].ffn.balance_bias.dtype == torch.float32


def test_meta_built_model_materializes_to_the_same_weights():
    """Build on the meta device (no memory), to_empty, reset_parameters: the model build_model makes."""
    cfg = small_cfg()
    with torch.device("meta"):
        model = MythosModel(cfg)
    assert all(p.device.type == "meta" for p in model.parameters())
    model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(3))
    expected = build_model(cfg, seed=3)
    state, ref = model.state_dict(), expected.state_dict()
    assert state.keys() == ref.keys()
    for name in ref:
        assert torch.equal(state[name], ref[name]), name
    for name, buffer in expected.named_buffers():  # non-persistent ones too (rope tables, counts)
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    ids = tokens(cfg)
    assert torch.equal(model(ids, n_loops=2).logits, expected(ids, n_loops=2).logits)
