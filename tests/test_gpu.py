"""GPU checks (``pytest -m gpu``); skipped without a CUDA device (see tests/conftest.py).

The broad sweep (operators x backends x array libraries x cupyx/JAX solvers,
with device-to-host copies counted) is ``benchmarks/gpu_check.py``, run here
as one test; the others pin single promises with small problems.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close

from curvlinops import GGNLinearOperator, IdentityLinearOperator, JacobianLinearOperator

# JAX would take 75% of the GPU's memory at its first use; PyTorch and CuPy share it here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
pytestmark = pytest.mark.gpu
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
RTOL32 = 1e-4


def _torch_problem(device: str, dtype: str = "float32"):
    """GGN and Jacobian of a small MLP on ``device``, and float64 CPU references."""
    import torch

    def build(device, dtype):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        model = model.to(device=device, dtype=getattr(torch, dtype))
        X = torch.linspace(-1, 1, 40, dtype=torch.float64).reshape(8, 5)
        data = [(X.to(device, getattr(torch, dtype)), None)]
        params = list(model.parameters())
        G_data = [(x, torch.zeros(8, 3, device=device, dtype=x.dtype)) for x, _ in data]
        return (
            GGNLinearOperator(model, torch.nn.MSELoss(), params, G_data),
            JacobianLinearOperator(model, params, data),
        )

    G, J = build(device, dtype)
    G64, J64 = build("cpu", "float64")
    return G, J, G64.todense().numpy(), J64.todense().numpy()


def test_gpu_check_script_passes():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


def test_torch_tensors_stay_on_their_device():
    import torch

    G, J, G_dense, J_dense = _torch_problem("cuda:0")
    v = np.random.default_rng(0).normal(size=G.shape[1]).astype(np.float32)
    out = G @ torch.as_tensor(v, device="cuda:0")
    assert out.device == torch.device("cuda:0")
    assert_close(out.cpu().numpy(), G_dense @ v, rtol=RTOL32)
    out = G @ torch.as_tensor(v)  # a CPU tensor for a CUDA model: copied there and back
    assert out.device == torch.device("cpu")
    assert_close(out.numpy(), G_dense @ v, rtol=RTOL32)
    out = G @ v
    assert isinstance(out, np.ndarray)
    assert_close(out, G_dense @ v, rtol=RTOL32)
    u = torch.ones(J.shape[0], device="cuda:0", requires_grad=True)
    out = J.rmatvec(u)
    assert out.device == u.device and not out.requires_grad
    assert_close(out.cpu().numpy(), J_dense.T @ np.ones(J.shape[0]), rtol=RTOL32)


def test_cupy_arrays_in_and_out_on_the_same_gpu():
    cupy = pytest.importorskip("cupy")
    G, J, G_dense, J_dense = _torch_problem("cuda:0")
    v = cupy.asarray(np.random.default_rng(1).normal(size=G.shape[1]), dtype=cupy.float32)
    out = G @ v
    assert isinstance(out, cupy.ndarray) and out.device.id == 0
    assert_close(cupy.asnumpy(out), G_dense @ cupy.asnumpy(v), rtol=RTOL32)
    strided = cupy.asarray(np.arange(2 * G.shape[1]), dtype=cupy.float32)[::-2]
    assert_close(cupy.asnumpy(G @ strided), G_dense @ cupy.asnumpy(strided), rtol=RTOL32)
    U = cupy.ones((J.shape[0], 2), dtype=cupy.float32)
    assert_close(cupy.asnumpy(J.rmatmat(U)), J_dense.T @ np.ones((J.shape[0], 2)), rtol=RTOL32)


def test_cupyx_solvers_take_the_operators():
    cupy = pytest.importorskip("cupy")
    cla = pytest.importorskip("cupyx.scipy.sparse.linalg")
    from curvlinops.backends._cupy import to_cupyx

    G, J, G_dense, J_dense = _torch_problem("cuda:0")
    A = G + 0.5 * IdentityLinearOperator(G)
    A_dense = G_dense + 0.5 * np.eye(G.shape[0])
    b = cupy.asarray(np.random.default_rng(2).normal(size=G.shape[0]), dtype=cupy.float32)
    for solve in (cla.cg, cla.minres, cla.gmres):
        x, info = solve(A, b)
        assert info == 0, solve.__name__
        residual = A_dense @ cupy.asnumpy(x) - cupy.asnumpy(b)
        assert np.linalg.norm(residual) <= 1e-3 * np.linalg.norm(cupy.asnumpy(b)), solve.__name__
    top = np.linalg.eigvalsh(G_dense)[-3:]
    w = cla.eigsh(G, k=3, which="LA", return_eigenvectors=False)
    assert_close(np.sort(cupy.asnumpy(w)), top, rtol=1e-3)
    X0 = cupy.asarray(np.random.default_rng(3).normal(size=(G.shape[0], 3)), dtype=cupy.float32)
    w, _ = cla.lobpcg(to_cupyx(G), X0, largest=True, maxiter=100, tol=1e-4)
    assert_close(np.sort(cupy.asnumpy(w)), top, rtol=1e-3)
    s = cla.svds(J, k=3, return_singular_vectors=False)
    singular = np.linalg.svd(J_dense, compute_uv=False)[:3]
    assert_close(np.sort(cupy.asnumpy(s))[::-1], singular, rtol=1e-3)


def test_array_on_another_gpu_raises():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    G, _, _, _ = _torch_problem("cuda:0")
    with pytest.raises(ValueError, match=r"x: expected an array on the .*cuda:0.*cuda:1"):
        G @ torch.ones(G.shape[1], device="cuda:1")
    cupy = pytest.importorskip("cupy")
    with cupy.cuda.Device(1):
        x = cupy.ones(G.shape[1], dtype=cupy.float32)
    with pytest.raises(ValueError, match=r"cuda:0.*cuda:1"):
        G @ x


def test_jax_on_the_gpu():
    jax = pytest.importorskip("jax")
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU here")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = gpu_check
    spec.loader.exec_module(gpu_check)
    env = gpu_check.detect(dry_run=False, dtype="float32")
    ops = gpu_check.build_operators(env, "jax", "float32", device, 16)
    refs = gpu_check.references(env, 16)
    rows = []
    for name in ("ggn", "hessian"):
        rows += gpu_check.jax_native_rows(env, name, ops[name], refs[name])
    rows += gpu_check.aliasing_rows(env, "jax", ops, refs["ggn"])
    failed = [row.cells() for row in rows if not row.ok]
    assert not failed, failed
