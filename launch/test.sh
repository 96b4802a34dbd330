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
# The dataset-reading files (test_data.py, test_synthetic.py) each in a process of their own:
# streaming keeps every shared-memory handle it opens until exit, and each new StreamingDataset
# opens one per live registration on the node (this process's earlier datasets, and any a killed
# job left behind), so file descriptors grow with the square of the datasets one process opens;
# the suite in one process reached the 20,000 limit.  Exit status: the first failing run's.
status=0
python3 -m pytest tests -q -rs --durations=25 --ignore=tests/test_data.py --ignore=tests/test_synthetic.py "$@" \
  || status=$?
for file in tests/test_data.py tests/test_synthetic.py; do
  python3 -m pytest "$file" -q -rs --durations=5 "$@" || { [ "$status" -ne 0 ] || status=$?; }
done
exit "$status"
