"""Array interop: every caller library x backend x product, device rules, bad input, aliasing.

The operators are a Jacobian (non-square, for ``rmatvec``) and a Hessian of a
small MLP with the same weights in PyTorch and JAX; dense references come from
``torch.func`` and ``jax`` in float64, independently of curvlinops.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from unittest import mock

import array_api_strict as xps
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from helpers import assert_close

from curvlinops import HessianLinearOperator, IdentityLinearOperator, JacobianLinearOperator
from curvlinops.backends._arrays import (
    device_label,
    dlpack_device,
    is_host_array,
    library_of,
    placement_error,
)
from curvlinops.backends._cupy import to_cupyx, wrap_products
from curvlinops.losses import MSELoss

LIBRARIES = ["numpy", "torch", "jax", "array_api_strict"]
BATCHES = (4, 3)


# --- the problem ---------------------------------------------------------------
def _weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(4, 3), (4,), (2, 4), (2,)]  # PyTorch layout: Linear.weight is (out, in)
    return [rng.normal(size=s) for s in shapes]


def _data(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(n, 3)), rng.normal(size=(n, 2))) for n in BATCHES]


def _jax_model(params, X):
    W1, b1, W2, b2 = params
    return jnp.tanh(X @ W1.T + b1) @ W2.T + b2


def _torch_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    with torch.no_grad():
        for p, w in zip(model.parameters(), _weights()):
            p.copy_(torch.as_tensor(w))
    return model


@functools.cache
def _torch_references() -> tuple[np.ndarray, np.ndarray]:
    """Dense Hessian (MSE, mean over all points) and Jacobian, by torch.func."""
    model = _torch_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    X = torch.cat([torch.as_tensor(x) for x, _ in _data()])
    Y = torch.cat([torch.as_tensor(y) for _, y in _data()])

    def outputs(theta):
        pieces, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            pieces[name] = theta[start : start + size].reshape(shape)
            start += size
        return torch.func.functional_call(model, pieces, (X,)).reshape(-1)

    def loss(theta):
        return ((outputs(theta) - Y.reshape(-1)) ** 2).mean()

    return (
        torch.func.hessian(loss)(flat).numpy(),
        torch.func.jacrev(outputs)(flat).numpy(),
    )


@functools.cache
def _jax_references() -> tuple[np.ndarray, np.ndarray]:
    """The same matrices by jax.hessian / jax.jacrev."""
    weights = [jnp.asarray(w) for w in _weights()]
    flat, unravel = jax.flatten_util.ravel_pytree(weights)
    X = jnp.concatenate([jnp.asarray(x) for x, _ in _data()])
    Y = jnp.concatenate([jnp.asarray(y) for _, y in _data()])

    def outputs(theta):
        return _jax_model(unravel(theta), X).reshape(-1)

    def loss(theta):
        return jnp.mean((outputs(theta) - Y.reshape(-1)) ** 2)

    # one compiled function: op-by-op dispatch of jax.hessian compiles dozens of kernels
    matrices = jax.jit(lambda t: (jax.hessian(loss)(t), jax.jacrev(outputs)(t)))(flat)
    return tuple(np.asarray(m) for m in matrices)


class Problem:
    """Operators of one backend and their dense references."""

    def __init__(self, backend_name: str):
        self.backend_name = backend_name
        if backend_name == "torch":
            model = _torch_model()
            params = list(model.parameters())
            data = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in _data()]
            self.H = HessianLinearOperator(model, torch.nn.MSELoss(), params, data)
            self.J = JacobianLinearOperator(model, params, data)
            self.H_dense, self.J_dense = _torch_references()
        else:
            params = [jnp.asarray(w) for w in _weights()]
            data = [(jnp.asarray(x), jnp.asarray(y)) for x, y in _data()]
            self.H = HessianLinearOperator(_jax_model, MSELoss(), params, data)
            self.J = JacobianLinearOperator(_jax_model, params, data)
            self.H_dense, self.J_dense = _jax_references()


@pytest.fixture(scope="module")
def problems():
    return {name: Problem(name) for name in ("torch", "jax")}


@pytest.fixture
def problem(problems, backend_name):
    return problems[backend_name]


# --- arrays of every library ---------------------------------------------------------
def make(library: str, array: np.ndarray):
    """``array`` in ``library`` (a fresh copy)."""
    array = np.array(array)
    if library == "numpy":
        return array
    if library == "torch":
        return torch.as_tensor(array)
    if library == "jax":
        return jnp.asarray(array)
    return xps.asarray(array)


def as_numpy(x) -> np.ndarray:
    """A numpy copy of an array of any library (array-api-strict through DLPack)."""
    if library_of(x) == "torch":
        return x.detach().cpu().numpy().copy()
    return np.array(np.from_dlpack(x))


def test_references_agree_across_frameworks():
    H_torch, J_torch = _torch_references()
    H_jax, J_jax = _jax_references()
    assert_close(H_jax, H_torch, name="Hessian jax vs torch")
    assert_close(J_jax, J_torch, name="Jacobian jax vs torch")


# --- every library x backend x product -----------------------------------------------
PRODUCTS = ["matvec", "matmat", "rmatvec", "rmatmat", "hessian_matvec", "hessian_matmat"]


def _product(problem: Problem, product: str):
    """(the operator's method, dense matrix, input rows, columns or None)."""
    J, H = problem.J, problem.H
    return {
        "matvec": (J.matvec, problem.J_dense, J.shape[1], None),
        "matmat": (J.matmat, problem.J_dense, J.shape[1], 3),
        "rmatvec": (J.rmatvec, problem.J_dense.T, J.shape[0], None),
        "rmatmat": (J.rmatmat, problem.J_dense.T, J.shape[0], 3),
        "hessian_matvec": (H.matvec, problem.H_dense, H.shape[1], None),
        "hessian_matmat": (H.__matmul__, problem.H_dense, H.shape[1], 3),
    }[product]


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("library", LIBRARIES)
def test_caller_type_and_values(problem, library, product):
    apply, dense, rows, columns = _product(problem, product)
    rng = np.random.default_rng(2)
    v = rng.normal(size=rows if columns is None else (rows, columns))
    out = apply(make(library, v))
    assert library_of(out) == library
    assert tuple(out.shape) == (dense.shape[0],) + (() if columns is None else (columns,))
    assert np.dtype(str(out.dtype).rsplit(".", 1)[-1]) == np.float64
    assert_close(as_numpy(out), dense @ v, name=f"{problem.backend_name} {product} {library}")


@pytest.mark.parametrize("library", LIBRARIES)
def test_float32_input_gives_operator_precision_in_caller_library(problem, library):
    """A float32 vector with a float64 operator: computed in float64, float64 back."""
    v = np.random.default_rng(3).normal(size=problem.J.shape[1]).astype(np.float32)
    out = problem.J @ make(library, v)
    assert library_of(out) == library
    assert "float64" in str(out.dtype)
    assert_close(as_numpy(out), problem.J_dense @ v.astype(np.float64))


# --- awkward memory ---------------------------------------------------------------------
def _awkward_numpy(kind: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(4)
    if kind == "read-only":
        x = rng.normal(size=n)
        x.flags.writeable = False
        return x
    if kind == "negative-stride":
        return rng.normal(size=2 * n)[::-2]
    if kind == "misaligned":
        raw = np.zeros(8 * n + 1, dtype=np.uint8)
        view = np.frombuffer(raw.data, dtype=np.float64, count=n, offset=1)
        assert not view.flags.aligned
        raw[1:] = np.frombuffer(rng.normal(size=n).tobytes(), dtype=np.uint8)
        return view
    if kind == "odd-stride":  # a field of a structured array: stride 9 bytes
        record = np.zeros(n, dtype=[("a", "f8"), ("b", "u1")])
        record["a"] = rng.normal(size=n)
        return record["a"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["read-only", "negative-stride", "misaligned", "odd-stride"])
def test_awkward_numpy_views(problem, kind):
    """These views crashed ``torch.from_dlpack`` (negative strides) or cannot use DLPack."""
    x = _awkward_numpy(kind, problem.J.shape[1])
    before = np.array(x)
    out = problem.J @ x
    assert isinstance(out, np.ndarray) and out.flags.writeable
    assert_close(out, problem.J_dense @ before, name=kind)
    np.testing.assert_array_equal(x, before)


def test_negative_strides_in_array_api_strict(problem):
    """array-api-strict hides its strides; a flipped array must still work."""
    v = np.random.default_rng(5).normal(size=problem.J.shape[1])
    x = xps.flip(xps.asarray(v[::-1].copy()))
    assert np.from_dlpack(x).strides[0] < 0
    assert_close(as_numpy(problem.J @ x), problem.J_dense @ v)


def test_strided_torch_tensor(problem):
    v = torch.randn(2 * problem.J.shape[1], dtype=torch.float64)
    out = problem.J @ v[::2]
    assert_close(as_numpy(out), problem.J_dense @ v[::2].numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_torch_inputs_of_other_dtypes(problem, dtype):
    v = torch.arange(problem.J.shape[1]).to(dtype)
    out = problem.J @ v
    assert out.dtype == torch.float64
    assert_close(as_numpy(out), problem.J_dense @ v.double().numpy())


def test_requires_grad_tensor(problem):
    v = torch.randn(problem.J.shape[1], dtype=torch.float64, requires_grad=True)
    out = problem.J @ v
    assert isinstance(out, torch.Tensor) and not out.requires_grad
    assert_close(as_numpy(out), problem.J_dense @ v.detach().numpy())
    U = torch.randn(problem.J.shape[0], 2, dtype=torch.float64, requires_grad=True)
    out = problem.J.rmatmat(U)
    assert not out.requires_grad
    assert_close(as_numpy(out), problem.J_dense.T @ U.detach().numpy())


# --- bad input ---------------------------------------------------------------------------
class _NoDLPack:
    """Claims the array API but offers no DLPack export (and no numpy conversion)."""

    def __init__(self, n: int):
        self.shape, self.ndim, self.dtype = (n,), 1, np.dtype(np.float64)

    def __array_namespace__(self, api_version=None):
        return np


def test_non_dlpack_array_raises(problem):
    with pytest.raises(TypeError, match=r"x: expected an array .*DLPack-capable.*_NoDLPack"):
        problem.J @ _NoDLPack(problem.J.shape[1])


def test_non_array_raises(problem):
    with pytest.raises(TypeError, match=r"x: expected an array .*got object"):
        problem.J.matvec(object())


def test_complex_input_raises(problem):
    with pytest.raises(TypeError, match="x: expected a real"):
        problem.J @ (np.ones(problem.J.shape[1]) * 1j)


def test_array_on_other_device_raises(problem):
    """A 'meta' tensor stands in for an array on another accelerator."""
    x = torch.ones(problem.J.shape[1], device="meta")
    device = str(problem.J.backend.device)
    with pytest.raises(ValueError, match=rf"x: expected an array on the .*device {device}.*meta"):
        problem.J @ x


def test_jax_tracer_into_torch_operator_raises(problems):
    J = problems["torch"].J
    with pytest.raises(TypeError, match="x: expected a concrete array.*cannot be traced"):
        jax.jit(J.matvec)(jnp.ones(J.shape[1]))


def test_placement_rule_messages():
    error = placement_error("x", "cuda:1", "cuda:0")
    assert isinstance(error, ValueError)
    assert "cuda:0" in str(error) and "cuda:1" in str(error) and str(error).startswith("x:")


def test_device_helpers_on_cpu_arrays():
    for x in (np.ones(2), torch.ones(2), jnp.ones(2), xps.ones(2)):
        assert dlpack_device(x) == (1, 0)
        assert is_host_array(x)
    assert dlpack_device(torch.ones(2, device="meta")) is None
    assert not is_host_array(torch.ones(2, device="meta"))
    assert device_label(torch.ones(2, device="meta")) == "meta"
    assert device_label(jnp.ones(2)) == "cpu:0"


# JAX with two CPU devices (a fresh process: the device count is fixed at start-up).
_TWO_DEVICES = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp, torch
    jax.config.update("jax_enable_x64", True)
    from curvlinops import GGNLinearOperator, JacobianLinearOperator
    from curvlinops.losses import MSELoss

    d0, d1 = jax.devices()
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 2))
    X, Y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    params = jax.device_put({"w": jnp.asarray(W)}, d1)
    data = [jax.device_put((jnp.asarray(X), jnp.asarray(Y)), d1)]
    G = GGNLinearOperator(lambda p, X: X @ p["w"], MSELoss(), params, data)
    assert str(G.backend.device) == "cpu:1"
    # GGN of mean MSE for a linear model: (2 / (N C)) blockdiag(X^T X, X^T X) in vec order
    dense = np.kron(2 * X.T @ X / Y.size, np.eye(2))
    v = rng.normal(size=6)
    for x in (v, torch.tensor(v), jax.device_put(v, d1)):
        out = G @ x
        assert type(out) is type(x), type(out)
        np.testing.assert_allclose(np.asarray(out), dense @ v, rtol=1e-12, atol=1e-12)
    assert (G @ jax.device_put(v, d1)).devices() == {d1}
    try:
        G @ jax.device_put(v, d0)
    except ValueError as error:
        assert "cpu:0" in str(error) and "cpu:1" in str(error), error
        print("raised:", error)
    else:
        raise AssertionError("no error for an array on cpu:0")
    # a PyTorch operator reads JAX arrays of any CPU device (host memory)
    model = torch.nn.Linear(3, 2, bias=False).double()
    Jt = JacobianLinearOperator(model, list(model.parameters()), [(torch.tensor(X), None)])
    out = Jt @ jax.device_put(v, d1)
    assert out.devices() == {d1}
    np.testing.assert_allclose(np.asarray(out), np.asarray(Jt @ v), rtol=1e-12)
    print("ok")
    """
)


def test_jax_device_rules_with_two_cpu_devices():
    # on top of the session's flags (conftest: compile fast)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    result = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: x: expected an array on the parameters' device cpu:1" in result.stdout
    assert result.stdout.strip().endswith("ok")


# --- aliasing -------------------------------------------------------------------------------
def test_torch_memory_shared_with_jax_mutated_after_the_call(problems):
    """The hazard from the issue: JAX reads torch memory, the caller mutates it afterwards."""
    for backend_name in ("jax", "torch"):
        problem = problems[backend_name]
        n = problem.H.shape[1]
        t = torch.randn(n, dtype=torch.float64)
        original = t.numpy().copy()
        x_jax = jnp.from_dlpack(t)  # shares t's memory
        results = [problem.H @ x_jax, problem.H @ t]
        t.add_(1.0)  # in place, after the calls returned
        for out in results:
            assert_close(as_numpy(out), problem.H_dense @ original, name=backend_name)


def _mutate(x) -> bool:
    """Add 1 to ``x`` in place; False for JAX arrays, which are immutable."""
    library = library_of(x)
    if library == "numpy":
        x += 1.0
    elif library == "torch":
        x.add_(1.0)
    elif library == "array_api_strict":
        x[...] = x + 1.0
    return library != "jax"


def _operators(problem: Problem):
    yield "J", problem.J, problem.J_dense
    yield "H", problem.H, problem.H_dense
    yield "identity", IdentityLinearOperator(problem.H.shape[0]), np.eye(problem.H.shape[0])
    yield "identity-like", IdentityLinearOperator(problem.H), np.eye(problem.H.shape[0])
    yield (
        "H + identity",
        problem.H + IdentityLinearOperator(problem.H),
        problem.H_dense + np.eye(problem.H.shape[0]),
    )


@pytest.mark.parametrize("library", LIBRARIES)
def test_results_never_alias_inputs(problem, library):
    for name, op, dense in _operators(problem):
        v = np.random.default_rng(6).normal(size=op.shape[1])
        x = make(library, v)
        out = op @ x
        x_now = v + 1.0 if _mutate(x) else v
        assert_close(as_numpy(out), dense @ v, name=f"{name}: output after mutating the input")
        _mutate(out)
        assert_close(as_numpy(x), x_now, name=f"{name}: input after mutating the output")


# --- cupyx's solvers: the wrapping logic, with scipy's LinearOperator ---------------------
def test_wrap_products_batches_blocks(problem):
    J = problem.J
    with mock.patch.object(J, "matmat", wraps=J.matmat) as spy:
        A = wrap_products(sla.LinearOperator, J)
        X = np.random.default_rng(7).normal(size=(J.shape[1], 4))
        assert_close(A.matmat(X), problem.J_dense @ X)
        spy.assert_called_once()
    assert A.shape == J.shape and A.dtype == J.dtype
    U = np.random.default_rng(8).normal(size=(J.shape[0], 2))
    assert_close(A.rmatmat(U), problem.J_dense.T @ U)
    assert_close(A.rmatvec(U[:, 0]), problem.J_dense.T @ U[:, 0])


def test_wrapped_operator_in_block_solvers(problem):
    """lobpcg and svds on the wrapped operator (as cupyx's would run them on the GPU)."""
    H, J = problem.H, problem.J
    G = wrap_products(sla.LinearOperator, J.T @ J)
    rng = np.random.default_rng(9)
    w, _ = sla.lobpcg(G, rng.normal(size=(G.shape[0], 2)), largest=True, tol=1e-9, maxiter=500)
    top = np.linalg.eigvalsh(problem.J_dense.T @ problem.J_dense)[-2:]
    assert_close(np.sort(w), top, rtol=1e-6, name="lobpcg")
    s = sla.svds(wrap_products(sla.LinearOperator, J), k=3, return_singular_vectors=False)
    assert_close(np.sort(s), np.linalg.svd(problem.J_dense, compute_uv=False)[:3][::-1])
    assert H.is_symmetric


def test_to_cupyx_checks_operator_then_needs_cupy(monkeypatch):
    with pytest.raises(TypeError, match="op: expected a curvlinops"):
        to_cupyx(np.eye(3))
    monkeypatch.setitem(sys.modules, "cupyx.scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match=r"pip install 'curvlinops\[cupy\]'"):
        to_cupyx(IdentityLinearOperator(3))
