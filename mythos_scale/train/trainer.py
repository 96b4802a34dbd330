"""``mythos train``: pretrain an RDT with DeepSpeed, alone or under a launcher.

    mythos train --config configs/tiny_cpu.yaml train.max_steps=50
    deepspeed --num_gpus 8 --module mythos_scale.train --config configs/mythos_770m.yaml
    srun python -m mythos_scale.train --config ...          (see slurm/)

One optimizer step: draw the loop count T from (seed, step) so every rank agrees, run
``grad_accum`` micro-batches forward/backward through the DeepSpeed engine (truncated
backprop through the last k iterations), let DeepSpeed reduce, clip and step (it skips the
update when the gradient is not finite), update the MoE balance biases from expert counts
summed over the data-parallel group, then log, evaluate and checkpoint.

Exit status: 0 finished, 2 bad config / data / launch environment, 75 preempted (SIGTERM or
SIGUSR1: the state was saved; requeue the job), 1 anything else (e.g. too many non-finite
steps in a row).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from mythos_scale.config import Config, ConfigError, dump_config, load_config
from mythos_scale.data.loader import build_train_loader, build_val_loader
from mythos_scale.data.manifest import DataError
from mythos_scale.model import build_model, update_balance_bias
from mythos_scale.parallel import LaunchError, ParallelLayout, init_distributed
from mythos_scale.plan import plan_model
from mythos_scale.train.checkpoint import CheckpointError, Checkpointer
from mythos_scale.train.loops import backprop_depth, sample_loops
from mythos_scale.train.metrics import MetricsLogger, memory_gib, peak_tflops
from mythos_scale.train.optim import build_optimizer, lr_at
from mythos_scale.train.plots import write_plots

log = logging.getLogger("mythos_scale.train")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PREEMPTED = 0, 1, 2, 75


# Set by SIGTERM / SIGUSR1 (preemption, the Slurm pre-timeout signal); read once per step.
_stop_signal: str | None = None


def _request_stop(signum, _frame) -> None:
    global _stop_signal
    _stop_signal = signal.Signals(signum).name


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why); exit status 1."""


