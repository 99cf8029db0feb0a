"""curvlinops-for-pytorch 3.0.1's ``curvlinops.experimental`` (PyTorch, loaded on first use)."""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._activation_hessian_torch import (  # noqa: F401
        ActivationHessianLinearOperator,
    )


__all__ = ["ActivationHessianLinearOperator"]

__getattr__ = lazy_attributes(__name__, __all__, "curvlinops.backends._activation_hessian_torch")
