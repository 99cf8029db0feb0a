"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.meyer2020hutch``.

:func:`curvlinops.estimators.hutchpp_trace` under that module path.
"""

from curvlinops.estimators import hutchpp_trace

__all__ = ["hutchpp_trace"]
