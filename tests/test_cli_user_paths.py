"""The README's "Using it" lines, run in the order written, so that they stay true.

The lines are parsed out of README.md.  Each ``mythos ...`` line runs as written (through
``python -m mythos_scale.cli``) in a scratch folder that holds this repository's ``configs/``
and ``mythos_scale/``, with tiny sizes appended so that the walk takes a minute or two on 2 CPU
cores: train lines get the suite's tiny model, 32-token sequences and 3 steps; data lines a
512-token vocabulary and 32-token sequences; eval lines 2 batches, generate lines 8 new tokens.
Not run, and checked to be exactly these:
``pip install`` (the suite already runs on the installed package) and the lines that need a GPU
node, a cluster or a long-running server (``bash launch/gpu_smoke.sh``, which
tests/test_gpu_path.py runs on the CPU instead, ``deepspeed --num_gpus 8``, ``sbatch``,
``tensorboard``).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN, subprocess_env

pytestmark = pytest.mark.slow  # multi-process, DeepSpeed, Slurm or long runs: see pyproject.toml

NOT_RUN = {  # by the line's first words
    "pip install": "installs the package the suite already runs on",
    "bash launch/gpu_smoke.sh": "needs a GPU node (tests/test_gpu_path.py runs it on the CPU)",
    "deepspeed": "needs a node with 8 GPUs",
    "sbatch": "needs a Slurm cluster with GPUs",
    "CONFIG=configs/dense_1p3b.yaml sbatch": "the same script on a Slurm cluster with GPUs (tests/test_slurm.py runs it)",
    "tensorboard": "a server that runs until stopped",
}


def readme_lines() -> list[str]:
    """The commands of the first bash block under "## Using it", continuation lines joined."""
    section = (REPO / "README.md").read_text().split("## Using it", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    lines, current = [], ""
    for raw in block.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if shlex.split(current, comments=True):
            lines.append(current.strip())
        current = ""
    return lines


def tiny_sizes(args: list[str], cache: Path) -> list[str]:
    """What is appended to a line's arguments (later options and overrides win)."""
    if args[0] == "train":
        return [*TINY_TRAIN, "train.max_steps=3", f"data.cache_dir={cache}"]
    if args[:2] == ["data", "embedded"]:
        return ["--cache-dir", str(cache), "--vocab-size", "512", "--seq-len", "32"]
    if args[:2] == ["data", "tokenizer"]:
        return ["--vocab-size", "512"]
    if args[:2] == ["data", "prepare"]:
        return ["--seq-len", "32"]
    if args[0] == "eval":
        return ["--max-batches", "2"]
    if args[0] == "generate":
        return ["--max-new-tokens", "8"]  # the tiny model's max_seq_len is 32
    return []


def test_readme_using_it_lines_work_in_order(tmp_path, tmp_path_factory):
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("configs", "mythos_scale"):
        (work / name).symlink_to(REPO / name)
    # the embedded corpus at these sizes, shared with tests/test_data.py (built once per session)
    cache = tmp_path_factory.getbasetemp() / "embedded-cache"
    ran, not_run = [], []
    for line in readme_lines():
        argv = shlex.split(line, comments=True)
        skipped = [prefix for prefix in NOT_RUN if argv[:len(prefix.split())] == prefix.split()]
        if skipped:
            not_run += skipped
            continue
        assert argv[0] == "mythos", f"a README line this test does not know how to run: {line}"
        command = [sys.executable, "-m", "mythos_scale.cli", *argv[1:], *tiny_sizes(argv[1:], cache)]
        proc = subprocess.run(command, cwd=work, env=subprocess_env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        ran.append((argv[1:], proc))
    assert sorted(not_run) == sorted(NOT_RUN), not_run

    # What the lines promise, checked on what they left.
    runs = work / "runs"
    main_job = runs / "tiny_cpu"
    assert (main_job / "plots" / "loss.png").is_file()
    complete = json.loads(next((main_job / "checkpoints").glob("step_*/COMPLETE.json")).read_text())
    assert complete["world_size"] == 2
    embedded = next(proc for args, proc in ran if args[:2] == ["data", "embedded"])
    assert embedded.stdout.startswith("data/stdlib: ")  # the path the next line trains on
    for name in ("stdlib_1proc", "mine"):
        rows = (runs / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    assert {p.name for p in (work / "data").iterdir()} == {"stdlib", "tok.json", "mine"}
    assert (main_job / "plots" / "eval_loops.png").is_file()
    evaluated = next(proc for args, proc in ran if args[:2] == ["eval", "--checkpoint"])
    assert [r["loops"] for r in json.loads(evaluated.stdout)["rows"]] == [4, 4]  # all loops, KL exit
    assert {p.name for p in (work / "exported" / "tiny_cpu").iterdir()} == {
        "model.safetensors", "config.yaml", "tokenizer.json", "export.json"}
