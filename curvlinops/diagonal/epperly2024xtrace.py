"""curvlinops-for-pytorch 3.0.1's ``curvlinops.diagonal.epperly2024xtrace``: :func:`xdiag`.

:func:`curvlinops.estimators.xdiag`, taking ``distribution`` also positionally.
"""

from curvlinops import estimators
from curvlinops._cfp_signatures import positional_distribution

__all__ = ["xdiag"]

xdiag = positional_distribution(estimators.xdiag)
