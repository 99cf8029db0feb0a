"""Products traced for solvers that compile their whole loop (JAX operands).

No framework is imported here: :mod:`curvlinops.backends._krylov_jax` does the
tracing, imported only for JAX operands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from curvlinops._linearization import solver_trace
from curvlinops._operand import Operand

__all__ = ["traced_product"]


def traced_product(
    op: Operand, columns: int, product: Callable[[Any], Any] | None = None
) -> tuple[Any, list] | None:
    """``product`` (default ``op.matmat``) on ``(n, columns)`` arrays traced: program, arrays.

    ``None`` where the operand is not a JAX one, or its product cannot run inside a
    compiled loop (it reads values on the host, or streams its data from a
    loader), or would run slower in a loop than called step by step
    (convolutions on the CPU: :func:`~curvlinops.backends._krylov_jax.slow_in_loops`):
    the solver then steps eagerly, each product one compiled call. Kept
    linearizations are read, not rebuilt, and become arguments of the program;
    tracing counts no product.
    """
    if op.library != "jax":
        return None
    from curvlinops.backends import _krylov_jax

    products = op.num_products
    try:
        with solver_trace() as trace:
            traced = _krylov_jax.trace_product(product or op.matmat, op.shape[0], columns, op.dtype)
    except _krylov_jax.TRACE_ERRORS:
        return None
    finally:
        op.num_products = products
    if trace.streamed or _krylov_jax.slow_in_loops(traced[0], _platform(op.device)):
        return None
    return traced


def _platform(device: Any) -> str:
    """``"cpu"``, ``"gpu"``, ... of a JAX device (``"cpu"`` when it says nothing)."""
    return str(getattr(device, "platform", "cpu"))
