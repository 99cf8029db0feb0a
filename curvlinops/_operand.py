"""What the matrix-free algorithms see of a matrix: native products and probes.

The algorithms in :mod:`curvlinops.inverse`, :mod:`curvlinops.eigen` and
:mod:`curvlinops.spectral` take an operator of this library, any scipy
``LinearOperator`` (or sparse matrix), or a dense array of numpy, PyTorch, JAX
or CuPy. :func:`as_operand` turns each into an :class:`Operand`, whose
products take and return arrays of one library (the *native* library): the
backend's framework for this library's operators, the array's own library
for dense arrays, numpy for scipy operators. The algorithms then do their
vector arithmetic with that library's array-API namespace, on its device,
without sending vectors to the host.

No framework is imported here.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops.backends import Backend
from curvlinops.backends._arrays import is_array, library_of

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "Operand",
    "as_operand",
    "check_choice",
    "check_int",
    "check_real",
    "raise_nonfinite",
]

_NUMPY = array_api_compat.array_namespace(np.empty(0))


class ConvergenceWarning(RuntimeWarning):
    """An iterative method stopped before it met its tolerance."""


class ConvergenceError(RuntimeError, ValueError):
    """An iterative method stopped before it met its tolerance (``on_failure='raise'``).

    Also a ``ValueError``: curvlinops-for-pytorch 3.0.1 raised that for a diverging series.
    """


class Operand:
    """A matrix seen through products on arrays of one library.

    Attributes:
        shape: ``(rows, columns)``.
        dtype: The numpy dtype of the computation.
        library: ``"numpy"``, ``"torch"``, ``"jax"`` or ``"cupy"``.
        xp: The array-API namespace of that library.
        backend: The backend of an operator of this library, else ``None``.
        source: What the caller passed.
    """

    def __init__(
        self,
        source: Any,
        *,
        shape: tuple[int, int],
        dtype: np.dtype,
        library: str,
        xp: Any,
        matmat: Callable[[Any], Any],
        rmatmat: Callable[[Any], Any],
        backend: Backend | None = None,
        like: Any = None,
    ) -> None:
        self.source = source
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.library = library
        self.xp = xp
        self.backend = backend
        self._matmat, self._rmatmat = matmat, rmatmat
        # pure functions of native arrays: jax.jit for JAX operators, as is otherwise
        self.compile: Callable[[Callable], Callable] = (
            (lambda f, **_: f) if backend is None else backend.compile
        )
        # an array of the native library, for device and dtype of new arrays
        self._like = like
        self.num_products = 0

    @property
    def eps(self) -> float:
        """Machine epsilon of the computation's dtype."""
        return float(np.finfo(self.dtype).eps)

    def matmat(self, X: Any) -> Any:
        """``A @ X`` for a native 2-d array."""
        self.num_products += 1
        return self._matmat(X)

    def rmatmat(self, X: Any) -> Any:
        """``Aᵀ @ X`` for a native 2-d array."""
        self.num_products += 1
        return self._rmatmat(X)

    def random(self, shape: tuple[int, ...], seed: int, kind: str = "normal") -> Any:
        """A seeded native array of standard-normal or Rademacher (±1) entries."""
        kind = check_choice(kind, "probes", ("normal", "rademacher"))
        if self.backend is not None:
            if kind == "normal":
                return self.backend.random_normal(tuple(shape), seed)
            return self.backend.random_rademacher(tuple(shape), seed)
        rng = np.random.default_rng(seed)
        if kind == "normal":
            host = rng.standard_normal(shape)
        else:
            host = 2.0 * rng.integers(0, 2, size=shape) - 1.0
        return self.from_host(host.astype(self.dtype))

    def from_host(self, host: np.ndarray) -> Any:
        """A numpy array as a native array of its dtype (a copy to the device if any)."""
        if self._like is None:
            return host
        return self.xp.asarray(np.ascontiguousarray(host), device=self.device)

    @property
    def device(self) -> Any:
        """The device of native arrays (``"cpu"`` for numpy)."""
        return "cpu" if self._like is None else array_api_compat.device(self._like)

    def to_host(self, y: Any) -> np.ndarray:
        """A native array as a numpy array (one copy from the device)."""
        if self.backend is not None:
            return self.backend.to_numpy(y)
        if self.library == "torch":
            return y.detach().cpu().numpy()
        if self.library == "cupy":
            return y.get()
        return np.asarray(y)

    def native(self, x: Any, argument: str) -> Any:
        """A caller's array as a native array of the operand's dtype."""
        if not is_array(x):
            raise type_error(argument, "an array (numpy, torch, jax, cupy)", x)
        if self.backend is not None:
            return self.backend.import_array(x, argument)[0]
        if library_of(x) != self.library:
            x = self.from_host(_host_copy(x, argument))
        x = self.xp.asarray(x)
        if _dtype_name(x) != self.dtype.name:
            x = self.xp.astype(x, self.native_dtype)
        return x

    def export(self, y: Any, like: Any) -> Any:
        """A native result in the library of the caller's array ``like``."""
        library = library_of(like)
        if library == self.library:
            return y
        host = self.to_host(y)
        if library == "numpy":
            return host
        return array_api_compat.array_namespace(like).asarray(host)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """Native zeros of the operand's dtype and device."""
        return self.xp.zeros(shape, dtype=self.native_dtype, device=self.device)

    def eye(self, n: int) -> Any:
        """Native identity matrix of the operand's dtype and device."""
        return self.xp.eye(n, dtype=self.native_dtype, device=self.device)

    def index(self, host: np.ndarray) -> Any:
        """Host integers as a native ``int64`` index array."""
        return self.xp.asarray(np.asarray(host, dtype=np.int64), device=self.device)

    @property
    def memory_device(self) -> Any:
        """Where the arrays take memory (``None``: host memory, numpy)."""
        return None if self.library == "numpy" else self.device

    @property
    def native_dtype(self) -> Any:
        """The computation's dtype as an object of the native library."""
        return getattr(self.xp, self.dtype.name)


