"""The demo's problem: the data, the closed-form optimum, and what it is compared with."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curvlinops._checks import value_error

SCHEMA = "curvlinops-demo/1"
D, K, N, N_TEST = 20, 5, 2000, 500
BATCH_SIZE = 500
TOP_VARIANCE, VARIANCE_DECAY = 4.0, 0.75
PENALTIES = (0.1, 0.2, 0.3, 0.4, 0.5)
INIT_SCALE = 0.1
LEARNING_RATE, MOMENTUM = 0.15, 0.98
MAX_STEPS, CHECK_EVERY = 10_000, 25
GRADIENT_TOL = {"float64": 1e-11, "float32": 1e-5}
TOP_K = 5
SLQ_PROBES, SLQ_STEPS = 16, 60
CG_DAMPING = 1e-3
CG_TOL = {"float64": 1e-10, "float32": 1e-4}
TORCH_THREADS = 1
"""PyTorch runs on one CPU thread: for this tiny problem more threads only cost time."""
PHASES = ("training", "operators", "rayleigh", "eigsh", "dense", "slq", "cg")


# --- the problem, in numpy ------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    r"""The data and what is known in closed form (all numpy, float64).

    Attributes:
        seed: The seed everything random came from.
        X: Training inputs ``(N, D)``, centred.
        X_test: Held-out inputs ``(N_test, D)``, centred.
        penalties: :math:`\Lambda`, ``(K,)``, increasing.
        variances: The top ``K`` eigenvalues :math:`s_k^2` of ``X.T @ X / N``, descending.
        components: The matching eigenvectors :math:`U` as columns, ``(D, K)``.
        W1_init: Initial encoder ``(K, D)``.
        W2_init: Initial decoder ``(D, K)``.
    """

    seed: int
    X: np.ndarray
    X_test: np.ndarray
    penalties: np.ndarray
    variances: np.ndarray
    components: np.ndarray
    W1_init: np.ndarray
    W2_init: np.ndarray


def make_problem(seed: int = 0) -> Problem:
    """The demo's data set and initialisation, drawn from ``seed``.

    Args:
        seed: A non-negative integer.

    Returns:
        The :class:`Problem`.

    Raises:
        ValueError: If a penalty is not below its variance (the optimum would be
            degenerate); this does not happen for the embedded spectrum.

    Example:
        >>> problem = make_problem(0)
        >>> problem.X.shape, problem.components.shape
        ((2000, 20), (20, 5))
        >>> bool(abs(problem.X.mean(axis=0)).max() < 1e-12)
        True
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0]
    scales = np.sqrt(TOP_VARIANCE * VARIANCE_DECAY ** np.arange(D))
    samples = (rng.standard_normal((N + N_TEST, D)) * scales) @ basis.T
    X, X_test = samples[:N], samples[N:]
    X, X_test = X - X.mean(axis=0), X_test - X_test.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(X.T @ X / N)
    variances, components = eigenvalues[::-1][:K], eigenvectors[:, ::-1][:, :K]
    penalties = np.asarray(PENALTIES, dtype=np.float64)
    if not np.all(penalties < variances):
        raise value_error(
            "seed",
            "data whose top variances exceed the penalties",
            f"variances {variances} for penalties {penalties}",
        )
    W1_init = INIT_SCALE * rng.standard_normal((K, D))
    W2_init = INIT_SCALE * rng.standard_normal((D, K))
    return Problem(seed, X, X_test, penalties, variances, components, W1_init, W2_init)


def closed_form_optimum(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    r"""The closed-form optimum :math:`W_1^\star`, :math:`W_2^\star = W_1^{\star\top}`.

    :math:`W_1^\star = (I - \Lambda S^{-2})^{1/2} U^\top` with the top ``K`` principal
    components :math:`U` and variances :math:`S^2`; every sign flip of a latent unit
    (row of :math:`W_1` with the column of :math:`W_2`) is an optimum too.

    Args:
        problem: The :class:`Problem`.

    Returns:
        ``(W1, W2)`` of shapes ``(K, D)`` and ``(D, K)``.

    Example:
        >>> problem = make_problem(0)
        >>> W1, W2 = closed_form_optimum(problem)
        >>> bool(np.allclose(W2, W1.T))
        True
    """
    scale = np.sqrt(1.0 - problem.penalties / problem.variances)
    return scale[:, None] * problem.components.T, problem.components * scale


def objective(problem: Problem, W1: np.ndarray, W2: np.ndarray) -> float:
    r"""The objective :math:`\mathcal{J}(W_1, W_2)` in numpy (float64).

    Example:
        >>> problem = make_problem(0)
        >>> W1, W2 = closed_form_optimum(problem)
        >>> objective(problem, W1, W2) < objective(problem, 1.01 * W1, W2)
        True
    """
    residual = problem.X @ W1.T @ W2.T - problem.X
    data = 0.5 * float(np.sum(residual * residual)) / problem.X.shape[0]
    lam = problem.penalties
    return data + 0.5 * float(np.sum(lam[:, None] * W1 * W1) + np.sum(W2 * W2 * lam))


def regulariser_diagonal(problem: Problem) -> np.ndarray:
    r"""The Hessian of the regulariser, a diagonal, in the operators' parameter order.

    :math:`\frac12 \sum_k \lambda_k (\|W_1[k, :]\|^2 + \|W_2[:, k]\|^2)` has second
    derivative :math:`\lambda_k` at every entry of row ``k`` of :math:`W_1` and of
    column ``k`` of :math:`W_2`; the parameters are flattened as ``W1`` then ``W2``,
    each row-major.

    Example:
        >>> regulariser_diagonal(make_problem(0))[[0, 20, 100, 101]]
        array([0.1, 0.2, 0.1, 0.2])
    """
    lam = problem.penalties
    return np.concatenate([np.repeat(lam, D), np.tile(lam, D)])


def align_signs(
    W1: np.ndarray, W2: np.ndarray, W1_star: np.ndarray, W2_star: np.ndarray
) -> tuple[np.ndarray, float, float]:
    """Signs per latent unit that bring the optimum closest to ``(W1, W2)``, and the distance.

    Returns:
        ``(signs, distance, relative distance)`` with the Frobenius distance of
        ``(W1, W2)`` to ``(S W1*, W2* S)``, ``S = diag(signs)``.
    """
    overlap = np.sum(W1 * W1_star, axis=1) + np.sum(W2 * W2_star, axis=0)
    signs = np.where(overlap < 0, -1.0, 1.0)
    difference = np.sum((W1 - signs[:, None] * W1_star) ** 2)
    difference += np.sum((W2 - W2_star * signs) ** 2)
    norm = math.sqrt(float(np.sum(W1_star**2) + np.sum(W2_star**2)))
    distance = math.sqrt(float(difference))
    return signs, distance, distance / norm


def angles_to_components(vectors: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Angle in degrees between ``vectors[k]`` and the line of ``components[:, k]``.

    Sign-blind, and accurate for tiny angles (``atan2`` of the orthogonal part).
    """
    along = np.sum(vectors * components.T, axis=1)
    orthogonal = vectors - along[:, None] * components.T
    return np.degrees(np.arctan2(np.linalg.norm(orthogonal, axis=1), np.abs(along)))
