"""Checkpoints at scale: the layout-free format, resharding, the asynchronous writer, the commit
and the stop budget.

The format and its reader are checked on real safetensors files against the logical tensors
they were cut from (any shard dim, any ZeRO runs), without processes; the engine side on real
DeepSpeed engines in gloo processes (a hand-sharded tensor-parallel model); the rest on real
trainer processes: resume in another number of ranks, an async save equal to a sync one, a
kill -9 in the middle of a write, ranks whose views of the folder differ, and a SIGTERM whose
grace time is too short for a save.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from mythos_scale.checkpoint import plan_stop, read_checkpoint_info, read_model_state
from mythos_scale.checkpoint.format import MANIFEST, CheckpointError, CheckpointReader, Piece, rank_file, tensor_key
from mythos_scale.checkpoint.stop import STOP_MARGIN_S, SaveTimes
from mythos_scale.checkpoint.writer import WriteJob

from conftest import REPO, free_port, run_train, start_train, subprocess_env, train_command, wait_for

# --------------------------------------------------------------------------- the format


def _cuts(numel: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    """``[0, numel)`` cut into ``parts`` runs at random points (ZeRO partitions a flat buffer of
    many parameters, so a parameter's run on a rank starts and ends anywhere); empty runs dropped."""
    points = sorted(rng.randint(0, numel) for _ in range(parts - 1))
    bounds = [0, *points, numel]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


def _layout_pieces(shape: tuple[int, ...], dim: int, shards: int, runs: int, rng: random.Random) -> list[Piece]:
    """The pieces of a logical tensor sharded ``shards`` ways on ``dim`` (tensor or expert
    parallelism), each shard's flattened elements cut into ``runs`` runs (ZeRO)."""
    length = shape[dim] // shards
    inner = math.prod(shape) // shape[dim] * length
    return [Piece(dim, s * length, length, start, numel)
            for s in range(shards) for start, numel in _cuts(inner, runs, rng)]


def _expected(logical: torch.Tensor, piece: Piece) -> torch.Tensor:
    return logical.narrow(piece.dim, piece.offset, piece.length).reshape(-1)[piece.start:piece.start + piece.numel]


def _write_checkpoint(tag_dir: Path, logical: dict[str, torch.Tensor], pieces: dict[str, list[Piece]]) -> None:
    """Write ``logical`` as the pieces of a layout (piece i of each tensor by rank i, as a rank
    holds one piece of each), with the writer and the record the trainer uses."""
    tag_dir.mkdir(parents=True)
    files = max(len(p) for p in pieces.values())
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in range(files)]
    params = {}
    for name, tensor in logical.items():
        fragments = []
        for i, piece in enumerate(pieces[name]):
            tensors[i][tensor_key("master", name)] = _expected(tensor, piece).clone()
            fragments.append([rank_file(i), piece.dim, piece.offset, piece.length, piece.start, piece.numel])
        params[name] = {"shape": list(tensor.shape), "fragments": fragments}
    reports = []
    for rank in range(files):
        job = WriteJob(tag_dir / rank_file(rank), tensors[rank], {"rank": str(rank)})
        job.run()
        reports.append(job.report)
    record = {"format": 2, "step": 1, "world_size": files, "layout": {}, "config": {}, "trainer": {},
              "optimizer": {"step": 1, "states": []}, "params": params, "buffers": {},
              "files": {r.name: {"bytes": r.bytes, "xxh3": r.xxh3} for r in reports}}
    (tag_dir / MANIFEST).write_text(json.dumps(record))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_of_any_layout_reassemble_in_any_other(tmp_path, seed):
    """Logical tensors cut as tensor/expert parallelism (shards on dim 0, 1 or 2) and ZeRO
    (random runs) cut them, written by one layout, read back into others: every piece a rank of
    the new layout needs is exactly the logical tensor's elements, and the whole is the tensor."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    shapes = {"column_parallel": ((12, 10), 0), "row_parallel": ((10, 12), 1), "experts": ((4, 6, 5), 0),
              "expert_inner": ((4, 6, 8), 2), "norm": ((7,), 0)}
    logical = {name: torch.randn(shape, generator=gen) for name, (shape, _) in shapes.items()}
    def splits(shape, dim):  # the shard counts that divide the sharded dim
        return [n for n in (1, 2, 3, 4) if shape[dim] % n == 0]

    saved_layout = {name: _layout_pieces(shape, dim, rng.choice(splits(shape, dim)), rng.randint(1, 4), rng)
                    for name, (shape, dim) in shapes.items()}
    _write_checkpoint(tmp_path / "ckpt", logical, saved_layout)

    with CheckpointReader(tmp_path / "ckpt") as reader:
        for name, (shape, dim) in shapes.items():
            for shards in splits(shape, dim):
                for piece in _layout_pieces(shape, dim, shards, rng.randint(1, 5), rng):
                    out = torch.full((piece.numel,), float("nan"))
                    reader.read_into("master", name, piece, out)
                    assert torch.equal(out, _expected(logical[name], piece)), (name, piece)
    state = read_model_state(tmp_path / "ckpt")
    assert state.keys() == logical.keys()
    for name in logical:
        assert torch.equal(state[name], logical[name]), name


def test_a_piece_sharded_on_another_dim_is_refused(tmp_path):
    logical = {"w": torch.arange(24.0).reshape(4, 6)}
    _write_checkpoint(tmp_path / "ckpt", logical, {"w": [Piece(0, 0, 2, 0, 12), Piece(0, 2, 2, 0, 12)]})
    with CheckpointReader(tmp_path / "ckpt") as reader:
        with pytest.raises(CheckpointError, match="'w'.*dim 0"):
            reader.read_into("master", "w", Piece(1, 0, 3, 0, 12), torch.empty(12))
        # a piece of the whole tensor may be described along any dim
        out = torch.empty(12)
        reader.read_into("master", "w", Piece(1, 0, 6, 6, 12), out)
        assert torch.equal(out, logical["w"].reshape(-1)[6:18])


def test_a_piece_missing_from_the_record_is_an_error(tmp_path):
    logical = {"w": torch.arange(24.0).reshape(4, 6)}
    _write_checkpoint(tmp_path / "ckpt", logical, {"w": [Piece(0, 0, 4, 0, 20)]})  # 4 elements lost
    with CheckpointReader(tmp_path / "ckpt") as reader, pytest.raises(CheckpointError, match="cover 20 of the 24"):
        reader.read_param("master", "w")


# --------------------------------------------------------------------------- the stop budget


def test_stop_plan_fits_the_grace_time():
    last = SaveTimes(step=10, bytes=1, blocked_s=0.5, write_s=4.0, commit_s=0.5)  # a save takes 5 s
    # no deadline (SIGUSR1, Ctrl-C): finish what is in flight, then save
    plan = plan_stop(13, None, 10, 3.0, last)
    assert (plan.finish_pending, plan.discard_pending, plan.save_now) == (True, False, True)
    # both fit: finish the one in flight, then save this step
    plan = plan_stop(13, 9.0, 10, 3.0, last)
    assert (plan.finish_pending, plan.discard_pending, plan.save_now) == (True, False, True)
    # only the one in flight fits: it is the resume point
    plan = plan_stop(13, 6.0, 10, 3.0, last)
    assert (plan.finish_pending, plan.discard_pending, plan.save_now) == (True, False, False)
    assert "not saving step 13" in plan.reason and "finishing the save of step 10" in plan.reason
    # nothing fits: discard it, keep the last committed checkpoint
    plan = plan_stop(13, 2.0, 10, 3.0, last)
    assert (plan.finish_pending, plan.discard_pending, plan.save_now) == (False, True, False)
    # nothing in flight: save if it fits
    assert plan_stop(13, 5.5, None, 0.0, last).save_now
    assert not plan_stop(13, 4.5, None, 0.0, last).save_now
    # the save in flight is of this very step: finishing it is all there is to do
    plan = plan_stop(13, 30.0, 13, 1.0, last)
    assert (plan.finish_pending, plan.save_now) == (True, False)
    # never measured: try (a save cut short never replaces the previous checkpoint)
    assert plan_stop(13, 1.0, None, 0.0, None).save_now


# --------------------------------------------------------------------------- real engines


def _start_ranks(commands: list[list[str]]) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank, command in enumerate(commands):
        env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(commands)),
                   LOCAL_WORLD_SIZE=str(len(commands)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # Output to a file, not a pipe: a rank blocked on a full pipe nobody reads yet (we wait for
        # the ranks in order) would hang the others in their next collective.
        output = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        proc.output = output
        procs.append(proc)
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    """Wait for every rank; once one fails, stop the others (they would wait for it in a collective)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            break
        time.sleep(0.2)
    outputs = []
    for proc in procs:
        proc.output.seek(0)
        outputs.append(proc.output.read())
    failed = [f"rank {rank} failed ({proc.returncode}):\n{out[-5000:]}"
              for rank, (proc, out) in enumerate(zip(procs, outputs)) if proc.returncode != 0]
    assert not failed, "\n\n".join(failed)
    return outputs


