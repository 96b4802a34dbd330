"""The RDT model: shapes, determinism, gradient flow, LTI stability, ACT, truncated backprop,
activation checkpointing, loop embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import ops
from mythos_scale.model import MythosModel, build_model
from mythos_scale.model.recurrence import ACTAccumulator

torch.set_num_threads(2)


def small_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, dim=32, n_heads=2, prelude_layers=1, core_layers=2, coda_layers=1,
                max_loops=4, max_seq_len=32, dense_ffn_hidden=48, lora_rank=2,
                attention=dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
                moe=dict(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return ModelConfig(**base)


def tokens(cfg: ModelConfig, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: MythosModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(ids[:, :-1], **kwargs)
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    return ce + out.moe_aux_loss + out.ponder_cost


def test_shapes_dtype_and_stats():
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    out = model(tokens(cfg), n_loops=3)
    assert out.logits.shape == (2, 12, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert out.moe_aux_loss.ndim == 0 and out.ponder_cost.ndim == 0
    assert out.stats["h_norm"].shape == (3,) and out.stats["update_norm"].shape == (3,)
    assert not out.stats["h_norm"].requires_grad
    assert torch.equal(out.stats["rho_a_bar"], model.spectral_radius())
    assert model(tokens(cfg)).stats["h_norm"].shape == (model.default_loops,) == (cfg.max_loops // 2,)


def test_bf16_forward():
    cfg = small_cfg()
    model = build_model(cfg, seed=0).to(torch.bfloat16)
    out = model.train()(tokens(cfg), n_loops=2)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    moe = model.core[0].ffn
    assert moe.balance_bias.dtype == torch.float32 and moe.expert_counts.dtype == torch.long
    assert moe.expert_counts.sum(-1).tolist() == [2 * 12 * cfg.moe.top_k] * 2 + [0] * (cfg.max_loops - 2)


def test_deterministic_given_seed():
    cfg = small_cfg()
    a, b, c = build_model(cfg, seed=3), build_model(cfg, seed=3), build_model(cfg, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embed.weight, c.embed.weight)
    ids = tokens(cfg)
    assert torch.equal(a(ids, 3).logits, b(ids, 3).logits)


def test_gradients_reach_every_parameter():
    cfg = small_cfg(act=dict(enabled=True, halt_bias_init=0.0), loop_embedding="learned", tie_embeddings=False,
                    sandwich_norm=True, lora_targets=["q", "kv", "o", "router"],
                    attention=dict(q_lora_rank=8), moe=dict(aux_loss_coef=0.01))
    model = build_model(cfg, seed=0).train()
    with torch.no_grad():  # LoRA A only gets gradient once B != 0 (B is zero-initialized)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02)
    lm_loss(model, tokens(cfg, batch=4, seq=16), n_loops=cfg.max_loops).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spectral_radius_below_one_at_extremes(dtype):
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    inj = model.injection
    for a_log, dt_bias in [(-30.0, -30.0), (-30.0, 30.0), (30.0, 30.0), (30.0, -30.0), (0.0, 0.0)]:
        with torch.no_grad():
            inj.a_log.fill_(a_log)
            inj.dt_bias.fill_(dt_bias)
        cast = model.to(dtype)
        a_bar = cast.injection.a_bar().to(dtype)
        assert (a_bar < 1.0).all() and (a_bar > 0.0).all(), (a_log, dt_bias, a_bar.max())
        assert cast.spectral_radius() < 1.0
        model = cast.float()
        inj = model.injection


def test_injection_math():
    cfg = small_cfg(injection=dict(a_log_init=0.3, dt_init=0.7))
    model = build_model(cfg, seed=0)
    expected = torch.exp(torch.tensor(-0.7 * torch.e ** 0.3))
    assert torch.allclose(model.injection.a_bar(), expected.expand(cfg.dim), atol=1e-6)
    e = torch.randn(3, cfg.dim)
    assert torch.allclose(model.injection.inject(e), 0.7 * e, atol=1e-5)  # B = I at init


def test_act_weights_sum_to_one_and_remainder():
    gen = torch.Generator().manual_seed(0)
    steps, threshold = 5, 0.9
    p = torch.rand(steps, 64, generator=gen) * 0.6
    h = torch.randn(steps, 64, 3, generator=gen)
    cum, acc = torch.zeros(64), torch.zeros(64, 3)
    accumulator = ACTAccumulator(h[0], threshold)
    weights = []
    for t in range(steps):
        w, cum, acc = ops().act_step(p[t], cum, acc, h[t], threshold, t == steps - 1)
        accumulator.step(p[t], h[t], t == steps - 1)
        weights.append(w)
    w = torch.stack(weights)
    assert torch.allclose(w.sum(0), torch.ones(64)) and (w >= 0).all()
    assert torch.allclose(acc, (w.unsqueeze(-1) * h).sum(0), atol=1e-6)
    assert torch.equal(accumulator.acc, acc) and torch.equal(accumulator.cum, cum)
    for i in range(64):
        halt = int(torch.nonzero(w[:, i]).max())
        assert torch.allclose(w[halt, i], 1 - p[:halt, i].sum(), atol=1e-6)  # remainder R
        assert torch.allclose(w[:halt, i], p[:halt, i])
        assert accumulator.steps[i] == halt + 1 and torch.allclose(accumulator.remainder[i], w[halt, i])


def test_act_limits_and_ponder_cost():
    tau = 0.01
    ids = tokens(small_cfg())
    plain = build_model(small_cfg(), seed=0).eval()
    for bias, loops_run, equal_to_loops in [(30.0, 1.0, 1), (-30.0, 4.0, 4)]:
        cfg = small_cfg(act=dict(enabled=True, ponder_cost=tau, halt_bias_init=bias))
        model = build_model(cfg, seed=0).eval()
        model.load_state_dict(plain.state_dict(), strict=False)
        out = model(ids, n_loops=4)
        assert torch.allclose(out.stats["act_mean_steps"], torch.tensor(loops_run))
        # N steps plus remainder R = 1 (all weight on the halting step)
        assert torch.allclose(out.ponder_cost, torch.tensor(tau * (loops_run + 1.0)), atol=1e-6)
        assert torch.allclose(out.logits, plain(ids, n_loops=equal_to_loops).logits, atol=1e-5)


def test_ponder_cost_is_differentiable():
    cfg = small_cfg(act=dict(enabled=True, halt_bias_init=0.0, threshold=0.99))
    model = build_model(cfg, seed=0)
    out = model(tokens(cfg), n_loops=3)
    out.ponder_cost.backward()
    assert model.halting.proj.weight.grad.abs().sum() > 0
    assert model.halting.proj.bias.grad.abs() > 0


def test_truncated_backprop_grads_only_last_k_iterations():
    cfg = small_cfg(lora_targets=["q", "o"])
    model = build_model(cfg, seed=0).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02)
    ids = tokens(cfg)
    full = lm_loss(model, ids, n_loops=4)
    truncated = lm_loss(model, ids, n_loops=4, backprop_depth=1)
    assert torch.allclose(full, truncated)  # the forward is unchanged
    truncated.backward()
    core = model.core[0]
    assert core.attn.wq.lora_b.grad[:3].abs().sum() == 0 and core.attn.wq.lora_b.grad[3].abs().sum() > 0
    assert core.ffn.depth_bias.grad[:3].abs().sum() == 0 and core.ffn.depth_bias.grad[3].abs().sum() > 0
    assert model.prelude[0].attn.wq.weight.grad.abs().sum() > 0  # B_bar e reaches the last iteration
    model.zero_grad()
    lm_loss(model, ids, n_loops=4, backprop_depth=0).backward()
    assert core.attn.wq.weight.grad is None or core.attn.wq.weight.grad.abs().sum() == 0


def test_activation_checkpointing_changes_no_gradient():
    ids = tokens(small_cfg())
    grads = []
    for checkpointing in (False, True):
        model = build_model(small_cfg(activation_checkpointing=checkpointing), seed=0).train()
        lm_loss(model, ids, n_loops=3, backprop_depth=2).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        counts = torch.stack([b.ffn.expert_counts for b in model.core])
        # the recompute in backward must not count tokens twice
        assert torch.equal(counts.sum(-1)[:, :3], torch.full((2, 3), 2 * 11 * 2))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_loops_beyond_max(kind):
    cfg = small_cfg(loop_embedding=kind)
    model = build_model(cfg, seed=0)
    last, beyond = model.loop_embedding(cfg.max_loops - 1), model.loop_embedding(cfg.max_loops + 2)
    assert torch.equal(last, beyond) == (kind == "learned")
    out = model(tokens(cfg), n_loops=cfg.max_loops + 2)
    assert torch.isfinite(out.logits).all()


def test_gqa_forward_backward():
    cfg = small_cfg(n_heads=4, attention=dict(type="gqa", n_kv_heads=2), lora_targets=["q", "kv", "o"])
    model = build_model(cfg, seed=0)
    lm_loss(model, tokens(cfg), n_loops=2).backward()
    assert model.core[0].attn.wkv.weight.grad.abs().sum() > 0


def test_dense_core_when_moe_disabled():
    cfg = small_cfg(moe=dict(enabled=False))
    model = build_model(cfg, seed=0)
    out = model(tokens(cfg), n_loops=2)
    assert out.moe_aux_loss == 0 and out.logits.shape[-1] == cfg.vocab_size


def test_no_weight_decay_names():
    model = build_model(small_cfg(), seed=0)
    names = model.no_weight_decay_names()
    assert {"injection.a_log", "injection.dt_bias", "injection.b", "core.0.ffn.depth_bias",
            "loop_embedding.gain", "norm.weight", "core.1.attn_norm.weight"} <= names
    assert "core.0.attn.wq.weight" not in names and "core.0.ffn.experts.w_up" not in names


def test_output_projections_get_depth_scaled_init():
    cfg = small_cfg(dim=256, dense_ffn_hidden=256, init_std=0.02)
    model = build_model(cfg, seed=0)
    depth = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * model.default_loops
    assert abs(model.core[0].attn.wq.weight.std() - 0.02) < 2e-3
    assert abs(model.core[0].attn.wo.weight.std() - 0.02 / (2 * depth) ** 0.5) < 1e-3
    assert torch.count_nonzero(model.core[0].attn.wo.lora_b) == 0


def test_bad_inputs_are_named():
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    with pytest.raises(ValueError, match="n_loops"):
        model(tokens(cfg), n_loops=0)
    with pytest.raises(ValueError, match="backprop_depth"):
        model(tokens(cfg), n_loops=2, backprop_depth=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(cfg, seq=cfg.max_seq_len + 1))
