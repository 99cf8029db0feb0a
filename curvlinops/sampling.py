"""curvlinops-for-pytorch 3.0.1's ``curvlinops.sampling``: random vectors in PyTorch.

``rademacher(dim, device, dtype)``, ``normal(dim, device, dtype)`` and
``random_vector(dim, distribution, device, dtype)`` draw from PyTorch's global
generator (``torch.manual_seed`` makes them repeatable); ``dtype`` may be a
``torch.dtype`` or an operator's numpy ``.dtype``. Importing this module
imports no framework.
"""

from typing import TYPE_CHECKING

from curvlinops._lazy import lazy_attributes

if TYPE_CHECKING:  # the names, for type checkers (loaded on first use)
    from curvlinops.backends._cfp_torch import (  # noqa: F401
        normal,
        rademacher,
        random_vector,
    )


__all__ = ["normal", "rademacher", "random_vector"]

__getattr__ = lazy_attributes(__name__, __all__, "curvlinops.backends._cfp_torch")
