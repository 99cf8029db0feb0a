"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.epperly2024xtrace``: :func:`xtrace`.

:func:`curvlinops.estimators.xtrace`, taking ``distribution`` also positionally.
"""

from curvlinops import estimators
from curvlinops._cfp_signatures import positional_distribution

__all__ = ["xtrace"]

xtrace = positional_distribution(estimators.xtrace)
