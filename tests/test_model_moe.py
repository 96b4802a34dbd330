"""DeepSeekMoE: dropless sorted dispatch equals a naive reference, bias-based selection,
per-depth routing, balance statistics and the auxiliary-loss-free bias update."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mythos_scale.model import MoE, build_model, update_balance_bias
from test_model import small_cfg, tokens

torch.set_num_threads(2)


def make_moe(**moe) -> MoE:
    cfg = small_cfg(moe=dict(n_routed_experts=6, top_k=2, **moe))
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
