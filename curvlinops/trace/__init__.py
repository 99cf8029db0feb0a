"""Trace estimators under curvlinops-for-pytorch 3.0.1's module paths.

``curvlinops.trace.hutchinson.hutchinson_trace``,
``curvlinops.trace.meyer2020hutch.hutchpp_trace`` and
``curvlinops.trace.epperly2024xtrace.xtrace`` are :mod:`curvlinops.estimators`'
functions (``distribution`` may also be given positionally, as in 3.0.1).
"""
