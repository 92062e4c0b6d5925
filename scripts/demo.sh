#!/usr/bin/env bash
# Set up, then run the main job: 1,000 simulated clients on Fashion-MNIST on an embedded local Ray.
# Extra arguments go to `fedray demo` (see `fedray demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
exec .venv/bin/fedray demo --dataset fashion-mnist --clients 1000 --clients-per-round 100 --rounds 5 \
  --codec int8 --json runs/demo.json "$@"
