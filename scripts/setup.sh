#!/usr/bin/env bash
# Sets up .venv with curvlinops, PyTorch (CPU) and JAX, and the test tools.
# torch is pinned in the same pip command as everything that depends on it:
# a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[torch,jax,test]"
