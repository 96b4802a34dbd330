"""Data stages: the training mix changes at given optimizer steps (``data.stages``).

Stage 0 is ``data.sources`` from step 0; stage ``i`` reads its own sources from its
``start_step`` on.  Each stage is its own sample stream (:class:`~.loader.TrainLoader`: blended,
shuffled, sharded as that module describes) counted from the stage's first sample, keyed by
``data.shuffle_seed`` (stage 0, so a run without stages reads what it always read) or by a seed
derived from it and the stage's index (a source read again in a later stage is read in another
order).  Stage boundaries are kept as global sample counts (``start_step x global batch``), so the
position of every batch is still a pure function of the samples consumed: a resume is exact
inside each stage and across its boundaries, into any data-parallel size.

On resume, the stage the checkpoint is in must be the same (same start, same sources) unless the
new config starts a stage exactly at the resume step; later stages may be added or changed
freely: that is how a mix is changed on resume (e.g. for a WSD decay phase).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mythos_scale.config import DataConfig
from mythos_scale.data.loader import TrainLoader, build_train_loader
from mythos_scale.data.manifest import DataError

log = logging.getLogger("mythos_scale.train")


def stage_seed(shuffle_seed: int, stage: int) -> int:
    """Stage 0 keeps ``data.shuffle_seed``; later stages get one derived from it and their index."""
    if stage == 0:
        return shuffle_seed
    return int(np.random.SeedSequence([shuffle_seed, stage]).generate_state(1, np.uint32)[0])


class StagedLoader:
    """The training stream over data stages: micro-batches like a TrainLoader's (which it is
    made of, one per stage), with the same ``state_dict`` / ``load_state_dict`` contract."""

    def __init__(self, loaders: list[TrainLoader], start_steps: list[int], global_batch_size: int, seed: int):
        self.loaders, self.global_batch_size, self.seed = loaders, global_batch_size, seed
        self.start_samples = [s * global_batch_size for s in start_steps]
        self.samples_per_micro_batch = loaders[0].micro_batch_size * loaders[0].dp_world
        self.step = 0  # micro-batches handed out by this rank, over all stages
        self.current: int | None = None

    @property
    def eos_id(self) -> int:
        """The end-of-document token (every stage shares stage 0's tokenizer)."""
        return self.loaders[0].sources[0].manifest.eos_id

    def _stage_at(self, sample: int) -> int:
        return max(i for i, start in enumerate(self.start_samples) if start <= sample)

    def __iter__(self) -> StagedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        consumed = self.step * self.samples_per_micro_batch
        stage = self._stage_at(consumed)
        if stage != self.current:
            if self.current is not None:
                self.loaders[self.current].close()
                log.info("data stage %d from step %d: %s", stage, consumed // self.global_batch_size,
                         ", ".join(s.name for s in self.loaders[stage].sources))
            self.current = stage
            self.loaders[stage].close()  # its next batch is read from the position set here
            self.loaders[stage].step = (consumed - self.start_samples[stage]) // self.samples_per_micro_batch
        self.step += 1
        return next(self.loaders[stage])

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()

    def _stages(self) -> list[dict[str, Any]]:
        return [{"start_sample": start, "sources": [s.fingerprint() for s in loader.sources]}
                for start, loader in zip(self.start_samples, self.loaders)]

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.step * self.samples_per_micro_batch, "seed": self.seed,
                "stages": self._stages()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["consumed_samples"]``; refused (DataError) when the stage that
        sample is in was read with other sources or from another start."""
        consumed = int(state["consumed_samples"])
        if state.get("seed") != self.seed:
            raise DataError(f"loader state has data.shuffle_seed {state.get('seed')}, this run {self.seed}; "
                            f"resuming would not continue the same sample stream")
        if consumed % self.samples_per_micro_batch:
            raise DataError(f"loader state consumed {consumed} samples, not a multiple of "
                            f"micro_batch_size x dp_world = {self.samples_per_micro_batch}")
        saved = state.get("stages") or [{"start_sample": 0, "sources": state.get("sources")}]  # before stages
        stage = self._stage_at(consumed)
        mine = self._stages()[stage]
        if mine["start_sample"] < consumed:  # the stage had begun: it must go on as it was
            before = [s for s in saved if s["start_sample"] <= consumed][-1]
            if before != mine:
                step, gb = consumed // self.global_batch_size, self.global_batch_size
                raise DataError(
                    f"the checkpoint is at step {step}, inside a data stage that started at step "
                    f"{before['start_sample'] // gb} with sources {before['sources']}; this config's stage "
                    f"{stage} starts at step {mine['start_sample'] // gb} with {mine['sources']}, so resuming "
                    f"would not continue the same sample stream. To change the mix now, keep the stages "
                    f"up to here as they were and add one with start_step: {step} (or later)")
        self.step = consumed // self.samples_per_micro_batch
        self.current = None


def build_staged_train_loader(cfg: DataConfig, *, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                              dp_world: int, vocab_size: int) -> StagedLoader:
    """The training stream of ``data.sources`` then ``data.stages`` (collective, like
    :func:`~.loader.build_train_loader`: every stage's datasets are opened and checked now)."""
    mixes = [cfg.sources] + [stage.sources for stage in cfg.stages]
    loaders = [build_train_loader(cfg.model_copy(update={"sources": sources, "shuffle_seed": stage_seed(cfg.shuffle_seed, i)}),
                                  micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_world=dp_world,
                                  vocab_size=vocab_size)
               for i, sources in enumerate(mixes)]
    first = loaders[0].sources[0]
    for i, loader in enumerate(loaders[1:], start=1):
        other = loader.sources[0]
        if other.manifest.tokenizer_sha256 != first.manifest.tokenizer_sha256:
            raise DataError(f"data.stages[{i - 1}]: {other.name} was tokenized with another tokenizer than "
                            f"data.sources' {first.name}; every stage must share one (token ids and the "
                            f"end-of-document token mean the same in all of them)")
    return StagedLoader(loaders, [0] + [stage.start_step for stage in cfg.stages], global_batch_size, cfg.shuffle_seed)
