#!/usr/bin/env bash
# README command 1: set up everything (first time only) and run the local job end to end.
# Extra arguments go to `rare-ray run`, e.g. --limit 100 or --output DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/rare-ray build-test-model --if-missing
exec .venv/bin/rare-ray run --config configs/local.yaml "$@"
