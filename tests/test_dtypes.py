"""dtypes end to end: float32 and float64, JAX's x64 switch, bfloat16 and float16 models.

Rules under test: products are computed in the parameters' dtype (inputs are
cast to it); results come back in the wider of the operator's and the
caller's float dtypes, in the caller's library (numpy gets float32 where the
result would be bfloat16). References are float64 Hessians of the same model
with the same (rounded) weights and data.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import textwrap

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from helpers import assert_close

from curvlinops import HessianLinearOperator
from curvlinops._base import _result_dtype
from curvlinops.losses import MSELoss

SHAPES = [(4, 3), (4,), (2, 4), (2,)]  # PyTorch layout; JAX uses the same list
P = 26
# Worst entry error allowed, relative to the largest entry: a few units of roundoff.
RTOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
TORCH_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _numbers():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=s) for s in SHAPES]
    data = [(rng.normal(size=(n, 3)), rng.normal(size=(n, 2))) for n in (4, 3)]
    return weights, data


def _jax_model(params, X):
    W1, b1, W2, b2 = params
    return jnp.tanh(X @ W1.T + b1) @ W2.T + b2


def _rounded(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` rounded to ``dtype`` and back to float64."""
    return np.asarray(array, dtype=np.dtype(getattr(ml_dtypes, dtype, dtype))).astype(np.float64)


def _operator(backend: str, dtype: str) -> HessianLinearOperator:
    weights, data = _numbers()
    if backend == "jax":
        jdt = jnp.dtype(dtype)
        params = [jnp.asarray(w, dtype=jdt) for w in weights]
        batches = [(jnp.asarray(x, dtype=jdt), jnp.asarray(y, dtype=jdt)) for x, y in data]
        return HessianLinearOperator(_jax_model, MSELoss(), params, batches)
    tdt = TORCH_DTYPES[dtype]
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(tdt)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.as_tensor(w))
    batches = [(torch.as_tensor(x).to(tdt), torch.as_tensor(y).to(tdt)) for x, y in data]
    return HessianLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()), batches)


@functools.cache
def _reference(dtype: str) -> np.ndarray:
    """float64 Hessian (jax.hessian) of the model with weights and data rounded to ``dtype``."""
    weights, data = _numbers()
    weights = [jnp.asarray(_rounded(w, dtype)) for w in weights]
    X = jnp.asarray(np.concatenate([_rounded(x, dtype) for x, _ in data]))
    Y = jnp.asarray(np.concatenate([_rounded(y, dtype) for _, y in data]))
    flat, unravel = jax.flatten_util.ravel_pytree(weights)

    def loss(theta):
        return jnp.mean((_jax_model(unravel(theta), X) - Y) ** 2)

    return np.asarray(jax.jit(jax.hessian(loss))(flat))


def _in(library: str, array: np.ndarray, dtype: str):
    if library == "numpy":
        return array.astype(np.dtype(getattr(ml_dtypes, dtype, dtype)))
    if library == "torch":
        return torch.as_tensor(array).to(TORCH_DTYPES[dtype])
    return jnp.asarray(array, dtype=jnp.dtype(dtype))


def _float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.double().numpy()
    return np.asarray(x).astype(np.float64)


def _dtype_name(x) -> str:
    return str(x.dtype).rsplit(".", 1)[-1]


# --- float32 end to end --------------------------------------------------------------
@pytest.mark.parametrize("library", ["numpy", "torch", "jax"])
def test_float32_end_to_end(backend_name, library):
    H = _operator(backend_name, "float32")
    assert H.dtype == np.float32 and _dtype_name(H.todense()) == "float32"
    V = np.random.default_rng(1).normal(size=(P, 2))
    out = H @ _in(library, V, "float32")
    assert _dtype_name(out) == "float32"
    expected = _reference("float32") @ V.astype(np.float32).astype(np.float64)
    assert_close(np.asarray(out), expected, rtol=RTOL["float32"], name=library)


