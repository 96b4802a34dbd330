"""`mythos ckpt export --format hf`: transformers loads the folder offline (AutoModelForCausalLM with
the bundled remote code, AutoTokenizer) and computes our logits bitwise in fp32 at several loop
counts; greedy generate() equals `mythos generate`; import-hf round trip; bad folders exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_eval import tiny_cfg

from conftest import REPO, subprocess_env

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons on one thread: on a loaded machine the BLAS may split the same GEMM
    differently between two calls, and the sums round differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mythos(*args: str) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mythos_scale.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_and_cfg(tiny_dataset):
    """A tiny model with adapters switched on and weights large enough for varied greedy tokens."""
    from mythos_scale.model import build_model

    cfg = tiny_cfg(tiny_dataset, "model.kernels=reference", "model.init_std=0.3")
    model = build_model(cfg.model, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    return model, cfg


def export_hf(model, cfg, folder: Path, tokenizer: Path, **hf) -> Path:
    from mythos_scale.eval.export import write_export

    write_export(folder, model.state_dict(), cfg, tokenizer, {"step": 0}, {"dtype": "fp32", **hf})
    return folder


@pytest.fixture(scope="module")
def hf_folder(model_and_cfg, tiny_dataset, tmp_path_factory) -> Path:
    model, cfg = model_and_cfg
    # a 256 KiB shard limit: several shards and an index
    return export_hf(model, cfg, tmp_path_factory.mktemp("hf") / "rdt_sharded", tiny_dataset / "tokenizer.json",
                     max_shard_bytes=256 << 10)


def test_transformers_logits_equal_ours_at_every_loop_count(model_and_cfg, hf_folder, tiny_dataset):
    """Equal to fp32 rounding (atol 1e-5 on logits of order 1-10): bitwise in most runs, but the full
    suite saw one-ulp GEMM differences between the two models' calls now and then (also seen at
    T = 8 on a trained model), so bitwise equality is not what the code guarantees."""
    from mythos_scale.data.tokenizer import load_tokenizer
    from mythos_scale.eval.load import load_model

    model, _ = model_and_cfg
    names = {p.name for p in hf_folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "model.safetensors.index.json", "modeling_mythos.py"} <= names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    for code in hf_folder.glob("*.py"):  # runs without mythos_scale installed
        assert "import mythos_scale" not in code.read_text() and "from mythos_scale" not in code.read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    text = "def parse_args(self, args=None):\n    return self"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer(tiny_dataset / "tokenizer.json").tokenizer.encode(
        text, add_special_tokens=False).ids
    assert tok.eos_token == "<|endoftext|>" and hf.config.n_loops == model.default_loops
    ours_loaded = load_model(hf_folder).model  # load_model reads HF folders too
    with torch.no_grad():
        logits = {}
        for loops in (1, 2, 4, 6):
            logits[loops] = model(ids, loops).logits
            torch.testing.assert_close(hf(ids, n_loops=loops).logits, logits[loops], rtol=0, atol=1e-5)
            torch.testing.assert_close(ours_loaded(ids, loops).logits, logits[loops], rtol=0, atol=1e-5)
        # config.n_loops is the default
        torch.testing.assert_close(hf(ids).logits, logits[model.default_loops], rtol=0, atol=1e-5)
    assert (logits[1] - logits[4]).abs().max() > 1e-2  # the loop count reaches the model


@pytest.mark.slow
def test_greedy_generate_equals_mythos_generate(model_and_cfg, hf_folder):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    prompt = "import json\nclass "
    ids = tok(prompt, return_tensors="pt").input_ids
    for loops in (1, 3):
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, n_loops=loops, eos_token_id=None)
            uncached = hf.generate(ids, max_new_tokens=12, do_sample=False, n_loops=loops, eos_token_id=None,
                                   use_cache=False)
        ours = mythos("generate", "--checkpoint", str(hf_folder), "--prompt", prompt, "--loops", str(loops),
                      "--temperature", "0", "--max-new-tokens", "12", "--json")
        assert ours.returncode == 0, ours.stderr
        tokens = json.loads(ours.stdout)["tokens"]
        hf_tokens = out[0, ids.shape[1]:].tolist()
        assert hf_tokens[:len(tokens)] == tokens and len(tokens) >= 1, (loops, hf_tokens, tokens)
        assert torch.equal(out, uncached)  # the RDT cache path equals full forwards
        assert len(set(hf_tokens)) > 1  # not a degenerate repeat that any model would match


@pytest.mark.slow
def test_bf16_export_and_import_hf_round_trip(model_and_cfg, tiny_dataset, tmp_path):
    from safetensors.torch import load_file

    from mythos_scale.eval.load import load_model

    model, cfg = model_and_cfg
    folder = export_hf(model, cfg, tmp_path / "rdt_bf16", tiny_dataset / "tokenizer.json", dtype="bf16")
    weights = load_file(str(folder / "model.safetensors"))
    assert weights["model.embed.weight"].dtype == torch.bfloat16
    assert weights["model.injection.a_log"].dtype == torch.float32  # kept fp32 by design
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    result = mythos("ckpt", "import-hf", str(hf_folder_of(model, cfg, tmp_path, tiny_dataset)),
                    "--out", str(tmp_path / "imported"))
    assert result.returncode == 0, result.stderr
    imported = load_model(tmp_path / "imported").model.state_dict()
    assert all(torch.equal(imported[n], t) for n, t in model.state_dict().items())


def hf_folder_of(model, cfg, tmp_path: Path, tiny_dataset: Path) -> Path:
    return export_hf(model, cfg, tmp_path / "rdt_fp32", tiny_dataset / "tokenizer.json")


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "llama"})), "model_type is 'llama'"),
    (lambda f: (f / "config.json").write_text("{not json"), "not readable JSON"),
    (lambda f: (f / "model-00002-of-00003.safetensors").unlink(), "is missing"),
    (lambda f: (f / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 10), "not a readable safetensors"),
])
def test_bad_hf_folders_exit_2_and_write_nothing(model_and_cfg, tiny_dataset, tmp_path, damage, message):
    model, cfg = model_and_cfg
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    folder = export_hf(model, cfg, tmp_path / "rdt_bad", tiny_dataset / "tokenizer.json",
                       max_shard_bytes=total // 2 - 1)
    assert (folder / "model-00003-of-00003.safetensors").is_file()
    damage(folder)
    result = mythos("ckpt", "import-hf", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    result = mythos("generate", "--checkpoint", str(folder), "--prompt", "x", "--max-new-tokens", "1")
    assert result.returncode == 2 and message in result.stderr, result.stderr
