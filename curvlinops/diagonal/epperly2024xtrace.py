"""curvlinops-for-pytorch 3.0.1's ``curvlinops.diagonal.epperly2024xtrace``.

:func:`curvlinops.estimators.xdiag` under that module path.
"""

from curvlinops.estimators import xdiag

__all__ = ["xdiag"]
