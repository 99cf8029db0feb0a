"""CuPy: the one place that imports ``cupyx`` (lazily, when a CuPy matrix comes).

CuPy inputs need no backend object: the algorithms run on them through the
array-API namespace. Only the eigensolver dispatches to CuPy's own ARPACK-like
``cupyx.scipy.sparse.linalg.eigsh``. :func:`to_cupyx` hands an operator to
``cupyx.scipy.sparse.linalg``'s solvers with batched block products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvlinops._checks import type_error

__all__ = ["eigsh", "is_cupy_operator", "random_vector", "to_cupyx", "wrap_products"]


def is_cupy_operator(A: Any) -> bool:
    """Whether ``A`` is a CuPy array, sparse matrix or ``cupyx`` LinearOperator.

    Looks at the type's module only, so that CuPy is never imported here.
    """
    return type(A).__module__.split(".")[0] in ("cupy", "cupyx")


def eigsh(A: Any, **kwargs: Any) -> Any:
    """``cupyx.scipy.sparse.linalg.eigsh(A, **kwargs)`` (same keywords as scipy's)."""
    from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

    return cupy_eigsh(A, **kwargs)


def to_cupyx(op: Any) -> Any:
    """The operator as a ``cupyx.scipy.sparse.linalg.LinearOperator``, for CuPy's solvers.

    CuPy's solvers take curvlinops operators as they are (``eigsh`` calls
    ``A @ v``; ``cg``, ``gmres``, ``minres``, ``lobpcg`` and ``svds`` wrap any
    object with ``shape``, ``dtype``, ``matvec``, ``rmatvec`` and ``rmatmat``),
    but their wrapper has no ``matmat``: block products (``lobpcg``'s ``A @ X``,
    the singular vectors of ``svds``) then run one column at a time. The
    operator returned here has all four products, so a block of ``k`` columns is
    one vectorised pass. Vectors stay on the GPU (see the device rules).

    Args:
        op: A curvlinops operator (or any scipy ``LinearOperator``).

    Returns:
        A ``cupyx.scipy.sparse.linalg.LinearOperator`` with ``op``'s shape,
        dtype and products; it takes and returns CuPy arrays.

    Raises:
        TypeError: If ``op`` is not a scipy ``LinearOperator``.
        ImportError: If CuPy (with ``cupyx.scipy.sparse.linalg``) is missing.

    Example:
        >>> import cupy, cupyx.scipy.sparse.linalg as cla  # doctest: +SKIP
        >>> w, V = cla.lobpcg(to_cupyx(G), cupy.random.randn(G.shape[0], 4))  # doctest: +SKIP
    """
    _check_operator(op)
    return wrap_products(_cupyx_linear_operator(), op)


def wrap_products(linear_operator: Callable[..., Any], op: Any) -> Any:
    """``linear_operator(shape, matvec, rmatvec, matmat, dtype, rmatmat)`` from ``op``.

    scipy's and cupyx's ``LinearOperator`` share this signature, so the
    wrapping is tested on CPU with scipy's.

    Example:
        >>> import numpy as np, scipy.sparse.linalg as sla
        >>> from curvlinops import IdentityLinearOperator
        >>> A = wrap_products(sla.LinearOperator, 2.0 * IdentityLinearOperator(3))
        >>> A.matmat(np.ones((3, 2)))
        array([[2., 2.],
               [2., 2.],
               [2., 2.]])
    """
    _check_operator(op)
    return linear_operator(
        op.shape,
        matvec=op.matvec,
        rmatvec=op.rmatvec,
        matmat=op.matmat,
        rmatmat=op.rmatmat,
        dtype=op.dtype,
    )


def _cupyx_linear_operator() -> Callable[..., Any]:
    try:
        from cupyx.scipy.sparse.linalg import LinearOperator
    except (ImportError, OSError) as error:
        raise ImportError(
            "to_cupyx needs CuPy with cupyx.scipy.sparse.linalg "
            f"({type(error).__name__}: {error}). Install it with: pip install "
            "'curvlinops[cupy]' (cupyx.scipy.sparse.linalg also needs the CUDA libraries: "
            "pip install 'cupy-cuda12x[ctk]')."
        ) from error
    return LinearOperator


def _check_operator(op: Any) -> None:
    from scipy.sparse.linalg import LinearOperator

    if not isinstance(op, LinearOperator):
        raise type_error("op", "a curvlinops (or scipy) LinearOperator", op)


def random_vector(n: int, dtype: Any, seed: int) -> Any:
    """A seeded standard-normal CuPy vector (the default start vector of ``eigsh``)."""
    import cupy

    return cupy.random.default_rng(seed).standard_normal(n, dtype=dtype)