@pytest.mark.slow
def test_hand_sharded_tensor_parallel_model_reshards_both_ways(tmp_path):
    """Real ZeRO-2 engines: TP=2 (pieces of split parameters, each rank's own) -> DP=2 (whole
    parameters, ZeRO partitions) -> TP=2, with an AdamW step between; after each load every
    rank's master weights, module weights and Adam moments equal AdamW on the logical tensors
    (checked in the ranks), and the checkpoints read back as those tensors with no process group."""
    script = str(Path(__file__).with_name("checkpoint_ranks.py"))
    outputs = _finish(_start_ranks([[sys.executable, script, "sharded", str(tmp_path), "2"]] * 2))
    assert all("all checks passed" in out for out in outputs)
    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_ranks import reference

    for tag_dir, steps in ((tmp_path / "tp2" / "checkpoints" / "step_00000001", 1),
                           (tmp_path / "dp2" / "checkpoints" / "step_00000002", 2)):
        state, expected = read_model_state(tag_dir), reference(steps)
        assert state.keys() == expected.keys()
        for name, values in expected.items():
            torch.testing.assert_close(state[name], values["master"], msg=name)
        with CheckpointReader(tag_dir) as reader:
            torch.testing.assert_close(reader.read_param("exp_avg_sq", "row.weight"), expected["row.weight"]["exp_avg_sq"])
    record = json.loads((tmp_path / "tp2" / "checkpoints" / "step_00000001" / MANIFEST).read_text())
    files = {name: sorted({f[0] for f in entry["fragments"]}) for name, entry in record["params"].items()}
    # the split parameters come from both TP ranks, the replicated one from TP rank 0 only
    assert files == {"col.weight": [rank_file(0), rank_file(1)], "row.weight": [rank_file(0), rank_file(1)],
                     "norm.weight": [rank_file(0)]}
    info = read_checkpoint_info(tmp_path / "tp2" / "checkpoints" / "step_00000001")
    assert info["layout"] == {"world_size": 2, "dp": 1, "tp": 2, "ep": 1, "zero_stage": 2}
    assert info["params"]["row.weight"] == [6, 8] and info["optimizer"]["step"] == 1


