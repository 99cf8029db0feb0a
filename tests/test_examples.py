"""The scripts in examples/ run and check their own results (each ends in assertions).

The GPU example runs in its ``--dry-run`` form (the same code on the CPU).
Each script gets one PyTorch thread: the models are tiny, and on a shared
CI machine spinning threads cost more than they give. The scripts of the
selected tests start together, so that a machine with two cores or more
runs them side by side (most of each one's time is starting Python and
importing PyTorch and JAX); each test then waits for its own.
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
HAS_HUGGINGFACE = all(
    importlib.util.find_spec(name) is not None for name in ("transformers", "tokenizers", "equinox")
)


# test: (script, its arguments ({out}: a folder for its files), whether it can run here)
SCRIPTS = {
    "test_eigenvalues": ("eigenvalues.py", [], HAS_TORCH),
    "test_spectral_density": ("spectral_density.py", ["--out", "{out}"], HAS_JAX),
    "test_trace": ("trace.py", [], HAS_TORCH),
    "test_influence": ("influence.py", [], HAS_TORCH),
    "test_kfac": ("kfac.py", [], HAS_TORCH),
    "test_gpu_dry_run": ("gpu.py", ["--dry-run"], HAS_TORCH),
    "test_huggingface": ("huggingface.py", [], HAS_TORCH and HAS_JAX and HAS_HUGGINGFACE),
}


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """The scripts of this module's selected tests, all started now: {test: (process, out)}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    selected = {item.originalname for item in request.session.items if item.path == request.path}
    processes = {}
    for test, (name, args, runnable) in SCRIPTS.items():
        if test in selected and runnable:
            out = tmp_path_factory.mktemp(test)
            command = [sys.executable, str(EXAMPLES / name), *(a.format(out=out) for a in args)]
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            processes[test] = (process, out)
    yield processes
    for process, _ in processes.values():  # a test that failed early left its script running
        if process.poll() is None:
            process.kill()
        process.communicate()


def run_example(started: dict, test: str) -> tuple[str, Path]:
    """The output of ``test``'s script, once it has exited with status 0, and its folder."""
    process, out = started[test]
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{SCRIPTS[test][0]} timed out:\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{SCRIPTS[test][0]} failed:\n{stdout}\n{stderr}"
    return stdout, out


@needs_torch
def test_eigenvalues(started):
    out, _ = run_example(started, "test_eigenvalues")
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
def test_spectral_density(started):
    out, folder = run_example(started, "test_spectral_density")
    assert "the density integrates to 1.000000" in out
    for png in ("hessian_density.png", "ggn_log_density.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"


@needs_torch
def test_trace(started):
    out, _ = run_example(started, "test_trace")
    assert "exact trace" in out
    assert len(re.findall(r"m=120: [0-9.]+ \+- [0-9.]+", out)) == 3


@needs_torch
def test_influence(started):
    out, _ = run_example(started, "test_influence")
    r = float(re.search(r"r = ([0-9.]+)", out).group(1))
    assert r > 0.99


@needs_torch
def test_kfac(started):
    out, _ = run_example(started, "test_kfac")
    rows = {}
    for name in ("GGN", "GGN blocks", "KFAC", "EKFAC"):
        line = re.search(rf"^{name} +([-0-9. ]+)$", out, re.MULTILINE).group(1)
        rows[name] = [float(x) for x in line.split()]
    # columns: error vs GGN, error vs its blocks, top 3 eigenvalues, cosine to the GGN step
    assert all(len(row) == 6 for row in rows.values())
    assert rows["GGN"][0] == 0.0 and rows["GGN blocks"][1] == 0.0 and rows["GGN"][5] == 1.0
    assert rows["EKFAC"][1] <= rows["KFAC"][1] < 0.5  # EKFAC is at least as close
    for name in ("KFAC", "EKFAC"):
        eigenvalues = rows[name][2:5]
        assert eigenvalues == sorted(eigenvalues, reverse=True) and eigenvalues[0] > 0
        assert 0.5 < rows[name][5] <= 1.0
    closed, dense = re.search(r"trace ([0-9.]+) \(dense ([0-9.]+)\)", out).groups()
    assert abs(float(closed) - float(dense)) <= 1.5e-6
    if HAS_JAX:
        difference = float(re.search(r"max \|factor_jax - factor_torch\| = (\S+)", out).group(1))
        assert difference < 1e-10


@needs_torch
def test_gpu_dry_run(started):
    out, _ = run_example(started, "test_gpu_dry_run")
    assert "PyTorch on cpu" in out and "CG: 1/1 columns converged" in out
    if HAS_JAX:
        assert "JAX on cpu" in out


@pytest.mark.skipif(
    not (HAS_TORCH and HAS_JAX and HAS_HUGGINGFACE),
    reason="needs PyTorch, JAX, transformers, tokenizers and equinox (the test extra)",
)
def test_huggingface(started):
    out, _ = run_example(started, "test_huggingface")
    assert "batches are BatchEncodings" in out
    for name in ("GPT-2 LM (PyTorch)", "GPT-2 classifier", "equinox LM (JAX)"):
        # numbers in any format, e.g. an exact dense check of "0.0e+00"
        row = re.search(rf"^{re.escape(name)} +(\d+) +([-+0-9. e]+)$", out, re.MULTILINE)
        assert row, f"no row for {name}:\n{out}"
        values = [float(x) for x in row.group(2).split()]
        top_hessian, top_ggn, dense_check = values[:3], values[3:6], values[6]
        assert top_hessian == sorted(top_hessian, reverse=True)
        assert min(top_ggn) >= 0 and dense_check < 1e-8


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