def deepspeed_config(cfg: Config, layout: ParallelLayout) -> dict[str, Any]:
    t = cfg.train
    per_step = t.micro_batch_size * layout.dp
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x data-parallel size ({t.micro_batch_size} x {layout.dp})")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and layout.device.type == "cuda")
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.deepspeed)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Trainer:
    def __init__(self, cfg: Config, layout: ParallelLayout):
        self.cfg, self.layout = cfg, layout
        t = cfg.train
        self.run_dir = Path(t.out_dir).expanduser() / t.name
        self._check_run_dir()

        loader_args = dict(micro_batch_size=t.micro_batch_size, dp_rank=layout.dp_rank, dp_world=layout.dp,
                           vocab_size=cfg.model.vocab_size)
        self.train_loader = build_train_loader(cfg.data, **loader_args)
        self.val_loader = build_val_loader(cfg.data, **loader_args) if t.eval_every else None

        model = build_model(cfg.model, seed=t.seed)  # identical initial weights on every rank
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, t), config=deepspeed_config(cfg, layout))
        self.model = self.engine.module
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.tokens_per_step = t.global_batch_size * cfg.data.seq_len
        self._flops_per_token: dict[tuple[int, int], float] = {}  # by (T, k), from the planner
        self.peak_tflops = peak_tflops(t.peak_tflops, layout.device)

        self.checkpointer = Checkpointer(self.run_dir, t.checkpoint.keep_last, layout.rank, layout.world_size)
        self.metrics = MetricsLogger(self.run_dir / "tb" if layout.is_main else None)
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0

    # ------------------------------------------------------------------ run folder

    def _check_run_dir(self) -> None:
        """A run folder belongs to one model: refuse to resume it with another."""
        saved = self.run_dir / "config.yaml"
        current = self.cfg.model_dump(mode="json")
        if saved.is_file():
            old = yaml.safe_load(saved.read_text())
            diffs = [f"model.{k}: {old['model'].get(k)!r} -> {v!r}"
                     for k, v in current["model"].items() if old["model"].get(k) != v]
            if old["data"]["seq_len"] != current["data"]["seq_len"]:
                diffs.append(f"data.seq_len: {old['data']['seq_len']} -> {current['data']['seq_len']}")
            if diffs:
                raise ConfigError(f"run folder {self.run_dir} was created with a different config "
                                  f"({saved}); use another train.name or train.out_dir. Differences:\n  "
                                  + "\n  ".join(diffs))
        elif self.layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(dump_config(self.cfg))
        dist.barrier()

    # ------------------------------------------------------------------ signals

    def _any_rank_wants_stop(self) -> bool:
        flag = torch.tensor([1.0 if _stop_signal else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        client = {"tokens_seen": self.tokens_seen, "nonfinite_skipped": self.skipped_steps}
        seconds = self.checkpointer.save(self.engine, self.step, client,
                                         {"data": self.train_loader.state_dict()})
        if self.layout.is_main:
            log.info("saved checkpoint step %d to %s in %.2fs", self.step, self.checkpointer.dir, seconds)
        self.metrics.scalars(self.step, {"ckpt/save_s": seconds})

    def _resume(self) -> None:
        start = time.perf_counter()
        point = self.checkpointer.load(self.engine)
        if point is None:
            return
        self.step = point.step
        self.tokens_seen = point.client_state["tokens_seen"]
        self.skipped_steps = point.client_state["nonfinite_skipped"]
        self.train_loader.load_state_dict(point.trainer_state["data"])
        if self.layout.is_main:
            log.info("resumed from %s (step %d, %d tokens) in %.2fs", point.tag, self.step,
                     self.tokens_seen, time.perf_counter() - start)

    # ------------------------------------------------------------------ the step

    def _sync(self, timed: bool) -> None:
        """Wait for the GPU, only on steps whose phases are timed: a sync stalls the launch queue."""
        if timed and self.layout.device.type == "cuda":
            torch.cuda.synchronize(self.layout.device)

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))

    def _loss(self, out, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = out.logits.float()
        lm = self._lm_loss(logits, labels)
        parts = {"lm_loss": lm, "moe_aux_loss": out.moe_aux_loss, "ponder_cost": out.ponder_cost}
        loss = lm + out.moe_aux_loss + out.ponder_cost
        if self.cfg.train.z_loss_coef:
            z = self.cfg.train.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
            parts["z_loss"] = z
            loss = loss + z
        return loss, parts

    def train_step(self, batches) -> dict[str, float]:
        step_start = time.perf_counter()
        t = self.cfg.train
        n_loops = sample_loops(t.loops, t.seed, self.step)
        k = backprop_depth(t.loops, n_loops)
        lr = lr_at(self.step, t)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

        timed = (self.step + 1) % t.log_every == 0
        times = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
        sums: dict[str, torch.Tensor] = {}
        stats = None
        for _ in range(self.grad_accum):
            t0 = time.perf_counter()
            inputs, labels = next(batches)
            inputs, labels = inputs.to(self.layout.device), labels.to(self.layout.device)
            t1 = time.perf_counter()
            out = self.engine(inputs, n_loops=n_loops, backprop_depth=k)
            loss, parts = self._loss(out, labels)
            self._sync(timed)
            t2 = time.perf_counter()
            self.engine.backward(loss)
            self._sync(timed)
            t3 = time.perf_counter()
            self.engine.step()  # DeepSpeed reduces and steps only at the accumulation boundary
            self._sync(timed)
            t4 = time.perf_counter()
            times["data"] += t1 - t0
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            times["optimizer"] += t4 - t3
            for name, value in dict(parts, loss=loss).items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            stats = out.stats

        applied = self.engine.was_step_applied()
        # A skipped (non-finite) step leaves the balance biases alone; its expert counts are dropped.
        load = update_balance_bias(self.model, self.cfg.model.moe.balance_update_rate if applied else 0.0,
                                   all_reduce=lambda counts: dist.all_reduce(counts))
        # Mean of every part over micro-batches and data-parallel ranks, in one collective.
        names = sorted(sums)
        packed = torch.stack([sums[n] for n in names]) / (self.grad_accum * self.layout.dp)
        dist.all_reduce(packed)
        metrics = {f"train/{n}": v for n, v in zip(names, packed.tolist())}

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
            "loops/T": n_loops, "loops/backprop_depth": k,
        })
        if timed or self.layout.device.type != "cuda":
            metrics.update({f"time/{phase}_s": seconds for phase, seconds in times.items()})
        metrics.update(self._model_stats(stats, load))
        self._throughput(metrics, n_loops, k, time.perf_counter() - step_start)
        return metrics

    @staticmethod
    def _model_stats(stats: dict[str, torch.Tensor], load: dict[str, float]) -> dict[str, float]:
        """TensorBoard tags for the model's own signals: one per loop iteration for per-iteration
        ones (``model/h_norm/iter_03``); the expert-load dict already holds its tags."""
        out = dict(load)
        for name, value in stats.items():
            value = value.detach().float()
            if value.ndim == 0:
                out[f"model/{name}"] = value.item()
            else:
                for i, v in enumerate(value.tolist()):
                    out[f"model/{name}/iter_{i:02d}"] = v
        return out

    def _throughput(self, metrics: dict[str, float], n_loops: int, k: int, seconds: float) -> None:
        if (n_loops, k) not in self._flops_per_token:
            self._flops_per_token[n_loops, k] = plan_model(
                self.cfg.model, loops=n_loops, backprop_depth=k, seq_len=self.cfg.data.seq_len)["flops_per_token"]
        tokens_per_s = self.tokens_per_step / seconds
        per_device = tokens_per_s / self.layout.world_size
        tflops = per_device * self._flops_per_token[n_loops, k] / 1e12
        metrics.update({
            "time/step_s": seconds, "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": per_device, "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak_tflops, "mem/gib": memory_gib(self.layout.device),
        })

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        total, count = torch.zeros(()), 0
        n_loops = self.cfg.train.loops.mean
        for i, (inputs, labels) in enumerate(self.val_loader):
            if i >= self.cfg.train.eval_batches:
                break
            out = self.engine(inputs.to(self.layout.device), n_loops=n_loops)
            total += self._lm_loss(out.logits.float(), labels.to(self.layout.device)).cpu()
            count += 1
        self.engine.train()
        packed = torch.stack([total, torch.tensor(float(count))])
        dist.all_reduce(packed)
        return (packed[0] / packed[1].clamp(min=1)).item()

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        t = self.cfg.train
        self._resume()
        if self.layout.is_main:
            log.info("run folder %s | %d ranks (dp %d) | global batch %d x %d tokens | grad accum %d | "
                     "steps %d..%d", self.run_dir, self.layout.world_size, self.layout.dp,
                     t.global_batch_size, self.cfg.data.seq_len, self.grad_accum, self.step, t.max_steps)
        history = open(self.run_dir / "metrics.jsonl", "a") if self.layout.is_main else None
        batches = iter(self.train_loader)
        last_step = t.max_steps if not t.exit_after_steps else min(t.max_steps, self.step + t.exit_after_steps)
        try:
            while self.step < last_step:
                metrics = self.train_step(batches)
                if self.val_loader is not None and self.step % t.eval_every == 0:
                    metrics["val/loss"] = self.evaluate()
                if self.layout.is_main:
                    self.metrics.scalars(self.step, metrics)
                    history.write(json.dumps({"step": self.step, **metrics}) + "\n")
                    history.flush()
                    if self.step % t.log_every == 0 or self.step == t.max_steps:
                        self.metrics.console(self.step, t.max_steps, metrics)
                if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise TrainingError(
                        f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                        f"(limit train.max_nonfinite_steps={t.max_nonfinite_steps}); stopping without "
                        f"saving. The last good checkpoint is in {self.checkpointer.dir}")
                stop = self._any_rank_wants_stop()
                if stop or self.step % t.checkpoint.every == 0 or self.step == last_step:
                    self._save()
                if stop:
                    if self.layout.is_main:
                        log.warning("stop requested (%s): saved step %d; exiting with status %d so the "
                                    "job can be requeued", _stop_signal or "signal on another rank",
                                    self.step, EXIT_PREEMPTED)
                    return EXIT_PREEMPTED
        finally:
            if history is not None:
                history.close()
            self.metrics.close()
        if self.layout.is_main:
            plots = write_plots(self.run_dir)
            log.info("plots: %s", ", ".join(str(p) for p in plots))
        if self.layout.is_main and self.step < t.max_steps:
            log.info("stopped after train.exit_after_steps=%d at step %d; run again to continue",
                     t.exit_after_steps, self.step)
        elif self.layout.is_main:
            log.info("done: %d steps, %d tokens. TensorBoard: tensorboard --logdir %s ; checkpoints: %s ; "
                     "run the same command again to resume (raise train.max_steps to train further)",
                     self.step, self.tokens_seen, self.run_dir / "tb", self.checkpointer.dir)
        return EXIT_OK


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mythos train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (defaults when omitted)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # DeepSpeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    args = parser.parse_args(argv)
    _setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    # From the start: a signal during start-up must not kill the process, only stop it at step 1.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _request_stop)
    try:
        cfg = load_config(args.config, args.overrides)
        layout = init_distributed(cfg.parallel.tp, cfg.parallel.ep)
        trainer = Trainer(cfg, layout)
        return trainer.fit()
    except (ConfigError, LaunchError, CheckpointError, DataError) as exc:
        print(f"mythos train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingError as exc:
        print(f"mythos train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
