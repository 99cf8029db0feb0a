"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.epperly2024xtrace``.

:func:`curvlinops.estimators.xtrace` under that module path.
"""

from curvlinops.estimators import xtrace

__all__ = ["xtrace"]
