#!/usr/bin/env bash
# The first thing to run on a GPU node (one GPU, about 8 minutes): what only a GPU can show,
# written to one JSON file.
#
#   1. parity on the device: the CUDA kernels (csrc) vs their references, flash-attn's varlen
#      kernel vs SDPA with the document mask, liger-kernel's fused loss vs the chunked loss
#      (pytest; a missing flash-attn / liger-kernel is a failure, not a skip);
#   2. 30 steps of mythos_770m in bf16 at seq 4096: checkpoint at step 10 (the asynchronous
#      save, its pinned-memory host copy), SIGKILL once it is committed, resume to step 30;
#   3. tokens/s, MFU and peak memory of the resumed steps beside the planner's estimate.
#
#   bash launch/gpu_check.sh                       # JSON: runs/gpu_check/<time>/gpu_check.json
#   OUT_DIR=/tmp/check bash launch/gpu_check.sh train.micro_batch_size=2   # config overrides
#   DATA=/data/mine bash launch/gpu_check.sh       # a prepared dataset (seq_len 4096; default: embedded)
#
# Needs: pip install -e '.[gpu]' and the CUDA kernels (MYTHOS_BUILD_EXT=cuda pip install
# --no-build-isolation -e .; else the parity test builds them, adding ~1-2 minutes).  Refuses to
# start (exit 2, nothing written) without a visible GPU.  Exit status: 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no GPU visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<unset>}); run it on a GPU node" >&2
  exit 2
fi
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
CONFIG=${CONFIG:-configs/mythos_770m.yaml}
DATA=${DATA:-embedded}
OUT_DIR=${OUT_DIR:-runs/gpu_check/$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT_DIR"
echo "gpu_check: results in $OUT_DIR"

echo "gpu_check: 1/3 parity on the device"
timeout 240 python3 -m pytest -q -p no:cacheprovider --junitxml "$OUT_DIR/parity.xml" \
  tests/test_kernels.py::test_cuda_kernels_match_reference \
  tests/test_doc_attention.py::test_flash_matches_sdpa_on_cuda \
  tests/test_lm_loss.py::test_liger_matches_chunked_on_cuda 2>&1 | tee "$OUT_DIR/parity.log"

echo "gpu_check: 2/3 30 steps of $CONFIG in bf16 at seq 4096: save at 10, SIGKILL, resume"
MICRO=$(python3 -c "from mythos_scale.config import load_config as l; import sys; print(l(sys.argv[1], sys.argv[2:]).train.micro_batch_size)" "$CONFIG" "$@")
RUN="$OUT_DIR/run"
ARGS=(--config "$CONFIG" "data.sources=[{path: '$DATA'}]" train.precision=bf16 data.seq_len=4096 train.out_dir="$OUT_DIR" train.name=run
      train.max_steps=30 train.checkpoint.every=10 train.checkpoint.async_save=true train.log_every=1
      train.eval_every=0 train.global_batch_size="$MICRO" "$@")
timeout 300 python3 -m mythos_scale.train "${ARGS[@]}" > "$OUT_DIR/first.log" 2>&1 &
FIRST=$!
KILLED=no
for _ in $(seq 1 600); do
  if grep -qs step_00000010 "$RUN/checkpoints/latest"; then kill -KILL "$FIRST" && KILLED=yes; break; fi
  kill -0 "$FIRST" 2>/dev/null || break
  sleep 0.5
done
wait "$FIRST" 2>/dev/null
echo "gpu_check: first run killed after the step-10 commit: $KILLED"
timeout 300 python3 -m mythos_scale.train "${ARGS[@]}" > "$OUT_DIR/resume.log" 2>&1
RESUME_RC=$?

echo "gpu_check: 3/3 the planner's estimate and the report"
python3 -m mythos_scale.plan --config "$CONFIG" --gpus-per-node 1 --dp 1 --micro-batch "$MICRO" \
  --global-batch "$MICRO" --seq-len 4096 --json train.precision=bf16 "$@" > "$OUT_DIR/plan.json" 2> "$OUT_DIR/plan.err"
python3 - "$OUT_DIR" "$KILLED" "$RESUME_RC" <<'EOF'
"""Collect the parity results, the resumed run's figures and the planner's estimate into one JSON."""
import json, statistics, sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, killed, resume_rc = Path(sys.argv[1]), sys.argv[2] == "yes", int(sys.argv[3])
parity = {}
if (out / "parity.xml").is_file():
    for case in ET.parse(out / "parity.xml").getroot().iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = "failed" if tag != "skipped" else "skipped"
        parity[case.get("name")] = status
run = out / "run"
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
    if (run / "metrics.jsonl").is_file() else []
steps = [r["step"] for r in rows]
resume_log = (out / "resume.log").read_text() if (out / "resume.log").is_file() else ""
resumed = "resumed from" in resume_log and "(step 10," in resume_log
after = [r for r in rows if r["step"] > 12 and "perf/tokens_per_s" in r]  # past the restart's warm-up
plan_peak = None
try:
    plan_peak = json.loads((out / "plan.json").read_text())["plan"]["memory"]["peak"] / 2 ** 30
except (OSError, ValueError, KeyError):
    pass
train = {"killed_after_commit": killed, "resumed_from_step_10": resumed, "resume_exit": resume_rc,
         "reached_step_30": bool(steps) and max(steps) == 30,
         "tokens_per_s": statistics.mean(r["perf/tokens_per_s"] for r in after) if after else None,
         "mfu": statistics.mean(r["perf/mfu"] for r in after) if after else None,
         "peak_allocated_gib": max((r["mem/allocated_gib"] for r in rows if "mem/allocated_gib" in r), default=None),
         "peak_reserved_gib": max((r["mem/reserved_gib"] for r in rows if "mem/reserved_gib" in r), default=None),
         "planner_peak_gib": plan_peak}
ok = (parity and all(s == "passed" for s in parity.values()) and killed and resumed and resume_rc == 0
      and train["reached_step_30"])
report = {"ok": bool(ok), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "parity": parity, "train": train}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
sys.exit(0 if ok else 1)
EOF
