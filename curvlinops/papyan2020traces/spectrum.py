r"""Lanczos spectral densities of Papyan (2020), with curvlinops-for-pytorch 3.0.1's interface.

:func:`lanczos_approximate_spectrum` estimates the density
:math:`p(\lambda) = \frac1n \sum_i \delta(\lambda - \lambda_i)` of a symmetric
:math:`A` as algorithm 2 of Papyan (2020): the spectrum is mapped to
:math:`[-1, 1]` with the extreme eigenvalues (from ``eigsh``, padded by
``margin``), each of ``num_repeats`` Lanczos runs of ``ncv`` steps from a
random unit vector (no reorthogonalisation) gives a Gauss quadrature
(nodes :math:`\theta_j`, weights :math:`\tau_j`), and each node becomes a
Gaussian bump of width :math:`\sigma = 2 / ((\mathrm{ncv} - 1)\sqrt{8 \ln\kappa})`
on :math:`[-1, 1]`. :func:`lanczos_approximate_log_spectrum` does the same for
:math:`\log(|A| + \epsilon I)` and returns the density over :math:`\lambda`
on a logarithmic grid.

The functions take an operator of this library (either backend), a scipy
``LinearOperator`` or a dense array, and return ``(grid, density)`` as arrays
of the operator's library and dtype (``torch.Tensor`` for PyTorch operators,
as in 3.0.1). The Lanczos runs go through :func:`curvlinops.eigen.lanczos`,
all repeats as the columns of one ``matmat`` per step. Start vectors come
from ``seed`` (keyword, ours): 3.0.1 drew them from PyTorch's global
generator; pass a seed for reproducible densities. :mod:`curvlinops.spectral`
offers this library's own interface (fixed kernel width, reorthogonalisation).
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
from scipy.sparse.linalg import eigsh

from curvlinops._checks import shape_error, type_error, value_error
from curvlinops._operand import (
    Operand,
    _host_copy,
    as_operand,
    check_int,
    check_real,
    raise_nonfinite,
)
from curvlinops.backends._arrays import library_of
from curvlinops.eigen import LanczosResult, lanczos

__all__ = [
    "LanczosApproximateLogSpectrumCached",
    "LanczosApproximateSpectrumCached",
    "approximate_boundaries",
    "approximate_boundaries_abs",
    "fast_lanczos",
    "lanczos_approximate_log_spectrum",
    "lanczos_approximate_log_spectrum_from_iter",
    "lanczos_approximate_spectrum",
    "lanczos_approximate_spectrum_from_iter",
]

Boundaries = tuple[Any, Any] | None


# --- the densities ---------------------------------------------------------------------------
def lanczos_approximate_spectrum(
    A: Any,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 3.0,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    *,
    seed: int | None = None,
) -> tuple[Any, Any]:
    r"""Approximate the spectral density :math:`p(\lambda)` of a symmetric ``A``.

    Args:
        A: A symmetric operator or matrix.
        ncv: Lanczos steps per run (nodes of each quadrature), ``2 <= ncv <= n``.
        num_points: Points of the grid.
        num_repeats: Lanczos runs (random start vectors) averaged over.
        kappa: Width parameter of the bumps (:math:`> 1`; larger is narrower).
        boundaries: ``(lambda_min, lambda_max)``; an entry ``None`` (or all of
            it) is estimated with ``eigsh``.
        margin: Padding of the interval, relative to its width.
        boundaries_tol: Relative accuracy of the ``eigsh`` estimates.
        seed: Seed of the start vectors (``None``: fresh randomness).

    Returns:
        ``(grid, density)``, each of shape ``(num_points,)``, in ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops import lanczos_approximate_spectrum
        >>> A = np.diag(np.linspace(1.0, 2.0, 50))
        >>> grid, density = lanczos_approximate_spectrum(A, ncv=20, num_repeats=3, seed=0)
        >>> round(float(np.trapezoid(density, grid)), 2)
        1.0
    """
    op, options = _checked(A, ncv, num_points, num_repeats, kappa, margin)
    bounds = approximate_boundaries(op, _tolerance(boundaries_tol), boundaries)
    nodes, weights = _quadratures(op, ncv, num_repeats, _seed_sequence(seed))
    grid, density = _linear_density(nodes, weights, bounds, *options)
    return _in_library_of(op, grid), _in_library_of(op, density)


def lanczos_approximate_log_spectrum(
    A: Any,
    ncv: int,
    num_points: int = 1024,
    num_repeats: int = 1,
    kappa: float = 1.04,
    boundaries: Boundaries = None,
    margin: float = 0.05,
    boundaries_tol: float = 1e-2,
    epsilon: float = 1e-5,
    *,
    seed: int | None = None,
) -> tuple[Any, Any]:
    r"""Approximate the spectral density of :math:`\log(|A| + \epsilon I)`, over :math:`\lambda`.

    The grid is logarithmic, from about :math:`\min|\lambda| + \epsilon` to
    :math:`\max|\lambda| + \epsilon` (padded in log space); the density is that
    of :math:`|\lambda| + \epsilon` (natural log inside).

    Args:
        A: A symmetric operator or matrix.
        ncv, num_points, num_repeats, margin, boundaries_tol, seed: As for
            :func:`lanczos_approximate_spectrum`.
        kappa: Width parameter of the bumps (:math:`> 1`).
        boundaries: ``(min |lambda|, max |lambda|)``, entries estimated with
            ``eigsh`` where ``None``.
        epsilon: Shift :math:`\epsilon > 0` before the logarithm.

    Returns:
        ``(grid, density)`` in ``A``'s library.
    """
    op, options = _checked(A, ncv, num_points, num_repeats, kappa, margin)
    epsilon = check_real(epsilon, "epsilon", minimum=0.0, strict=True)
    bounds = approximate_boundaries_abs(op, _tolerance(boundaries_tol), boundaries)
    nodes, weights = _quadratures(op, ncv, num_repeats, _seed_sequence(seed))
    grid, density = _log_density(nodes, weights, bounds, *options, epsilon)
    return _in_library_of(op, grid), _in_library_of(op, density)


class _LanczosSpectrumCached:
    """Keeps the Lanczos quadratures, so densities with other settings cost no products."""

    def __init__(self, A: Any, ncv: int, seed: int | None) -> None:
        self._op = as_operand(A)
        self._ncv = _check_ncv(ncv, self._op.shape[0])
        self._seeds = _seed_sequence(seed)
        self._nodes = np.zeros((0, self._ncv))
        self._weights = np.zeros((0, self._ncv))

    def _quadratures(self, num_repeats: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``num_repeats`` quadratures, running the missing ones together."""
        missing = check_int(num_repeats, "num_repeats") - self._nodes.shape[0]
        if missing > 0:
            nodes, weights = _quadratures(self._op, self._ncv, missing, self._seeds)
            self._nodes = np.concatenate([self._nodes, nodes])
            self._weights = np.concatenate([self._weights, weights])
        return self._nodes[:num_repeats], self._weights[:num_repeats]


