#!/usr/bin/env bash
# Before submitting slurm/pretrain_770m.sh, run this on one GPU node: 10 steps of the 770M config
# on every GPU of the node (DeepSpeed launcher), a checkpoint at step 5 and a stop, a resume to
# step 10, then tokens/s, MFU and peak GPU memory.  It also hashes the dataset's shards once
# (data.verify_shards=hash_once), so later starts only check sizes.
#
#   bash launch/gpu_smoke.sh                                  # the embedded corpus, no preparation
#   DATA=/data/mine bash launch/gpu_smoke.sh                  # a prepared dataset (seq_len 4096)
#   bash launch/gpu_smoke.sh train.micro_batch_size=2         # any config override
#
# Environment: DATA, NPROC (processes; default: the visible GPUs), CONFIG (default
# configs/mythos_770m.yaml), RUN_ROOT (default runs/gpu_smoke), MASTER_PORT.  The same steps run
# on CPUs with a small config (CONFIG=configs/tiny_cpu.yaml NPROC=2), which is how the test suite
# checks this script.  Exit status: that of the failing run, else 0.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/mythos_770m.yaml}
DATA=${DATA:-embedded}
RUN_ROOT=${RUN_ROOT:-runs/gpu_smoke}
NPROC=${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}
if [ "$NPROC" -lt 1 ]; then
  echo "gpu_smoke: no GPU visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}); run it on a GPU node" >&2
  exit 2
fi
NAME=smoke_$(date +%Y%m%d_%H%M%S)
MICRO=$(python3 -c "from mythos_scale.config import load_config as l; import sys; print(l(sys.argv[1], sys.argv[2:]).train.micro_batch_size)" "$CONFIG" "$@")
ARGS=(--config "$CONFIG" "data.sources=[{path: '$DATA'}]" data.verify_shards=hash_once
      train.out_dir="$RUN_ROOT" train.name="$NAME" train.max_steps=10 train.exit_after_steps=5
      train.checkpoint.every=5 train.log_every=1 train.eval_every=0
      train.global_batch_size=$((2 * MICRO * NPROC)) "$@")

run() {
  deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module mythos_scale.train "${ARGS[@]}"
}
echo "gpu_smoke: $NPROC process(es), $CONFIG, data $DATA, run folder $RUN_ROOT/$NAME"
echo "gpu_smoke: steps 1-5, then save and stop"
run
echo "gpu_smoke: resume, steps 6-10"
run 2>&1 | tee "$RUN_ROOT/$NAME/resume.log"
python3 - "$RUN_ROOT/$NAME" <<'EOF'
"""Check the two runs made steps 1..10 once each, resuming at 6; print the figures of the steps
that were not the first of their process (those include start-up and warm-up)."""
import json, re, statistics, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
steps = [r["step"] for r in rows]
if steps != list(range(1, 11)):
    sys.exit(f"gpu_smoke: FAILED: steps logged {steps}, expected 1..10 once each")
if not re.search(r"resumed from \S+ \(step 5,", (run / "resume.log").read_text()):
    sys.exit("gpu_smoke: FAILED: the second run did not resume from the step 5 checkpoint")
steady = [r for r in rows if r["step"] not in (1, 6)]
tokens = statistics.mean(r["perf/tokens_per_s"] for r in steady)
mfu = statistics.mean(r["perf/mfu"] for r in steady)
peak = max(r.get("mem/allocated_gib", r.get("mem/rss_gib", 0.0)) for r in rows)  # CUDA: peak allocated; CPU: RSS
print(f"gpu_smoke: OK: saved at step 5, resumed, reached step 10 | {tokens:,.0f} tokens/s "
      f"(mean of steps 2-5, 7-10) | MFU {100 * mfu:.2f}% | peak memory {peak:.1f} GiB per process")
EOF
