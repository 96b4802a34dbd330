"""Synthetic reasoning data (mythos data synthetic), answer-only labels, accuracy by difficulty, the probe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mythos_scale.config import DataConfig
from mythos_scale.data.data_cli import main as data_main
from mythos_scale.data.loader import build_train_loader, build_val_loader
from mythos_scale.data.manifest import DataError, read_manifest
from mythos_scale.data.synthetic import HOP_MARK, TASKS, VOCAB, generate_splits, read_items, solve, solve_p_hop
from mythos_scale.eval.reasoning import exact_match
from mythos_scale.train.lm_loss import IGNORE_INDEX, full_linear_cross_entropy

from conftest import REPO, subprocess_env


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    for task in TASKS:
        assert data_main(["synthetic", "--task", task, "--out", str(root / task), "--n-train", "300",
                          "--n-val", "10", "--max-difficulty", "3", "--seed", "5"]) == 0
    return root


@pytest.mark.parametrize("task", TASKS)
def test_generators_seeded_and_checked_by_the_solver(task):
    train, val = generate_splits(task, 400, 20, 3, 6, seed=7)
    again = generate_splits(task, 400, 20, 3, 6, seed=7)
    other = generate_splits(task, 400, 20, 3, 6, seed=8)
    assert (train, val) == again
    assert [i.prompt for i in val] != [i.prompt for i in other[1]]
    assert sorted({i.difficulty for i in train}) == [1, 2, 3]
    assert [i.difficulty for i in val] == [d for d in range(1, 7) for _ in range(20)]
    assert all(solve(task, item) == item.answer for item in train + val)


def test_p_hop_depth_matters():
    """The difficulty is real: the answer after p hops is not, in general, the one after p - 1."""
    _, val = generate_splits("p_hop", 10, 50, 1, 4, seed=0)
    deep = [i for i in val if i.difficulty == 4]
    assert sum(solve_p_hop(i.prompt, 3) != i.answer for i in deep) > len(deep) // 2


def test_arith_solver_rejects_a_wrong_answer():
    _, val = generate_splits("arith", 10, 30, 1, 3, seed=0)
    for item in val:
        wrong = str((int(item.answer) + 1) % 10)
        assert solve("arith", item) != wrong


@pytest.mark.parametrize("task", TASKS)
def test_splits_do_not_leak(datasets, task):
    train, val = read_items(datasets / task, "train"), read_items(datasets / task, "val")
    assert len(train) == 300 and len(val) == 60
    assert not {tuple(i.prompt) for i in train} & {tuple(i.prompt) for i in val}
    assert len({tuple(i.prompt) for i in train}) == len(train)
    if task == "arith":  # the difficulty of an arith item is its number of operations
        ops = [sum(w in "+*-" for w in i.prompt) for i in train]
        assert max(ops) == 3 and min(ops) == 1
        assert [sum(w in "+*-" for w in i.prompt) for i in val] == [i.difficulty for i in val]
    else:  # a p-hop prompt states p (its hop marks); without them the depth asked for is unknowable
        assert sorted({i.prompt.count(HOP_MARK) for i in train}) == [1, 2, 3]
        assert [i.prompt.count(HOP_MARK) for i in val] == [i.difficulty for i in val]
    for item in val:
        assert solve(task, item) == item.answer


def test_labels_count_only_the_answer(datasets):
    root = datasets / "arith"
    m = read_manifest(root)
    cfg = DataConfig(sources=[{"path": str(root)}], seq_len=m.seq_len)
    items = read_items(root, "val")
    inputs, labels = next(iter(build_val_loader(cfg, micro_batch_size=len(items), dp_rank=0, dp_world=1,
                                                vocab_size=m.vocab_size)))
    answer = labels != IGNORE_INDEX
    assert answer.sum(1).tolist() == [1] * len(items)
    assert [VOCAB[t] for t in labels[answer].tolist()] == [i.answer for i in items]
    assert [VOCAB[t] for t in inputs[answer].tolist()] == ["?"] * len(items)  # the answer follows the query mark
    # the training loss (the trainer's lm_head_loss reference) is the answer tokens' cross-entropy alone
    torch.manual_seed(0)
    hidden, weight = torch.randn(*labels.shape, 8), torch.randn(m.vocab_size, 8)
    logits = hidden @ weight.T
    expected = torch.nn.functional.cross_entropy(logits[answer], labels[answer])
    assert torch.allclose(full_linear_cross_entropy(hidden, weight, labels).lm, expected, atol=1e-5)
    unmasked = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs.roll(-1, 1).flatten())
    assert not torch.allclose(unmasked, expected, atol=1e-3)
    # the train stream masks the same way
    x, y = next(build_train_loader(cfg, micro_batch_size=4, dp_rank=0, dp_world=1, vocab_size=m.vocab_size))
    assert ((y != IGNORE_INDEX).sum(1) == 1).all()


def test_exact_match_counts_only_answers(datasets):
    root = datasets / "p_hop"
    m = read_manifest(root)
    cfg = DataConfig(sources=[{"path": str(root)}], seq_len=m.seq_len)
    inputs, labels = next(iter(build_val_loader(cfg, micro_batch_size=16, dp_rank=0, dp_world=1,
                                                vocab_size=m.vocab_size)))
    assert not exact_match(inputs, labels).any()  # copying the prompt scores 0
    oracle = torch.where(labels == IGNORE_INDEX, torch.randint_like(labels, m.vocab_size), labels)
    assert exact_match(oracle, labels).all()  # right answers, anything elsewhere: 1
    wrong = oracle.clone()
    wrong[0][labels[0] != IGNORE_INDEX] = (labels[0][labels[0] != IGNORE_INDEX] + 1) % m.vocab_size
    assert exact_match(wrong, labels).tolist() == [False] + [True] * 15
    with pytest.raises(ValueError, match="no answer tokens"):
        exact_match(inputs, torch.full_like(labels, IGNORE_INDEX))


def test_bad_requests_are_named(tmp_path, capsys):
    with pytest.raises(DataError, match="max-difficulty"):
        generate_splits("p_hop", 100, 10, 4, 2, seed=0)
    assert data_main(["synthetic", "--task", "arith", "--out", str(tmp_path / "x"), "--seq-len", "8"]) == 2
    assert "--seq-len 8" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_quick_trains_and_eval_cli_reads_the_run(tmp_path, capsys):
    """The probe's --quick mode: the real trainer on the synthetic folder, its JSON and heat-map;
    then `mythos eval --by-difficulty` on one of its runs."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reasoning_probe.py"), "--quick",
                           "--out", str(out), "--work-dir", str(work)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "reasoning_probe.json").read_text())
    assert set(results["models"]) == {"looped", "single_loop", "dense"}
    assert results["models"]["dense"]["core_layers"] == 6 and results["models"]["looped"]["core_layers"] == 2
    rows = results["models"]["looped"]["rows"]
    assert {(r["difficulty"], r["loops"]) for r in rows if r["exit_threshold"] is None} == {
        (d, t) for d in (1, 2) for t in (1, 3)}
    assert all(0 <= r["accuracy"] <= 1 and r["items"] == 4 for r in rows)
    assert (out / "reasoning_probe.png").stat().st_size > 0

    # --combine: the models of two processes merge into the same probe; mismatched runs are refused
    parts = []
    for name, models in (("a", ["looped", "single_loop"]), ("b", ["dense"])):
        part = dict(results, models={m: results["models"][m] for m in models})
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(part))
    probe = [sys.executable, str(REPO / "benchmarks" / "reasoning_probe.py")]
    proc = subprocess.run([*probe, "--combine", *map(str, parts), "--out", str(tmp_path / "merged")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "merged" / "reasoning_probe.json").read_text())
    assert merged["models"] == results["models"] and merged["checks"] == results["checks"]
    parts[1].write_text(json.dumps(dict(json.loads(parts[1].read_text()), steps=5)))
    proc = subprocess.run([*probe, "--combine", *map(str, parts), "--out", str(tmp_path / "bad")], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "b.json has steps = 5" in proc.stderr, proc.stderr[-3000:]

    from mythos_scale.eval.eval_cli import main as eval_main

    assert eval_main(["--run", str(work / "looped_s0"), "--by-difficulty", "--loops", "1,2",
                      "--exit-thresholds", "", "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["difficulty"], r["loops"]) for r in printed["rows"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert eval_main(["--run", str(work / "looped_s0"), "--by-difficulty", "--data", "embedded",
                      "--device", "cpu"]) == 2
