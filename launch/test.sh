#!/usr/bin/env bash
# The test suite: installs what it needs, starts a one-node Slurm cluster for the slurm/
# script tests (as root; elsewhere those tests are skipped and say so), checks the code with
# ruff (rules in pyproject.toml), runs every test on the CPU.  The fast part alone (no
# multi-process, DeepSpeed or Slurm runs): python3 -m pytest -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [ "$(id -u)" = 0 ]; then
  bash launch/slurm_local_cluster.sh
fi
python3 -m ruff check .
exec python3 -m pytest tests -q -rs --durations=25 "$@"
