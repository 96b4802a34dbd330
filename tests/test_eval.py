"""mythos eval / generate / ckpt on exported folders: bits per byte computed two ways, the KL
exit at threshold 0, every requested loop count in --json, and bad input (exit status 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_TRAIN, subprocess_env

torch.set_num_threads(2)


def tiny_cfg(dataset: Path, *overrides: str):
    from mythos_scale.config import load_config

    return load_config(REPO / "configs" / "tiny_cpu.yaml",
                       [*TINY_TRAIN, f"data.sources=[{{path: {dataset}}}]", *overrides])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_dataset) -> Path:
    """An exported folder of a tiny model (random weights, adapters switched on), with the
    dataset's tokenizer."""
    from mythos_scale.eval.export import write_export
    from mythos_scale.model import build_model

    cfg = tiny_cfg(tiny_dataset)
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("export") / "model"
    write_export(out, model.state_dict(), cfg, tiny_dataset / "tokenizer.json", {"step": 0})
    return out


def mythos(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mythos_scale.cli", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bits_per_byte_via_tokens_equals_via_bytes(exported, tiny_dataset):
    """bits/byte from the per-token byte counts equals bits/byte from the UTF-8 bytes of the text
    the predicted tokens decode to, on a known text with multi-byte characters."""
    from mythos_scale.data.tokenizer import load_tokenizer
    from mythos_scale.eval.evaluate import EvalMode, evaluate
    from mythos_scale.eval.load import load_model
    from mythos_scale.eval.text_bytes import token_byte_lengths

    loaded = load_model(exported)
    tok = load_tokenizer(tiny_dataset / "tokenizer.json")
    text = "def naïve(x):\n    return {'café': x, 'π': 3.14159, 'ß': \"straße\"}  # ünïcödé → ok\n"
    ids = torch.tensor([tok.tokenizer.encode(text, add_special_tokens=False).ids])
    labels = ids[:, 1:]
    window = loaded.cfg.model.max_seq_len
    batches = [(ids[:, s:s + window], ids[:, s + 1:s + 1 + window]) for s in range(0, labels.shape[1], window)]
    batches[-1] = (batches[-1][0][:, :batches[-1][1].shape[1]], batches[-1][1])
    first = tok.tokenizer.decode(ids[0, :1].tolist())  # the unpredicted first token: "def"
    assert text.startswith(first) and first.isascii()
    predicted_text = text[len(first):]
    assert tok.tokenizer.decode(labels[0].tolist()) == predicted_text
    lengths = token_byte_lengths(tok.tokenizer, loaded.cfg.model.vocab_size)
    assert lengths[labels].sum().item() == len(predicted_text.encode("utf-8")) > len(predicted_text)
    row = evaluate(loaded.model, batches, 2, EvalMode("loops"), lengths)
    with torch.no_grad():
        nats = sum(F.cross_entropy(loaded.model(x, n_loops=2).logits.flatten(0, 1), y.flatten(), reduction="sum").item()
                   for x, y in batches)
    assert row["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(predicted_text.encode("utf-8")), rel=1e-6)
    assert row["loss"] == pytest.approx(nats / labels.numel(), rel=1e-6)
    assert row["bits_per_byte"] < row["loss"] / math.log(2)  # several bytes per token


def test_a_tokenizer_that_is_not_byte_level_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    from mythos_scale.eval.text_bytes import token_byte_lengths

    word_level = Tokenizer(models.WordLevel({"hello": 0, "wörld": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="not byte-level BPE"):
        token_byte_lengths(word_level, 3)


@pytest.mark.slow
def test_kl_exit_threshold_zero_equals_all_loops(exported, tiny_dataset):
    from mythos_scale.eval.eval_cli import val_batches
    from mythos_scale.eval.evaluate import EvalMode, evaluate
    from mythos_scale.eval.load import load_model

    loaded = load_model(exported)
    batches, lengths, _, _ = val_batches(loaded, None, 4, 3)
    plain = evaluate(loaded.model, batches, 4, EvalMode("loops"), lengths)
    zero = evaluate(loaded.model, batches, 4, EvalMode("kl0", exit_threshold=0.0), lengths)
    assert plain["mean_loops"] == zero["mean_loops"] == 4
    assert zero["loss"] == pytest.approx(plain["loss"], rel=1e-6, abs=0)
    assert zero["bits_per_byte"] == pytest.approx(plain["bits_per_byte"], rel=1e-6, abs=0)


@pytest.mark.slow
def test_eval_json_holds_every_loop_count_and_a_plot(exported, tmp_path):
    plot = tmp_path / "eval.png"
    proc = mythos("eval", "--checkpoint", str(exported), "--loops", "1,3,5", "--exit-thresholds", "0,1e-3",
                  "--max-batches", "2", "--batch-size", "4", "--json", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["loops"] == [1, 3, 5] and report["modes"] == ["loops", "kl0", "kl0.001"]
    assert sorted((r["loops"], r["mode"]) for r in report["rows"]) == sorted(
        (t, m) for t in (1, 3, 5) for m in ("loops", "kl0", "kl0.001"))
    for r in report["rows"]:
        assert r["tokens"] == 2 * 4 * 32 and math.isfinite(r["bits_per_byte"]) and 1 <= r["mean_loops"] <= r["loops"]
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert plot.stat().st_size > 10_000  # a PNG with the curves, not an empty figure
    table = mythos("eval", "--checkpoint", str(exported), "--loops", "2", "--max-batches", "1",
                   "--plot", str(tmp_path / "t.png"))
    assert table.returncode == 0 and "bits/byte" in table.stdout and "kl0.0005" in table.stdout, table.stdout


@pytest.mark.slow
def test_generate_command_prints_speed_loops_and_cache(exported):
    proc = mythos("generate", "--checkpoint", str(exported), "--prompt", "def main(", "--max-new-tokens", "12",
                  "--loops", "3", "--temperature", "0", "--exit", "kl", "--exit-threshold", "1e-3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert 1 <= out["new_tokens"] <= 12 and out["decode_tokens_per_s"] > 0 and 1 <= out["mean_loops"] <= 3
    assert 0 < out["cache_bytes_per_token"] < out["uncached_bytes_per_token"]
    text = mythos("generate", "--checkpoint", str(exported), "--prompt", "import os", "--max-new-tokens", "5",
                  "--top-k", "20", "--top-p", "0.9")
    assert text.returncode == 0 and text.stdout.startswith("import os"), text.stdout
    assert "tokens/s decoding" in text.stderr and "KV cache" in text.stderr


def _damaged(exported: Path, tmp_path: Path, name: str, how) -> Path:
    import shutil

    copy = tmp_path / name
    shutil.copytree(exported, copy)
    how(copy)
    return copy


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _other_dim(folder: Path) -> None:
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("dim: 64", "dim: 96", 1))


@pytest.mark.slow
@pytest.mark.parametrize("name, how, message", [
    ("truncated", _truncate, "not a readable safetensors file"),
    ("mismatched", _other_dim, "does not match its config's model"),
    ("no_config", lambda f: (f / "config.yaml").unlink(), "lacks config.yaml"),
])
def test_damaged_exports_are_refused(exported, tmp_path, name, how, message):
    folder = _damaged(exported, tmp_path, name, how)
    for command in (["eval", "--checkpoint", str(folder), "--loops", "1"],
                    ["generate", "--checkpoint", str(folder), "--prompt", "x"]):
        proc = mythos(*command)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and str(folder) in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_foreign_paths_are_refused(tmp_path, exported):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    for args, message in [(["eval", "--run", str(foreign)], "is not a model mythos_scale can load"),
                          (["generate", "--run", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
                          (["ckpt", "inspect", str(foreign)], "is not a model mythos_scale can load"),
                          (["ckpt", "export", str(foreign), "--out", str(tmp_path / "o")],
                           "is not a model mythos_scale can load"),
                          (["ckpt", "export", str(tmp_path), "--out", str(foreign)], "not an empty folder"),
                          (["generate", "--checkpoint", str(exported), "--prompt", "x", "--max-new-tokens", "99"],
                           "exceeds the model's max_seq_len"),
                          (["eval", "--checkpoint", str(exported), "--threads", "-1"], "--threads must be >= 0")]:
        proc = mythos(*args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # nothing written


# --------------------------------------------------------------------------- from real runs

RUNS = {  # name: (world size, overrides)
    "one_rank": (1, ["train.max_steps=20", "train.eval_every=10", "train.eval_batches=2", "train.eval_loops=[1,3]"]),
    "dp2_zero2": (2, ["train.max_steps=4", "train.zero_stage=2"]),
    "tp2": (2, ["train.max_steps=4", "parallel.tp=2"]),
    "ep2_zero2": (2, ["train.max_steps=4", "train.zero_stage=2", "parallel.ep=2"]),
}
PROBE_LOOPS = 3


def probe(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(11))


def train_worker(rank: int, world: int, port: int, names: list[str], root: str, dataset: str) -> None:
    """One rank: each run of ``names`` through the real trainer (DeepSpeed engine, parallelize
    pass, checkpoint at the end), then the trained model's logits on a probe batch and its
    parameters gathered to their logical tensors, saved by rank 0 as ``<root>/<name>.pt``."""
    import dataclasses
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from mythos_scale.parallel.distributed import init_distributed, init_process_groups
    from mythos_scale.parallel.shard import gather_logical
    from mythos_scale.train.trainer import Trainer, _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    base = init_distributed(1, 1)
    torch.set_num_threads(1)
    for name in names:
        cfg = tiny_cfg(Path(dataset), f"train.out_dir={root}", f"train.name={name}", *RUNS[name][1])
        layout = dataclasses.replace(base, tp=cfg.parallel.tp, ep=cfg.parallel.ep)
        init_process_groups(layout)
        trainer = Trainer(cfg, layout)
        assert trainer.fit() == 0
        model = trainer.model.eval()
        with torch.no_grad():
            logits = model(probe(cfg.model.vocab_size), n_loops=PROBE_LOOPS).logits
        params = {}
        for pname, p in model.named_parameters():
            spec = getattr(p, "mythos_shard", None)
            group = None if spec is None else (layout.tp_group if spec.group == "tp" else layout.ep_group)
            params[pname] = gather_logical(p.detach(), spec, group)
        if rank == 0:
            torch.save({"logits": logits, "params": params}, Path(root) / f"{name}.pt")
        dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset) -> Path:
    import torch.multiprocessing as mp

    from conftest import free_port

    root = tmp_path_factory.mktemp("runs")
    for world in (1, 2):
        names = [n for n, (w, _) in RUNS.items() if w == world]
        mp.start_processes(train_worker, args=(world, free_port(), names, str(root), str(tiny_dataset)),
                           nprocs=world, start_method="spawn")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_export_then_load_reproduces_the_training_model(runs, tmp_path, name):
    """From every layout: the exported weights are the trained ones bit for bit, and the loaded
    model's logits equal the training model's (exactly without TP; TP sums partial products
    across ranks, so to rounding there)."""
    from mythos_scale.eval.load import load_model

    trained = torch.load(runs / f"{name}.pt", weights_only=True)
    out = tmp_path / "exported"
    proc = mythos("ckpt", "export", str(runs / name), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json", "export.json"}
    loaded = load_model(out)
    state = dict(loaded.model.named_parameters())
    assert state.keys() == trained["params"].keys()
    for pname, value in trained["params"].items():
        assert torch.equal(state[pname].detach(), value), pname
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: a GEMM split over other thread counts rounds otherwise
    try:
        with torch.no_grad():
            logits = loaded.model(probe(loaded.cfg.model.vocab_size), n_loops=PROBE_LOOPS).logits
    finally:
        torch.set_num_threads(threads)
    if loaded.cfg.parallel.tp == 1:
        assert torch.equal(logits, trained["logits"])
    else:
        assert torch.allclose(logits, trained["logits"], rtol=0, atol=1e-5), (logits - trained["logits"]).abs().max()
    info = json.loads((out / "export.json").read_text())
    world, _ = RUNS[name]
    assert info["layout"]["world_size"] == world and info["step"] == loaded.cfg.train.max_steps
    # the run folder and its checkpoint load the same model directly
    direct = load_model(runs / name)
    assert all(torch.equal(p, state[n]) for n, p in direct.model.named_parameters())
    assert direct.source["step"] == info["step"]


@pytest.mark.slow
def test_inspect_names_step_layout_and_sizes(runs):
    proc = mythos("ckpt", "inspect", str(runs / "ep2_zero2"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["step"] == 4 and info["tokens_seen"] == 4 * 4 * 32 and info["zero_stage"] == 2
    assert info["layout"]["ep"] == 2 and info["layout"]["world_size"] == 2
    assert info["bytes"] == sum(info["files"].values()) > 0 and info["parameters"] > 0
    assert info["config"]["model"]["dim"] == 64
    text = mythos("ckpt", "inspect", str(runs / "tp2"))
    assert text.returncode == 0 and "step 4" in text.stdout and "tp 2" in text.stdout and "ZeRO stage 1" in text.stdout


@pytest.mark.slow
def test_kl_exit_on_a_trained_model_uses_fewer_loops_and_keeps_the_loss(runs):
    """A large KL threshold stops most tokens early (fewer loops on average, measured) and changes
    the held-out loss by under 2%; threshold 0 equals all loops."""
    proc = mythos("eval", "--run", str(runs / "one_rank"), "--loops", "4", "--exit-thresholds", "0,0.05",
                  "--json", "--plot", str(runs / "one_rank_eval.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["mode"]: r for r in json.loads(proc.stdout)["rows"]}
    assert rows["kl0"]["loss"] == pytest.approx(rows["loops"]["loss"], rel=1e-6) and rows["kl0"]["mean_loops"] == 4
    assert rows["kl0.05"]["mean_loops"] < 3.5, rows
    assert abs(rows["kl0.05"]["loss"] / rows["loops"]["loss"] - 1) < 0.02, rows


@pytest.mark.slow
def test_trainer_logs_validation_loss_per_loop_count(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "one_rank" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/loss", "val/loss_at_loops/T01", "val/loss_at_loops/T03"} <= tags
    for tag in ("val/loss_at_loops/T01", "val/loss_at_loops/T03"):
        assert [e.step for e in events.Scalars(tag)] == [10, 20]
    t1, t3 = (events.Scalars(f"val/loss_at_loops/T0{n}")[-1].value for n in (1, 3))
    assert t1 != t3  # each its own forward at its own loop count
    mean = events.Scalars("val/loss")[-1].value  # at train.loops.mean = 2
    assert min(t1, t3) - 0.5 < mean < max(t1, t3) + 0.5


@pytest.mark.slow
def test_eval_command_equals_the_trainers_validation_loss(runs):
    """``mythos eval`` measures what the trainer logs: its loss on the trainer's validation batches
    equals the trainer's last ``val/loss_at_loops`` (same weights), and packed documents are seen
    one at a time under the document mask, as in training (the end-of-document id reaches the model)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mythos_scale.eval.eval_cli import val_batches
    from mythos_scale.eval.evaluate import evaluate
    from mythos_scale.eval.load import load_model

    events = EventAccumulator(str(runs / "one_rank" / "tb"))
    events.Reload()
    proc = mythos("eval", "--run", str(runs / "one_rank"), "--loops", "1,3", "--batch-size", "2",
                  "--max-batches", "2", "--json", "--plot", str(runs / "one_rank_val.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [row for row in json.loads(proc.stdout)["rows"] if row["mode"] == "loops"]
    assert [row["loops"] for row in rows] == [1, 3]
    for row in rows:
        logged = events.Scalars(f"val/loss_at_loops/T{row['loops']:02d}")[-1]
        assert logged.step == 20 and row["loss"] == pytest.approx(logged.value, rel=1e-5), row
    loaded = load_model(runs / "one_rank")
    batches, _, _, eos_id = val_batches(loaded, None, 2, 2)
    batches = [(inputs.index_fill(1, torch.tensor([15]), eos_id), labels) for inputs, labels in batches]
    masked, unmasked = (evaluate(loaded.model, batches, 3, eos_id=e)["loss"] for e in (eos_id, None))
    assert abs(masked - unmasked) > 1e-4  # the adversarial case: with a document ending mid-row, the mask acts


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "ep2_zero2"])
def test_hf_export_of_a_parallel_run_loads_in_transformers_with_the_trained_logits(runs, tmp_path, name,
                                                                                  monkeypatch):
    """A run trained with TP or EP (and ZeRO-2) leaves for Hugging Face: the HF export gathers the
    shards, and transformers (offline, the bundled code) computes the training model's logits;
    the import brings back the very weights.  (The CLI around both: tests/test_hf_format.py.)"""
    transformers = pytest.importorskip("transformers")
    from mythos_scale.eval.export import export_checkpoint, import_hf
    from mythos_scale.eval.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained = torch.load(runs / f"{name}.pt", weights_only=True)
    out = tmp_path / "hf"
    export_checkpoint(runs / name, out, {"dtype": "fp32"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        with torch.no_grad():
            logits = hf(probe(hf.config.vocab_size), n_loops=PROBE_LOOPS).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(logits, trained["logits"], rtol=0, atol=1e-5), (logits - trained["logits"]).abs().max()
    import_hf(out, tmp_path / "imported")
    state = dict(load_model(tmp_path / "imported").model.named_parameters())
    for pname, value in trained["params"].items():
        assert torch.equal(state[pname].detach(), value), pname
