"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace.hutchinson``.

:func:`curvlinops.estimators.hutchinson_trace` under that module path.
"""

from curvlinops.estimators import hutchinson_trace

__all__ = ["hutchinson_trace"]
