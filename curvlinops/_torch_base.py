"""curvlinops-for-pytorch 3.0.1's ``curvlinops._torch_base``: its operator base classes.

``PyTorchLinearOperator`` and ``CurvatureLinearOperator`` live in
:mod:`curvlinops.backends._torch_compat`; this module hands them out on first
use, so that importing it imports no framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._torch_compat import (  # noqa: F401
        CurvatureLinearOperator,
        PyTorchLinearOperator,
    )


__all__ = ["CurvatureLinearOperator", "PyTorchLinearOperator"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("curvlinops.backends._torch_compat"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
