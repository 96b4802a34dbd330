"""Host syncs of real training steps (one rank of a launch): ``python tests/host_sync_step.py
CONFIG OVERRIDES...`` builds the trainer, runs one warm-up step, then counts the syncs of an
unlogged step and of a logged one (:class:`~mythos_scale.train.host_syncs.HostSyncCounter`) and
writes them to ``<train.out_dir>/syncs_rank<r>.json`` (a file per rank: the launcher interleaves
the ranks' stdout, so two ranks' lines can share a line)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mythos_scale.config import load_config
from mythos_scale.parallel import init_distributed
from mythos_scale.train.host_syncs import HostSyncCounter
from mythos_scale.train.trainer import Trainer, _skip_deepspeed_shm_op


def main() -> None:
    torch.set_num_threads(1)
    _skip_deepspeed_shm_op()
    cfg = load_config(sys.argv[1], sys.argv[2:])
    trainer = Trainer(cfg, init_distributed(cfg.parallel.tp, cfg.parallel.ep))
    batches = iter(trainer.train_loader)
    trainer.train_step(batches, logged=False)  # warm-up: DeepSpeed's first-step set-up is not a step's cost
    report = {}
    for logged in (False, True):
        with HostSyncCounter() as syncs:
            metrics = trainer.train_step(batches, logged=logged)
        report["logged" if logged else "unlogged"] = {
            "total": syncs.total, "by_kind": dict(syncs.by_kind),
            "model_stats": sorted(k for k in metrics if k.startswith("model/"))}
    rank = trainer.layout.rank
    (Path(cfg.train.out_dir) / f"syncs_rank{rank}.json").write_text(json.dumps({"rank": rank, **report}))


if __name__ == "__main__":
    main()
