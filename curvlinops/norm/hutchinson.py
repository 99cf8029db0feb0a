"""curvlinops-for-pytorch 3.0.1's ``curvlinops.norm.hutchinson``: :func:`hutchinson_squared_fro`."""

from curvlinops.estimators import hutchinson_squared_fro

__all__ = ["hutchinson_squared_fro"]
