"""The recurrence inside a real DeepSpeed engine (each case in its own process: it starts
torch.distributed): the balance biases on a skipped step, and the injection parameters under
bf16 + ZeRO-1/2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, TINY_TRAIN, subprocess_env

pytestmark = pytest.mark.slow  # multi-process, DeepSpeed, Slurm or long runs: see pyproject.toml

SKIPPED_STEP = r"""
import sys, torch
from mythos_scale.config import load_config
from mythos_scale.parallel import init_distributed
from mythos_scale.train.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]), init_distributed())
batches = iter(trainer.train_loader)
moe = trainer.model.core[0].ffn
trainer.train_step(batches)
bias = moe.balance_bias.clone()
assert bias.abs().sum() > 0, "an applied step moves the balance bias"
with torch.no_grad():
    trainer.model.norm.weight.fill_(float("nan"))  # a non-finite loss and gradient: the step is skipped
metrics = trainer.train_step(batches)
assert metrics["train/skipped_steps"] == 1, metrics
assert torch.equal(moe.balance_bias, bias), (moe.balance_bias - bias).abs().max()
assert all(int(m.ffn.expert_counts.sum()) == 0 for m in trainer.model.core), "counts of a skipped step are dropped"
print("OK")
"""

BF16_ENGINE = r"""
import sys, torch, deepspeed
from deepspeed.utils import safe_get_full_fp32_param
from mythos_scale.config import load_config
from mythos_scale.model import build_model
from mythos_scale.parallel import init_distributed
from mythos_scale.train.optim import build_optimizer

init_distributed()
cfg = load_config(sys.argv[1], sys.argv[3:])
model = build_model(cfg.model, seed=0)
ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
      "gradient_clipping": 1.0, "zero_optimization": {"stage": int(sys.argv[2])}, "bf16": {"enabled": True},
      "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train), config=ds)
inj = engine.module.injection
ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
a_log0 = inj.a_log.detach().float().clone()
for _ in range(4):
    out = engine(ids[:, :-1], n_loops=3, backprop_depth=2)
    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
    engine.backward(loss)
    engine.step()
    assert engine.was_step_applied() and torch.isfinite(loss)
assert out.logits.dtype == torch.bfloat16 and inj.a_bar().dtype == torch.float32
assert (inj.a_bar().bfloat16() < 1).all()
for name in ("a_log", "dt_bias", "b"):
    lp = getattr(inj, name)
    master = safe_get_full_fp32_param(lp)
    # DeepSpeed stores every parameter in the training dtype and keeps an fp32 master copy
    assert lp.dtype == torch.bfloat16 and master.dtype == torch.float32, name
    assert torch.equal(master.bfloat16(), lp.data), name
master = safe_get_full_fp32_param(inj.a_log)
assert (master - a_log0).abs().max() > 0, "A_log learns"
assert not torch.equal(master, master.bfloat16().float()), "its updates accumulate in fp32"
print("OK")
"""


def _run(script: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script, str(REPO / "configs" / "tiny_cpu.yaml"), *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout[-3000:] + proc.stderr[-3000:]


def test_balance_bias_holds_still_on_a_skipped_step(tmp_path, tiny_dataset):
    _run(SKIPPED_STEP, *TINY_TRAIN, f"data.sources=[{{path: '{tiny_dataset}'}}]", f"train.out_dir={tmp_path}",
         "train.name=skip", "train.micro_batch_size=4", "train.global_batch_size=4")


@pytest.mark.parametrize("stage", [1, 2])
def test_injection_under_deepspeed_bf16_zero(stage):
    """DeepSpeed casts every parameter to bf16 itself and flattens one dtype per group, so A_log,
    dt_bias and B are stored in bf16 there; their fp32 master copies take the updates and the
    model computes A_bar and B_bar e in fp32 from the stored values."""
    _run(BF16_ENGINE, str(stage), *TINY_TRAIN, "data.seq_len=16")
