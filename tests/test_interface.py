"""The operator object: scipy compatibility, array-agnostic products, composites.

Products take numpy arrays, torch tensors and JAX arrays of shape ``(P,)``,
``(P, 1)`` or ``(P, K)``, or lists/pytrees of parameter-shaped arrays, and
return the caller's library, dtype (``result_type`` of the operator's and the
input's dtypes) and structure. Composites (sums, scalings, products, adjoints,
powers) keep computing in the backend and stay array-agnostic.
"""

from collections import OrderedDict, UserDict
from collections.abc import Mapping

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from cases import build, numpy_data
from helpers import assert_close, to_numpy

import curvlinops
from curvlinops import IdentityLinearOperator

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

LIBRARIES = ["numpy", "torch", "jax"]
CASE = "mlp-ce-mean"


def make(library, a):
    """``a`` (numpy) as an array of ``library``."""
    if library == "torch":
        return torch.as_tensor(a)
    if library == "jax":
        return jnp.asarray(a)
    return np.asarray(a)


def library_of(x):
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, jax.Array):
        return "jax"
    if isinstance(x, np.ndarray):
        return "numpy"
    return type(x).__name__


def dtype_name(x):
    return str(x.dtype).rsplit(".", 1)[-1]


def map_leaves(fn, tree):
    if isinstance(tree, dict):
        return {k: map_leaves(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_leaves(fn, v) for v in tree)
    return fn(tree)


def leaves(tree):
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in leaves(v)]
    return [tree]


@pytest.fixture
def problem(backend_name):
    return build(CASE, backend_name)


def test_scipy_linear_operator_attributes(problem):
    P = problem.num_params
    H, G, J = (problem.operator(k) for k in "HGJ")
    for A in (H, G, J):
        assert isinstance(A, spla.LinearOperator)
        assert isinstance(A, curvlinops.LinearOperator)
        assert isinstance(A.dtype, np.dtype) and A.dtype == np.float64
        assert A.to_scipy() is A
    assert H.shape == G.shape == (P, P)
    assert J.shape == (problem.dense["J"].shape[0], P)
    assert f"{P}x{P} HessianLinearOperator" in repr(H)
    assert H.is_symmetric and G.is_symmetric and not J.is_symmetric


def test_float32_parameters(backend_name):
    """The operator's dtype is the parameters' dtype; products follow result_type."""
    rng = np.random.default_rng(0)
    W, X, y = rng.normal(size=(2, 3)), rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    if backend_name == "torch":
        model = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.as_tensor(W))
        params, loss = list(model.parameters()), torch.nn.MSELoss(reduction="sum")
        data = [(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))]
    else:
        params, loss = {"w": jnp.asarray(W, dtype=jnp.float32)}, curvlinops.losses.MSELoss("sum")
        data = [(X.astype(np.float32), y.astype(np.float32))]

        def model(p, X):
            return X @ p["w"].T

    H = curvlinops.HessianLinearOperator(model, loss, params, data)
    assert H.dtype == np.float32
    v32 = np.ones(6, dtype=np.float32)
    # H = 2 Xᵀ X ⊗ I (rows of W are the outputs): compare with float32 tolerance
    dense = np.kron(np.eye(2), 2 * X.T @ X)
    assert (H @ v32).dtype == np.float32
    assert_close(H @ v32, dense @ v32.astype(np.float64), rtol=1e-5)
    assert (H @ v32.astype(np.float64)).dtype == np.float64
    assert (H @ np.ones(6, dtype=np.int64)).dtype == np.float32


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("columns", [None, 1, 3], ids=["(P,)", "(P,1)", "(P,K)"])
def test_products_in_any_library(problem, library, columns):
    H, J = problem.operator("H"), problem.operator("J")
    D, DJ = problem.dense["H"], problem.dense["J"]
    rng = np.random.default_rng(1)
    shape = lambda n: (n,) if columns is None else (n, columns)  # noqa: E731
    v, u = rng.normal(size=shape(H.shape[0])), rng.normal(size=shape(J.shape[0]))
    x = make(library, v)
    products = [(H @ x, D @ v), (J @ x, DJ @ v), (J.T @ make(library, u), DJ.T @ u)]
    if columns is None or columns == 1:
        products += [(H.matvec(x), D @ v), (J.rmatvec(make(library, u)), DJ.T @ u)]
    if columns is not None:
        products += [(H.matmat(x), D @ v), (J.rmatmat(make(library, u)), DJ.T @ u)]
    for y, expected in products:
        assert library_of(y) == library
        assert dtype_name(y) == "float64"
        assert tuple(y.shape) == expected.shape
        assert_close(y, expected)


@pytest.mark.parametrize("library", LIBRARIES)
def test_result_dtype_rule(problem, library):
    """float64 operator: float32 and integer inputs give float64 results."""
    H, D = problem.operator("H"), problem.dense["H"]
    P = H.shape[0]
    for a in (np.arange(P, dtype=np.float32) / P, np.arange(P, dtype=np.int32) % 3):
        y = H @ make(library, a)
        assert library_of(y) == library
        assert dtype_name(y) == "float64"
        assert_close(y, D @ a.astype(np.float64))