def as_operand(A: Any, argument: str = "A", *, square: bool = True) -> Operand:
    """Wrap an operator, scipy operator, sparse matrix or dense array as an :class:`Operand`.

    Raises:
        TypeError: ``A`` is none of these.
        ValueError: ``A`` is not 2-d, or not square where ``square`` is asked.
    """
    if isinstance(A, Operand):
        return A
    if isinstance(A, LinearOperator):
        operand = _from_our_operator(A)
    elif isinstance(A, ScipyLinearOperator) or issparse(A):
        operand = _from_scipy(A)
    elif is_array(A):
        operand = _from_dense(A, argument)
    else:
        raise type_error(
            argument,
            "a curvlinops operator, a scipy LinearOperator or sparse matrix, or a 2-d array",
            A,
            "Wrap a matrix-vector function f with scipy.sparse.linalg.LinearOperator"
            "((n, n), matvec=f).",
        )
    if square and operand.shape[0] != operand.shape[1]:
        raise shape_error(argument, "a square operator", operand.shape)
    return operand


def _from_our_operator(A: LinearOperator) -> Operand:
    b = A.backend
    own = getattr(A, "_library_operand", None)
    if b is None and own is not None:  # a matrix of a library (curvlinops.examples)
        return own
    if b is None:
        # framework-free: products on numpy arrays
        return Operand(
            A,
            shape=A.shape,
            dtype=_float_dtype(A.dtype),
            library="numpy",
            xp=_NUMPY,
            matmat=lambda X: np.asarray(A._native(X, False)),
            rmatmat=lambda X: np.asarray(A._native(X, True)),
        )
    if not b.array_api:
        return _on_host(A, b)
    like = b.zeros((1,))
    return Operand(
        A,
        shape=A.shape,
        dtype=b.dtype,
        library=b.name,
        xp=array_api_compat.array_namespace(like),
        matmat=lambda X: A._native(X, False),
        rmatmat=lambda X: A._native(X, True),
        backend=b,
        like=like,
    )


