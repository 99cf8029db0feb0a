"""curvlinops-for-pytorch 3.0.1's ``curvlinops.trace``: its trace estimators' module paths.

``curvlinops.trace.hutchinson.hutchinson_trace``,
``curvlinops.trace.meyer2020hutch.hutchpp_trace`` and
``curvlinops.trace.epperly2024xtrace.xtrace`` are the functions of
:mod:`curvlinops.estimators`.
"""
