"""The run folder (``train.out_dir/train.name``): what a start may do with it.

It is checked before anything is built (:meth:`RunFolder.check`: the checkpoint to resume from,
or a refusal that changes nothing) and claimed only once the data is checked, the engine built
and the checkpoint loaded (:meth:`RunFolder.claim`), so a start that fails early leaves nothing
behind.  A start from step 0 moves what an earlier attempt left to ``previous/<time>/``; a resume
at step s keeps the metrics rows up to s.  Nothing is mixed, nothing lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch.distributed as dist
import yaml

from mythos_scale.checkpoint import Checkpointer, CheckpointError
from mythos_scale.config import Config, ConfigError, dump_config
from mythos_scale.parallel import ParallelLayout

log = logging.getLogger("mythos_scale.train")

# What a run leaves in its folder besides config.yaml; a fresh start moves these to previous/.
RUN_OUTPUTS = ("metrics.jsonl", "tb", "wandb", "profile", "plots", "checkpoints")


class RunFolder:
    def __init__(self, path: Path, cfg: Config, layout: ParallelLayout):
        self.path, self.cfg, self.layout = path, cfg, layout

    def check(self, checkpointer: Checkpointer) -> Path | None:
        """Decide, changing nothing, how this run starts: the checkpoint to resume from, or None
        for step 0.  Refused (exit 2): a folder whose checkpoints are all unusable (unless
        ``train.restart``), a resume with another model config.  A checkpoint written by
        another layout is resharded on load.  A folder without a committed checkpoint is not
        claimed by anything in it (a config.yaml of an earlier start that failed included).
        Collective: rank 0 picks the checkpoint, every rank gets the same answer."""
        t, main = self.cfg.train, self.layout.is_main
        scan = checkpointer.choose_resume()
        for tag_dir, problem in scan.rejected:
            if main:
                log.warning("checkpoint %s cannot be used: %s", tag_dir.name, problem)
        if scan.only_unusable:
            if not t.restart:
                listed = "\n  ".join(f"{tag.name}: {why}" for tag, why in scan.rejected) or "(none left)"
                raise CheckpointError(
                    f"run folder {self.path} has checkpoints, but none can be resumed from:\n  {listed}\n"
                    f"Nothing was changed. Repair or remove them, use another train.name or train.out_dir, "
                    f"or set train.restart=true to start again from step 0 (what this folder holds is then "
                    f"moved to {self.path / 'previous'}/<time>/, not deleted)")
            if main:
                log.warning("train.restart=true: no usable checkpoint; starting again from step 0")
            return None
        if scan.usable is None:
            return None
        if t.restart and main:
            log.info("train.restart=true has no effect: checkpoint %s is usable and is resumed", scan.usable.name)
        self._check_same_model()
        return scan.usable

    def _check_same_model(self) -> None:
        """A run folder belongs to one model: refuse to resume it with another."""
        saved = self.path / "config.yaml"
        if not saved.is_file():
            return
        current = self.cfg.model_dump(mode="json")
        old = yaml.safe_load(saved.read_text())
        diffs = [f"model.{k}: {old['model'].get(k)!r} -> {v!r}"
                 for k, v in current["model"].items() if old["model"].get(k) != v]
        if old["data"]["seq_len"] != current["data"]["seq_len"]:
            diffs.append(f"data.seq_len: {old['data']['seq_len']} -> {current['data']['seq_len']}")
        if diffs:
            raise ConfigError(f"run folder {self.path} was created with a different config "
                              f"({saved}); use another train.name or train.out_dir. Differences:\n  "
                              + "\n  ".join(diffs))

    def claim(self, resumed: bool, step: int) -> None:
        """Claim the folder, once the data is checked, the engine built and the checkpoint
        loaded.  A resume at ``step`` drops the metrics rows after it (those steps run again,
        identically); a start from step 0 moves what an earlier attempt left (metrics,
        TensorBoard logs, plots, checkpoints) to ``previous/<time>/``.  Then ``config.yaml``
        records this start's config.  Collective."""
        if self.layout.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if resumed:
                self.truncate_history(step)
            else:
                self._move_earlier_attempt_aside()
            (self.path / "config.yaml").write_text(dump_config(self.cfg))
        dist.barrier()

    def _move_earlier_attempt_aside(self) -> None:
        found = [self.path / n for n in RUN_OUTPUTS if (self.path / n).exists()]
        if not found:
            return
        found += [p for p in [self.path / "config.yaml"] if p.exists()]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, n = self.path / "previous" / stamp, 1
        while dest.exists():
            n += 1
            dest = self.path / "previous" / f"{stamp}.{n}"
        dest.mkdir(parents=True)
        for path in found:
            path.rename(dest / path.name)
        log.warning("starting from step 0: moved what an earlier attempt left in %s (%s) to %s",
                    self.path, ", ".join(p.name for p in found), dest)

    def truncate_history(self, step: int) -> None:
        """Keep the metrics rows up to ``step`` (one per step) and drop damaged lines."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        rows, later, damaged = {}, 0, 0
        for line in path.read_text().splitlines():
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                damaged += 1
                continue
            if row_step <= step:
                rows[row_step] = line
            else:
                later += 1
        text = "".join(rows[k] + "\n" for k in sorted(rows))
        if text != path.read_text():
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
            log.info("metrics.jsonl: kept the rows up to step %d; dropped %d rows of later steps (they "
                     "run again) and %d damaged lines", step, later, damaged)