# --------------------------------------------------------------------------- real trainer runs

STEPS, SWITCH = 8, 4  # runs of 8 steps; a resumed run takes over after step 4


def _args(tiny_dataset: Path, *extra: str) -> list[str]:
    return [f"data.sources=[{{path: '{tiny_dataset}'}}]", "train.name=r", f"train.max_steps={STEPS}",
            "train.checkpoint.every=2", "train.checkpoint.keep_last=8", *extra]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


def _tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dataset) -> dict[int, Path]:
    """Uninterrupted runs on 1 and on 4 ranks (global batch 4: micro-batch 1 on 4 ranks); the
    one-rank run writes its checkpoints in the background, slowly (4 MB/s), while it trains."""
    root = tmp_path_factory.mktemp("uninterrupted")
    one = run_train(root / "n1", _args(tiny_dataset, "train.checkpoint.write_limit_mb_s=4"))
    (root / "n1" / "stderr.txt").write_text(one.stderr)
    run_train(root / "n4", _args(tiny_dataset, "train.micro_batch_size=1"), nproc=4)
    return {1: root / "n1" / "r", 4: root / "n4" / "r"}


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, tiny_dataset):
    """``two_rank_run(stage)``: steps 1-4 on 2 ranks with ZeRO-``stage``, checkpoints at 2 and 4."""
    made: dict[int, Path] = {}

    def make(stage: int) -> Path:
        if stage not in made:
            root = tmp_path_factory.mktemp(f"two_ranks_zero{stage}")
            run_train(root, _args(tiny_dataset, f"train.zero_stage={stage}", f"train.exit_after_steps={SWITCH}"), nproc=2)
            made[stage] = root / "r"
        return made[stage]

    return make


