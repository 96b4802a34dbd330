"""Weights & Biases as a metrics backend (``train.wandb``), on the main rank beside TensorBoard.

The run's W&B id is kept in ``<run>/wandb/run_id``: a resume (a requeued job) continues the same
W&B run, a start from step 0 moves ``wandb/`` aside with the other outputs and opens a new one.
Every row and extra scalar goes to ``wandb.log`` at its optimizer step, as in TensorBoard.  A
resume re-runs the steps after its checkpoint, bitwise as before: W&B (online) keeps the values it
already has for those steps and ignores the repeats; offline, each attempt is one
``wandb/offline-run-*`` folder with the same id, which ``wandb sync`` uploads into one run.
"""

from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

from mythos_scale.config import Config, ConfigError
from mythos_scale.train.metrics_log import MetricsBackend

RUN_ID_FILE = "run_id"


def check_wandb_installed(cfg: Config) -> None:
    """Refuse at start-up, before the run folder is touched, a ``train.wandb`` without wandb."""
    if cfg.train.wandb is not None and cfg.train.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.wandb is set but the wandb package is not installed: "
                          "pip install 'mythos_scale[wandb]' (or remove train.wandb)")


def wandb_run_id(wandb_dir: Path) -> str:
    """The W&B run id of this run folder: the kept one, or a new one (kept from now on)."""
    path = wandb_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    wandb_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class WandB(MetricsBackend):
    """One W&B run per run folder; every row and every extra scalar at its step."""

    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        settings = cfg.train.wandb
        wandb_dir = run_dir / "wandb"
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, name=settings.name or cfg.train.name,
            mode=settings.mode, dir=str(run_dir), id=wandb_run_id(wandb_dir), resume="allow",
            tags=settings.tags, config=cfg.model_dump(mode="json"),
            # our console line stays ours: W&B does not wrap stdout/stderr
            settings=wandb.Settings(console="off"))

    def row(self, step: int, metrics: dict[str, float]) -> None:
        self.scalars(step, metrics)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()
