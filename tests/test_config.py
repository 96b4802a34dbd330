"""The config schema: defaults, overrides, and a clear error for each kind of bad input."""

import pytest

from mythos_scale.config import ConfigError, apply_overrides, load_config


def _error(tmp_path, text: str = "", overrides: list[str] | None = None) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return str(info.value)


def test_defaults_and_overrides_apply():
    cfg = load_config(None, ["model.dim=320", "train.max_steps=7", "model.moe.top_k=3",
                             "train.betas=[0.8, 0.9]", "model.act.enabled=true"])
    assert cfg.model.dim == 320 and cfg.train.max_steps == 7 and cfg.model.moe.top_k == 3
    assert cfg.train.betas == (0.8, 0.9) and cfg.model.act.enabled is True


def test_shipped_configs_load():
    for name in ("tiny_cpu", "mythos_770m"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.model.vocab_size > 0


def test_unknown_key_is_named(tmp_path):
    msg = _error(tmp_path, "model:\n  dimm: 3\n")
    assert "model.dimm" in msg and "unknown key" in msg


def test_unknown_key_suggests_the_nearest_in_its_own_section(tmp_path):
    msg = _error(tmp_path, overrides=["train.max_step=7", "model.attention.kv_lora_rnk=3",
                                      "data.stages=[{start_step: 2, sources: [{path: a, wieght: 2}]}]"])
    assert "train.max_step: unknown key (did you mean train.max_steps?)" in msg
    assert "did you mean model.attention.kv_lora_rank?" in msg
    assert "did you mean data.stages.0.sources.0.weight?" in msg  # through list items
    assert "did you mean" not in _error(tmp_path, overrides=["train.zzzzzz=1"])  # nothing close: no guess


def test_wrong_type_is_named(tmp_path):
    msg = _error(tmp_path, "train:\n  max_steps: many\n")
    assert "train.max_steps" in msg


def test_heads_must_divide_dim_for_gqa(tmp_path):
    msg = _error(tmp_path, "model:\n  dim: 100\n  n_heads: 3\n  attention: {type: gqa}\n")
    assert "model.n_heads" in msg and "divide" in msg


def test_top_k_larger_than_experts(tmp_path):
    msg = _error(tmp_path, "model:\n  moe: {n_routed_experts: 4, top_k: 5}\n")
    assert "model.moe.top_k" in msg


def test_odd_rope_dim(tmp_path):
    msg = _error(tmp_path, "model:\n  attention: {qk_rope_head_dim: 7}\n")
    assert "model.attention.qk_rope_head_dim" in msg and "even" in msg


def test_batch_not_multiple_of_micro(tmp_path):
    msg = _error(tmp_path, "train: {micro_batch_size: 3, global_batch_size: 8}\n")
    assert "train.global_batch_size" in msg


def test_loop_range(tmp_path):
    msg = _error(tmp_path, "train:\n  loops: {min: 2, mean: 1, max: 4}\n")
    assert "train.loops.mean" in msg


def test_a_bar_bounds(tmp_path):
    msg = _error(tmp_path, "model:\n  injection: {a_bar_max: 0.999}\n")
    assert "model.injection.a_bar_max" in msg and "rounds to 1.0 in bfloat16" in msg
    assert load_config(None, ["model.injection.a_bar_max=0.998"]).model.injection.a_bar_max == 0.998
    msg = _error(tmp_path, "model:\n  injection: {a_bar_min: 0.95, a_bar_max: 0.9}\n")
    assert "model.injection.a_bar_min" in msg and "below" in msg


def test_seq_len_beyond_model(tmp_path):
    msg = _error(tmp_path, "model: {max_seq_len: 64}\ndata: {seq_len: 128}\n")
    assert "data.seq_len" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    assert "not valid YAML" in _error(tmp_path, "model: [unclosed\n")
    assert "mapping" in _error(tmp_path, "- a\n- b\n")


def test_bad_override_forms():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.dim"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": {"dim": 3}}, ["model.dim.x=1"])
    with pytest.raises(ConfigError, match="model.dim"):
        load_config(None, ["model.dim=-5"])
    with pytest.raises(ConfigError, match=r"data.sources is a list of 1 item\(s\) here; .* index 0..0, not '1'"):
        apply_overrides({"data": {"sources": [{"path": "a"}]}}, ["data.sources.1.weight=2"])
    with pytest.raises(ConfigError, match="not 'weight'"):
        apply_overrides({"data": {"sources": [{"path": "a"}]}}, ["data.sources.weight=2"])


def test_overrides_address_list_items():
    raw = {"data": {"sources": [{"path": "a", "weight": 1}, {"path": "b", "weight": 1}]}}
    out = apply_overrides(raw, ["data.sources.1.weight=3", "data.sources.0.path=c"])
    assert out["data"]["sources"] == [{"path": "c", "weight": 1}, {"path": "b", "weight": 3}]
    assert raw["data"]["sources"][1]["weight"] == 1  # the input is not changed


def test_print_config_shows_the_resolved_config_and_exits(tmp_path):
    import subprocess
    import sys

    import yaml

    from mythos_scale.config import config_from_dict

    result = subprocess.run([sys.executable, "-m", "mythos_scale.cli", "train", "--config", "configs/tiny_cpu.yaml",
                             "--print-config", "train.max_steps=7", f"train.out_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = config_from_dict(yaml.safe_load(result.stdout))  # every default filled in, loadable as is
    assert printed == load_config("configs/tiny_cpu.yaml", ["train.max_steps=7", f"train.out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