def test_float32_operator_in_scipy_cg(backend_name):
    H = _operator(backend_name, "float32")
    A = H + sla.aslinearoperator(np.eye(P, dtype=np.float32))
    b = np.random.default_rng(2).normal(size=P).astype(np.float32)
    x, info = sla.cg(A, b, rtol=1e-6, maxiter=200)
    assert info == 0 and x.dtype == np.float32
    expected = np.linalg.solve(_reference("float32") + np.eye(P), b.astype(np.float64))
    assert_close(x, expected, rtol=1e-4)


# --- JAX's float64 switch ------------------------------------------------------------------
@contextlib.contextmanager
def x64_disabled():
    """JAX's float64 mode off for a while (the test session runs with it on)."""
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", True)


def test_float64_numpy_params_need_x64():
    weights, data = _numbers()
    batches = [(x.astype(np.float32), y.astype(np.float32)) for x, y in data]
    with x64_disabled(), pytest.raises(ValueError, match=r"float64 mode is off.*enable_x64"):
        HessianLinearOperator(_jax_model, MSELoss(), weights, batches)


def test_float64_operator_after_x64_switched_off():
    H = _operator("jax", "float64")
    with x64_disabled(), pytest.raises(ValueError, match=r"jax_enable_x64: expected True"):
        H @ np.ones(P)
    assert_close(H @ np.eye(P), _reference("float64"))


def test_float32_operator_with_x64_off_takes_float64_arrays():
    v = np.random.default_rng(3).normal(size=P)
    expected = _reference("float32") @ v.astype(np.float32).astype(np.float64)
    with x64_disabled():
        H = _operator("jax", "float32")
        for x in (v, torch.as_tensor(v)):
            out = H @ x
            assert _dtype_name(out) == "float64"  # the wider of the two dtypes
            assert_close(np.asarray(out), expected, rtol=RTOL["float32"])


# --- half precision models -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model(backend_name, dtype):
    H = _operator(backend_name, dtype)
    assert H.dtype.name == dtype
    assert _dtype_name(H.todense()) == dtype  # products are computed in the model's dtype
    reference = _reference(dtype)
    V = np.random.default_rng(4).normal(size=(P, 3))
    for library in ("numpy", "torch", "jax"):
        out = H @ _in(library, V, "float32")
        assert _dtype_name(out) == "float32", library
        assert_close(np.asarray(out), reference @ V, rtol=RTOL[dtype], name=library)
        out = H @ _in(library, V, dtype)  # numpy: ml_dtypes' bfloat16 arrays too
        assert _dtype_name(out) == dtype, library
        expected = reference @ _rounded(V, dtype)
        assert_close(_float64(out), expected, rtol=2 * RTOL[dtype], name=f"{library} {dtype}")
    assert (H @ V).dtype == np.float64
    assert (H @ np.arange(P)).dtype == (np.float32 if dtype == "bfloat16" else np.float16)


def test_result_dtype_rules():
    bf16, f16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
    assert _result_dtype(bf16, np.zeros(2, dtype=f16)) == np.float32
    assert _result_dtype(bf16, np.zeros(2, dtype=int)) == np.float32
    assert _result_dtype(f16, np.zeros(2, dtype=int)) == np.float16
    assert _result_dtype(np.dtype(np.float32), torch.zeros(2, dtype=torch.bfloat16)) == np.float32
    assert _result_dtype(bf16, torch.zeros(2, dtype=torch.bfloat16)) == bf16
    assert _result_dtype(np.dtype(np.float32), np.zeros(2)) == np.float64


def test_torch_bfloat16_model_without_jax():
    """numpy knows bfloat16 only through ml_dtypes; PyTorch-only processes load it."""
    code = textwrap.dedent(
        """
        import sys, numpy as np, torch
        from curvlinops import HessianLinearOperator
        model = torch.nn.Linear(3, 2).to(torch.bfloat16)
        X = torch.randn(5, 3).to(torch.bfloat16)
        params = list(model.parameters())
        H = HessianLinearOperator(model, torch.nn.MSELoss(), params, [(X, X[:, :2])])
        out = H @ np.ones(8, dtype=np.float32)
        out_bf16 = H @ torch.ones(8, dtype=torch.bfloat16)
        print(H.dtype, out.dtype, out_bf16.dtype, "jax" in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["bfloat16", "float32", "torch.bfloat16", "False"]
