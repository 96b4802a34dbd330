"""The RDT model: shapes, determinism, gradient flow, LTI stability, ACT, truncated backprop,
activation checkpointing, loop embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mythos_scale.config import ModelConfig
from mythos_scale.kernels import select_kernels
from mythos_scale.model import MythosModel, build_model
from mythos_scale.model.moe import RoutedExperts
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
    inj = cfg.injection
    expected = inj.a_bar_min + (inj.a_bar_max - inj.a_bar_min) * torch.exp(torch.tensor(-0.7 * torch.e ** 0.3))
    assert torch.allclose(model.injection.a_bar(), expected.expand(cfg.dim), atol=1e-6)
    e = torch.randn(3, cfg.dim)
    assert torch.allclose(model.injection.inject(e), 0.7 * e, atol=1e-5)  # B = I at init


def _zero_core_updates(model: MythosModel) -> None:
    """Zero every projection that writes into the core's residual stream, so ``Core(z) = 0``."""
    with torch.no_grad():
        for module in model.core.modules():
            if getattr(module, "is_output_projection", False):
                module.weight.zero_()
            elif isinstance(module, RoutedExperts):
                module.w_down.zero_()


def _force_a_bar(model: MythosModel, a_bar: torch.Tensor) -> None:
    """Set A_log so that A_bar takes the given per-channel values."""
    inj = model.injection
    dt = F.softplus(inj.dt_bias.detach())
    fraction = (a_bar - inj.a_bar_min) / (inj.a_bar_max - inj.a_bar_min)
    with torch.no_grad():
        inj.a_log.copy_(torch.log(-torch.log(fraction) / dt))