class LanczosApproximateSpectrumCached(_LanczosSpectrumCached):
    r"""The density of :func:`lanczos_approximate_spectrum`, for several settings at little cost.

    The Lanczos runs are kept: a new ``kappa``, ``margin`` or ``num_points``
    costs no products, and more ``num_repeats`` cost only the new runs.

    Args:
        A: A symmetric operator or matrix.
        ncv: Lanczos steps per run.
        boundaries: ``(lambda_min, lambda_max)``, entries estimated where ``None``.
        boundaries_tol: Relative accuracy of the ``eigsh`` estimates.
        seed: Seed of the start vectors (``None``: fresh randomness).
    """

    def __init__(
        self,
        A: Any,
        ncv: int,
        boundaries: Boundaries = None,
        boundaries_tol: float = 1e-2,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(A, ncv, seed)
        self._boundaries = approximate_boundaries(self._op, _tolerance(boundaries_tol), boundaries)

    def approximate_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
    ) -> tuple[Any, Any]:
        """``(grid, density)`` as :func:`lanczos_approximate_spectrum` computes them."""
        options = _check_density_options(num_points, kappa, margin)
        nodes, weights = self._quadratures(num_repeats)
        grid, density = _linear_density(nodes, weights, self._boundaries, *options)
        return _in_library_of(self._op, grid), _in_library_of(self._op, density)


