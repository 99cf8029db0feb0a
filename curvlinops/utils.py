"""Helpers of curvlinops-for-pytorch 3.0.1's ``curvlinops.utils`` that its users import."""

from __future__ import annotations

from typing import Any

import numpy as np

from curvlinops._checks import shape_error
from curvlinops._operand import _host_copy

__all__ = ["allclose_report"]


def allclose_report(tensor1: Any, tensor2: Any, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """``allclose`` that prints the entries that differ, and the scales of both arrays.

    Args:
        tensor1: An array of any library (torch, numpy, JAX); compared on the host.
        tensor2: An array of the same shape (or broadcastable to it).
        rtol: Relative tolerance: ``|a - b| <= atol + rtol * |b|``.
        atol: Absolute tolerance.

    Returns:
        Whether all entries are close.

    Example:
        >>> import numpy as np
        >>> from curvlinops.utils import allclose_report
        >>> allclose_report(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
        at index (1,): 2.00000e+00 vs 2.50000e+00 (ratio 8.00000e-01)
        largest |entry|: 2.00000e+00 vs 2.50000e+00; smallest: 1.00000e+00 vs 1.00000e+00
        1 of 2 entries differ (rtol = 1e-05, atol = 1e-08)
        False
    """
    a = _host_copy(tensor1, "tensor1").astype(np.float64)
    b = _host_copy(tensor2, "tensor2").astype(np.float64)
    try:
        a, b = np.broadcast_arrays(np.atleast_1d(a), np.atleast_1d(b))
    except ValueError as error:
        raise shape_error("tensor2", f"an array broadcastable to {a.shape}", b.shape) from error
    close = np.isclose(a, b, rtol=rtol, atol=atol)
    if close.all():
        return True
    with np.errstate(divide="ignore", invalid="ignore"):
        for index in zip(*np.nonzero(~close)):
            ratio = a[index] / b[index]
            where = tuple(int(i) for i in index)
            print(f"at index {where}: {a[index]:.5e} vs {b[index]:.5e} (ratio {ratio:.5e})")
    print(
        f"largest |entry|: {np.abs(a).max():.5e} vs {np.abs(b).max():.5e}; "
        f"smallest: {np.abs(a).min():.5e} vs {np.abs(b).min():.5e}"
    )
    print(f"{int((~close).sum())} of {close.size} entries differ (rtol = {rtol}, atol = {atol})")
    return False
