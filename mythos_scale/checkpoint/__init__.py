"""Checkpoints: a layout-free format (:mod:`.format`), the ZeRO engine's state as pieces
(:mod:`.zero_state`), the file writer (:mod:`.writer`), the save / commit / resume protocol
(:mod:`.checkpointer`) and what a stop request saves in its grace time (:mod:`.stop`).
Used by training (save, resume) and by ``mythos eval | generate | ckpt`` (read, export)."""

from mythos_scale.checkpoint.checkpointer import (
                                                  Checkpointer,
                                                  CheckpointScan,
                                                  CheckpointWriteError,
                                                  ResumePoint,
                                                  seed_rng,
                                                  tag_for_step,
                                                  validate_checkpoint,
)
from mythos_scale.checkpoint.format import CheckpointError, read_checkpoint_info, read_model_state
from mythos_scale.checkpoint.stop import SaveTimes, plan_stop

__all__ = ["CheckpointError", "CheckpointScan", "CheckpointWriteError", "Checkpointer", "ResumePoint", "SaveTimes",
           "plan_stop", "read_checkpoint_info", "read_model_state", "seed_rng", "tag_for_step", "validate_checkpoint"]
