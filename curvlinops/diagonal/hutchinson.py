"""curvlinops-for-pytorch 3.0.1's ``curvlinops.diagonal.hutchinson``: :func:`hutchinson_diag`."""

from curvlinops.estimators import hutchinson_diag

__all__ = ["hutchinson_diag"]
