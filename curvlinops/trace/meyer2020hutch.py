"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.meyer2020hutch``: :func:`hutchpp_trace`.

:func:`curvlinops.estimators.hutchpp_trace`, taking ``distribution`` also positionally.
"""

from curvlinops import estimators
from curvlinops._cfp_signatures import positional_distribution

__all__ = ["hutchpp_trace"]

hutchpp_trace = positional_distribution(estimators.hutchpp_trace)