def _on_host(A: LinearOperator, b: Backend) -> Operand:
    """An operator of a backend whose namespace the algorithms cannot use: they run in numpy.

    Each product copies its columns to the framework and the result back
    (:attr:`~curvlinops.backends.BackendDefaults.array_api`).
    """

    def product(X: np.ndarray, adjoint: bool) -> np.ndarray:
        return b.to_numpy(A._native(b.import_array(X, "X")[0], adjoint))

    return Operand(
        A,
        shape=A.shape,
        dtype=b.dtype,
        library="numpy",
        xp=_NUMPY,
        matmat=lambda X: product(X, False),
        rmatmat=lambda X: product(X, True),
    )


def _from_scipy(A: Any) -> Operand:
    dtype = _float_dtype(A.dtype if A.dtype is not None else np.float64)
    matmat = getattr(A, "matmat", None)
    if matmat is None:  # sparse matrix
        return Operand(
            A,
            shape=A.shape,
            dtype=dtype,
            library="numpy",
            xp=_NUMPY,
            matmat=lambda X: np.asarray(A @ X),
            rmatmat=lambda X: np.asarray(A.T @ X),
        )
    return Operand(
        A,
        shape=A.shape,
        dtype=dtype,
        library="numpy",
        xp=_NUMPY,
        matmat=lambda X: np.asarray(A.matmat(X)),
        rmatmat=lambda X: np.asarray(A.rmatmat(X)),
    )


def _from_dense(A: Any, argument: str) -> Operand:
    if getattr(A, "ndim", 0) != 2:
        raise shape_error(argument, "a 2-d array (a matrix)", tuple(getattr(A, "shape", ())))
    library = library_of(A)
    xp = array_api_compat.array_namespace(A)
    dtype = _float_dtype(_dtype_name(A))
    if _dtype_name(A) != dtype.name:
        A = xp.astype(A, getattr(xp, dtype.name))
    At = xp.permute_dims(A, (1, 0))
    return Operand(
        A,
        shape=tuple(A.shape),
        dtype=dtype,
        library=library,
        xp=xp,
        matmat=lambda X: A @ X,
        rmatmat=lambda X: At @ X,
        like=A,
    )


def _dtype_name(x: Any) -> str:
    return str(x.dtype if hasattr(x, "dtype") else x).rsplit(".", 1)[-1]


def _float_dtype(dtype: Any) -> np.dtype:
    """The dtype to compute in: real floats as they are, anything else as float64."""
    try:
        dtype = np.dtype(_dtype_name(dtype) if not isinstance(dtype, np.dtype) else dtype)
    except TypeError:
        return np.dtype(np.float64)
    if dtype.kind == "c":
        raise type_error("A", "a real operator", dtype, "Complex operators are not supported.")
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


def _host_copy(x: Any, argument: str) -> np.ndarray:
    if library_of(x) == "torch":
        x = x.detach().cpu()
    try:
        return np.asarray(x)
    except (TypeError, RuntimeError) as error:
        raise type_error(argument, "an array that can be copied to the host", x) from error


def raise_nonfinite(algorithm: str) -> None:
    """Stop an algorithm whose products with ``A`` gave NaN or inf."""
    raise FloatingPointError(
        f"{algorithm}: the products with A contain NaN or inf. Check A (for a curvature "
        "operator: the model's outputs and the loss on your data, e.g. log of zero or "
        "overflow in float16)."
    )


# --- argument checks shared by the algorithms ---------------------------------------------
def check_int(value: Any, argument: str, *, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools are refused)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise type_error(argument, f"an integer >= {minimum}", value)
    if value < minimum:
        raise value_error(argument, f"an integer >= {minimum}", repr(value))
    return int(value)


def check_real(value: Any, argument: str, *, minimum: float | None = None, strict=False) -> float:
    """A finite real number, optionally ``>= minimum`` (``> minimum`` if ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise type_error(argument, "a real number", value)
    value = float(value)
    if not np.isfinite(value):
        raise value_error(argument, "a finite number", repr(value))
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise value_error(argument, f"a number {relation} {minimum}", repr(value))
    return value


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        expected = " or ".join(repr(c) for c in choices)
        raise value_error(argument, expected, repr(value))
    return value
