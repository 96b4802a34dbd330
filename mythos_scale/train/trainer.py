"""The trainer: one rank of a run (``mythos train``, see :mod:`mythos_scale.train.train_cli`).

One optimizer step: draw the loop count T from (seed, step) so every rank agrees, run
``grad_accum`` micro-batches forward/backward through the DeepSpeed engine (truncated
backprop through the last k iterations), let DeepSpeed reduce, clip and step (it skips the
update when the gradient is not finite), update the MoE balance biases from expert counts
summed over the data-parallel group, then log, evaluate and checkpoint.

Its components: the run folder (:mod:`.run_folder`: checked before anything is built, claimed
once the engine is built and the checkpoint loaded), the checkpointer
(:mod:`mythos_scale.checkpoint`: one call per step decides whether to commit, save or stop) and
the metrics logger (:mod:`.metrics_log`: ``metrics.jsonl``, TensorBoard, the console line).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mythos_scale.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError, seed_rng
from mythos_scale.config import Config, ConfigError
from mythos_scale.data.loader import build_val_loader
from mythos_scale.data.manifest import DataError
from mythos_scale.data.stages import build_staged_train_loader
from mythos_scale.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED
from mythos_scale.model import build_model, update_balance_bias
from mythos_scale.parallel import LaunchError, ParallelLayout, init_distributed, sum_over_ranks
from mythos_scale.parallel.compile import graph_breaks
from mythos_scale.parallel.parallelize import parallelize
from mythos_scale.parallel.precision import refresh_fp32_values, uses_bf16
from mythos_scale.parallel.replicas import replica_drift
from mythos_scale.plan import plan_model
from mythos_scale.train.init_from import init_from_weights
from mythos_scale.train.lm_loss import lm_head_loss
from mythos_scale.train.loops import sample_loops, step_backprop_depth
from mythos_scale.train.metrics import ThroughputInterval, keep_cpu_peak, memory_metrics, peak_tflops
from mythos_scale.train.metrics_log import MetricsLogger
from mythos_scale.train.optim import build_optimizer, lr_at
from mythos_scale.train.plots import write_plots
from mythos_scale.train.profiling import StepProfiler
from mythos_scale.train.run_folder import RunFolder
from mythos_scale.train.stop_signals import sigterm_age_s, stop_requested
from mythos_scale.train.wandb_log import check_wandb_installed

log = logging.getLogger("mythos_scale.train")

# The keys of the learning-rate schedule, saved with each checkpoint to detect a change on resume.
SCHEDULE_KEYS = ("max_steps", "lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why); exit status 1."""


