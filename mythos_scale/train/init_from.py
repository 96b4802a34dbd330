"""``train.init_from``: a run that starts from another model's weights (a warm start).

Weights only: the source is anything :func:`mythos_scale.eval.load.load_model` reads (a run
folder, one checkpoint, an export folder), its fp32 weights and persistent buffers are copied into
the freshly built model before it is parallelized (so any DP/TP/EP layout and ZeRO stage takes
them), and the optimizer state, the data order and the step counter start fresh.  Once the run
has a checkpoint of its own, a restart resumes that instead and ``init_from`` is not read.
"""

from __future__ import annotations

import logging
from typing import Any

from mythos_scale.config import Config, ConfigError
from mythos_scale.model import MythosModel

log = logging.getLogger("mythos_scale.train")


def init_from_weights(model: MythosModel, cfg: Config, resuming: bool, main: bool) -> dict[str, Any] | None:
    """Copy ``train.init_from``'s weights into ``model`` (when set and not resuming); returns what
    was loaded (kind, path, step...).  A path that holds no model, or one whose tensors do not fit
    this run's ``model.*``, is a ConfigError (exit 2) raised before the run folder is touched."""
    path = cfg.train.init_from
    if not path:
        return None
    if resuming:
        if main:
            log.info("train.init_from=%s is not used: this run resumes from its own checkpoint", path)
        return None
    from mythos_scale.eval.load import ModelLoadError, load_model

    try:
        loaded = load_model(path)
    except ModelLoadError as exc:
        raise ConfigError(f"train.init_from: {exc}") from None
    source, target = loaded.model.state_dict(), model.state_dict()
    problems = [f"{n}: missing in the source" for n in sorted(set(target) - set(source))]
    problems += [f"{n}: not in this run's model" for n in sorted(set(source) - set(target))]
    problems += [f"{n}: {tuple(source[n].shape)} in the source, {tuple(target[n].shape)} here"
                 for n in sorted(set(source) & set(target)) if source[n].shape != target[n].shape]
    if problems:
        raise ConfigError(f"train.init_from: the model in {path} does not fit this run's model.* settings:\n  "
                          + "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else ""))
    model.load_state_dict({n: t.to(target[n].dtype) for n, t in source.items()})
    if main:
        theirs, ours = loaded.cfg.model.model_dump(), cfg.model.model_dump()
        differing = [f"model.{k}" for k in ours if theirs.get(k) != ours[k]]
        step = loaded.source.get("step")
        log.info("weights from train.init_from=%s (%s%s); weights only: the optimizer, the data order and the "
                 "step counter start fresh, at step 0%s", path, loaded.source.get("kind"),
                 f" at step {step}" if step is not None else "",
                 f"; this run's model settings differ in {', '.join(differing)}" if differing else "")
    return loaded.source