def test_state_follows_a_bar_as_linear_theory_predicts():
    """With the core's updates zeroed and no loop embedding, h_T = B_bar e (1 - A^T) / (1 - A) per
    channel: rho(A_bar) governs the state's scale.  (A norm on z erased it: any A_bar gave one norm.)"""
    cfg = small_cfg()
    model = build_model(cfg, seed=0).eval()
    _zero_core_updates(model)
    with torch.no_grad():
        model.loop_embedding.gain.zero_()
    seen = {}
    model.prelude_norm.register_forward_hook(lambda m, args, out: seen.__setitem__("e", out))
    model.coda[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))
    ids = tokens(cfg)
    norms = []
    for forced in (0.5, 0.9, 0.99):
        targets = torch.tensor([0.3, forced, 0.7, 0.95]).repeat(cfg.dim // 4)
        _force_a_bar(model, targets)
        a_bar = model.injection.a_bar().detach()
        assert torch.allclose(a_bar, targets, atol=1e-5)
        for loops in (1, 5, 64):
            with torch.no_grad():
                model(ids, n_loops=loops)
                expected = model.injection.inject(seen["e"]) * (1 - a_bar ** loops) / (1 - a_bar)
            torch.testing.assert_close(seen["h"], expected, rtol=1e-4, atol=1e-5)
        norms.append(seen["h"][..., 1::4].norm(dim=-1).mean())  # the channels forced to 0.5 / 0.9 / 0.99
    assert norms[0] < norms[1] < norms[2]
    assert torch.allclose(norms[2] / norms[0], torch.tensor((1 - 0.99 ** 64) / 0.01 * 0.5), rtol=1e-3)


def test_state_stays_bounded_over_many_loops_in_bf16():
    """The real core at a large scale, A_bar pressed to 0.9: in bf16 the state norm levels off (its
    update is bounded: every core block normalizes its input) and tracks the fp32 run."""
    cfg = small_cfg()
    model = build_model(cfg, seed=0).eval()
    _force_a_bar(model, torch.full((cfg.dim,), 0.9))
    with torch.no_grad():
        for module in model.core.modules():  # updates 30x the init scale
            if getattr(module, "is_output_projection", False):
                module.weight.mul_(30)
            elif isinstance(module, RoutedExperts):
                module.w_down.mul_(30)
    ids = tokens(cfg)
    with torch.no_grad():
        fp32 = model(ids, n_loops=96).stats["h_norm"]
        out = model.to(torch.bfloat16)(ids, n_loops=96)
    h_norm = out.stats["h_norm"]
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(h_norm).all()
    assert h_norm[48:].max() / h_norm[48:].min() < 1.1  # levelled off, not growing
    assert h_norm.max() < 2 * h_norm[48]
    assert torch.allclose(h_norm[-1], fp32[-1], rtol=0.05)


def test_input_reenters_at_a_scale_that_matters():
    """rms(A_bar h_t) / rms(B_bar e) stays O(1) at every iteration (it was ~60 with a norm on z
    and an unnormalized prelude output)."""
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    ratio = model(tokens(cfg), n_loops=16).stats["state_to_input"]
    assert ratio[0] == 0  # h_0 = 0
    assert (ratio[1:] > 0.2).all() and (ratio[1:] < 3).all(), ratio


def test_core_change_tells_a_collapsed_recurrence_from_a_live_one():
    """``core_change`` (relative change of the core's update c_t = h_{t+1} - z_t between iterations):
    ~0 when every iteration sees the same input (A_bar at its floor, no loop embedding: z_t = B_bar e
    for all t), clearly not when the loop embedding makes the iterations differ.  A wrong z_t
    (e.g. the loop embedding left out) would show a change in the first case."""
    cfg = small_cfg(injection=dict(a_log_init=12.0))
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.loop_embedding.gain.zero_()
        collapsed = model(tokens(cfg), n_loops=4).stats["core_change"]
        model.loop_embedding.gain.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        live = model(tokens(cfg), n_loops=4).stats["core_change"]
    assert collapsed.shape == live.shape == (3,)
    assert (collapsed < 1e-3).all() and (live > 0.05).all(), (collapsed, live)
    assert "core_change" not in model(tokens(cfg), n_loops=1).stats


def test_a_log_keeps_gradient_at_the_bound():
    """A_bar pressed against a_bar_max still moves A_log (a hard clamp gave it zero gradient)."""
    cfg = small_cfg(injection=dict(a_log_init=-12.0))
    model = build_model(cfg, seed=0)
    a_bar = model.injection.a_bar()
    assert (a_bar < cfg.injection.a_bar_max).all() and (a_bar > cfg.injection.a_bar_max - 1e-4).all()
    a_bar.sum().backward()
    assert (model.injection.a_log.grad != 0).all()


def test_injection_parameters_stay_fp32_through_casts():
    cfg = small_cfg()
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.injection.a_log.fill_(0.1234567)  # not representable in bf16
    model.to(torch.bfloat16)
    inj = model.injection
    assert inj.a_log.dtype == inj.dt_bias.dtype == inj.b.dtype == torch.float32
    assert model.core[0].attn.wo.weight.dtype == torch.bfloat16
    assert (inj.a_log == torch.tensor(0.1234567)).all()  # kept, not rounded through bf16
    assert model(tokens(cfg), n_loops=2).logits.dtype == torch.bfloat16
    assert model.float().injection.a_log.dtype == torch.float32


def test_act_weights_sum_to_one_and_remainder():
    gen = torch.Generator().manual_seed(0)
    steps, threshold = 5, 0.9
    p = torch.rand(steps, 64, generator=gen) * 0.6
    h = torch.randn(steps, 64, 3, generator=gen)
    cum, acc = torch.zeros(64), torch.zeros(64, 3)
    dispatch = select_kernels("auto")
    accumulator = ACTAccumulator(h[0], threshold, dispatch)
    weights = []
    for t in range(steps):
        w, cum, acc = dispatch.act_step(p[t], cum, acc, h[t], threshold, t == steps - 1)
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
        assert torch.allclose(out.stats["mean_loops"], torch.tensor(loops_run))
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


def test_act_trains_under_truncated_backprop():
    """T=8, k=2, a positive halting bias: every position would halt in the no-grad iterations and
    hand the loss a constant (zero gradient everywhere).  Halting is decided and charged only in
    the grad-carrying window, so the core, the prelude and the halting unit all learn."""
    cfg = small_cfg(max_loops=8, act=dict(enabled=True, halt_bias_init=3.0, ponder_cost=0.01))
    model = build_model(cfg, seed=0).train()
    out = model(tokens(cfg)[:, :-1], n_loops=8, backprop_depth=2)
    assert out.loops_used.min() >= 7 and out.loops_used.max() == 8  # 6 warm-up loops, then 1-2 in the window
    lm_loss(model, tokens(cfg), n_loops=8, backprop_depth=2).backward()
    for name in ("core.0.attn.wq.weight", "core.1.ffn.experts.w_up", "prelude.0.attn.wq.weight",
                 "embed.weight", "halting.proj.weight", "halting.proj.bias"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def _rows_per_core_call(model: MythosModel) -> list[int]:
    calls: list[int] = []
    model.core[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def _split_halting(model: MythosModel, ids: torch.Tensor) -> None:
    """Point the halting unit so that batch row 0 halts at once and row 1 never halts early."""
    states = {}
    model.coda[0].register_forward_pre_hook(lambda m, args: states.__setitem__("h", args[0]))
    with torch.no_grad():
        plain = model.halting
        model.halting = None
        model(ids, n_loops=1)
        model.halting = plain
        h0, h1 = states["h"][0].mean(0), states["h"][1].mean(0)
        direction = (h0 - h1) / (h0 - h1).norm()
        scale = 200 / ((states["h"][0] - states["h"][1]) @ direction).min().clamp_min(1e-3)
        plain.proj.weight.copy_(scale * direction)
        plain.proj.bias.fill_(-float(scale * direction @ (h0 + h1) / 2))


def test_act_inference_skips_halted_positions():
    cfg = small_cfg(act=dict(enabled=True))
    model = build_model(cfg, seed=0).eval()
    ids = torch.stack([torch.full((12,), 5), torch.full((12,), 7)])
    _split_halting(model, ids)
    calls = _rows_per_core_call(model)
    with torch.no_grad():
        out = model(ids, n_loops=4)
    assert out.loops_used[0].eq(1).all() and out.loops_used[1].eq(4).all(), out.loops_used
    assert calls == [2, 1, 1, 1]  # row 0 halted: not computed again
    assert torch.equal(out.stats["mean_loops"], torch.tensor(2.5))


def test_kl_exit():
    cfg = small_cfg(max_loops=6)
    model = build_model(cfg, seed=0).eval()
    ids = tokens(cfg)
    with torch.no_grad():  # iterations whose predictions differ: a loud loop embedding, sharp logits
        model.loop_embedding.gain.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        model.embed.weight.mul_(20)
        plain = model(ids, n_loops=6)
        never = model(ids, n_loops=6, exit_threshold=0.0)  # KL is never < 0: all loops
        assert never.loops_used.eq(6).all() and torch.allclose(never.logits, plain.logits, atol=1e-5)
        always = model(ids, n_loops=6, exit_threshold=1e9)  # every position exits at its first check
        assert always.loops_used.eq(2).all()
        assert torch.allclose(always.logits, model(ids, n_loops=2).logits, atol=1e-5)
        kl = [model(ids, n_loops=6, exit_threshold=tau) for tau in (1e-4, 1e-3, 1e-2, 1e-1)]
    used = [out.stats["mean_loops"].item() for out in kl]
    assert used == sorted(used, reverse=True) and used[0] > used[-1], used  # per token, monotone
    assert any(0 < (out.loops_used < 6).float().mean() < 1 for out in kl)  # some positions exit, some run on
    with pytest.raises(ValueError, match="model.eval"):
        model.train()(ids, n_loops=2, exit_threshold=1e-3)
    with pytest.raises(ValueError, match=">= 0"):
        model.eval()(ids, n_loops=2, exit_threshold=-1.0)
    with pytest.raises(ValueError, match="ACT"):
        build_model(small_cfg(act=dict(enabled=True)), seed=0).eval()(ids, n_loops=2, exit_threshold=1e-3)


def test_kl_exit_decoding_skips_exited_tokens():
    """Token-by-token decoding with the KL exit: each token runs its own number of loops, a batch
    row whose token has exited is not computed again, and later tokens read the cache slots the
    exited token's last iteration filled."""
    cfg = small_cfg(max_loops=6)
    model = build_model(cfg, seed=0).eval()
    ids = tokens(cfg, batch=2, seq=10)
    with torch.no_grad():
        model.loop_embedding.gain.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        model.embed.weight.mul_(20)
    calls = _rows_per_core_call(model)
    cache = model.new_cache(2)
    used = []
    with torch.no_grad():
        model(ids[:, :4], 6, cache=cache, exit_threshold=0.0)
        calls.clear()
        for pos in range(4, 10):
            out = model(ids[:, pos:pos + 1], 6, cache=cache, start_pos=pos, exit_threshold=1e-2)
            assert torch.isfinite(out.logits).all()
            used.append(out.loops_used[:, 0])
    used = torch.stack(used)
    assert used.min() >= 2 and used.max() <= 6 and used.float().mean() < 6
    assert sum(calls) == int(used.sum())  # one core row per token and loop actually run
    assert all(layer.buffers[0][:, 4:10].abs().sum(-1).gt(0).all() for key, layer in cache.layers.items()
               if key[0] == "core")  # every iteration's slot is filled, computed or copied


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


LOOP_INVARIANT = dict(lora_rank=0, loop_embedding="none", moe=dict(depth_routing=False))


@pytest.mark.parametrize("depth_signal", [None, "lora_rank", "loop_embedding", "depth_routing"])
def test_loop_invariant_core(depth_signal):
    """With no LoRA, no loop embedding and no depth routing the core is one function at every
    iteration (the balancing bias has a single row); restoring any one of the three makes
    iteration 0 and iteration max_loops + 1 differ."""
    overrides = dict(LOOP_INVARIANT)
    overrides.update({"lora_rank": dict(lora_rank=2), "loop_embedding": dict(loop_embedding="learned"),
                      "depth_routing": dict(moe=dict(depth_routing=True)), None: {}}[depth_signal])
    cfg = small_cfg(**overrides)
    model = build_model(cfg, seed=0).train()
    with torch.no_grad():  # every depth-indexed parameter away from its zero init
        for name, p in model.named_parameters():
            if "lora_b" in name or "depth_bias" in name or "loop_embedding" in name:
                p.normal_(0, 0.5)
        for block in model.core:
            block.ffn.balance_bias.normal_(0, 0.5)
    assert model.core[0].ffn.balance_bias.shape[0] == (1 if depth_signal != "depth_routing" else cfg.max_loops)
    h = torch.randn(2, 12, cfg.dim, generator=torch.Generator().manual_seed(1))
    e_inj, a_bar = torch.randn_like(h), model.injection.a_bar()
    first, _, _ = model._iterate(h, e_inj, a_bar, 0, None, 0)
    far, _, _ = model._iterate(h, e_inj, a_bar, cfg.max_loops + 1, None, 0)
    assert torch.equal(first, far) == (depth_signal is None)


def test_loop_invariant_core_counts_every_iteration_in_one_row():
    cfg = small_cfg(**LOOP_INVARIANT)
    model = build_model(cfg, seed=0).train()
    assert not any("loop_embedding" in name for name, _ in model.named_parameters())
    lm_loss(model, tokens(cfg), n_loops=cfg.max_loops + 2, backprop_depth=2).backward()
    counts = torch.stack([b.ffn.expert_counts for b in model.core])
    assert counts.shape == (2, 1, cfg.moe.n_routed_experts)
    assert counts.sum(-1).flatten().tolist() == [(cfg.max_loops + 2) * 2 * 11 * cfg.moe.top_k] * 2


@pytest.mark.parametrize("kind", ["sinusoidal", "learned"])
def test_loop_embedding_init_scale(kind):
    """``loop_embedding_init`` sets the embedding's initial scale (default init_std / 10), in
    ``__init__`` and in ``reset_parameters`` alike."""
    cfg = small_cfg(loop_embedding=kind)
    default = build_model(cfg, seed=0).loop_embedding(3)
    scaled_cfg = small_cfg(loop_embedding=kind, loop_embedding_init=0.5)
    scaled = build_model(scaled_cfg, seed=0).loop_embedding(3)
    fresh = MythosModel(scaled_cfg).loop_embedding  # not reset: __init__'s value (sinusoidal) or uninitialized
    assert torch.allclose(scaled, default * (0.5 / (cfg.init_std / 10)), rtol=1e-5)
    if kind == "sinusoidal":
        assert torch.equal(fresh(3), scaled)


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