def test_input_is_not_modified_and_not_aliased(problem):
    H = problem.operator("H")
    eye = IdentityLinearOperator(H)
    for library in LIBRARIES:
        x = make(library, np.arange(H.shape[0], dtype=np.float64))
        before = to_numpy(x)
        y = eye @ x
        assert library_of(y) == library
        np.testing.assert_array_equal(to_numpy(y), before)
        H @ x
        np.testing.assert_array_equal(to_numpy(x), before)
    x = np.arange(H.shape[0], dtype=np.float64)
    y = eye @ x
    y[0] = 100.0
    assert x[0] == 0.0


@pytest.mark.parametrize("library", LIBRARIES)
def test_parameter_structures_in_any_library(problem, library):
    """Lists/pytrees of parameter-shaped arrays in, the same structure out."""
    H, J, D = problem.operator("H"), problem.operator("J"), problem.dense["H"]
    rng = np.random.default_rng(2)
    v, V = rng.normal(size=H.shape[0]), rng.normal(size=(H.shape[0], 2))
    for flat, method in [(v, H.matvec), (v, H.__matmul__), (V, H.matmat)]:
        tree = map_leaves(lambda a: make(library, to_numpy(a)), problem.param_structure(flat))
        out = method(tree)
        assert type(out) is type(problem.params)
        assert all(library_of(leaf) == library for leaf in leaves(out))
        shapes = [tuple(leaf.shape) for leaf in leaves(out)]
        assert shapes == [s + flat.shape[1:] for s in problem.param_shapes]
        assert_close(problem.flatten_structure(out), D @ flat)
    tree = map_leaves(lambda a: make(library, to_numpy(a)), problem.param_structure(v))
    (y,) = J @ tree  # a list of J's output shapes (N, *output shape), as in 3.0.1
    assert library_of(y) == library
    assert tuple(y.shape) == tuple(J._out_shape[0])
    assert_close(y.reshape(-1), problem.dense["J"] @ v)


def _composites(H, G, J, M):
    """name -> (operator, its dense matrix from the dense H, G, J)."""
    P = H.op.shape[0]
    lam = 0.3
    scipy_op = spla.LinearOperator((P, P), matvec=lambda x: M @ x, rmatvec=lambda x: M.T @ x)
    Hd, Gd, Jd = H.dense, G.dense, J.dense
    return {
        "-H": (-H.op, -Hd),
        "H+G": (H.op + G.op, Hd + Gd),
        "H-G": (H.op - G.op, Hd - Gd),
        "2.0*H": (2.0 * H.op, 2.0 * Hd),
        "H*2.0": (H.op * 2.0, 2.0 * Hd),
        "H/2": (H.op / 2, Hd / 2),
        "H@G": (H.op @ G.op, Hd @ Gd),
        "H**2": (H.op**2, Hd @ Hd),
        "H**0": (H.op**0, np.eye(P)),
        "H.T": (H.op.T, Hd.T),
        "H.H": (H.op.H, Hd.T),
        "H.adjoint()": (H.op.adjoint(), Hd.T),
        "(H@G).T": ((H.op @ G.op).T, (Hd @ Gd).T),
        "G+lam*I(G)": (G.op + lam * IdentityLinearOperator(G.op), Gd + lam * np.eye(P)),
        "G+I(P)": (G.op + IdentityLinearOperator(P), Gd + np.eye(P)),
        "H+scipy_op": (H.op + scipy_op, Hd + M),
        "H+matrix_op": (H.op + spla.aslinearoperator(M), Hd + M),
        "H@matrix_op": (H.op @ spla.aslinearoperator(M), Hd @ M),
        "H-matrix_op": (H.op - spla.aslinearoperator(M), Hd - M),
        "J.T@J": (J.op.T @ J.op, Jd.T @ Jd),
        "2*(H-G)@G/3": (2 * (H.op - G.op) @ G.op / 3, 2 * (Hd - Gd) @ Gd / 3),
    }


class _Pair:
    def __init__(self, op, dense):
        self.op, self.dense = op, dense


COMPOSITE_NAMES = [
    "-H",
    "H+G",
    "H-G",
    "2.0*H",
    "H*2.0",
    "H/2",
    "H@G",
    "H**2",
    "H**0",
    "H.T",
    "H.H",
    "H.adjoint()",
    "(H@G).T",
    "G+lam*I(G)",
    "G+I(P)",
    "H+scipy_op",
    "H+matrix_op",
    "H@matrix_op",
    "H-matrix_op",
    "J.T@J",
    "2*(H-G)@G/3",
]