@pytest.mark.slow
@pytest.mark.parametrize("stage, nproc", [(1, 4), (2, 1)])
def test_resume_on_another_number_of_ranks(tmp_path, tiny_dataset, uninterrupted, two_rank_run, stage, nproc):
    """2 ranks (ZeRO-``stage``) -> ``nproc`` ranks (the other ZeRO stage): the loss after the switch
    is the uninterrupted run's at the new size, the data continues at the same sample.  The two
    cases cover both stages on both sides and a move to fewer and to more ranks."""
    other = 3 - stage
    extra = ["train.micro_batch_size=1"] if nproc == 4 else []
    run = tmp_path / f"n{nproc}" / "r"
    shutil.copytree(two_rank_run(stage), run)
    proc = run_train(run.parent, _args(tiny_dataset, f"train.zero_stage={other}", *extra), nproc=nproc)
    ranks = f"{nproc} rank{'s' if nproc > 1 else ''}"
    assert (f"resharded step_00000004 from 2 ranks (dp 2, tp 1, ep 1, ZeRO-{stage}) to {ranks} "
            f"(dp {nproc}, tp 1, ep 1, ZeRO-{other})") in proc.stderr
    assert "the data continues at sample 16 of the global stream" in proc.stderr
    losses, reference = _losses(run), _losses(uninterrupted[nproc])
    assert sorted(losses) == list(range(1, STEPS + 1))
    worst = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in range(SWITCH + 1, STEPS + 1))
    print(f"ZeRO-{stage} 2 ranks -> ZeRO-{other} {nproc} ranks: max relative loss difference after the "
          f"switch {worst:.2e}")
    assert worst < 1e-4
    assert read_checkpoint_info(_tag(run, STEPS))["trainer"]["data"]["consumed_samples"] == STEPS * 4
    final, expected = read_model_state(_tag(run, STEPS)), read_model_state(_tag(uninterrupted[nproc], STEPS))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def _latest(run: Path) -> str | None:
    path = run / "checkpoints" / "latest"
    return path.read_text().strip() if path.exists() else None


def _file_hashes(tag_dir: Path) -> dict[str, str]:
    return {name: entry["xxh3"] for name, entry in json.loads((tag_dir / MANIFEST).read_text())["files"].items()}


