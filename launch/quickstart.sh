#!/usr/bin/env bash
# The main job: a real small pretraining run on this machine's CPUs.
# Installs the package, prepares the embedded corpus (the Python standard library's sources),
# then trains configs/tiny_cpu.yaml on 2 ranks (DeepSpeed ZeRO-1, gloo), started by
# `mythos train --nproc`: SIGTERM or Ctrl-C to this script reaches every rank, which saves a
# checkpoint and exits with status 75.  Running it again resumes from the latest checkpoint.
# Extra arguments are config overrides, e.g.  bash launch/quickstart.sh train.max_steps=400
# NPROC=<ranks> changes the rank count; MASTER_PORT=<port> fixes the port (else a free one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec python3 -m mythos_scale.train --nproc "${NPROC:-2}" --config configs/tiny_cpu.yaml "$@"
