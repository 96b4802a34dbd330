"""The precision policy (mythos_scale/parallel/precision.py) under the real DeepSpeed engine at
bf16, built by the trainer itself (parallelize()): 1 rank and 2 gloo ranks with EP=2, ZeRO-1 and
ZeRO-2, in one spawned launch per world size.  Each case trains 3 steps at bf16 straight, 3 steps
at bf16 split by a checkpoint (resume) and 3 steps at fp32."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, TINY_TRAIN, free_port

STAGES = (1, 2)
BF16_LOSS_RTOL = 0.02  # bf16 weights and activations: ~3 significant digits, a few roundings deep


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from deepspeed.utils import safe_get_full_fp32_param

    from mythos_scale.config import load_config
    from mythos_scale.model.recurrence import LTIInjection
    from mythos_scale.parallel import init_distributed
    from mythos_scale.parallel.precision import PrecisionError, check_engine_precision, dtype_table
    from mythos_scale.train.trainer import Trainer, _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    torch.set_num_threads(1)
    layout = init_distributed(1, world)  # EP over both ranks when there are two
    results = {}
    for stage in STAGES:
        def trainer(name: str, precision: str, *extra: str) -> Trainer:
            cfg = load_config(REPO / "configs" / "tiny_cpu.yaml", [
                *TINY_TRAIN, f"data.sources=[{{path: '{dataset}'}}]", f"train.out_dir={out}",
                f"train.name=w{world}_z{stage}_{name}", f"train.precision={precision}", f"train.zero_stage={stage}",
                "train.max_steps=3", "train.loops.sampler=fixed", "train.global_batch_size=4", *extra])
            return Trainer(cfg, layout)

        straight = trainer("straight", "bf16")
        table = dtype_table(straight.engine)
        straight.fit()
        inj = straight.model.injection
        masters = {n: safe_get_full_fp32_param(getattr(inj, n)) for n in LTIInjection.FP32_VALUES}
        try:  # adversarial: a parameter cast behind the model's back (last: it unlinks the flat buffer)
            straight.model.norm.weight.data = straight.model.norm.weight.data.float()
            check_engine_precision(straight.engine, bf16=True)
            caught = ""
        except PrecisionError as exc:
            caught = str(exc)
        trainer("split", "bf16", "train.exit_after_steps=2").fit()
        trainer("split", "bf16", "train.exit_after_steps=2").fit()  # resumes at step 2
        trainer("fp32", "fp32").fit()
        if rank == 0:
            results[stage] = dict(
                table=table, caught=caught, optimizer=type(straight.engine.optimizer).__name__,
                fp32_values_are_masters=all(torch.equal(inj.fp32_values[n], m) for n, m in masters.items()),
                masters_off_bf16=all(not torch.equal(m, m.bfloat16().float()) for m in masters.values()),
                **{name: _losses(Path(out) / f"w{world}_z{stage}_{name}") for name in ("straight", "split", "fp32")})
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks_ep2"])
def results(request, tmp_path_factory, tiny_dataset) -> dict:
    out = tmp_path_factory.mktemp(f"precision{request.param}")
    mp.start_processes(worker, args=(request.param, free_port(), str(tiny_dataset), str(out)),
                       nprocs=request.param, start_method="spawn")
    return {int(k): v for k, v in json.loads((out / "results.json").read_text()).items()}


@pytest.mark.slow  # multi-process DeepSpeed engines
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_engine_follows_the_policy(results, stage):
    r = results[stage]
    params = {n: d for n, d in r["table"].items() if not n.startswith("<")}
    assert params and set(params.values()) == {"bfloat16"}, params
    assert r["table"]["<gradient reduction>"] == "float32"
    assert r["table"]["<gradient accumulation>"] == ("float32" if stage == 2 else "bfloat16")
    assert r["optimizer"] == "DeepSpeedZeroOptimizer"  # not BF16_Optimizer, which checkpoints cannot read
    assert r["fp32_values_are_masters"] and r["masters_off_bf16"], r  # A_bar from fp32, not bf16-rounded
    assert "norm.weight" in r["caught"] and "torch.float32" in r["caught"], r["caught"]


@pytest.mark.slow  # multi-process DeepSpeed engines
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_loss_close_to_fp32_and_resume_exact(results, stage):
    r = results[stage]
    assert len(r["straight"]) == len(r["fp32"]) == 3 and len(r["split"]) == 3
    for bf16, fp32 in zip(r["straight"], r["fp32"]):
        assert abs(bf16 - fp32) <= BF16_LOSS_RTOL * fp32, (r["straight"], r["fp32"])
    assert r["straight"] != r["fp32"]  # it did run in bf16
    assert r["split"] == r["straight"], (r["split"], r["straight"])  # resumed from a bf16 checkpoint: exact


def test_zero1_fp32_accumulation_and_bf16_reduction_refused():
    """grad_accum_dtype=fp32 under ZeRO-1 would switch DeepSpeed to BF16_Optimizer: refused with the key named."""
    from mythos_scale.parallel.precision import PrecisionError, check_deepspeed_config, deepspeed_precision

    for stage in STAGES:
        check_deepspeed_config(deepspeed_precision(True, stage), stage)  # the policy itself passes
    ds = deepspeed_precision(True, 1) | {"data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(PrecisionError, match=r"grad_accum_dtype=fp32 with train.zero_stage=1"):
        check_deepspeed_config(ds, 1)
    check_deepspeed_config(deepspeed_precision(True, 2) | {"data_types": {"grad_accum_dtype": "fp32"}}, 2)
    with pytest.raises(PrecisionError, match="communication_data_type=bf16"):
        check_deepspeed_config(deepspeed_precision(True, 2) | {"communication_data_type": "bf16"}, 2)
    check_deepspeed_config({"bf16": {"enabled": False}, "communication_data_type": "bf16"}, 1)  # fp32 runs: free
