"""Estimators with curvlinops-for-pytorch 3.0.1's signature, for its module paths.

3.0.1's estimators take ``(A, num_matvecs, distribution="rademacher")`` with
``distribution`` positional; :mod:`curvlinops.estimators` takes it (and its
own options) by keyword.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

__all__ = ["positional_distribution"]


def positional_distribution(estimator: Callable) -> Callable:
    """``estimator`` callable as ``(A, num_matvecs, distribution="rademacher", **options)``."""

    @functools.wraps(estimator)
    def with_3_0_1_signature(
        A: Any, num_matvecs: int, distribution: str = "rademacher", **options: Any
    ) -> Any:
        return estimator(A, num_matvecs, distribution=distribution, **options)

    del with_3_0_1_signature.__wrapped__  # inspect.signature shows this one
    with_3_0_1_signature.__signature__ = inspect.signature(with_3_0_1_signature)
    return with_3_0_1_signature


def lazy_attributes(module: str, names: list[str], source: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that hands out ``names`` from ``source`` on first use.

    The PyTorch functions of 3.0.1's helper modules live in
    :mod:`curvlinops.backends`; this keeps importing those modules framework-free.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            import importlib

            return getattr(importlib.import_module(source), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
