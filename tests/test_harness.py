"""`mythos eval --tasks`: lm-evaluation-harness on local task YAMLs (a multiple-choice task and a
perplexity task built from the embedded corpus, local data_files, offline): lm-eval's score of
every item equals a by-hand loglikelihood computation with the model; bad task files exit 2."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_eval import mythos, tiny_cfg

torch.set_num_threads(2)
LOOPS = (1, 3)


@pytest.fixture(scope="module")
def model_folder(tiny_dataset, tmp_path_factory):
    from mythos_scale.eval.export import write_export
    from mythos_scale.model import build_model

    cfg = tiny_cfg(tiny_dataset, "model.kernels=reference", "model.init_std=0.3")
    model = build_model(cfg.model, seed=0).eval()
    out = tmp_path_factory.mktemp("harness") / "model"
    write_export(out, model.state_dict(), cfg, tiny_dataset / "tokenizer.json", {"step": 0})
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> tuple[Path, Path, list[dict], list[str]]:
    """A multiple-choice task (finish a line of textwrap.py: its own ending or three others) and a
    perplexity task (paragraphs of shlex.py), each a YAML + local JSONL file."""
    root = tmp_path_factory.mktemp("tasks")
    lines = [ln.strip() for ln in (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
             if len(ln.strip()) > 30 and " " in ln.strip()][:40]
    halves = [(ln[:len(ln) // 2], ln[len(ln) // 2:]) for ln in lines]
    items = []
    for i in range(10):
        endings = [halves[(i + k * 7) % len(halves)][1] for k in range(4)]
        gold = i % 4
        endings[0], endings[gold] = endings[gold], endings[0]
        items.append({"context": halves[i][0], "choices": endings, "gold": gold})
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    (root / "mc.yaml").write_text(
        f"task: mythos_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "shlex.py").read_text()
    docs = [p.strip() for p in text.split("\n\n") if 80 < len(p.strip()) < 400][:5]
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (root / "ppl.yaml").write_text(
        f"task: mythos_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'ppl.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return root / "mc.yaml", root / "ppl.yaml", items, docs


def by_hand_logprob(model, tokens: list[int], n_predict: int, loops: int) -> float:
    """log p of the last n_predict tokens of ``tokens`` given the ones before, the context cut from
    the left to fit max_seq_len."""
    tokens = tokens[-(model.cfg.max_seq_len + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]), loops).logits[0, -n_predict:]
    return F.log_softmax(logits, -1).gather(1, torch.tensor(tokens[-n_predict:])[:, None]).sum().item()


@pytest.mark.slow
def test_lm_eval_scores_equal_by_hand_loglikelihoods(model_folder, tasks, tmp_path):
    from mythos_scale.eval.load import load_model

    mc_yaml, ppl_yaml, items, docs = tasks
    result = mythos("eval", "--checkpoint", str(model_folder), "--tasks", f"{mc_yaml},{ppl_yaml}",
                    "--loops", ",".join(map(str, LOOPS)), "--json", "--plot", str(tmp_path / "tasks.png"))
    assert result.returncode == 0, result.stderr
    rows = {(r["task"], r["loops"]): r for r in json.loads(result.stdout)["rows"]}
    assert (tmp_path / "tasks.png").stat().st_size > 0
    loaded = load_model(model_folder)
    model, tok = loaded.model, loaded.tokenizer
    max_len = loaded.cfg.model.max_seq_len
    enc = lambda s: tok.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    bits = {}
    for loops in LOOPS:
        correct = []
        for item in items:
            context = enc(item["context"])
            scores = [by_hand_logprob(model, enc(item["context"] + " " + c), len(enc(item["context"] + " " + c))
                                      - len(context), loops) for c in item["choices"]]
            correct.append(float(max(range(4), key=scores.__getitem__) == item["gold"]))
        row = rows[("mythos_mc", loops)]
        assert [s["acc"] for s in row["samples"]] == correct, loops
        assert row["acc"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
        total, n_bytes, n_words = 0.0, 0, 0
        for doc in docs:
            seq = [tok.eos_id, *enc(doc)]
            for start in range(0, len(seq) - 1, max_len):  # lm-eval's rolling windows: disjoint targets,
                end = min(start + max_len + 1, len(seq))  # the last one's context filled up to max_seq_len
                total += by_hand_logprob(model, seq[max(0, end - max_len - 1):end], end - start - 1, loops)
            n_bytes += len(doc.encode())
            n_words += len(re.split(r"\s+", doc))
        row = rows[("mythos_ppl", loops)]
        # fp32 log-probabilities summed in another order: 1e-6; a wrong window or token moves it by >1e-3
        assert row["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-6)
        assert math.log(row["word_perplexity"]) == pytest.approx(-total / n_words, rel=1e-6)
        bits[loops] = row["bits_per_byte"]
    assert bits[1] != bits[3]  # the loop count reaches the model


@pytest.mark.slow
@pytest.mark.parametrize("content, message", [
    ("task: [unclosed", "not valid YAML"),
    ("dataset_path: json\n", "no 'task: NAME'"),
])
def test_bad_task_files_exit_2(model_folder, tmp_path, content, message):
    (tmp_path / "bad.yaml").write_text(content)
    result = mythos("eval", "--checkpoint", str(model_folder), "--tasks", str(tmp_path / "bad.yaml"), "--loops", "1",
                    "--plot", str(tmp_path / "p.png"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "p.png").exists()
