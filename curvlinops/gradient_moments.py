"""curvlinops-for-pytorch 3.0.1's ``curvlinops.gradient_moments``: the empirical Fisher."""

from curvlinops.fisher import EFLinearOperator

__all__ = ["EFLinearOperator"]