@pytest.mark.slow
def test_kill_during_an_async_write_then_a_sync_resume(tmp_path, tiny_dataset, uninterrupted):
    """kill -9 while the step-4 checkpoint is being written in the background: step 2 stays the
    resume point; resumed with synchronous saves, the run ends as the uninterrupted one (bitwise)
    and its files equal the background writer's byte for byte."""
    run = tmp_path / "r"
    proc = start_train(tmp_path, _args(tiny_dataset, "train.checkpoint.write_limit_mb_s=0.5"))
    partial = _tag(run, 4) / rank_file(0)
    wait_for(lambda: _latest(run) == "step_00000002" and partial.exists() and partial.stat().st_size > 0, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    full = json.loads((_tag(uninterrupted[1], 4) / MANIFEST).read_text())["files"][rank_file(0)]["bytes"]
    assert partial.stat().st_size < full and not (_tag(run, 4) / MANIFEST).exists()  # killed mid-write
    assert _latest(run) == "step_00000002"

    resumed = run_train(tmp_path, _args(tiny_dataset, "train.checkpoint.async_save=false"))
    assert "resumed from step_00000002" in resumed.stderr
    assert _losses(run) == _losses(uninterrupted[1])
    for step in (4, 6, 8):  # written synchronously here, in the background there
        assert _file_hashes(_tag(run, step)) == _file_hashes(_tag(uninterrupted[1], step))
        mine, theirs = CheckpointReader(_tag(run, step)), CheckpointReader(_tag(uninterrupted[1], step))
        with mine, theirs:
            for name in mine.record["params"]:
                for kind in ("master", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(mine.read_param(kind, name), theirs.read_param(kind, name)), (step, kind, name)
    # the background writer overlapped training: the step loop waited far less than the write took
    log = (uninterrupted[1].parent / "stderr.txt").read_text()
    waited, wrote = map(float, re.search(r"saved checkpoint step 2 .*?waited ([\d.]+)s, the write took ([\d.]+)s",
                                         log).groups())
    assert wrote > 0.3 and waited < wrote / 3, (waited, wrote)


@pytest.mark.slow
def test_ranks_whose_views_differ_resume_from_the_same_step(tmp_path, tiny_dataset, two_rank_run, uninterrupted):
    """Rank 1's view of the folder lacks the newest checkpoint (its listings never show it, and
    for 3 s it cannot find it): rank 0 picks it and both ranks resume from it."""
    run = tmp_path / "r"
    shutil.copytree(two_rank_run(1), run)
    hidden = _tag(run, 4)
    python, _, _, *train_args = train_command(tmp_path, _args(tiny_dataset))
    stale = [python, str(Path(__file__).with_name("checkpoint_ranks.py")), "stale-view", str(hidden), "3", *train_args]
    outputs = _finish(_start_ranks([train_command(tmp_path, _args(tiny_dataset)), stale]))
    assert "stale view: checkpoints lists ['latest', 'step_00000002']" in outputs[1]  # what rank 1 sees
    assert "resumed from step_00000004" in outputs[0]
    losses, reference = _losses(run), _losses(uninterrupted[1])
    assert max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in range(SWITCH + 1, STEPS + 1)) < 1e-4


@pytest.mark.slow
def test_sigterm_without_time_for_a_save_keeps_the_last_checkpoint(tmp_path, tiny_dataset):
    """After a measured save of ~2 s (writes capped at 1 MB/s), a SIGTERM finds no time for another
    one: the run says so, keeps its last committed checkpoint and exits 75 in time.  The grace time
    is the exit margin alone, so the time left for saving is <= 0 whenever the SIGTERM arrives: a
    save in flight (step 6's starts as step 3's commits) cannot be finished either, and the outcome
    does not depend on how far that save got when the signal came."""
    run = tmp_path / "r"
    args = _args(tiny_dataset, "train.max_steps=200", "train.checkpoint.every=3",
                 "train.checkpoint.write_limit_mb_s=1", f"train.checkpoint.grace_s={STOP_MARGIN_S}")
    proc = start_train(tmp_path, args)
    wait_for(lambda: _latest(run) == "step_00000003", proc)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    stopped_at = int(re.search(r"stop: .*?not saving step (\d+)", output).group(1))
    assert "kept the last committed checkpoint" in output
    assert int(_latest(run).split("_")[1]) < stopped_at
    assert time.monotonic() - sent < 30  # a step and the decision, not a save
    for tag_dir in (run / "checkpoints").glob("step_*"):  # a save discarded in flight left nothing
        assert (tag_dir / MANIFEST).exists(), tag_dir
