"""curvlinops-for-pytorch 3.0.1's ``curvlinops._torch_base``: its operator base classes.

``PyTorchLinearOperator`` and ``CurvatureLinearOperator`` live in
:mod:`curvlinops.backends._torch_compat`; this module hands them out on first
use, so that importing it imports no framework.
"""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._torch_compat import (  # noqa: F401
        CurvatureLinearOperator,
        PyTorchLinearOperator,
    )

__all__ = ["CurvatureLinearOperator", "PyTorchLinearOperator"]

__getattr__ = lazy_attributes(__name__, __all__, "curvlinops.backends._torch_compat")
