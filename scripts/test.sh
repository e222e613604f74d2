#!/usr/bin/env bash
# README command 2: set up everything (first time only), then lint, type-check and test.
# Extra arguments go to pytest, e.g. `-m slow` for the long end-to-end runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/rare-ray build-test-model --if-missing
echo "[test] ruff"
.venv/bin/ruff check rare_ray tests
.venv/bin/ruff format --check rare_ray tests
echo "[test] mypy"
.venv/bin/mypy
echo "[test] pytest"
exec .venv/bin/python -m pytest "$@"
