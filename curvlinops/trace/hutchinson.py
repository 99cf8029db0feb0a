"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.hutchinson``: :func:`hutchinson_trace`.

:func:`curvlinops.estimators.hutchinson_trace`, taking ``distribution`` also positionally.
"""

from curvlinops import estimators
from curvlinops._cfp_signatures import positional_distribution

__all__ = ["hutchinson_trace"]

hutchinson_trace = positional_distribution(estimators.hutchinson_trace)