class LanczosApproximateLogSpectrumCached(_LanczosSpectrumCached):
    r"""The density of :func:`lanczos_approximate_log_spectrum`, for several settings.

    Args:
        A: A symmetric operator or matrix.
        ncv: Lanczos steps per run.
        boundaries: ``(min |lambda|, max |lambda|)``, entries estimated where ``None``.
        boundaries_tol: Relative accuracy of the ``eigsh`` estimates.
        seed: Seed of the start vectors (``None``: fresh randomness).
    """

    def __init__(
        self,
        A: Any,
        ncv: int,
        boundaries: Boundaries = None,
        boundaries_tol: float = 1e-2,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(A, ncv, seed)
        self._boundaries = approximate_boundaries_abs(
            self._op, _tolerance(boundaries_tol), boundaries
        )

    def approximate_log_spectrum(
        self,
        num_repeats: int = 1,
        num_points: int = 1024,
        kappa: float = 3.0,
        margin: float = 0.05,
        epsilon: float = 1e-5,
    ) -> tuple[Any, Any]:
        """``(grid, density)`` as :func:`lanczos_approximate_log_spectrum` computes them.

        The default ``kappa`` is 3, not the function's 1.04 (as in 3.0.1).
        """
        options = _check_density_options(num_points, kappa, margin)
        epsilon = check_real(epsilon, "epsilon", minimum=0.0, strict=True)
        nodes, weights = self._quadratures(num_repeats)
        grid, density = _log_density(nodes, weights, self._boundaries, *options, epsilon)
        return _in_library_of(self._op, grid), _in_library_of(self._op, density)


# --- the pieces, under 3.0.1's names ---------------------------------------------------------
def fast_lanczos(A: Any, ncv: int, *, seed: int | None = None) -> tuple[Any, Any]:
    """One Lanczos run without reorthogonalisation: eigenpairs of its tridiagonal matrix.

    Args:
        A: A symmetric operator or matrix.
        ncv: Lanczos steps.
        seed: Seed of the start vector (``None``: fresh randomness).

    Returns:
        ``(evals, evecs)`` in ``A``'s library; ``evecs[:, i]`` belongs to ``evals[i]``.
    """
    op = as_operand(A)
    ncv = _check_ncv(ncv, op.shape[0])
    T = _tridiagonals(op, ncv, 1, _seed_sequence(seed))[0]
    evals, evecs = np.linalg.eigh(T)
    return _in_library_of(op, evals), _in_library_of(op, evecs)


def lanczos_approximate_spectrum_from_iter(
    lanczos_iter: tuple[Any, Any],
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
) -> tuple[Any, Any]:
    """The density of one quadrature ``(evals, evecs)`` (e.g. from :func:`fast_lanczos`)."""
    evals, nodes, weights = _quadrature_of(lanczos_iter)
    options = _check_density_options(num_points, kappa, margin)
    grid, density = _linear_density(nodes, weights, _pair(boundaries), *options)
    return _like(evals, grid), _like(evals, density)


def lanczos_approximate_log_spectrum_from_iter(
    lanczos_iter: tuple[Any, Any],
    boundaries: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: float,
) -> tuple[Any, Any]:
    """The log-density of one quadrature ``(evals, evecs)``."""
    evals, nodes, weights = _quadrature_of(lanczos_iter)
    options = _check_density_options(num_points, kappa, margin)
    epsilon = check_real(epsilon, "epsilon", minimum=0.0, strict=True)
    grid, density = _log_density(nodes, weights, _pair(boundaries), *options, epsilon)
    return _like(evals, grid), _like(evals, density)


def approximate_boundaries(
    A: Any, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    """Smallest and largest eigenvalue of a symmetric ``A`` by ``eigsh``; given entries are kept."""
    low, high = _pair(boundaries, allow_none=True)
    if low is None and high is None:
        low, high = _eigsh(A, tol, "BE", 2)
    elif low is None:
        (low,) = _eigsh(A, tol, "SA", 1)
    elif high is None:
        (high,) = _eigsh(A, tol, "LA", 1)
    return float(low), float(high)


def approximate_boundaries_abs(
    A: Any, tol: float = 1e-2, boundaries: Boundaries = None
) -> tuple[float, float]:
    """Smallest and largest ``|eigenvalue|`` of a symmetric ``A`` by ``eigsh``."""
    low, high = _pair(boundaries, allow_none=True)
    if high is None:
        (high,) = _eigsh(A, tol, "LM", 1)
    if low is None:
        (low,) = _eigsh(A, tol, "SM", 1)
    return abs(float(low)), abs(float(high))


# --- internals ---------------------------------------------------------------------------------
def _checked(
    A: Any, ncv: Any, num_points: Any, num_repeats: Any, kappa: Any, margin: Any
) -> tuple[Operand, tuple[int, float, float]]:
    op = as_operand(A)
    _check_ncv(ncv, op.shape[0])
    check_int(num_repeats, "num_repeats")
    return op, _check_density_options(num_points, kappa, margin)


def _check_ncv(ncv: Any, n: int) -> int:
    ncv = check_int(ncv, "ncv", minimum=2)
    if ncv > n:
        raise value_error(
            "ncv", f"at most the operator's size n = {n}", str(ncv), "Lower ncv (Lanczos steps)."
        )
    return ncv


def _check_density_options(num_points: Any, kappa: Any, margin: Any) -> tuple[int, float, float]:
    num_points = check_int(num_points, "num_points", minimum=2)
    kappa = check_real(kappa, "kappa", minimum=1.0, strict=True)
    margin = check_real(margin, "margin", minimum=0.0)
    return num_points, kappa, margin


def _tolerance(tol: Any) -> float:
    return check_real(tol, "boundaries_tol", minimum=0.0)


def _pair(boundaries: Any, allow_none: bool = False) -> tuple[Any, Any]:
    if boundaries is None and allow_none:
        return None, None
    if not isinstance(boundaries, (tuple, list)) or len(boundaries) != 2:
        raise type_error("boundaries", "a pair (lower, upper) of numbers", boundaries)
    return tuple(
        None if b is None and allow_none else check_real(float(b), "boundaries") for b in boundaries
    )


def _seed_sequence(seed: Any) -> np.random.SeedSequence:
    if seed is None:
        return np.random.SeedSequence()
    return np.random.SeedSequence(check_int(seed, "seed", minimum=0))


def _tridiagonals(op: Operand, ncv: int, runs: int, seeds: np.random.SeedSequence) -> np.ndarray:
    """Lanczos tridiagonal matrices ``(runs, ncv, ncv)`` from unit normal start vectors."""
    (child,) = seeds.spawn(1)  # new start vectors on every call (cached classes grow)
    V = op.random((op.shape[0], runs), int(child.generate_state(1)[0]), "normal")
    V = V / op.xp.linalg.vector_norm(V, axis=0)
    result = lanczos(op, ncv, reorthogonalize=False, v0=V, keep_basis=False)
    host = op.to_host(op.xp.concat([result.alphas, result.betas], axis=1)).astype(np.float64)
    if not np.isfinite(host).all():
        raise_nonfinite("lanczos_approximate_spectrum")
    return LanczosResult(host[:, :ncv], host[:, ncv:], None).tridiagonal()


def _quadratures(
    op: Operand, ncv: int, runs: int, seeds: np.random.SeedSequence
) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights ``(runs, ncv)`` of the Gauss quadratures, on the host."""
    theta, S = np.linalg.eigh(_tridiagonals(op, ncv, runs, seeds))
    return theta, S[:, 0, :] ** 2


def _quadrature_of(lanczos_iter: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    if not isinstance(lanczos_iter, (tuple, list)) or len(lanczos_iter) != 2:
        raise type_error("lanczos_iter", "a pair (evals, evecs) from fast_lanczos", lanczos_iter)
    evals, evecs = lanczos_iter
    nodes = _host_copy(evals, "lanczos_iter[0]").astype(np.float64)
    vectors = _host_copy(evecs, "lanczos_iter[1]").astype(np.float64)
    if nodes.ndim != 1 or vectors.shape != (nodes.size, nodes.size) or nodes.size < 2:
        raise shape_error("lanczos_iter", "evals (m,) and evecs (m, m) with m >= 2", vectors.shape)
    return evals, nodes[None, :], vectors[None, 0, :] ** 2


def _bump_width(ncv: int, kappa: float) -> float:
    """Width of the Gaussian bumps on ``[-1, 1]`` (Papyan, 2020, Section D.2)."""
    return 2.0 / (ncv - 1) / math.sqrt(8.0 * math.log(kappa))


def _bumps(points: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``mean over runs of sum_j weights_j N(points; nodes_j, sigma^2)``."""
    z = (points[:, None] - nodes.reshape(1, -1)) / sigma
    kernel = np.exp(-0.5 * z**2) / (sigma * math.sqrt(2.0 * math.pi))
    return kernel @ weights.reshape(-1) / nodes.shape[0]


def _unit_interval(low: float, high: float, margin: float) -> tuple[float, float, float, float]:
    """The padded interval ``[low, high]`` and the centre and half-width mapping it to [-1, 1]."""
    padding = margin * (high - low)
    low, high = low - padding, high + padding
    return low, high, (high + low) / 2.0, (high - low) / 2.0


def _linear_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    bounds: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    low, high, center, half = _unit_interval(*bounds, margin)
    _check_width(half, "boundaries")
    unit = np.linspace(-1.0, 1.0, num_points)
    sigma = _bump_width(nodes.shape[1], kappa)
    density = _bumps(unit, (nodes - center) / half, weights / half, sigma)
    return np.linspace(low, high, num_points), density


def _log_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    bounds: tuple[float, float],
    num_points: int,
    kappa: float,
    margin: float,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    low, high = (math.log(b + epsilon) for b in bounds)
    _, _, center, half = _unit_interval(low, high, margin)
    _check_width(half, "boundaries (of |A|)")
    unit = np.linspace(-1.0, 1.0, num_points)
    grid = np.exp(unit * half + center)
    unit_nodes = (np.log(np.abs(nodes) + epsilon) - center) / half
    sigma = _bump_width(nodes.shape[1], kappa)
    return grid, _bumps(unit, unit_nodes, weights, sigma) / (half * grid)


def _check_width(half: float, argument: str) -> None:
    if not half > 0:
        raise value_error(
            argument,
            "an interval of positive width (lower < upper)",
            f"half-width {half}",
            "A multiple of the identity has no spread; pass boundaries around its eigenvalue.",
        )


def _eigsh(A: Any, tol: float, which: str, k: int) -> np.ndarray:
    """Eigenvalues by scipy's ``eigsh`` on the host, in float64 (as 3.0.1's ``to_scipy``)."""
    op = as_operand(A)
    if op.shape[0] <= k:
        raise value_error(
            "A", f"an operator larger than {k} x {k} for eigsh", str(op.shape), "Pass boundaries."
        )

    def matmat(X: np.ndarray) -> np.ndarray:
        native = op.from_host(np.asarray(X, dtype=op.dtype).reshape(op.shape[0], -1))
        return op.to_host(op.matmat(native)).astype(np.float64)

    host_op = ScipyLinearOperator(
        op.shape,
        matvec=lambda x: matmat(x)[:, 0],
        matmat=matmat,
        dtype=np.float64,
    )
    return np.sort(eigsh(host_op, k=k, which=which, tol=tol, return_eigenvectors=False))


def _in_library_of(op: Operand, host: np.ndarray) -> Any:
    """A host result as an array of the operand's library, dtype and device."""
    return op.from_host(np.asarray(host, dtype=op.dtype))


def _like(like: Any, host: np.ndarray) -> Any:
    """A host result in the library, dtype and device of the array ``like``."""
    dtype = np.dtype(str(like.dtype).rsplit(".", 1)[-1])
    if library_of(like) == "numpy":
        return host.astype(dtype)
    xp = array_api_compat.array_namespace(like)
    return xp.asarray(host.astype(dtype), device=array_api_compat.device(like))
