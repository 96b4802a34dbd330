"""Checkpoints: a layout-free format (:mod:`.format`), the ZeRO engine's pieces (:mod:`.zero`),
the file writer (:mod:`.writer`) and the save / commit / resume protocol (:mod:`.checkpointer`)."""

from mythos_scale.train.checkpoint.checkpointer import (CheckpointScan, Checkpointer, CheckpointWriteError,
                                                        ResumePoint, SaveTimes, plan_stop, seed_rng,
                                                        tag_for_step, validate_checkpoint)
from mythos_scale.train.checkpoint.format import CheckpointError, read_checkpoint_info, read_model_state

__all__ = ["CheckpointError", "CheckpointScan", "CheckpointWriteError", "Checkpointer", "ResumePoint", "SaveTimes",
           "plan_stop", "read_checkpoint_info", "read_model_state", "seed_rng", "tag_for_step", "validate_checkpoint"]
