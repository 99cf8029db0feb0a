"""Helpers of curvlinops-for-pytorch 3.0.1's ``curvlinops.utils`` that its users import."""

from __future__ import annotations

from typing import Any

import numpy as np

from curvlinops._checks import shape_error, value_error
from curvlinops._operand import _host_copy

__all__ = [
    "allclose_report",
    "assert_divisible_by",
    "assert_is_square",
    "assert_matvecs_subseed_dim",
    "split_list",
]


def split_list(x: list | tuple, sizes: list[int]) -> list[list]:
    """``x`` cut into consecutive lists of ``sizes`` entries (which must add up to ``len(x)``).

    Example:
        >>> from curvlinops.utils import split_list
        >>> split_list([1, 2, 3], [1, 2])
        [[1], [2, 3]]
    """
    if len(x) != sum(sizes):
        raise value_error(
            "sizes", f"sizes adding up to len(x) = {len(x)}", f"a sum of {sum(sizes)}"
        )
    bounds = np.cumsum([0, *sizes])
    return [list(x[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]


def assert_is_square(A: Any) -> int:
    """The size ``n`` of a square ``A`` (anything with ``.shape``); else ValueError."""
    if len(A.shape) != 2 or A.shape[0] != A.shape[1]:
        raise shape_error("A", "a square operator", tuple(A.shape))
    return int(A.shape[0])


def assert_matvecs_subseed_dim(A: Any, num_matvecs: int) -> None:
    """ValueError unless ``num_matvecs`` is below each of ``A``'s dimensions."""
    if any(num_matvecs >= d for d in A.shape):
        raise value_error("num_matvecs", f"fewer than A's size {tuple(A.shape)}", str(num_matvecs))


def assert_divisible_by(num: int, divisor: int, name: str) -> None:
    """ValueError unless ``num`` (the argument ``name``) is a multiple of ``divisor``."""
    if num % divisor != 0:
        raise value_error(name, f"a multiple of {divisor}", str(num))


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
