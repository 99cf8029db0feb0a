"""curvlinops-for-pytorch 3.0.1's ``curvlinops.experimental.activation_hessian``.

:class:`ActivationHessianLinearOperator` and ``store_activation``, from
:mod:`curvlinops.backends._activation_hessian_torch` on first use.
"""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._activation_hessian_torch import (  # noqa: F401
        ActivationHessianLinearOperator,
        store_activation,
    )


__all__ = ["ActivationHessianLinearOperator", "store_activation"]

__getattr__ = lazy_attributes(__name__, __all__, "curvlinops.backends._activation_hessian_torch")