class Trainer:
    def __init__(self, cfg: Config, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        t = cfg.train
        self.run_dir = Path(t.out_dir).expanduser() / t.name
        self.checkpointer = Checkpointer(self.run_dir, cfg, layout)
        self.run_folder = RunFolder(self.run_dir, cfg, layout)
        check_wandb_installed(cfg)
        self.profiler = StepProfiler(t.profile, self.run_dir / "profile", layout)
        self.resume_tag = self.run_folder.check(self.checkpointer)

        loader_args = dict(micro_batch_size=t.micro_batch_size, dp_rank=layout.dp_rank, dp_world=layout.dp,
                           vocab_size=cfg.model.vocab_size)
        self.train_loader = build_staged_train_loader(cfg.data, global_batch_size=t.global_batch_size, **loader_args)
        self.val_loader = build_val_loader(cfg.data, **loader_args) if t.eval_every else None
        self.eos_id = self.train_loader.eos_id  # document boundaries

        seed_rng(t.seed, layout.rank)  # restored from the checkpoint on resume in the same layout
        model = build_model(cfg.model, seed=t.seed)  # identical initial weights on every rank
        init_from_weights(model, cfg, resuming=self.resume_tag is not None, main=layout.is_main)
        self.engine = parallelize(model, cfg, layout, lambda m: build_optimizer(m, t))  # TP, EP, ZeRO
        self.model = self.engine.module
        self.bf16 = uses_bf16(cfg, layout.device)
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self._flops_per_token: dict[tuple[int, int], float] = {}  # by (T, k), from the planner
        self.peak_tflops = peak_tflops(t.peak_tflops, layout.device, cfg.data.cache_dir)
        self.metrics: MetricsLogger | None = None  # opened by fit(), once the run has started
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ state

    def _trainer_state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint (JSON, the same on every rank)."""
        return {"tokens_seen": self.tokens_seen, "nonfinite_skipped": self.skipped_steps,
                "schedule": {k: getattr(self.cfg.train, k) for k in SCHEDULE_KEYS},
                "data": self.train_loader.state_dict()}

    def _resume(self, tag_dir: Path) -> None:
        start = time.perf_counter()
        point = self.checkpointer.load(self.engine, tag_dir)
        refresh_fp32_values(self.engine, self.bf16)
        self.step = point.step
        self.tokens_seen = point.trainer["tokens_seen"]
        self.skipped_steps = point.trainer["nonfinite_skipped"]
        self.train_loader.load_state_dict(point.trainer["data"])
        if self.layout.is_main:
            log.info("resumed from %s (step %d, %d tokens) in %.2fs", point.tag, self.step,
                     self.tokens_seen, time.perf_counter() - start)
            if point.resharded:
                log.info("%s; the data continues at sample %d of the global stream", point.resharded,
                         point.trainer["data"]["consumed_samples"])
            self._warn_if_schedule_changed(point.tag, point.trainer.get("schedule"))

    def _warn_if_schedule_changed(self, tag: str, saved: dict[str, Any] | None) -> None:
        """Changing train.max_steps (or another schedule key) on resume is allowed, since raising
        max_steps is how a run is extended, but it bends the LR curve from here on: say how."""
        t = self.cfg.train
        changed = {k: v for k, v in (saved or {}).items() if k in SCHEDULE_KEYS and v != getattr(t, k)}
        if not changed:
            return
        before = lr_at(self.step, t.model_copy(update=changed))
        log.warning("the learning-rate schedule differs from the one %s was trained with (%s): from step %d "
                    "the LR follows the new one, %.3g instead of %.3g%s; to keep the old curve, resume with "
                    "the old values", tag, ", ".join(f"train.{k} {v} -> {getattr(t, k)}" for k, v in changed.items()),
                    self.step, lr_at(self.step, t), before,
                    " (the decay is stretched over the new length)" if "max_steps" in changed else "")

    # ------------------------------------------------------------------ the step

    def _sync(self, logged: bool) -> None:
        """Wait for the GPU, only on logged steps (their phases are timed): a sync stalls the launch queue."""
        if logged and self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)

    def _loss(self, out, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.cfg.train
        lm = lm_head_loss(out.hidden, self.model.head_weight, labels, t.loss_chunk_tokens, t.z_loss_coef)
        parts = {"lm_loss": lm.lm, "moe_aux_loss": out.moe_aux_loss, "ponder_cost": out.ponder_cost}
        if t.z_loss_coef:
            parts["z_loss"] = lm.z
        total = lm.total
        if len(out.window_hidden) > 1:  # train.loops.window_loss: every grad-carrying iteration predicts
            earlier = [lm_head_loss(h, self.model.head_weight, labels, t.loss_chunk_tokens, t.z_loss_coef).total
                       for h in out.window_hidden[:-1]]
            total = (sum(earlier) + lm.total) / len(out.window_hidden)
            parts["window_loss"] = total
        return total + out.moe_aux_loss + out.ponder_cost, parts

    def train_step(self, batches, logged: bool = True) -> dict[str, float]:
        """One optimizer step.  ``logged``: a logging step, whose phases are timed and whose model
        statistics (``model/*``, full-activation passes) are computed; other steps skip both."""
        step_start = time.perf_counter()
        t = self.cfg.train
        n_loops = sample_loops(t.loops, t.seed, self.step)
        backprop_depth = step_backprop_depth(t.loops, n_loops)
        lr = lr_at(self.step, t)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

        times = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
        sums: dict[str, torch.Tensor] = {}
        stats = None
        for micro in range(self.grad_accum):
            t0 = time.perf_counter()
            inputs, labels = next(batches)
            inputs, labels = inputs.to(self.layout.device), labels.to(self.layout.device)
            t1 = time.perf_counter()
            out = self.engine(inputs, n_loops=n_loops, backprop_depth=backprop_depth, eos_id=self.eos_id, logits=False,
                              with_stats=logged and micro == self.grad_accum - 1,  # the last one's are logged
                              window=t.loops.window_loss)
            loss, parts = self._loss(out, labels)
            self._sync(logged)
            t2 = time.perf_counter()
            self.engine.backward(loss)
            self._sync(logged)
            t3 = time.perf_counter()
            self.engine.step()  # DeepSpeed reduces and steps only at the accumulation boundary
            self._sync(logged)
            t4 = time.perf_counter()
            times["data"] += t1 - t0
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            times["optimizer"] += t4 - t3
            for name, value in dict(parts, loss=loss).items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            stats = out.stats

        applied = self.engine.was_step_applied()
        refresh_fp32_values(self.engine, self.bf16)  # the injection's decay from its new fp32 masters
        # Expert counts are summed over the data-parallel group (TP ranks route the same tokens);
        # a skipped (non-finite) step leaves the balance biases alone and its counts are dropped.
        load = update_balance_bias(self.model, self.cfg.model.moe.balance_update_rate if applied else 0.0,
                                   all_reduce=lambda counts: dist.all_reduce(counts, group=self.layout.dp_group))
        # Mean of every part over micro-batches and ranks (TP ranks hold equal copies), in one collective.
        names = sorted(sums)
        means = sum_over_ranks([sums[n] / (self.grad_accum * self.layout.world_size) for n in names],
                               self.layout.device)
        metrics = {f"train/{n}": v for n, v in zip(names, means)}

        self.step += 1
        self.tokens_seen += self.tokens_per_step
        if applied:
            self.nonfinite_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update({
            "train/lr": lr, "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/skipped_steps": self.skipped_steps, "train/tokens_seen": self.tokens_seen,
            "loops/T": n_loops, "loops/backprop_depth": backprop_depth,
        })
        if logged or self.layout.device.type != "cuda":
            metrics.update({f"time/{phase}_s": seconds for phase, seconds in times.items()})
        metrics.update(self._model_stats(stats, load) if logged else load)
        if self.cfg.model.compile and logged:
            metrics["compile/graph_breaks"] = sum(graph_breaks().values())
        metrics["time/step_s"] = time.perf_counter() - step_start
        return metrics

    @staticmethod
    def _model_stats(stats: dict[str, torch.Tensor], load: dict[str, float]) -> dict[str, float]:
        """TensorBoard tags for the model's own signals: one per loop iteration for per-iteration
        ones (``model/h_norm/iter_03``); the expert-load dict already holds its tags.  All values
        are read in one host sync."""
        out = dict(load)
        flat = [value.detach().float().reshape(-1) for value in stats.values()]
        values = iter(torch.cat(flat).tolist() if flat else [])
        for (name, value), size in zip(stats.items(), (f.numel() for f in flat)):
            if value.ndim == 0:
                out[f"model/{name}"] = next(values)
            else:
                for i in range(size):
                    out[f"model/{name}/iter_{i:02d}"] = next(values)
        return out

    def _step_flops(self, n_loops: int, backprop_depth: int) -> float:
        """Model FLOPs of one optimizer step (all ranks) at loop count T and backprop depth k (``backprop_depth``)."""
        if (n_loops, backprop_depth) not in self._flops_per_token:
            self._flops_per_token[n_loops, backprop_depth] = plan_model(
                self.cfg.model, n_loops=n_loops, backprop_depth=backprop_depth, seq_len=self.cfg.data.seq_len)["flops_per_token"]
        return self.tokens_per_step * self._flops_per_token[n_loops, backprop_depth]

    def _throughput(self, steps: int, seconds: float, flops: float) -> dict[str, float]:
        """Throughput over a logging interval of ``steps`` steps and ``seconds`` of wall time
        (evaluation and checkpointing included), the ETA to train.max_steps at that pace, and the
        interval's memory: what the console, ``perf/*`` and ``mem/*`` report."""
        tokens_per_s = steps * self.tokens_per_step / seconds
        tflops = flops / seconds / self.layout.world_size / 1e12
        if tflops > self.peak_tflops and self.layout.device.type == "cpu" and self.cfg.train.peak_tflops <= 0:
            # The start-up matmul was timed on a machine too busy to show the CPU's rate: what
            # the model just sustained is a better lower bound for the peak (kept for later runs).
            if self.layout.is_main:
                log.warning("the model ran at %.1f GFLOP/s per rank, above the CPU peak measured at start-up "
                            "(%.1f GFLOP/s, the machine was busy): that rate is the MFU peak from now on",
                            tflops * 1e3, self.peak_tflops * 1e3)
            self.peak_tflops = keep_cpu_peak(self.cfg.data.cache_dir, tflops)[0]
        return {"perf/step_s": seconds / steps, "perf/tokens_per_s": tokens_per_s,
                "perf/tokens_per_s_per_device": tokens_per_s / self.layout.world_size,
                "perf/tflops_per_device": tflops, "perf/mfu": tflops / self.peak_tflops,
                "perf/eta_s": (self.cfg.train.max_steps - self.step) * seconds / steps,
                **memory_metrics(self.layout.device)}

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss at the training mean loop count (``val/loss``) and at each of
        ``train.eval_loops`` (``val/loss_at_loops/T<n>``), averaged over ranks in one collective."""
        self.engine.eval()
        t = self.cfg.train
        tags = {"val/loss": t.loops.mean, **{f"val/loss_at_loops/T{n:02d}": n for n in t.eval_loops}}
        totals, count = {tag: torch.zeros((), device=self.layout.device) for tag in tags}, 0
        for i, (inputs, labels) in enumerate(self.val_loader):
            if i >= t.eval_batches:
                break
            inputs, labels = inputs.to(self.layout.device), labels.to(self.layout.device)
            for tag, n_loops in tags.items():
                out = self.engine(inputs, n_loops=n_loops, eos_id=self.eos_id, logits=False)
                totals[tag] += lm_head_loss(out.hidden, self.model.head_weight, labels, t.loss_chunk_tokens).lm
            count += 1
        self.engine.train()
        *sums, batches = sum_over_ranks([*totals.values(), float(count)], self.layout.device)
        return {tag: s / max(batches, 1.0) for tag, s in zip(tags, sums)}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        t, resumed = self.cfg.train, self.resume_tag is not None
        if resumed:
            self._resume(self.resume_tag)
        self.run_folder.claim(resumed, self.step)
        # On resume, TensorBoard hides what an earlier attempt logged after the checkpoint.
        self.metrics = MetricsLogger.for_run(self.run_dir, self.layout.is_main, self.step + 1 if resumed else None,
                                             self.cfg)
        self._log_start()
        batches = iter(self.train_loader)
        last_step = t.max_steps if not t.exit_after_steps else min(t.max_steps, self.step + t.exit_after_steps)
        interval = ThroughputInterval()
        try:
            while self.step < last_step:
                logged = (self.step + 1) % t.log_every == 0 or self.step + 1 == last_step
                with self.profiler.step(self.step + 1):
                    metrics = self.train_step(batches, logged)
                interval.add_step(self._step_flops(int(metrics["loops/T"]), int(metrics["loops/backprop_depth"])))
                if self.val_loader is not None and self.step % t.eval_every == 0:
                    metrics.update(self.evaluate())
                if logged:
                    metrics.update(self._throughput(*interval.take()))
                self.metrics.row(self.step, t.max_steps, metrics, console=logged)
                self._check_finite()
                self._check_replicas()
                saving = self.checkpointer.after_step(
                    self.engine, self.step, due=self.step % t.checkpoint.every == 0 or self.step == last_step,
                    trainer_state=self._trainer_state, stop_requested=stop_requested() is not None,
                    sigterm_age_s=sigterm_age_s())
                self.metrics.scalars(self.step, saving.scalars)
                if saving.stopped is not None:
                    return self._exit_preempted(saving.stopped)
            self.metrics.scalars(self.step, self.checkpointer.finish())
        finally:
            self.checkpointer.close()
            self.metrics.close()
        self._log_end()
        return EXIT_OK

    def _log_start(self) -> None:
        t, lay = self.cfg.train, self.layout
        if lay.is_main:
            log.info("run folder %s | %d ranks (dp %d, tp %d, ep %d) | global batch %d x %d tokens | grad accum %d | "
                     "steps %d..%d", self.run_dir, lay.world_size, lay.dp, lay.tp, lay.ep,
                     t.global_batch_size, self.cfg.data.seq_len, self.grad_accum, self.step, t.max_steps)

    def _check_finite(self) -> None:
        """Give up after ``train.max_nonfinite_steps`` non-finite steps in a row."""
        t = self.cfg.train
        if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
            self.metrics.scalars(self.step, self.checkpointer.finish())  # taken before the trouble: a good one
            raise TrainingError(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                f"(limit train.max_nonfinite_steps={t.max_nonfinite_steps}); stopping without "
                f"saving. The last good checkpoint is in {self.checkpointer.dir}")

    def _check_replicas(self) -> None:
        """Every ``parallel.tp_check_every`` steps under TP: stop when the TP ranks' copies of a
        replicated parameter are no longer bit-identical (see mythos_scale/parallel/replicas.py)."""
        every = self.cfg.parallel.tp_check_every
        if self.layout.tp > 1 and every and self.step % every == 0:
            drift = replica_drift(self.engine.module, self.layout)
            if drift is not None:
                raise TrainingError(f"step {self.step}: {drift}")

    def _exit_preempted(self, saved: str) -> int:
        if self.layout.is_main:
            log.warning("stop requested (%s): %s; exiting with status %d: run the same command again "
                        "(or requeue the job) to resume", stop_requested() or "signal on another rank",
                        saved, EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    def _log_end(self) -> None:
        t = self.cfg.train
        if not self.layout.is_main:
            return
        self._write_plots()
        if self.step < t.max_steps:
            log.info("stopped after train.exit_after_steps=%d at step %d; run again to continue",
                     t.exit_after_steps, self.step)
        else:
            log.info("done: %d steps, %d tokens. TensorBoard: tensorboard --logdir %s ; checkpoints: %s ; "
                     "run the same command again to resume (raise train.max_steps to train further)",
                     self.step, self.tokens_seen, shlex.quote(str(self.run_dir / "tb")),
                     shlex.quote(str(self.checkpointer.dir)))

    def _write_plots(self) -> None:
        """The run is done whatever happens here: a plot that cannot be drawn is a warning."""
        try:
            plots = write_plots(self.run_dir)
        except Exception as exc:  # matplotlib and a hand-edited history can fail in many ways
            log.warning("could not draw the plots (%s: %s); the run itself is complete. Retry with: "
                        "mythos plot %s", type(exc).__name__, exc, shlex.quote(str(self.run_dir)))
            return
        log.info("plots: %s", ", ".join(str(p) for p in plots))


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles its shared-memory all-reduce op (``deepspeed_shm_comm``,
    under ~/.cache/torch_extensions) when it starts communication: a minute of compiling on a
    first start, again whenever another environment rebuilt it with other flags, and every other
    rank waits on the build lock meanwhile.  The op serves only ``inference_all_reduce``, which
    training never calls; DeepSpeed 0.19 builds it only when ``deepspeed.ops.__compatible_ops__``
    lists it, a dict it otherwise fills lazily by probing every op (compiler runs) and reads only
    there.  So set that dict, with the op marked unavailable."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__ = {ShareMemCommBuilder.NAME: False}


def run(cfg: Config) -> int:
    """Train ``cfg`` as one rank of a launch (or a world of one); returns the exit status."""
    _setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    try:
        if not torch.cuda.is_available():
            _skip_deepspeed_shm_op()
        layout = init_distributed(cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.timeout_minutes,
                                  cfg.parallel.device)
        return Trainer(cfg, layout).fit()
    except (ConfigError, LaunchError, CheckpointError, DataError) as exc:
        print(f"mythos train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (TrainingError, CheckpointWriteError) as exc:
        print(f"mythos train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
