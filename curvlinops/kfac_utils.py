"""curvlinops-for-pytorch 3.0.1's ``curvlinops.kfac_utils`` (PyTorch).

``loss_hessian_matrix_sqrt(output_one_datum, target_one_datum, loss_func)``,
``extract_patches(x, kernel_size, stride, padding, dilation, groups)`` and
``extract_averaged_patches(...)``, from :mod:`curvlinops.backends._cfp_torch`
on first use (importing this module imports no framework).
"""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._cfp_torch import (  # noqa: F401
        extract_averaged_patches,
        extract_patches,
        loss_hessian_matrix_sqrt,
    )


__all__ = ["extract_averaged_patches", "extract_patches", "loss_hessian_matrix_sqrt"]

__getattr__ = lazy_attributes(__name__, __all__, "curvlinops.backends._cfp_torch")
