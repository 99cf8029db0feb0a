"""The influence job's problem: the digits with flipped labels, the models' sizes and weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from curvlinops.losses import CrossEntropyLoss

SCHEMA = "curvlinops-influence/1"
MODELS = ("logreg", "mlp")
CURVATURE_METHODS = ("exact", "ggn", "kfac", "ekfac")
BASELINES = ("loss", "grad_norm", "random")
METHODS = (*CURVATURE_METHODS, *BASELINES)
DEFAULT_PLAN = {"logreg": METHODS, "mlp": tuple(m for m in METHODS if m != "exact")}
"""The default methods per model. The MLP's exact Hessian is left out: at its minimum
:math:`H + \\lambda I` is ill-conditioned (CG needs about 300 steps per column, against
45 for the GGN), which for all training points is a quarter of an hour on two cores;
``--method exact`` runs it."""
NUM_CLASSES, NUM_PIXELS = 10, 64
LOSS = CrossEntropyLoss(reduction="mean")
EXAMPLES_PER_PASS = 128
LBFGS_TOL = 1e-4
"""Gradient norm at which training hands over from L-BFGS to Newton."""
CURVE_POINTS = 101


@dataclass(frozen=True)
class StudyConfig:
    r"""Sizes and tolerances of the study (the command line uses the defaults).

    Attributes:
        n_train: Training images (``None``: all that are not test images).
        n_test: Test images.
        flip_fraction: Fraction of training labels flipped.
        hidden: Hidden units of the MLP.
        l2: :math:`\lambda`, the penalty on all parameters (and the damping).
        train_tol: Gradient-norm goal of training (and of leave-one-out retraining).
        cg_tol: Relative residual tolerance of the self-influence solves.
        block_size: Training points per batched CG solve.
        columns_per_pass: Columns per vectorised pass of the curvature products.
        loo_points: Training points retrained without (logistic regression).
        loo_points_mlp: The same for the MLP, whose retraining costs far more.
        grid_test_images: Test images in the test-influence grid.
        grid_neighbours: Helpful and harmful training images shown for each.
        processes: Run the backends side by side, each in a process of its own
            with its share of the cores' threads, where there are several and the
            machine has a core for each (:mod:`curvlinops.jobs._parallel`); their
            lines are printed when each finishes. Otherwise one after the other,
            each with all the cores.
    """

    n_train: int | None = None
    n_test: int = 500
    flip_fraction: float = 0.1
    hidden: int = 32
    l2: float = 1e-2
    train_tol: float = 1e-7
    cg_tol: float = 1e-5
    block_size: int = 1297
    columns_per_pass: int = 128
    loo_points: int = 40
    loo_points_mlp: int = 10
    grid_test_images: int = 4
    grid_neighbours: int = 5
    processes: bool = True


# --- the data, in numpy ----------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsProblem:
    """The split digits with flipped training labels (numpy).

    Attributes:
        seed: Where the split, the flips and the initial weights came from.
        X_train: ``(N, 64)`` pixels in ``[0, 1]``.
        y_train: ``(N,)`` training labels as used, 10% of them flipped.
        y_clean: ``(N,)`` the original labels.
        flipped: ``(N,)`` whether the label was flipped.
        X_test: ``(N_test, 64)``.
        y_test: ``(N_test,)`` original labels.
    """

    seed: int
    X_train: np.ndarray
    y_train: np.ndarray
    y_clean: np.ndarray
    flipped: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def make_problem(seed: int = 0, config: StudyConfig | None = None) -> DigitsProblem:
    """Split scikit-learn's digits and flip a fraction of the training labels.

    Args:
        seed: Seed of the split and the flips.
        config: Sizes (default :class:`StudyConfig`).

    Returns:
        The :class:`DigitsProblem`.

    Raises:
        ImportError: scikit-learn is not installed (the message names the extra).

    Example:
        >>> problem = make_problem(0)
        >>> problem.X_train.shape, problem.X_test.shape, int(problem.flipped.sum())
        ((1297, 64), (500, 64), 130)
        >>> bool(np.all(problem.y_train[problem.flipped] != problem.y_clean[problem.flipped]))
        True
    """
    config = config or StudyConfig()
    X, y = _load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    test, rest = order[: config.n_test], order[config.n_test :]
    train = rest if config.n_train is None else rest[: config.n_train]
    y_clean = y[train]
    flipped = np.zeros(len(train), dtype=bool)
    flipped[rng.choice(len(train), round(config.flip_fraction * len(train)), replace=False)] = True
    shift = rng.integers(1, NUM_CLASSES, size=len(train))  # another class, uniformly
    y_noisy = np.where(flipped, (y_clean + shift) % NUM_CLASSES, y_clean)
    return DigitsProblem(seed, X[train], y_noisy, y_clean, flipped, X[test], y[test])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "The influence study needs scikit-learn's digits. Install it with: "
            "pip install 'curvlinops[data]'"
        ) from None
    digits = load_digits()
    return np.asarray(digits.data, dtype=np.float64) / 16.0, np.asarray(digits.target)


def architecture(model: str, config: StudyConfig) -> tuple[int, ...]:
    """Layer widths of ``model``: ``(64, 10)`` or ``(64, hidden, 10)``."""
    if model == "logreg":
        return (NUM_PIXELS, NUM_CLASSES)
    return (NUM_PIXELS, config.hidden, NUM_CLASSES)


def initial_weights(model: str, config: StudyConfig, seed: int) -> list[np.ndarray]:
    """``[W_1, b_1, ...]``: zeros for logistic regression, Glorot-uniform for the MLP."""
    widths = architecture(model, config)
    rng = np.random.default_rng([seed, len(widths)])
    weights = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        bound = 0.0 if model == "logreg" else math.sqrt(6.0 / (fan_in + fan_out))
        weights += [rng.uniform(-bound, bound, (fan_out, fan_in)), np.zeros(fan_out)]
    return weights


def _split(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A flat vector in the shapes of ``like`` (row-major, as the backends flatten)."""
    sizes = np.cumsum([0, *(w.size for w in like)])
    return [vector[a:b].reshape(w.shape) for a, b, w in zip(sizes[:-1], sizes[1:], like)]