@pytest.mark.parametrize("name", COMPOSITE_NAMES)
def test_composites(problem, name):
    H, G, J = (_Pair(problem.operator(k), problem.dense[k]) for k in "HGJ")
    M = np.random.default_rng(3).normal(size=H.dense.shape)
    A, dense = _composites(H, G, J, M)[name]
    assert isinstance(A, curvlinops.LinearOperator), type(A)  # not one of scipy's composites
    assert A.shape == dense.shape and A.dtype == np.float64
    rng = np.random.default_rng(4)
    v, V = rng.normal(size=dense.shape[1]), rng.normal(size=(dense.shape[1], 3))
    for library in LIBRARIES:
        for x, expected in [(v, dense @ v), (V, dense @ V)]:
            y = A @ make(library, x)
            assert library_of(y) == library, (name, library)
            assert_close(y, expected, name=f"{name} @ x ({library})")
        y = A.rmatvec(make(library, v))
        assert library_of(y) == library
        assert_close(y, dense.T @ v, name=f"({name}).rmatvec ({library})")
    assert_close(A.todense(), dense, name=f"({name}).todense()")
    # parameter-shaped inputs pass through composites whose input space is the parameters'
    if name == "H@matrix_op":  # the input space is the plain scipy operator's
        with pytest.raises(TypeError, match="Parameter lists are taken only where"):
            A @ problem.param_structure(v)
        return
    out = A @ problem.param_structure(v)
    assert type(out) is type(problem.params)
    assert_close(problem.flatten_structure(out), dense @ v, name=f"{name} @ params")


def test_scalar_and_operator_dot(problem):
    H = problem.operator("H")
    assert isinstance(H.dot(2.0), curvlinops.LinearOperator)
    assert isinstance(H(2.0), curvlinops.LinearOperator)
    x = np.ones(H.shape[1])
    assert_close(H(x), problem.dense["H"] @ x)
    assert_close(H @ list(x), problem.dense["H"] @ x)


def test_composites_of_two_frameworks_are_refused():
    H_torch = build(CASE, "torch").operator("H")
    H_jax = build(CASE, "jax").operator("H")
    with pytest.raises(TypeError, match="operands: expected operators of one framework"):
        H_torch + H_jax
    with pytest.raises(TypeError, match="got jax and torch"):
        H_jax @ H_torch


def test_todense_types(problem):
    native = torch.Tensor if problem.backend == "torch" else jax.Array
    assert isinstance(problem.operator("H").todense(), native)
    assert isinstance((problem.operator("H") + IdentityLinearOperator(51)).todense(), native)
    eye = IdentityLinearOperator(4).todense()
    assert isinstance(eye, np.ndarray)
    np.testing.assert_array_equal(eye, np.eye(4))


class _ReadOnlyMapping(Mapping):
    """A mapping that is not a dict (as Hugging Face's ``BatchEncoding`` is a ``UserDict``)."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)


@pytest.mark.parametrize("mapping", [UserDict, OrderedDict, _ReadOnlyMapping])
def test_inputs_in_any_mapping(backend_name, mapping):
    """Inputs ``X`` in any mapping give the numbers of a plain dict."""
    problem = build("dict-mse-mean", backend_name)
    data = [(mapping(X), y) for X, y in numpy_data(problem.case)]
    args = (problem.model_func, problem.loss_func, problem.params, data)
    H = curvlinops.HessianLinearOperator(*args, **problem.options)
    J = curvlinops.JacobianLinearOperator(
        problem.model_func, problem.params, data, **problem.options
    )
    V = np.random.default_rng(0).normal(size=(H.shape[1], 2))
    assert_close(H @ V, problem.operator("H") @ V, name="H V")
    assert_close(J @ V, problem.operator("J") @ V, name="J V")


def test_to_scipy_and_device_as_in_curvlinops_for_pytorch(backend_name):
    """``to_scipy()`` presents a float32 operator as float64 (3.0.1's default); ``.device``."""
    problem = build(CASE, backend_name)
    if backend_name == "torch":
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        params, loss = list(model.parameters()), torch.nn.CrossEntropyLoss()
        data = [(torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y)) for X, y in
                numpy_data(problem.case)]  # fmt: skip
        model_func, device = model, params[0].device
    else:
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), problem.params)
        model_func, loss = problem.model_func, problem.loss_func
        data = [(X.astype(np.float32), y) for X, y in numpy_data(problem.case)]
        device = jax.tree_util.tree_leaves(params)[0].devices().pop()
    H = curvlinops.HessianLinearOperator(model_func, loss, params, data)
    assert H.dtype == np.float32 and H.device == device
    exported = H.to_scipy()
    assert exported.dtype == np.float64 and exported.shape == H.shape
    assert H.to_scipy(np.float32) is H and H.to_scipy("float32") is H
    dense = to_numpy(H.todense()).astype(np.float64)
    evals = spla.eigsh(exported, k=2, which="LA", rng=0, return_eigenvectors=False)
    assert evals.dtype == np.float64
    tol = 100 * np.finfo(np.float32).eps * np.abs(dense).max() * dense.shape[0]
    assert np.abs(np.sort(evals) - np.linalg.eigvalsh(dense)[-2:]).max() <= tol
    v = np.random.default_rng(0).normal(size=H.shape[1]).astype(np.float32)
    assert (exported @ v).dtype == np.float64
    assert_close(exported @ v, H @ v, name="retyped product")
    assert exported.T.shape == H.shape  # an operator like the others: algebra works
    with pytest.raises(ValueError, match=r"dtype: expected float32, float64 or None .*'int64'"):
        H.to_scipy("int64")
    assert problem.operator("H").to_scipy() is problem.operator("H")  # float64: itself
