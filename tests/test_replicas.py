"""The TP replica check (mythos_scale/parallel/replicas.py) on real gloo ranks: TP=2 x DP=2.

Every rank builds the same small model; the parameters marked TP-sharded get rank-specific
values (they differ by design and must be ignored).  The check passes; then one replicated
parameter on one rank moves by one ulp (the adversarial case): both ranks of that TP group name
it, and the ranks of the other TP group, whose copies agree, stop with them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port

pytestmark = pytest.mark.slow  # four processes


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from mythos_scale.parallel.distributed import init_distributed
    from mythos_scale.parallel.replicas import replica_drift, tp_replicated
    from mythos_scale.parallel.shard import ShardSpec
    from mythos_scale.train.trainer import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()
    layout = init_distributed(tp=2, ep=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4).bfloat16())
    with torch.no_grad():
        model[0].weight.add_(layout.tp_rank)  # a TP shard: differs across TP ranks by design
    model[0].weight.mythos_shard = ShardSpec(dim=0, global_shape=(16, 8), offset=8 * layout.tp_rank, group="tp")
    result = {"replicated": [name for name, _ in tp_replicated(model)], "clean": replica_drift(model, layout)}
    if rank == 1:
        with torch.no_grad():  # one ulp of one bf16 entry
            model[2].weight.view(torch.int16)[0, 0] += 1
    result["drift"] = replica_drift(model, layout)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_replica_drift_is_found_and_stops_every_rank(tmp_path):
    mp.start_processes(worker, args=(4, free_port(), str(tmp_path)), nprocs=4, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, res in enumerate(results):
        assert res["replicated"] == ["0.bias", "1.weight", "1.bias", "2.weight", "2.bias"], res
        assert res["clean"] is None, (r, res)
    for r in (0, 1):  # the drifted TP group names the parameter and the ranks that agree
        assert "parameter 2.weight differs" in results[r]["drift"] and "[[0], [1]]" in results[r]["drift"], results[r]
        assert "1 of 5 replicated parameters differ" in results[r]["drift"]
    for r in (2, 3):  # the other group's copies agree, and it stops too
        assert "not rank" in results[r]["drift"] and "1 TP group(s)" in results[r]["drift"], results[r]
