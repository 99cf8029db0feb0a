"""The scripts in examples/ run and check their own results (each ends in assertions).

The GPU example runs in its ``--dry-run`` form (the same code on the CPU).
Each script gets one PyTorch thread: the models are tiny, and on a shared
CI machine spinning threads cost more than they give.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="needs JAX")


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@needs_torch
def test_eigenvalues():
    out = run_example("eigenvalues.py")
    rows = re.findall(r"Hessian, top 5 \((.*?)\):\s+\[(.*?)\]", out)
    assert [name for name, _ in rows] == ["curvlinops eigsh", "scipy eigsh", "dense eigvalsh"]
    # all three print the same numbers (6 decimals): equal up to one unit of the last digit,
    # as values that differ in the 12th digit may round to neighbours
    values = np.array([[float(x) for x in numbers.split()] for _, numbers in rows])
    assert values.shape == (3, 5)
    assert np.abs(values - values[2]).max() <= 1.5e-6
    lam = float(re.search(r"lambda_max = ([0-9.]+)", out).group(1))
    step = float(re.search(r"2 / lambda_max = ([0-9.]+)", out).group(1))
    assert abs(step - 2 / lam) < 1e-5


@needs_jax
def test_spectral_density(tmp_path):
    out = run_example("spectral_density.py", "--out", str(tmp_path))
    assert "the density integrates to 1.000000" in out
    for png in ("hessian_density.png", "ggn_log_density.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


@needs_torch
def test_trace():
    out = run_example("trace.py")
    assert "exact trace" in out
    assert len(re.findall(r"m=120: [0-9.]+ \+- [0-9.]+", out)) == 3


@needs_torch
def test_influence():
    out = run_example("influence.py")
    r = float(re.search(r"r = ([0-9.]+)", out).group(1))
    assert r > 0.99


@needs_torch
def test_gpu_dry_run():
    out = run_example("gpu.py", "--dry-run")
    assert "PyTorch on cpu" in out and "CG: 1/1 columns converged" in out
    if HAS_JAX:
        assert "JAX on cpu" in out


@needs_torch
def test_gpu_without_a_gpu_says_what_to_do():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would run on it")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "gpu.py")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "--dry-run" in result.stderr and "Traceback" not in result.stderr
