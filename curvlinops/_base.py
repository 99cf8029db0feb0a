"""The operator base class, its composites, and the identity.

Public products (``@``, ``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``,
``dot``) take arrays of any library, validate them, convert them to the
backend's arrays, call the private hook :meth:`LinearOperator._native`, and
hand the result back in the caller's library, device, dtype and structure.
Composites (sum, scaled, product, adjoint) keep their operands and compute
in the backend's arrays too, unlike scipy's own composites, which call
``np.asarray``.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from scipy.sparse.linalg import aslinearoperator

from curvlinops import _blas_guard
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops.backends import Backend
from curvlinops.backends._arrays import export_like, is_array, library_of, to_device_of

__all__ = ["IdentityLinearOperator", "LinearOperator"]


class LinearOperator(ScipyLinearOperator):
    """A scipy ``LinearOperator`` whose products work in any array library.

    Subclasses implement :meth:`_native` on arrays of their backend (shape
    ``(n, K)``), and set ``is_symmetric`` when the operator is self-adjoint.
    Operators with ``backend = None`` are framework-free and compute on the
    caller's arrays directly.
    """

    backend: Backend | None = None
    is_symmetric: bool = False
    # Whether the input/output space is the parameter space (for list inputs).
    _params_in: bool = False
    _params_out: bool = False

    def __init__(self, dtype: Any, shape: tuple[int, int]) -> None:
        super().__init__(np.dtype(dtype), shape)

    # --- the hook subclasses implement -------------------------------------
    def _native(self, X: Any, adjoint: bool) -> Any:
        """``A @ X`` (or ``Aᴴ @ X``) for a native 2-d array ``X``."""
        raise NotImplementedError

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        """``A @ x`` for a native 1-d array; overridden where a vector needs no column axis.

        With JAX every reshape outside a compiled function is a dispatch and a
        copy (80-320 µs for 270k entries, about 10% of a Jacobian product).
        """
        return self._native(x.reshape(x.shape[0], 1), adjoint).reshape(-1)

    # scipy's private entry points, for code that calls them directly.
    def _matvec(self, x: Any) -> Any:
        return self.matvec(x)

    def _matmat(self, X: Any) -> Any:
        return self.matmat(X)

    def _rmatvec(self, x: Any) -> Any:
        return self.rmatvec(x)

    def _rmatmat(self, X: Any) -> Any:
        return self.rmatmat(X)

    # --- public products -----------------------------------------------------
    def matvec(self, x: Any) -> Any:
        """``A @ x`` for a vector of shape ``(N,)`` or ``(N, 1)`` (or parameter list)."""
        return self._apply(x, adjoint=False, argument="x", ndims=(1, 2), columns=1)

    def matmat(self, X: Any) -> Any:
        """``A @ X`` for ``X`` of shape ``(N, K)`` (or a list of ``(*shape, K)`` arrays)."""
        return self._apply(X, adjoint=False, argument="X", ndims=(2,))

    def rmatvec(self, x: Any) -> Any:
        """``Aᴴ @ x`` for a vector of shape ``(M,)`` or ``(M, 1)``."""
        return self._apply(x, adjoint=True, argument="x", ndims=(1, 2), columns=1)

    def rmatmat(self, X: Any) -> Any:
        """``Aᴴ @ X`` for ``X`` of shape ``(M, K)``."""
        return self._apply(X, adjoint=True, argument="X", ndims=(2,))

    def dot(self, x: Any) -> Any:
        """Product with an operator, a scalar, a vector or a matrix."""
        if isinstance(x, ScipyLinearOperator):
            return _ProductOperator(self, x)
        if _is_scalar(x):
            return _ScaledOperator(self, x)
        return self._apply(x, adjoint=False, argument="x", ndims=(1, 2))

    __mul__ = dot
    __call__ = dot

    def __matmul__(self, other: Any) -> Any:
        if _is_scalar(other):
            raise ValueError("Scalar operands are not allowed with '@', use '*' instead.")
        return self.dot(other)

    def __rmul__(self, x: Any) -> Any:
        if _is_scalar(x):
            return _ScaledOperator(self, x)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> Any:
        if isinstance(other, ScipyLinearOperator):
            return _ProductOperator(other, self)
        return NotImplemented

    def __truediv__(self, other: Any) -> Any:
        if not _is_scalar(other):
            raise type_error("divisor", "a scalar", other)
        return _ScaledOperator(self, 1.0 / other)

    def __add__(self, other: Any) -> Any:
        if isinstance(other, ScipyLinearOperator):
            return _SumOperator(self, other)
        return NotImplemented

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, ScipyLinearOperator):
            return _SumOperator(other, self)
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return _ScaledOperator(self, -1.0)

    def __sub__(self, other: Any) -> Any:
        if isinstance(other, ScipyLinearOperator):
            return _SumOperator(self, -_wrap(other))
        return NotImplemented

    def __pow__(self, power: Any) -> Any:
        if not isinstance(power, numbers.Integral) or power < 0:
            raise type_error("power", "a non-negative integer", power)
        if power == 0:
            return IdentityLinearOperator(self)
        result: LinearOperator = self
        for _ in range(int(power) - 1):
            result = _ProductOperator(result, self)
        return result

    def _adjoint(self) -> LinearOperator:
        return self if self.is_symmetric else _AdjointOperator(self)

    # Real operators: the transpose is the adjoint.
    _transpose = _adjoint

    def to_scipy(self, dtype: Any = None) -> LinearOperator:
        """The operator as scipy's solvers should see it: with ``dtype`` (default float64).

        For code written for curvlinops-for-pytorch 3.0.1, whose ``to_scipy``
        wraps an operator in a scipy one of numpy's default dtype (float64)
        unless ``dtype`` is given: ``eigsh(H.to_scipy())`` then returns float64
        eigenvalues. The operator already is a scipy ``LinearOperator``: of its
        own dtype it is returned as it is; of another, the same operator is
        presented in that dtype (products still run in the parameters' dtype,
        results come in the wider one).
        """
        wanted = np.dtype(np.float64 if dtype is None else dtype)
        if wanted.kind != "f" or wanted.itemsize < 4:
            raise value_error(
                "dtype",
                "float32, float64 or None (float64, as in curvlinops-for-pytorch)",
                repr(dtype),
                "scipy's solvers need single or double precision.",
            )
        return self if wanted == self.dtype else _RetypedOperator(self, wanted)

    @property
    def device(self) -> Any:
        """The parameters' device (``torch.device`` or JAX device), where products run.

        ``None`` for an operator that belongs to no framework.
        """
        return None if self.backend is None else self.backend.device

    @property
    def torch_dtype(self) -> Any:
        """:attr:`dtype` as a ``torch.dtype``, for ``torch.eye(n, dtype=A.torch_dtype)``.

        :attr:`dtype` is a numpy dtype, as scipy's solvers need; in
        curvlinops-for-pytorch 3.0.1 it was a ``torch.dtype``. Needs PyTorch
        imported (this property does not import it).
        """
        torch = sys.modules.get("torch")
        if torch is None:
            raise ImportError(
                f"{type(self).__name__}.torch_dtype: PyTorch is not imported. Import torch "
                "first, or use .dtype (a numpy dtype)."
            )
        return getattr(torch, self.dtype.name)

    def todense(self) -> Any:
        """The matrix, built column block by column block.

        Returns:
            A ``torch.Tensor`` or ``jax.Array`` (the backend's array type) on
            the parameters' device; a numpy array for framework-free operators.
        """
        if self.backend is None:
            return np.asarray(self._native(np.eye(self.shape[1], dtype=self.dtype), False))
        return self._native(self.backend.eye(self.shape[1]), False)

    # --- conversion in and out ------------------------------------------------
    def _apply(
        self, x: Any, *, adjoint: bool, argument: str, ndims: tuple[int, ...], columns: int = 0
    ) -> Any:
        rows_in = self.shape[0] if adjoint else self.shape[1]
        if _is_structure(x):
            return self._apply_structure(x, adjoint, argument, ndims, columns)
        if isinstance(x, (list, tuple)):
            x = np.asarray(x)
        if not is_array(x):
            raise type_error(argument, "an array (numpy, torch, jax, cupy, ...)", x)
        _check_shape(x, argument, rows_in, ndims, columns)
        out_dtype = _result_dtype(self.dtype, x)
        b = self.backend
        if b is None:
            Y = self._native(x if x.ndim == 2 else x[:, None], adjoint)
            return _cast(Y if x.ndim == 2 else Y[:, 0], out_dtype)
        X, shared = b.import_array(x, argument)
        guard = library_of(x) == "numpy" and _blas_guard.on_cpu(b)
        # a scipy solver drives us: its BLAS threads off our cores
        with _blas_guard.holding() if guard else contextlib.nullcontext():
            Y = self._native(X, adjoint) if X.ndim == 2 else self._native_vector(X, adjoint)
        self._check_finite(Y, X, argument)
        if shared:
            # x's memory is read by the backend: finish before the caller may change it
            Y = b.block_until_ready(Y)
        if b.owns(x):
            # back on the caller's device (e.g. a CPU tensor for a CUDA model)
            return _cast(to_device_of(Y, x) if b.is_concrete(Y) else Y, out_dtype)
        return export_like(Y, x, out_dtype, b.to_numpy)

    # --- the spaces as lists of shapes (curvlinops-for-pytorch's tensor lists) ----
    @property
    def _in_shape(self) -> list[tuple[int, ...]]:
        """Shapes of the input space's arrays: the parameters', else one vector.

        A list of arrays of these shapes (each with an optional trailing
        column axis) is a valid operand; the product is then a list of arrays
        of :attr:`_out_shape`, as in curvlinops-for-pytorch.
        """
        shapes = self.__dict__.get("_in_shapes")
        return list(shapes) if shapes is not None else self._space(self._params_in, 1)

    @_in_shape.setter
    def _in_shape(self, shapes: Any) -> None:
        self.__dict__["_in_shapes"] = [tuple(int(d) for d in s) for s in shapes]

    @property
    def _out_shape(self) -> list[tuple[int, ...]]:
        """Shapes of the output space's arrays (see :attr:`_in_shape`)."""
        shapes = self.__dict__.get("_out_shapes")
        return list(shapes) if shapes is not None else self._space(self._params_out, 0)

    @_out_shape.setter
    def _out_shape(self, shapes: Any) -> None:
        self.__dict__["_out_shapes"] = [tuple(int(d) for d in s) for s in shapes]

    @property
    def _in_shape_flat(self) -> list[int]:
        return [int(np.prod(s, dtype=int)) for s in self._in_shape]

    @property
    def _out_shape_flat(self) -> list[int]:
        return [int(np.prod(s, dtype=int)) for s in self._out_shape]

    def _space(self, params: bool, axis: int) -> list[tuple[int, ...]]:
        if params and self.backend is not None:
            return [tuple(s) for s in self.backend.param_shapes]
        return [(int(self.shape[axis]),)]

    def _apply_structure(
        self, x: Any, adjoint: bool, argument: str, ndims: tuple[int, ...], columns: int
    ) -> Any:
        """Products with a list of arrays of :attr:`_in_shape` (or a parameter pytree)."""
        params_in = self._params_out if adjoint else self._params_in
        params_out = self._params_in if adjoint else self._params_out
        in_shapes = self._out_shape if adjoint else self._in_shape
        out_shapes = self._in_shape if adjoint else self._out_shape
        b = self.backend
        if b is not None and params_in:
            leaves, _ = b.tree_flatten(x)
        else:
            leaves = list(x) if isinstance(x, (list, tuple)) else []
            if len(leaves) != len(in_shapes) or not all(map(_is_leaf_array, leaves)):
                raise type_error(
                    argument,
                    f"an array of {self.shape[0] if adjoint else self.shape[1]} rows, or a "
                    f"list of arrays of shapes {in_shapes}",
                    x,
                    "Parameter lists are taken only where the input space is the parameter space.",
                )
        if b is None:
            return _structure_without_backend(self, leaves, in_shapes, out_shapes, adjoint)
        K = _structure_columns(leaves, in_shapes, argument)
        if K is None and 1 not in ndims:
            raise value_error(
                argument,
                "parameter-shaped arrays with a trailing column axis (*shape, K)",
                "arrays of the parameters' shapes",
                "Use matvec for a single vector.",
            )
        if columns and K not in (None, columns):
            raise value_error(argument, "parameter-shaped arrays (one vector)", f"{K} columns")
        like = leaves[0]
        out_dtype = _result_dtype(self.dtype, like)
        flat = [
            b.import_array(leaf, f"{argument}[{i}]")[0].reshape(-1 if K is None else (-1, K))
            for i, leaf in enumerate(leaves)
        ]
        X = b.concat(flat, axis=0)
        Y = self._native(X, adjoint) if K is not None else self._native_vector(X, adjoint)
        self._check_finite(Y, X, argument)
        Y = b.block_until_ready(Y)

        def hand_back(block: Any) -> Any:
            if b.owns(like):
                return _cast(block, out_dtype)
            return export_like(block, like, out_dtype, b.to_numpy)

        pieces, start = [], 0
        for shape in out_shapes:
            size = int(np.prod(shape, dtype=int))
            block = Y[start : start + size]
            pieces.append(hand_back(block.reshape(shape if K is None else (*shape, K))))
            start += size
        if params_out and params_in:
            return b.tree_flatten(x)[1](pieces)  # the caller's structure
        if params_out:
            return b.tree_flatten(b.primals)[1](pieces) if b.name != "torch" else pieces
        return pieces

    def _check_finite(self, Y: Any, X: Any, argument: str) -> None:
        b = self.backend
        if b is None or not b.is_concrete(Y) or b.all_finite(Y):
            return
        if b.is_concrete(X) and not b.all_finite(X):  # looked at only when Y is bad
            cause = (
                f"the input {argument} contains NaN or inf, and a product carries them "
                f"through. Check how {argument} was computed."
            )
        else:
            cause = (
                "Check the model's outputs and the loss on your data (e.g. log of zero, "
                "overflow in float16)."
            )
        warnings.warn(
            f"{type(self).__name__}: the product contains NaN or inf; {cause}",
            RuntimeWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        backend = "" if self.backend is None else f", backend={self.backend.name}"
        size = f"{self.shape[0]}x{self.shape[1]}"
        return f"<{size} {type(self).__name__} with dtype={self.dtype}{backend}>"


# --- composites ---------------------------------------------------------------
class _RetypedOperator(LinearOperator):
    """``A`` presented to scipy in another dtype (:meth:`LinearOperator.to_scipy`)."""

    def __init__(self, A: LinearOperator, dtype: np.dtype) -> None:
        self.A = A
        self.backend = A.backend
        self.is_symmetric = A.is_symmetric
        self._params_in, self._params_out = A._params_in, A._params_out
        super().__init__(dtype, A.shape)
        _same_spaces(self, A._in_shape, A._out_shape)

    def _native(self, X: Any, adjoint: bool) -> Any:
        return self.A._native(X, adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        return self.A._native_vector(x, adjoint)


class _ScaledOperator(LinearOperator):
    def __init__(self, A: Any, alpha: Any) -> None:
        A = _wrap(A)
        self.A, self.alpha = A, alpha
        self.backend = A.backend
        self.is_symmetric = A.is_symmetric and np.isreal(alpha)
        self._params_in, self._params_out = A._params_in, A._params_out
        super().__init__(np.result_type(A.dtype, alpha), A.shape)
        _same_spaces(self, A._in_shape, A._out_shape)

    def _native(self, X: Any, adjoint: bool) -> Any:
        alpha = np.conj(self.alpha) if adjoint else self.alpha
        return alpha * self.A._native(X, adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        alpha = np.conj(self.alpha) if adjoint else self.alpha
        return alpha * self.A._native_vector(x, adjoint)


class _SumOperator(LinearOperator):
    def __init__(self, A: Any, B: Any) -> None:
        A, B = _wrap(A), _wrap(B)
        if A.shape != B.shape:
            raise shape_error("operand", f"an operator of shape {A.shape}", B.shape)
        self.A, self.B = A, B
        self.backend = _common_backend(A, B)
        self.is_symmetric = A.is_symmetric and B.is_symmetric
        self._params_in = A._params_in or B._params_in
        self._params_out = A._params_out or B._params_out
        super().__init__(np.result_type(A.dtype, B.dtype), A.shape)
        _same_spaces(
            self, max(A._in_shape, B._in_shape, key=len), max(A._out_shape, B._out_shape, key=len)
        )

    def _native(self, X: Any, adjoint: bool) -> Any:
        return self.A._native(X, adjoint) + self.B._native(X, adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        return self.A._native_vector(x, adjoint) + self.B._native_vector(x, adjoint)


class _ProductOperator(LinearOperator):
    def __init__(self, A: Any, B: Any) -> None:
        A, B = _wrap(A), _wrap(B)
        if A.shape[1] != B.shape[0]:
            raise shape_error(
                "operand", f"an operator with {A.shape[1]} rows (to follow {A.shape})", B.shape
            )
        self.A, self.B = A, B
        self.backend = _common_backend(A, B)
        self._params_in, self._params_out = B._params_in, A._params_out
        super().__init__(np.result_type(A.dtype, B.dtype), (A.shape[0], B.shape[1]))
        _same_spaces(self, B._in_shape, A._out_shape)

    def _native(self, X: Any, adjoint: bool) -> Any:
        if adjoint:
            return self.B._native(self.A._native(X, True), True)
        return self.A._native(self.B._native(X, False), False)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        if adjoint:
            return self.B._native_vector(self.A._native_vector(x, True), True)
        return self.A._native_vector(self.B._native_vector(x, False), False)


class _AdjointOperator(LinearOperator):
    def __init__(self, A: LinearOperator) -> None:
        self.A = A
        self.backend = A.backend
        self._params_in, self._params_out = A._params_out, A._params_in
        super().__init__(A.dtype, (A.shape[1], A.shape[0]))
        _same_spaces(self, A._out_shape, A._in_shape)

    def _native(self, X: Any, adjoint: bool) -> Any:
        return self.A._native(X, not adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        return self.A._native_vector(x, not adjoint)

    def _adjoint(self) -> LinearOperator:
        return self.A


class _ScipyOperand(LinearOperator):
    """A plain scipy operator or matrix inside one of our composites.

    It computes on numpy, so native arrays make a round trip through the host.
    """

    def __init__(self, op: ScipyLinearOperator) -> None:
        self.op = op
        super().__init__(op.dtype if op.dtype is not None else np.float64, op.shape)

    # The composite that holds this operand sets it to the composite's backend.
    host_backend: Backend | None = None

    def _native(self, X: Any, adjoint: bool) -> Any:
        b = self.host_backend
        host = np.asarray(X) if b is None else b.to_numpy(X)
        Y = np.asarray(self.op.rmatmat(host) if adjoint else self.op.matmat(host))
        if b is None:
            return _to_library_of(X, Y)
        return b.import_array(Y, "operand")[0]


class IdentityLinearOperator(LinearOperator):
    r"""The identity, for damping: ``G + λ * IdentityLinearOperator(G)``.

    .. math:: I \in \mathbb{R}^{n \times n}

    Framework-free: it works on arrays of every library.

    Args:
        shape_or_like: ``n``, ``(n, n)``, or a square operator whose shape
            and dtype to take.
        dtype: The dtype (default: that of ``shape_or_like``, else float64).

    Example:
        >>> import numpy as np
        >>> from curvlinops import IdentityLinearOperator
        >>> eye = IdentityLinearOperator(3)
        >>> (2.0 * eye) @ np.ones(3)
        array([2., 2., 2.])
    """

    is_symmetric = True

    def __init__(self, shape_or_like: Any, dtype: Any = None) -> None:
        if isinstance(shape_or_like, ScipyLinearOperator):
            n, m = shape_or_like.shape
            like_dtype = shape_or_like.dtype
            self._params_in = self._params_out = getattr(shape_or_like, "_params_in", False)
        elif isinstance(shape_or_like, numbers.Integral):
            n = m = int(shape_or_like)
            like_dtype = None
        elif isinstance(shape_or_like, tuple) and len(shape_or_like) == 2:
            n, m = (int(s) for s in shape_or_like)
            like_dtype = None
        else:
            raise type_error(
                "shape_or_like", "an int n, a shape (n, n), or a square operator", shape_or_like
            )
        if n != m or n < 0:
            raise value_error("shape_or_like", "a square, non-negative shape", f"({n}, {m})")
        super().__init__(dtype or like_dtype or np.float64, (n, n))
        self._like = shape_or_like if isinstance(shape_or_like, LinearOperator) else None
        self.backend = None if self._like is None else self._like.backend

    def _native(self, X: Any, adjoint: bool) -> Any:
        return _copy_in_own_library(X)

    _native_vector = _native


# --- helpers --------------------------------------------------------------------
def _same_spaces(op: LinearOperator, in_shapes: list, out_shapes: list) -> None:
    """A composite's spaces: those of its operands (lists of shapes)."""
    op._in_shape, op._out_shape = in_shapes, out_shapes


def _wrap(op: Any) -> LinearOperator:
    if isinstance(op, LinearOperator):
        return op
    if isinstance(op, ScipyLinearOperator) or is_array(op):
        return _ScipyOperand(aslinearoperator(op))
    raise type_error("operand", "a linear operator", op)


def _common_backend(*ops: LinearOperator) -> Backend | None:
    backends = [op.backend for op in ops if op.backend is not None]
    names = sorted({b.name for b in backends})
    if len(names) > 1:
        raise TypeError(
            f"operands: expected operators of one framework, got {' and '.join(names)}. "
            "Build both operators from the same framework's model and parameters."
        )
    devices = {str(b.device) for b in backends}
    if len(devices) > 1:
        raise ValueError(
            f"operands: expected operators on one device, got {sorted(devices)}. "
            "Build both from parameters on the same device."
        )
    backend = backends[0] if backends else None
    for op in ops:
        if isinstance(op, _ScipyOperand):
            op.host_backend = backend
    return backend


def _is_scalar(x: Any) -> bool:
    # numbers only: np.isscalar is also true for strings and bytes
    return isinstance(x, numbers.Number) or (
        isinstance(x, np.ndarray) and x.ndim == 0 and x.dtype.kind in "biufc"
    )


def _is_structure(x: Any) -> bool:
    """Parameter-shaped input: a mapping, or a list/tuple of arrays or structures."""
    if isinstance(x, Mapping):
        return True
    return (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(_is_leaf_array(leaf) or _is_structure(leaf) for leaf in x)
    )


def _is_leaf_array(x: Any) -> bool:
    return is_array(x) and getattr(x, "ndim", 0) > 0


def _structure_columns(leaves: list, shapes: list, argument: str) -> int | None:
    """None for parameter-shaped leaves; K for leaves of shape ``(*shape, K)``."""
    if len(leaves) != len(shapes):
        raise value_error(
            argument, f"{len(shapes)} parameter-shaped arrays", f"{len(leaves)} arrays"
        )
    columns = set()
    for i, (leaf, shape) in enumerate(zip(leaves, shapes)):
        leaf_shape = tuple(getattr(leaf, "shape", ()))
        if leaf_shape == tuple(shape):
            columns.add(None)
        elif len(leaf_shape) == len(shape) + 1 and leaf_shape[:-1] == tuple(shape):
            columns.add(leaf_shape[-1])
        else:
            raise shape_error(
                f"{argument}[{i}]", f"shape {tuple(shape)} or {(*shape, 'K')}", leaf_shape
            )
    if len(columns) != 1:
        raise value_error(argument, "the same number of columns in every array", str(columns))
    return columns.pop()


def _structure_without_backend(
    op: LinearOperator, leaves: list, in_shapes: list, out_shapes: list, adjoint: bool
) -> list:
    """A list product of a framework-free operator, in the leaves' library."""
    K = _structure_columns(leaves, in_shapes, "x")
    xp = array_api_compat.array_namespace(leaves[0])
    X = xp.concat([xp.reshape(leaf, (-1, 1 if K is None else K)) for leaf in leaves], axis=0)
    Y = _cast(op._native(X, adjoint), _result_dtype(op.dtype, leaves[0]))
    pieces, start = [], 0
    for shape in out_shapes:
        size = int(np.prod(shape, dtype=int))
        pieces.append(xp.reshape(Y[start : start + size], shape if K is None else (*shape, K)))
        start += size
    return pieces


def _check_shape(x: Any, argument: str, rows: int, ndims: tuple[int, ...], columns: int) -> None:
    shape = tuple(x.shape)
    if len(shape) not in ndims:
        dims = " or ".join(f"{d}-d" for d in ndims)
        raise shape_error(argument, f"a {dims} array with {rows} rows", shape)
    if shape[0] != rows:
        wanted = f"shape ({rows},)" if ndims == (1, 2) else f"shape ({rows}, K)"
        raise shape_error(argument, f"{rows} rows to match the operator ({wanted})", shape)
    if columns and len(shape) == 2 and shape[1] != columns:
        raise shape_error(argument, f"a vector of shape ({rows},) or ({rows}, 1)", shape)


def _numpy_dtype(x: Any) -> np.dtype:
    dtype = x.dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        name = str(dtype).rsplit(".", 1)[-1]
        if name == "bfloat16":
            return _bfloat16()
        return np.dtype(name)


def _bfloat16() -> np.dtype:
    """The bfloat16 dtype of ``ml_dtypes`` (installed with JAX); float32 without it."""
    try:
        import ml_dtypes
    except ImportError:
        return np.dtype(np.float32)
    return np.dtype(ml_dtypes.bfloat16)


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _result_dtype(op_dtype: np.dtype, x: Any) -> np.dtype:
    """The dtype of a product: the wider of the operator's and ``x``'s float dtypes.

    Integer inputs give the operator's dtype (float32 for bfloat16 operators,
    as numpy and array-api-strict have no bfloat16); bfloat16 with float16
    gives float32.
    """
    op_dtype, x_dtype = np.dtype(op_dtype), _numpy_dtype(x)
    if not _is_float(x_dtype):
        return op_dtype if op_dtype.kind == "f" else np.dtype(np.float32)
    try:
        return np.result_type(op_dtype, x_dtype)
    except TypeError:  # numpy.exceptions.DTypePromotionError: bfloat16 and float16
        return np.dtype(np.float32)


def _cast(y: Any, dtype: np.dtype) -> Any:
    if _numpy_dtype(y) == dtype:
        return y
    xp = array_api_compat.array_namespace(y)
    return xp.astype(y, getattr(xp, dtype.name))


def _copy_in_own_library(x: Any) -> Any:
    """A fresh copy, so that a result never shares memory with an input."""
    if library_of(x) == "numpy":
        return np.array(x)
    return array_api_compat.array_namespace(x).asarray(x, copy=True)


def _to_library_of(like: Any, y: np.ndarray) -> Any:
    if library_of(like) == "numpy":
        return y
    return array_api_compat.array_namespace(like).asarray(y)
