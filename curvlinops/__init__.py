"""Matrix-free curvature operators (Hessian, GGN, Jacobian) for PyTorch and JAX.

The operators are ``scipy.sparse.linalg.LinearOperator`` objects whose
products take and return numpy, PyTorch or JAX arrays. Importing this package
imports no framework; the backend is loaded when an operator is built.
"""

from curvlinops import losses
from curvlinops._base import IdentityLinearOperator, LinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.jacobian import JacobianLinearOperator, TransposedJacobianLinearOperator

__all__ = [
    "GGNLinearOperator",
    "HessianLinearOperator",
    "IdentityLinearOperator",
    "JacobianLinearOperator",
    "LinearOperator",
    "TransposedJacobianLinearOperator",
    "losses",
]

__version__ = "0.1.0"
