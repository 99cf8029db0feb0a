"""The BLAS guard: scipy-path products keep the BLAS pools at one thread, then give them back."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_close

from curvlinops import _blas_guard

HAS_TORCH = importlib.util.find_spec("torch") is not None
threadpoolctl = pytest.importorskip("threadpoolctl", reason="the guard needs threadpoolctl")


@pytest.fixture
def operator():
    torch = pytest.importorskip("torch")
    import curvlinops as cl

    model = torch.nn.Linear(3, 2).double()
    data = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]
    H = cl.HessianLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()), data)
    _blas_guard.release()
    yield H
    _blas_guard.release()


GUARD_SCRIPT = """
import time, numpy as np, threadpoolctl, torch
import curvlinops as cl
from curvlinops import _blas_guard

def threads():
    return max(i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")

model = torch.nn.Linear(3, 2).double()
data = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]
H = cl.HessianLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()), data)
before = threads()
if before < 2:
    print("SKIP single-threaded BLAS")
    raise SystemExit(0)
H @ np.ones(H.shape[1])
assert _blas_guard.is_holding() and threads() == 1, threads()
deadline = time.monotonic() + 10 * _blas_guard.IDLE_SECONDS + 5
while _blas_guard.is_holding() and time.monotonic() < deadline:
    time.sleep(0.05)
assert not _blas_guard.is_holding() and threads() == before, threads()
H.matvec(np.ones(H.shape[1]))
assert threads() == 1
_blas_guard.release()
assert not _blas_guard.is_holding() and threads() == before, threads()
print("OK")
"""


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_numpy_products_limit_blas_until_idle_then_give_it_back():
    """In a fresh process: the application has not set BLAS threads itself."""
    env = {**os.environ, "CURVLINOPS_LIMIT_BLAS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", GUARD_SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("OK")


def test_native_inputs_and_switch_off_leave_blas_alone(operator, monkeypatch):
    import torch

    operator @ torch.ones(operator.shape[1], dtype=torch.float64)
    assert not _blas_guard.is_holding()
    monkeypatch.setenv("CURVLINOPS_LIMIT_BLAS", "0")
    assert not _blas_guard.enabled()
    operator @ np.ones(operator.shape[1])
    assert not _blas_guard.is_holding()


def test_products_are_unchanged_by_the_guard(operator, monkeypatch):
    x = np.linspace(-1.0, 1.0, operator.shape[1])
    monkeypatch.setenv("CURVLINOPS_LIMIT_BLAS", "0")
    off = operator @ x
    monkeypatch.setenv("CURVLINOPS_LIMIT_BLAS", "1")
    on = operator @ x
    # the same maths; a BLAS may split a reduction differently with fewer threads, so the
    # two may differ in the last bits: allow rounding (1e-12), far below any real change
    assert_close(on, off, rtol=1e-12, name="guard on vs off")


def test_on_cpu_reads_the_backend_device():
    class Device:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Backend:
        def __init__(self, device):
            self.device = device

    assert _blas_guard.on_cpu(Backend(Device(type="cpu")))
    assert _blas_guard.on_cpu(Backend(Device(platform="cpu")))
    assert not _blas_guard.on_cpu(Backend(Device(type="cuda")))
    assert not _blas_guard.on_cpu(Backend(Device(platform="gpu")))
    assert not _blas_guard.on_cpu(object())
