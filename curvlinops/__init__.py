"""Matrix-free curvature operators (Hessian, GGN, Fisher, Jacobian) for PyTorch and JAX.

The operators are ``scipy.sparse.linalg.LinearOperator`` objects whose
products take and return numpy, PyTorch, JAX or CuPy arrays. Importing this
package imports no framework; the backend is loaded when an operator is built.
"""

from curvlinops import losses
from curvlinops._base import IdentityLinearOperator, LinearOperator
from curvlinops._memory import MemoryEstimate
from curvlinops._operand import ConvergenceError, ConvergenceWarning
from curvlinops.backends._cupy import to_cupyx
from curvlinops.diagonal import DiagonalLinearOperator, GGNDiagonalLinearOperator
from curvlinops.directional import rayleigh_quotient, transformation_tangent
from curvlinops.eigen import (
    MemoryBudgetError,
    eigsh,
    eigsh_memory,
    lanczos,
    max_stable_learning_rate,
    sharpness,
)
from curvlinops.estimators import (
    hutchinson_diag,
    hutchinson_diagonal,
    hutchinson_squared_fro,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)
from curvlinops.fisher import EFLinearOperator, FisherMCLinearOperator
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient import gradient_and_loss
from curvlinops.hessian import HessianLinearOperator
from curvlinops.influence import ResponseJacobianLinearOperator, influence_on_test_loss
from curvlinops.influence_factors import KeptCaptures, fit_ekfac
from curvlinops.influence_scores import InfluenceScorer
from curvlinops.inverse import (
    CGInverseLinearOperator,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
)
from curvlinops.jacobian import JacobianLinearOperator, TransposedJacobianLinearOperator
from curvlinops.kfac import (
    EKFACLinearOperator,
    FisherType,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFACType,
)
from curvlinops.papyan2020traces.spectrum import (
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
)
from curvlinops.spectral import log_spectral_density, plot_spectral_density, spectral_density
from curvlinops.submatrix import (
    BlockDiagonalLinearOperator,
    SubmatrixLinearOperator,
    restrict_params,
)

__all__ = [
    "BlockDiagonalLinearOperator",
    "CGInverseLinearOperator",
    "ConvergenceError",
    "ConvergenceWarning",
    "DiagonalLinearOperator",
    "EKFACLinearOperator",
    "EFLinearOperator",
    "FisherMCLinearOperator",
    "FisherType",
    "GGNDiagonalLinearOperator",
    "GGNLinearOperator",
    "HessianLinearOperator",
    "IdentityLinearOperator",
    "InfluenceScorer",
    "KeptCaptures",
    "JacobianLinearOperator",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "KFACType",
    "LSMRInverseLinearOperator",
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "LinearOperator",
    "MemoryBudgetError",
    "MemoryEstimate",
    "NeumannInverseLinearOperator",
    "ResponseJacobianLinearOperator",
    "SubmatrixLinearOperator",
    "TransposedJacobianLinearOperator",
    "eigsh",
    "eigsh_memory",
    "fit_ekfac",
    "gradient_and_loss",
    "hutchinson_diag",
    "hutchinson_diagonal",
    "hutchinson_squared_fro",
    "hutchinson_squared_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "influence_on_test_loss",
    "lanczos",
    "lanczos_approximate_log_spectrum",
    "lanczos_approximate_spectrum",
    "log_spectral_density",
    "losses",
    "max_stable_learning_rate",
    "plot_spectral_density",
    "rayleigh_quotient",
    "restrict_params",
    "sharpness",
    "spectral_density",
    "to_cupyx",
    "transformation_tangent",
    "xdiag",
    "xtrace",
]

__version__ = "0.1.0"
