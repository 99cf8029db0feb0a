"""curvlinops-for-pytorch 3.0.1's ``curvlinops.ekfac``.

:class:`~curvlinops.EKFACLinearOperator` (with ``FisherType`` and ``KFACType``)
and ``compute_eigenvalue_correction_linear_weight_sharing`` (PyTorch, from
:mod:`curvlinops.backends._cfp_torch` on first use).
"""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes
from curvlinops.kfac import EKFACLinearOperator, FisherType, KFACType

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._cfp_torch import (  # noqa: F401
        compute_eigenvalue_correction_linear_weight_sharing,
    )


__all__ = [
    "EKFACLinearOperator",
    "FisherType",
    "KFACType",
    "compute_eigenvalue_correction_linear_weight_sharing",
]

__getattr__ = lazy_attributes(
    __name__,
    ["compute_eigenvalue_correction_linear_weight_sharing"],
    "curvlinops.backends._cfp_torch",
)
