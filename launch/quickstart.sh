#!/usr/bin/env bash
# The main job: a real small pretraining run on this machine's CPUs.
# Installs the package, prepares the embedded corpus (the Python standard library's sources),
# then trains configs/tiny_cpu.yaml on 2 ranks with the DeepSpeed launcher (ZeRO-1, gloo).
# Running it again resumes from the latest checkpoint.  Extra arguments are config overrides,
# e.g.  bash launch/quickstart.sh train.max_steps=400
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
NPROC=${NPROC:-2}
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  --module mythos_scale.train --config configs/tiny_cpu.yaml "$@"
