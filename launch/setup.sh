#!/usr/bin/env bash
# Install mythos_scale, its `mythos` command and the test tools on a fresh machine.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"
