r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric :math:`n \times n` matrix :math:`A` with
eigenvalues :math:`\lambda_1, \dots, \lambda_n` is
:math:`\phi(t) = \frac1n \sum_i \delta(t - \lambda_i)`. SLQ (Golub & Meurant;
used for neural-network Hessians by Ghorbani, Krishnan & Xiao, 2019, and
Papyan, 2020) estimates its Gaussian-smoothed version
:math:`\phi_\sigma(t) = \frac1n \sum_i g_\sigma(t - \lambda_i)`: for a random unit
vector :math:`v` (Rademacher entries scaled by :math:`1/\sqrt n`),
:math:`v^\top g_\sigma(t - A) v` is an unbiased estimate of :math:`\phi_\sigma(t)`,
and :math:`m` Lanczos steps from :math:`v` turn it into the Gauss quadrature
:math:`\sum_{j=1}^m \tau_j g_\sigma(t - \theta_j)`, with the eigenvalues
:math:`\theta_j` of the tridiagonal :math:`T` as nodes and the squared first
components :math:`\tau_j = (e_1^\top s_j)^2` of its eigenvectors as weights.
The estimate averages over several probes, which run as the columns of one
``matmat`` per Lanczos step.

Normalisation: the weights of each probe sum to 1, so the density integrates
to 1 (multiply it by :math:`n` for an eigenvalue count per unit of :math:`t`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops._checks import shape_error, type_error, value_error
from curvlinops._memory import MemoryEstimate
from curvlinops._operand import (
    Operand,
    as_operand,
    check_choice,
    check_int,
    check_real,
    raise_nonfinite,
)
from curvlinops.backends._arrays import is_array, library_of
from curvlinops.eigen import LanczosResult, _lanczos, lanczos_memory

__all__ = [
    "SpectralDensity",
    "log_spectral_density",
    "plot_spectral_density",
    "spectral_density",
]

DEFAULT_NUM_POINTS = 1024
PADDING = 5.0
"""Default grids reach this many kernel widths beyond the outermost nodes."""


@dataclass
class SpectralDensity:
    r"""A smoothed spectral density on a grid, and the quadrature it came from.

    Unpacks as ``grid, density = spectral_density(...)``.

    Attributes:
        grid: Points :math:`t` (eigenvalues, or :math:`\log_{10}` of eigenvalues
            for :func:`log_spectral_density`), shape ``(num_points,)``.
        density: :math:`\phi_\sigma(t)` on ``grid``; integrates to 1 over the real
            line (on the default grid, up to ~1e-6).
        nodes: Ritz values :math:`\theta`, shape ``(num_probes, num_steps)``.
        weights: Quadrature weights :math:`\tau` (each row sums to 1).
        kernel_width: :math:`\sigma` of the Gaussian kernel, in units of ``grid``.
        scale: ``"linear"`` or ``"log10"``.
        floor: For ``"log10"``: eigenvalues at or below it were counted at it.
        mass_below_floor: For ``"log10"``: fraction of the spectrum at or below
            ``floor`` (numerically zero eigenvalues).
        info: How the quadrature ran: ``reorthogonalize`` (bool), ``probes_per_pass``,
            ``passes``, and the memory estimate (``estimated_bytes``, ``parts``,
            ``memory_budget``, ``available``).
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    kernel_width: float
    scale: str = "linear"
    floor: float | None = None
    mass_below_floor: float | None = None
    info: dict | None = None

    def __iter__(self) -> Any:
        return iter((self.grid, self.density))


def spectral_density(
    A: Any,
    *,
    num_probes: int = 10,
    num_steps: int = 80,
    num_points: int | None = None,
    grid: Any = None,
    kernel_width: float | None = None,
    seed: int = 0,
    probes: str = "rademacher",
    reorthogonalize: bool | str = "auto",
    probes_per_pass: int | None = None,
    memory_budget: float | None = None,
) -> SpectralDensity:
    r"""Gaussian-smoothed spectral density :math:`\phi_\sigma` of a symmetric operator, by SLQ.

    Args:
        A: A symmetric operator of this library, a scipy ``LinearOperator`` or
            sparse matrix, or a dense array; computed in its array library.
        num_probes: Number of random start vectors averaged over.
        num_steps: Lanczos steps per probe (products); at most ``n`` are taken
            (the Krylov space cannot grow further).
        num_points: Points of the default grid (1024); not with ``grid``.
        grid: The points :math:`t` at which to evaluate the density (1-d array).
            Default: ``num_points`` equispaced points from the smallest to the
            largest node, padded by 5 kernel widths on each side.
        kernel_width: :math:`\sigma`. Default: 1% of the spread of the nodes.
        seed: Seed of the probes (results are reproducible).
        probes: ``"rademacher"`` or ``"normal"`` entries (both scaled to unit norm).
        reorthogonalize: Full reorthogonalisation in Lanczos (memory ``n *
            num_steps`` per probe in a pass). Without it, memory is a few vectors
            per probe and the quadrature stays accurate (repeated Ritz values share
            the weight), at the price of wasted steps. ``"auto"`` (default): full
            reorthogonalisation when the basis of one probe fits ``memory_budget``,
            else none (reported in ``info``).
        probes_per_pass: Probes run together as columns of one ``matmat`` (default:
            as many as fit ``memory_budget``, at most all).
        memory_budget: Bytes the Lanczos runs may allocate (bases and work vectors,
            not the operator's products). Default: half of the memory available
            where the operator's arrays live.

    Returns:
        A :class:`SpectralDensity` (unpacks as ``grid, density``), numpy arrays.

    Raises:
        MemoryBudgetError: Even one probe without reorthogonalisation (or with it,
            when ``reorthogonalize=True``) needs more than the budget.

    Example:
        >>> import numpy as np
        >>> from curvlinops.spectral import spectral_density
        >>> A = np.diag(np.linspace(0.0, 1.0, 50))
        >>> grid, density = spectral_density(A, num_probes=4, num_steps=30)
        >>> round(float(np.trapezoid(density, grid)), 6)
        1.0
    """
    op = as_operand(A)
    nodes, weights, info = _quadrature(
        op, num_probes, num_steps, seed, probes, reorthogonalize, probes_per_pass, memory_budget
    )
    result = _smooth(nodes, weights, grid, num_points, kernel_width, scale="linear")
    result.info = info
    return result


def log_spectral_density(
    A: Any,
    *,
    floor: float | None = None,
    num_probes: int = 10,
    num_steps: int = 80,
    num_points: int | None = None,
    grid: Any = None,
    kernel_width: float | None = None,
    seed: int = 0,
    probes: str = "rademacher",
    reorthogonalize: bool | str = "auto",
    probes_per_pass: int | None = None,
    memory_budget: float | None = None,
) -> SpectralDensity:
    r"""Density of :math:`\log_{10}` of the eigenvalues of a positive semi-definite operator.

    The same quadrature as :func:`spectral_density`, with nodes mapped to
    :math:`\log_{10}\max(\theta, \text{floor})` before smoothing: the density of
    :math:`u = \log_{10}\lambda` (Papyan, 2020), which resolves eigenvalues over
    many orders of magnitude. It integrates to 1 over :math:`u`; the fraction of
    eigenvalues at or below ``floor`` (numerically zero) forms a peak at
    :math:`\log_{10}` floor and is reported as ``mass_below_floor``.

    Args:
        A: A symmetric positive semi-definite operator or matrix (e.g. a GGN).
        floor: Smallest eigenvalue resolved. Default: ``100 * eps * theta_max``
            with the machine epsilon of the operator's dtype.
        kernel_width: :math:`\sigma` in decades. Default: 1% of the spread.
        **others: As for :func:`spectral_density` (``grid`` in decades).

    Returns:
        A :class:`SpectralDensity` with ``scale="log10"``.

    Raises:
        ValueError: A Ritz value below ``-sqrt(eps) * theta_max``: ``A`` is not
            positive semi-definite (use :func:`spectral_density`).

    Example:
        >>> import numpy as np
        >>> from curvlinops.spectral import log_spectral_density
        >>> A = np.diag(np.logspace(-3, 0, 40))
        >>> result = log_spectral_density(A, num_probes=4, num_steps=40)
        >>> bool(-3.2 < result.grid[np.argmax(result.density)] < 0.2)
        True
    """
    op = as_operand(A)
    nodes, weights, info = _quadrature(
        op, num_probes, num_steps, seed, probes, reorthogonalize, probes_per_pass, memory_budget
    )
    floor = _psd_floor(nodes, weights, floor, op.eps)
    log_nodes = np.log10(np.maximum(nodes, floor))
    result = _smooth(log_nodes, weights, grid, num_points, kernel_width, scale="log10")
    result.nodes, result.floor, result.info = nodes, floor, info
    result.mass_below_floor = float(np.sum(weights * (nodes <= floor)) / weights.shape[0])
    return result


def _psd_floor(nodes: np.ndarray, weights: np.ndarray, floor: Any, eps: float) -> float:
    """The floor of the log-spectrum, after checking that the nodes look PSD."""
    used = nodes[_significant(weights)]
    top = float(np.max(used, initial=0.0))
    if top <= 0:
        raise value_error(
            "A", "a positive semi-definite operator with a positive eigenvalue", "none found"
        )
    bottom = float(np.min(used))
    if bottom < -math.sqrt(eps) * top:
        raise value_error(
            "A",
            "a positive semi-definite operator",
            f"a Ritz value {bottom:.3e} (largest {top:.3e})",
            "Use spectral_density for indefinite matrices such as Hessians.",
        )
    if floor is None:
        return 100 * eps * top
    return check_real(floor, "floor", minimum=0.0, strict=True)


def _quadrature(
    op: Operand,
    num_probes: int,
    num_steps: int,
    seed: int,
    probes: str,
    reorthogonalize: bool | str,
    probes_per_pass: int | None,
    memory_budget: Any,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Nodes and weights ``(num_probes, s)`` of the Lanczos quadrature (host), and the info."""
    num_probes = check_int(num_probes, "num_probes")
    num_steps = min(check_int(num_steps, "num_steps"), op.shape[0])
    seed = check_int(seed, "seed", minimum=0)
    probes = check_choice(probes, "probes", ("rademacher", "normal"))
    if probes_per_pass is not None:
        probes_per_pass = check_int(probes_per_pass, "probes_per_pass")
    reorthogonalize, per_pass, estimate = _plan_passes(
        op, num_probes, num_steps, reorthogonalize, probes_per_pass, memory_budget
    )
    info = {
        "reorthogonalize": reorthogonalize,
        "probes_per_pass": per_pass,
        "passes": -(-num_probes // per_pass),
        **estimate.as_dict(),
    }
    # one independent seed per probe: results do not depend on probes_per_pass
    seeds = np.random.SeedSequence(seed).generate_state(num_probes).tolist()
    xp, nodes, weights = op.xp, [], []
    for start in range(0, num_probes, per_pass):
        columns = [op.random((op.shape[0], 1), s, probes) for s in seeds[start : start + per_pass]]
        V = xp.concat(columns, axis=1)
        V = V / xp.linalg.vector_norm(V, axis=0)
        alphas, betas, _ = _lanczos(op, V, num_steps, bool(reorthogonalize), False)
        # the small tridiagonal eigenproblems are solved on the host, where the
        # quadrature goes anyway (one transfer of 2 * num_steps numbers per probe)
        host = op.to_host(xp.concat([alphas, betas], axis=1)).astype(np.float64)
        if not np.isfinite(host).all():
            raise_nonfinite("spectral_density")
        T = LanczosResult(host[:, :num_steps], host[:, num_steps:], None).tridiagonal()
        theta, S = np.linalg.eigh(T)
        nodes.append(theta)
        weights.append(S[:, 0, :] ** 2)
    return np.concatenate(nodes), np.concatenate(weights), info


def _plan_passes(
    op: Operand,
    num_probes: int,
    num_steps: int,
    reorthogonalize: bool | str,
    per_pass: int | None,
    memory_budget: Any,
) -> tuple[bool, int, MemoryEstimate]:
    """Reorthogonalisation and probes per pass that fit the budget, and their estimate.

    Prefers reorthogonalisation (when ``"auto"``), then as many probes per pass
    as fit; a given ``probes_per_pass`` or ``reorthogonalize=True`` is kept, and
    refused if it does not fit.
    """
    if isinstance(reorthogonalize, str):
        check_choice(reorthogonalize, "reorthogonalize", ("auto",))
        choices = [True, False]
    elif isinstance(reorthogonalize, bool):
        choices = [reorthogonalize]
    else:
        raise type_error("reorthogonalize", "True, False or 'auto'", reorthogonalize)
    for keep in choices:
        sizes = [per_pass] if per_pass is not None else range(num_probes, 0, -1)
        for size in sizes:
            estimate = lanczos_memory(op, size, num_steps, keep, memory_budget, "spectral_density")
            if estimate.fits():
                return keep, size, estimate
    estimate.fixes = [
        "Lower probes_per_pass or num_steps, pass reorthogonalize=False (or 'auto'), or "
        "raise memory_budget."
    ]
    estimate.check()
    raise AssertionError("unreachable: an estimate that does not fit fails its check")


def _smooth(
    nodes: np.ndarray,
    weights: np.ndarray,
    grid: Any,
    num_points: int | None,
    kernel_width: float | None,
    scale: str,
) -> SpectralDensity:
    """Gaussian-smoothed quadrature on a grid."""
    used = nodes[_significant(weights)]
    low, high = float(used.min()), float(used.max())
    if kernel_width is None:
        spread = high - low
        kernel_width = 0.01 * (spread if spread > 0 else max(abs(high), 1.0))
    sigma = check_real(kernel_width, "kernel_width", minimum=0.0, strict=True)
    points = _grid(grid, num_points, low - PADDING * sigma, high + PADDING * sigma)
    density = _gaussian_mixture(points, nodes, weights, sigma)
    return SpectralDensity(points, density, nodes, weights, sigma, scale)


def _significant(weights: np.ndarray) -> np.ndarray:
    """Nodes that carry weight (breakdowns leave nodes of zero or round-off weight)."""
    return weights > 1e-12


def _grid(grid: Any, num_points: int | None, low: float, high: float) -> np.ndarray:
    if grid is None:
        num = (
            DEFAULT_NUM_POINTS
            if num_points is None
            else check_int(num_points, "num_points", minimum=2)
        )
        return np.linspace(low, high, num)
    if num_points is not None:
        raise value_error(
            "num_points", "None when a grid is given", str(num_points), "Pass grid or num_points."
        )
    if not is_array(grid) and not isinstance(grid, (list, tuple)):
        raise type_error("grid", "a 1-d array of points", grid)
    if library_of(grid) == "torch":
        grid = grid.detach().cpu()
    points = np.asarray(grid, dtype=np.float64)
    if points.ndim != 1 or points.size < 2:
        raise shape_error("grid", "a 1-d array of at least 2 points", points.shape)
    return points


def _gaussian_mixture(
    points: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float
) -> np.ndarray:
    """``mean over probes of sum_j weights_j N(points; nodes_j, sigma^2)``."""
    flat_nodes, flat_weights = nodes.reshape(-1), weights.reshape(-1) / nodes.shape[0]
    keep = flat_weights > 0
    flat_nodes, flat_weights = flat_nodes[keep], flat_weights[keep]
    density = np.zeros_like(points)
    for start in range(0, flat_nodes.size, 256):  # bounded memory: points x 256
        z = (points[:, None] - flat_nodes[None, start : start + 256]) / sigma
        density += np.exp(-0.5 * z**2) @ flat_weights[start : start + 256]
    return density / (sigma * math.sqrt(2 * math.pi))


def plot_spectral_density(
    result: SpectralDensity,
    path: str | Path,
    *,
    title: str | None = None,
    yscale: str = "log",
) -> Path:
    """Plot a :class:`SpectralDensity` and save it as a PNG file.

    Needs matplotlib (``pip install 'curvlinops[plot]'``); no window opens, and
    matplotlib's global state (pyplot) is not touched.

    Args:
        result: The output of :func:`spectral_density` or :func:`log_spectral_density`.
        path: Where to write the PNG.
        title: Figure title.
        yscale: ``"log"`` (shows outliers and the bulk together) or ``"linear"``.

    Returns:
        The path written.
    """
    if not isinstance(result, SpectralDensity):
        raise type_error("result", "a SpectralDensity from spectral_density()", result)
    yscale = check_choice(yscale, "yscale", ("log", "linear"))
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plot_spectral_density needs matplotlib, which is not installed. Install it with: "
            "pip install 'curvlinops[plot]'"
        ) from error
    figure = Figure(figsize=(6, 4), dpi=120)
    ax = figure.add_subplot()
    positive = result.density > 0
    ax.plot(result.grid[positive], result.density[positive], color="C0")
    ax.set_yscale(yscale)
    ax.set_xlabel("log10(eigenvalue)" if result.scale == "log10" else "eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"Spectral density (SLQ, kernel width {result.kernel_width:.2g})")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
