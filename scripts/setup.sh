#!/usr/bin/env bash
# Sets up .venv with curvlinops, PyTorch (CPU) and JAX, the test tools, and the
# two downstream packages the tests compare with:
# - curvlinops-for-pytorch 3.0.1 in a folder of its own (.venv/curvlinops-for-pytorch):
#   its top-level package is also called "curvlinops", so it must not go into
#   site-packages (tests/test_kfac.py, tests/test_laplace_torch.py and the benchmarks
#   put that folder first on sys.path when they want it);
# - laplace-torch 0.3 and backpack-for-pytorch 1.7.1 without their declared
#   dependencies (they require torchvision, which is not needed for what the tests
#   use and does not import next to the CPU torch, and curvlinops-for-pytorch,
#   which is the folder above); what they import at run time is the "downstream"
#   extra.
# - the documentation's tools (the "docs" extra; Debian's libjs-katex and chromium, see
#   the end).
# torch is pinned in the same pip command as everything that depends on it:
# a bare "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet)
"${PIP[@]}" --upgrade pip
# "data": scikit-learn for python -m curvlinops influence (its digits ship with it)
"${PIP[@]}" "torch==2.13.0" -e ".[torch,jax,test,data,bench,downstream,docs]"
"${PIP[@]}" --no-deps "laplace-torch==0.3" "backpack-for-pytorch==1.7.1"
# kronfluence 1.0.1, the contender of the influence tests and benchmark: --no-deps, as it
# declares torchvision; what it imports is in the "bench" extra.
"${PIP[@]}" --no-deps "kronfluence==1.0.1"
# The MLX backend: its own package (plugins/curvlinops-mlx), found by curvlinops through its
# entry point. Linux wheels of MLX need the "cpu" extra for a compute library.
MLX="mlx[cpu]"
if [ "$(uname -s)" = "Darwin" ]; then MLX="mlx"; fi
"${PIP[@]}" "$MLX" -e plugins/curvlinops-mlx
CFP=.venv/curvlinops-for-pytorch
if [ ! -d "$CFP/curvlinops_for_pytorch-3.0.1.dist-info" ]; then
  "${PIP[@]}" --no-deps --upgrade --target "$CFP" "curvlinops-for-pytorch==3.0.1"
fi
# The documentation (docs/conf.py, docs/test_site.py): KaTeX's style sheet and fonts,
# served from the built site, and a headless Chromium that reads it. Debian packages,
# installed when missing where this runs as root with apt-get (as CI does).
DOCS_DEBS=()
[ -f /usr/share/javascript/katex/katex.min.css ] || DOCS_DEBS+=(libjs-katex)
command -v chromium >/dev/null || DOCS_DEBS+=(chromium)
if [ ${#DOCS_DEBS[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${DOCS_DEBS[@]}" >/dev/null
  else
    echo "setup.sh: the docs need ${DOCS_DEBS[*]} (Debian: sudo apt-get install ${DOCS_DEBS[*]})" >&2
  fi
fi
