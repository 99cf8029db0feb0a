r"""Influence functions on real data: finding mislabelled handwritten digits.

``python -m curvlinops influence`` (or the console script ``curvlinops
influence``) runs the study of Koh and Liang (2017, §5.4) on scikit-learn's
bundled digits (1,797 real 8×8 images, no download), on every installed
backend:

1. **Data.** The pixels scaled to ``[0, 1]``; a random split into ``N_test =
   500`` test and ``N = 1297`` training images; 10% of the training labels
   flipped to another class, uniformly (all from ``--seed``).
2. **Models**, both with cross-entropy averaged over the training set and an
   :math:`\ell_2` penalty on all parameters,

   .. math::
       \mathcal{J}(w) = \frac1N \sum_{i=1}^N \ell_i(w) + \frac{\lambda}{2}\|w\|^2,
       \qquad \lambda = 10^{-2}:

   multinomial logistic regression (64-10, convex) and a tanh MLP
   (64-32-10), trained by L-BFGS (scipy) on the backend's compiled gradient
   and finished by Newton's method (scipy's ``trust-ncg`` on the backend's
   Hessian-vector products) until the gradient norm is below ``1e-7``
   (reported); the same initial weights on every backend.
3. **Self-influence** of every training point,
   :math:`s_i = \nabla\ell_i^\top (H + \lambda I)^{-1} \nabla \ell_i` with
   :math:`H` the Hessian of the data term (the change of point :math:`i`'s own
   loss when it is removed is about :math:`s_i / N`), by

   * ``exact``: ``HessianLinearOperator`` solved by batched CG: the per-example
     gradients of ``block_size`` training points (default: all) are the
     columns of one solve (one ``matmat`` per CG step for all of them); each
     column's convergence is reported. Not run for the MLP by default
     (:data:`DEFAULT_PLAN`): its :math:`H + \lambda I` needs ~300 CG steps per
     column; ``--method exact`` runs it;
   * ``ggn``: the same with ``GGNLinearOperator`` (for logistic regression the
     GGN is the Hessian);
   * ``kfac`` and ``ekfac``: ``KFACInverseLinearOperator`` of a type-2
     ``KFACLinearOperator`` / ``EKFACLinearOperator`` with exact damping
     :math:`\lambda`;

   and the baselines ``loss`` (the training loss :math:`\ell_i`),
   ``grad_norm`` (:math:`\|\nabla\ell_i\|`) and ``random`` (a seeded
   permutation). Each ranking, largest first, gives a **recall curve**: the
   fraction of flipped labels found against the fraction of the training set
   inspected; its value at 10% is the headline number (a random order finds
   10% on average).
4. **Test influence** (logistic regression, exact Hessian): for the test
   images with the largest loss, the training images whose up-weighting
   lowers (helpful) and raises (harmful) their loss most,
   :math:`\mathcal{I}_{ti} = -\nabla\ell_t^\top (H + \lambda I)^{-1}\nabla\ell_i`,
   as an image grid (first backend).
5. **Leave-one-out validation**: for the test image with the largest loss,
   the predicted change of its loss when training point :math:`i` is removed,
   :math:`-\mathcal{I}_{ti}/N`, against retraining without it (warm-started
   Newton, same tolerance), for the 40 (MLP: 10) points with the largest
   predicted effect; Pearson's :math:`r`, per model and backend, and a scatter
   plot.

The PNGs (``recall.png``, ``test_influence.png``, ``loo.png``) go to
``--out``; a table of recall at 10% and time per method and backend, and the
agreement between backends (Spearman correlation of the scores), is printed.

JSON report (``--json FILE``), schema ``"curvlinops-influence/1"``::

    {
      "schema": "curvlinops-influence/1",
      "command": [str, ...],
      "problem": {"seed", "n_train", "n_test", "n_flipped", "num_classes": int,
                  "flip_fraction", "l2", "cg_tol": float, "block_size": int,
                  "models": {"<model>": str},              # architecture, e.g. "64-32-10 tanh"
                  "inspected_at_10pct": int},              # round(N / 10)
      "versions": {"python", "platform", "curvlinops", "numpy", "scipy",
                   "sklearn", "torch", "jax": str or null},
      "models": {"<model>": {"<backend>": {               # model: "logreg" or "mlp"
          "num_params": int,
          "training": {"iterations": int, "converged": bool, "gradient_norm",
                       "gradient_tol", "objective", "train_accuracy",
                       "train_accuracy_clean_labels", "test_accuracy", "seconds": float}}}},
      "methods": {"<model>_<method>": {"<backend>": {      # method: exact, ggn, kfac, ...
          "model": str, "method": str,
          "recall_at_10pct": float, "recall_at_5pct": float, "recall_at_20pct": float,
          "recall_curve": [float] * 101,                  # at 0%, 1%, ..., 100% inspected
          "top_indices": [int],                           # the 10% inspected, largest first
          "seconds": float,                               # scores from the trained model
          "cg": null or {"tol": float, "columns", "blocks", "converged", "indefinite",
                         "iterations_min", "iterations_max", "products": int,
                         "iterations_mean", "max_relative_residual": float,
                         "all_converged": bool}}}},
      "random_recall_at_10pct": float,                    # expected: inspected / N
      "agreement": {"<model>_<method>": {"spearman": float,  # between the first two backends
                                         "max_relative_difference": float}},
      "test_influence": {"<backend>": {"test_indices": [int],
                                       "helpful": [[int]], "harmful": [[int]],
                                       "harmful_flipped_fraction": float}},
      "loo": {"<model>": {"<backend>": {
          "pearson_r", "spearman_r": float, "test_index": int,
          "train_indices": [int], "predicted": [float], "actual": [float],
          "max_retrain_gradient_norm", "seconds": float, "cg_converged": bool}}},
      "plots": {"recall", "test_influence", "loo": str or null},
      "timings": {"wall_s", "cpu_user_s", "cpu_system_s": float},
      "threads": {"mode": "side by side" or "one after another", "cores": int,
                  "threads_per_backend": int, "environment": {str: str},
                  "observed": {"<backend>": {"pid": int, "intra_op_threads": int or null,
                                             "blas": {str: int}, "xla_flags": str or null}}},
      "load": {"cpu_count": int, "loadavg_1min_start", "loadavg_1min_end": float or null}
    }

Numbers are Python floats; indices refer to the training (test) set in the
order of :func:`make_problem`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import scipy.optimize
import scipy.stats

from curvlinops.backends import Backend, make_backend
from curvlinops.backends._study_models import tanh_classifier
from curvlinops.demo import versions
from curvlinops.ggn import GGNLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.influence import _PerExampleGradients, influence_on_test_loss
from curvlinops.inverse import CGInverseLinearOperator
from curvlinops.jobs._parallel import plan_threads, run_backends
from curvlinops.kfac import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator
from curvlinops.losses import CrossEntropyLoss

__all__ = [
    "DEFAULT_PLAN",
    "METHODS",
    "MODELS",
    "DigitsProblem",
    "StudyConfig",
    "make_problem",
    "recall_curve",
    "run_influence_study",
]

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


# --- training, written once for every framework ---------------------------------------------
class _Objective:
    r"""Per-example losses and the weighted objective on one data set, in one framework.

    :math:`\frac1N \sum_i c_i \ell_i(w) + \frac{\lambda}{2}\|w\|^2`, with weights
    :math:`c_i` (1, or 0 for a removed point), and its gradient, compiled by the
    backend, as numpy functions of the flat weights.
    """

    def __init__(self, b: Backend, X: np.ndarray, y: np.ndarray, l2: float) -> None:
        self.b, self.l2, self.num_data = b, l2, len(y)
        self.X = b.import_batch(X, 0)
        self.Y = b.import_batch(np.eye(NUM_CLASSES)[y], 0)
        self._value_and_gradient = b.compile(self._value_and_gradient_fn)
        self._losses = b.compile(self._losses_fn)
        self._hessian_product = b.compile(self._hessian_product_fn)

    def _terms(self, primals: Any, X: Any, Y: Any) -> Any:
        xp = self.b.xp
        logits = self.b.model_fn(primals, X)
        top = xp.max(logits, axis=1, keepdims=True)
        log_norm = top[:, 0] + xp.log(xp.sum(xp.exp(logits - top), axis=1))
        return log_norm - xp.sum(Y * logits, axis=1)

    def _losses_fn(self, primals: Any, X: Any, Y: Any) -> Any:
        return self._terms(primals, X, Y)

    def _objective(self, X: Any, Y: Any, weights: Any) -> Callable[[Any], Any]:
        b, xp = self.b, self.b.xp

        def objective(p: Any) -> Any:
            data = xp.sum(weights * self._terms(p, X, Y)) / self.num_data
            return data + 0.5 * self.l2 * sum(xp.sum(q * q) for q in b.tree_flatten(p)[0])

        return objective

    def _value_and_gradient_fn(self, primals: Any, X: Any, Y: Any, weights: Any) -> Any:
        value, pullback = self.b.vjp(self._objective(X, Y, weights), primals)
        return value, self.b.flatten(pullback(self.b.xp.ones_like(value)))

    def _hessian_product_fn(self, primals: Any, X: Any, Y: Any, weights: Any, v: Any) -> Any:
        b = self.b
        return b.flatten(b.hvp_fn(self._objective(X, Y, weights), primals)(b.unflatten(v)))

    def hessian_product(self, w: np.ndarray, v: np.ndarray, weights: Any) -> np.ndarray:
        """The objective's Hessian at ``w`` times ``v`` (numpy)."""
        v_native = self.b.import_array(np.array(v), "v")[0]
        product = self._hessian_product(self.primals(w), self.X, self.Y, weights, v_native)
        return np.asarray(self.b.to_numpy(product), dtype=np.float64)

    def primals(self, w: np.ndarray) -> Any:
        return self.b.unflatten(self.b.import_array(np.array(w), "w")[0])

    def value_and_gradient(self, w: np.ndarray, weights: Any) -> tuple[float, np.ndarray]:
        value, gradient = self._value_and_gradient(self.primals(w), self.X, self.Y, weights)
        return float(value), np.asarray(self.b.to_numpy(gradient), dtype=np.float64)

    def losses(self, w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per-example cross-entropy at ``w`` on ``(X, y)`` (numpy)."""
        Xn, Yn = self.b.import_batch(X, 0), self.b.import_batch(np.eye(NUM_CLASSES)[y], 0)
        return np.asarray(self.b.to_numpy(self._losses(self.primals(w), Xn, Yn)), np.float64)

    def example_weights(self, removed: int | None = None) -> Any:
        c = np.ones(self.num_data)
        if removed is not None:
            c[removed] = 0.0
        return self.b.import_batch(c, 0)


@dataclass
class Trained:
    """Flat trained weights and what the optimiser did."""

    w: np.ndarray
    iterations: int
    gradient_norm: float
    objective: float
    converged: bool
    seconds: float


def minimise(
    objective: _Objective, w0: np.ndarray, tol: float, removed: int | None = None
) -> Trained:
    """Minimise from ``w0`` until the gradient norm is at most ``tol``.

    L-BFGS (scipy) brings the gradient norm to ``LBFGS_TOL``; then Newton's
    method with a trust region (scipy's ``trust-ncg``, Hessian-vector products
    by the backend) reaches ``tol`` in a few steps, where L-BFGS would need
    thousands (the MLP) or stall at float64's resolution of the objective.
    Leave-one-out retraining starts next to the optimum and is all Newton.
    """
    start = time.perf_counter()
    weights = objective.example_weights(removed)
    args, iterations = (weights,), 0
    value, gradient = objective.value_and_gradient(w0, weights)
    w = w0
    if np.linalg.norm(gradient) > LBFGS_TOL:
        first = scipy.optimize.minimize(
            objective.value_and_gradient,
            w,
            args=args,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 20_000, "maxcor": 20, "gtol": LBFGS_TOL / math.sqrt(w.size)},
        )
        w, iterations = first.x, int(first.nit)
    second = scipy.optimize.minimize(
        objective.value_and_gradient,
        w,
        args=args,
        jac=True,
        hessp=objective.hessian_product,
        method="trust-ncg",
        options={"gtol": tol, "maxiter": 100},
    )
    value, gradient = objective.value_and_gradient(second.x, weights)
    norm = float(np.linalg.norm(gradient))
    return Trained(
        second.x,
        iterations + int(second.nit),
        norm,
        value,
        norm <= tol,
        time.perf_counter() - start,
    )


# --- self-influence ----------------------------------------------------------------------------
@dataclass
class Model:
    """A trained model in one framework, with what the influence computations share."""

    name: str
    framework: str
    model_func: Any
    params: list[Any]
    b: Backend
    data: list[tuple[Any, Any]]
    objective: _Objective
    trained: Trained
    per_example: _PerExampleGradients = field(init=False)

    def __post_init__(self) -> None:
        self.per_example = _PerExampleGradients(self.b, self.b.loss(LOSS), EXAMPLES_PER_PASS)


def curvature_inverse(model: Model, method: str, config: StudyConfig) -> Any:
    r"""The operator applying :math:`(C + \lambda I)^{-1}` for ``method``'s curvature ``C``."""
    args = (model.model_func, LOSS, model.params, model.data)
    options = {"backend": model.framework}
    if method in ("exact", "ggn"):
        operator = HessianLinearOperator if method == "exact" else GGNLinearOperator
        curvature = operator(*args, **options, columns_per_pass=config.columns_per_pass)
        return CGInverseLinearOperator(curvature, damping=config.l2, tol=config.cg_tol)
    kfac = KFACLinearOperator if method == "kfac" else EKFACLinearOperator
    curvature = kfac(*args, **options, fisher_type="type-2")
    return KFACInverseLinearOperator(curvature, damping=config.l2, use_exact_damping=True)


def self_influence(
    model: Model, inverse: Any, problem: DigitsProblem, block_size: int
) -> tuple[np.ndarray, list[Any]]:
    r""":math:`s_i = g_i^\top (C + \lambda I)^{-1} g_i` for every training point, in blocks.

    The per-example gradients of a block are the columns of one (batched) solve.

    Returns:
        The scores ``(N,)`` and the CG reports of the blocks (empty without CG).
    """
    b, xp = model.b, model.b.xp
    scores, reports = [], []
    for start in range(0, len(problem.y_train), block_size):
        stop = start + block_size
        X = b.import_batch(problem.X_train[start:stop], 0)
        y = b.import_batch(problem.y_train[start:stop], 0)
        G = model.per_example(X, y)
        with warnings.catch_warnings(record=True):  # convergence goes into the report
            warnings.simplefilter("always")
            S = inverse @ G
        scores.append(b.to_numpy(xp.sum(G * S, axis=0)))
        if isinstance(inverse, CGInverseLinearOperator):
            reports.append(inverse.info)
    return np.concatenate(scores).astype(np.float64), reports


def cg_summary(reports: Sequence[Any], tol: float) -> dict | None:
    """Convergence of all blocks' CG solves, one entry per training point aggregated."""
    if not reports:
        return None
    iterations = np.concatenate([r.iterations for r in reports])
    residuals = np.concatenate([r.relative_residuals for r in reports])
    converged = np.concatenate([r.converged for r in reports])
    indefinite = np.concatenate([r.indefinite for r in reports])
    return {
        "tol": tol,
        "columns": int(iterations.size),
        "blocks": len(reports),
        "converged": int(converged.sum()),
        "all_converged": bool(converged.all()),
        "indefinite": int(indefinite.sum()),
        "iterations_min": int(iterations.min()),
        "iterations_max": int(iterations.max()),
        "iterations_mean": float(iterations.mean()),
        "products": int(sum(r.num_products for r in reports)),
        "max_relative_residual": float(residuals.max()),
    }


def baseline_scores(model: Model, method: str, problem: DigitsProblem) -> np.ndarray:
    """Training loss, per-example gradient norm, or a seeded random order."""
    if method == "loss":
        return model.objective.losses(model.trained.w, problem.X_train, problem.y_train)
    if method == "random":
        return np.random.default_rng([problem.seed, 7]).permutation(len(problem.y_train)) * 1.0
    b, xp = model.b, model.b.xp
    norms = []
    for start in range(0, len(problem.y_train), EXAMPLES_PER_PASS * 8):
        stop = start + EXAMPLES_PER_PASS * 8
        G = model.per_example(
            b.import_batch(problem.X_train[start:stop], 0),
            b.import_batch(problem.y_train[start:stop], 0),
        )
        norms.append(b.to_numpy(xp.sqrt(xp.sum(G * G, axis=0))))
    return np.concatenate(norms).astype(np.float64)


def recall_curve(scores: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """Fraction of flipped labels among the ``k`` largest scores, for ``k = 0..N``.

    Example:
        >>> recall_curve(np.array([0.3, 0.9, 0.1, 0.5]), np.array([0, 1, 0, 1], bool)).tolist()
        [0.0, 0.5, 1.0, 1.0, 1.0]
    """
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(flipped[order])])
    return found / max(int(flipped.sum()), 1)


def recall_at(curve: np.ndarray, fraction: float) -> float:
    """Recall after inspecting ``round(fraction * N)`` points."""
    return float(curve[round(fraction * (len(curve) - 1))])


def method_report(
    model: Model, method: str, problem: DigitsProblem, config: StudyConfig
) -> tuple[dict, np.ndarray]:
    """Scores of one method, its recall and time, and the CG convergence."""
    start, reports = time.perf_counter(), []
    if method in CURVATURE_METHODS:
        inverse = curvature_inverse(model, method, config)
        scores, reports = self_influence(model, inverse, problem, config.block_size)
    else:
        scores = baseline_scores(model, method, problem)
    seconds = time.perf_counter() - start
    curve = recall_curve(scores, problem.flipped)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    return {
        "model": model.name,
        "method": method,
        "recall_at_10pct": recall_at(curve, 0.1),
        "recall_at_5pct": recall_at(curve, 0.05),
        "recall_at_20pct": recall_at(curve, 0.2),
        "recall_curve": [recall_at(curve, f) for f in grid],
        "top_indices": np.argsort(-scores, kind="stable")[: round(0.1 * len(scores))].tolist(),
        "seconds": seconds,
        "cg": cg_summary(reports, config.cg_tol),
    }, scores


# --- test influence and leave-one-out ------------------------------------------------------------
def exact_inverse(model: Model, config: StudyConfig) -> CGInverseLinearOperator:
    r""":math:`(H + \lambda I)^{-1}` by CG to 1e-10 (for a few columns only)."""
    hessian = HessianLinearOperator(
        model.model_func, LOSS, model.params, model.data, backend=model.framework
    )
    return CGInverseLinearOperator(hessian, damping=config.l2, tol=1e-10)


def influence_on_test_images(
    model: Model, problem: DigitsProblem, test_indices: np.ndarray, config: StudyConfig
) -> tuple[np.ndarray, bool]:
    r""":math:`\mathcal{I}_{ti}` ``(T, N)`` for the test points ``test_indices`` (exact Hessian)."""
    inverse = exact_inverse(model, config)
    X_t, y_t = problem.X_test[test_indices], problem.y_test[test_indices]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        influence = influence_on_test_loss(
            inverse,
            model.model_func,
            LOSS,
            model.params,
            model.data,
            (X_t, y_t),
            backend=model.framework,
        )
    return np.asarray(model.b.to_numpy(influence), np.float64), bool(inverse.info.converged.all())


def grid_report(model: Model, problem: DigitsProblem, config: StudyConfig) -> dict:
    """Most helpful and harmful training points for the test images of largest loss."""
    test_losses = model.objective.losses(model.trained.w, problem.X_test, problem.y_test)
    chosen = np.argsort(-test_losses, kind="stable")[: config.grid_test_images]
    influence, _ = influence_on_test_images(model, problem, chosen, config)
    k = config.grid_neighbours
    helpful = np.argsort(influence, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(-influence, axis=1, kind="stable")[:, :k]
    return {
        "test_indices": chosen.tolist(),
        "helpful": helpful.tolist(),
        "harmful": harmful.tolist(),
        "harmful_flipped_fraction": float(problem.flipped[harmful].mean()),
    }


def loo_report(model: Model, problem: DigitsProblem, config: StudyConfig) -> dict:
    r"""Predicted (:math:`-\mathcal{I}_{ti}/N`) against retrained change of one test loss."""
    start = time.perf_counter()
    test_losses = model.objective.losses(model.trained.w, problem.X_test, problem.y_test)
    t = int(np.argmax(test_losses))
    influence, converged = influence_on_test_images(model, problem, np.array([t]), config)
    predicted_all = -influence[0] / len(problem.y_train)
    count = config.loo_points if model.name == "logreg" else config.loo_points_mlp
    chosen = np.argsort(-np.abs(predicted_all), kind="stable")[:count]
    X_t, y_t = problem.X_test[t : t + 1], problem.y_test[t : t + 1]
    base = float(test_losses[t])
    actual, norms = [], []
    for i in chosen:
        retrained = minimise(model.objective, model.trained.w, config.train_tol, removed=int(i))
        actual.append(float(model.objective.losses(retrained.w, X_t, y_t)[0]) - base)
        norms.append(retrained.gradient_norm)
    predicted = predicted_all[chosen]
    return {
        "pearson_r": float(np.corrcoef(predicted, actual)[0, 1]),
        "spearman_r": float(scipy.stats.spearmanr(predicted, actual).statistic),
        "test_index": t,
        "train_indices": chosen.tolist(),
        "predicted": predicted.tolist(),
        "actual": actual,
        "max_retrain_gradient_norm": float(max(norms)),
        "seconds": time.perf_counter() - start,
        "cg_converged": converged,
    }


# --- one backend --------------------------------------------------------------------------------
def train_model(name: str, framework: str, problem: DigitsProblem, config: StudyConfig) -> Model:
    """Train ``name`` in ``framework`` from the shared initial weights."""
    like = initial_weights(name, config, problem.seed)
    model_func, params = tanh_classifier(framework, like)
    b = make_backend(model_func, params, framework)
    objective = _Objective(b, problem.X_train, problem.y_train, config.l2)
    w0 = np.concatenate([w.ravel() for w in like])
    trained = minimise(objective, w0, config.train_tol)
    model_func, params = tanh_classifier(framework, _split(trained.w, like))
    b = make_backend(model_func, params, framework)
    data = [(b.import_batch(problem.X_train, 0), b.import_batch(problem.y_train, 0))]
    return Model(name, framework, model_func, params, b, data, objective, trained)


def training_report(model: Model, problem: DigitsProblem, config: StudyConfig) -> dict:
    t = model.trained
    return {
        "iterations": t.iterations,
        "converged": t.converged,
        "gradient_norm": t.gradient_norm,
        "gradient_tol": config.train_tol,
        "objective": t.objective,
        "train_accuracy": _accuracy(model, problem.X_train, problem.y_train),
        "train_accuracy_clean_labels": _accuracy(model, problem.X_train, problem.y_clean),
        "test_accuracy": _accuracy(model, problem.X_test, problem.y_test),
        "seconds": t.seconds,
    }


def _accuracy(model: Model, X: np.ndarray, y: np.ndarray) -> float:
    logits = model.b.to_numpy(model.b.model_fn(model.b.primals, model.b.import_batch(X, 0)))
    return float(np.mean(np.argmax(logits, axis=1) == y))


def run_backend(
    framework: str,
    problem: DigitsProblem,
    config: StudyConfig,
    plan: dict[str, Sequence[str]],
    say: Callable[[str], None],
) -> tuple[dict, dict[str, np.ndarray]]:
    """Everything on one backend; returns its report sections and the scores per method."""
    sections: dict[str, Any] = {"models": {}, "methods": {}, "loo": {}}
    scores: dict[str, np.ndarray] = {}
    for name in MODELS:
        model = train_model(name, framework, problem, config)
        sections["models"][name] = {
            "num_params": int(model.trained.w.size),
            "training": training_report(model, problem, config),
        }
        say(_training_line(framework, name, sections["models"][name]))
        for method in plan[name]:
            report, scores[f"{name}_{method}"] = method_report(model, method, problem, config)
            sections["methods"][f"{name}_{method}"] = report
            say(_method_line(framework, report))
        sections["loo"][name] = loo_report(model, problem, config)
        say(_loo_line(framework, name, sections["loo"][name]))
        if name == "logreg":
            sections["test_influence"] = grid_report(model, problem, config)
    return sections, scores


# --- the whole run -------------------------------------------------------------------------------
def run_influence_study(
    backends: Iterable[str],
    *,
    methods: Sequence[str] | None = None,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    seed: int = 0,
    quiet: bool = False,
    stream: TextIO | None = None,
    command: Sequence[str] = (),
    config: StudyConfig | None = None,
) -> dict:
    """Run the study on each backend, print the table, save the plots and the JSON.

    Args:
        backends: Installed framework names (the first one's results are plotted).
        methods: Which of :data:`METHODS` to rank with, on both models
            (default: :data:`DEFAULT_PLAN`).
        out_dir: Directory for the PNGs (created), or ``None``.
        json_path: Where to write the JSON report, or ``None``.
        seed: Seed of split, flips, initial weights and the random baseline.
        quiet: Print only the final table.
        stream: Where to print (default ``sys.stdout``).
        command: The command line, recorded in the report.
        config: Sizes and tolerances (default :class:`StudyConfig`).

    Returns:
        The report (see the module docstring).
    """
    stream = stream or sys.stdout
    config = config or StudyConfig()
    names, wall, usage = list(backends), time.perf_counter(), os.times()
    load_start = _loadavg()
    plan = DEFAULT_PLAN if methods is None else {model: tuple(methods) for model in MODELS}
    problem = make_problem(seed, config)
    if config.block_size > len(problem.y_train):
        config = replace(config, block_size=len(problem.y_train))
    say = (lambda text: None) if quiet else (lambda text: print(text, file=stream, flush=True))
    say(_describe(problem, config, names))
    threads = plan_threads(names, processes=config.processes)
    say(threads.describe())
    outcome, observed = run_backends(names, threads, run_backend, (problem, config, plan), say)
    results = {name: r[0] for name, r in outcome.items()}
    scores = {name: r[1] for name, r in outcome.items()}
    report = _assemble(problem, config, names, results, scores, command)
    print(format_table(report, names), file=stream)
    report["plots"] = _plots(report, problem, config, names, out_dir, stream)
    after = os.times()
    report["timings"] = {
        "wall_s": time.perf_counter() - wall,
        # the backends' processes, if any, have ended: their times are the children's
        "cpu_user_s": after.user - usage.user + after.children_user - usage.children_user,
        "cpu_system_s": (
            after.system - usage.system + after.children_system - usage.children_system
        ),
    }
    report["threads"] = {**threads.as_dict(), "observed": observed}
    report["load"] = {
        "cpu_count": os.cpu_count(),
        "loadavg_1min_start": load_start,
        "loadavg_1min_end": _loadavg(),
    }
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"JSON report: {json_path}", file=stream)
    timing = report["timings"]
    print(
        f"total: {timing['wall_s']:.1f} s wall, {timing['cpu_user_s']:.1f} s user CPU "
        f"(1-min load average {load_start} at the start)",
        file=stream,
    )
    return report


def _assemble(
    problem: DigitsProblem,
    config: StudyConfig,
    names: Sequence[str],
    results: dict,
    scores: dict,
    command: Sequence[str],
) -> dict:
    n = len(problem.y_train)
    sections: dict[str, Any] = {"models": {}, "methods": {}, "loo": {}}
    for section in sections:
        for name in names:
            for key, value in results[name][section].items():
                sections[section].setdefault(key, {})[name] = value
    return {
        "schema": SCHEMA,
        "command": list(command),
        "problem": {
            "seed": problem.seed,
            "n_train": n,
            "n_test": len(problem.y_test),
            "n_flipped": int(problem.flipped.sum()),
            "num_classes": NUM_CLASSES,
            "flip_fraction": config.flip_fraction,
            "l2": config.l2,
            "cg_tol": config.cg_tol,
            "block_size": config.block_size,
            "models": {m: _architecture_label(m, config) for m in MODELS},
            "inspected_at_10pct": round(0.1 * n),
        },
        "versions": versions(sklearn="scikit-learn"),
        **sections,
        "random_recall_at_10pct": round(0.1 * n) / n,
        "agreement": agreement(scores, names),
        "test_influence": {name: results[name]["test_influence"] for name in names},
    }


def agreement(scores: dict[str, dict[str, np.ndarray]], names: Sequence[str]) -> dict:
    """Spearman correlation and largest relative difference of the first two backends' scores."""
    if len(names) < 2:
        return {}
    first, second = scores[names[0]], scores[names[1]]
    result = {}
    for key in first:
        if key.endswith("_random"):
            continue
        a, c = first[key], second[key]
        result[key] = {
            "spearman": float(scipy.stats.spearmanr(a, c).statistic),
            "max_relative_difference": float(np.max(np.abs(a - c)) / np.max(np.abs(a))),
        }
    return result


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _architecture_label(model: str, config: StudyConfig) -> str:
    widths = "-".join(str(w) for w in architecture(model, config))
    return f"{widths} softmax" if model == "logreg" else f"{widths} tanh"


# --- text ---------------------------------------------------------------------------------------
def format_table(report: dict, names: Sequence[str]) -> str:
    """Recall at 10% inspected and seconds per method and backend, and the agreement."""
    header = ["model", "method"]
    for name in names:
        header += [f"recall@10% {name}", f"s {name}"]
    if len(names) > 1:
        header.append("Spearman")
    lines = [header]
    for key, per_backend in report["methods"].items():
        first = per_backend[names[0]]
        cells = [first["model"], first["method"]]
        for name in names:
            entry = per_backend[name]
            cells += [f"{entry['recall_at_10pct']:.3f}", f"{entry['seconds']:.1f}"]
        if len(names) > 1:
            match = report["agreement"].get(key)
            cells.append("-" if match is None else f"{match['spearman']:.6f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for j, cells in enumerate(lines):
        text.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    text.append(f"random order: recall@10% = {report['random_recall_at_10pct']:.3f} expected")
    for model, per_backend in report["loo"].items():
        rs = ", ".join(f"{n} r = {per_backend[n]['pearson_r']:.4f}" for n in names)
        text.append(f"leave-one-out, {model} ({len(per_backend[names[0]]['actual'])} points): {rs}")
    return "\n".join(text)


def _describe(problem: DigitsProblem, config: StudyConfig, names: Sequence[str]) -> str:
    models = ", ".join(_architecture_label(m, config) for m in MODELS)
    return (
        f"Influence functions on scikit-learn's digits: {len(problem.y_train)} training images "
        f"({int(problem.flipped.sum())} labels flipped), {len(problem.y_test)} test images, "
        f"seed {problem.seed}\n  models: {models}; l2 {config.l2:g}; backends: {', '.join(names)}"
    )


def _training_line(framework: str, name: str, section: dict) -> str:
    t = section["training"]
    state = "trained" if t["converged"] else "NOT converged"
    return (
        f"{framework} {name}: {state} in {t['iterations']} L-BFGS iterations "
        f"(|grad| {t['gradient_norm']:.1e}), train accuracy {t['train_accuracy']:.3f}, "
        f"test accuracy {t['test_accuracy']:.3f}, {t['seconds']:.1f} s"
    )


def _method_line(framework: str, report: dict) -> str:
    text = (
        f"  {framework} {report['model']} {report['method']}: recall@10% "
        f"{report['recall_at_10pct']:.3f}, {report['seconds']:.1f} s"
    )
    cg = report["cg"]
    if cg is not None:
        text += (
            f"; CG {cg['converged']}/{cg['columns']} converged, iterations "
            f"{cg['iterations_min']}..{cg['iterations_max']}, relative residual <= "
            f"{cg['max_relative_residual']:.1e}"
        )
        if not cg["all_converged"]:
            text += f" (NOT all converged: {cg['indefinite']} met non-positive curvature)"
    return text


def _loo_line(framework: str, name: str, loo: dict) -> str:
    return (
        f"  {framework} {name} leave-one-out ({len(loo['actual'])} retrainings): Pearson r "
        f"{loo['pearson_r']:.4f}, {loo['seconds']:.1f} s"
    )


# --- plots --------------------------------------------------------------------------------------
def _plots(
    report: dict,
    problem: DigitsProblem,
    config: StudyConfig,
    names: Sequence[str],
    out_dir: Path | None,
    stream: TextIO,
) -> dict:
    paths: dict[str, str | None] = {"recall": None, "test_influence": None, "loo": None}
    if out_dir is None:
        return paths
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'curvlinops[plot]')", file=stream)
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["recall"] = str(plot_recall(Figure, report, names, out_dir / "recall.png"))
    paths["test_influence"] = str(
        plot_test_influence(
            Figure, report["test_influence"][names[0]], problem, out_dir / "test_influence.png"
        )
    )
    paths["loo"] = str(plot_loo(Figure, report["loo"], names, out_dir / "loo.png"))
    print("plots: " + ", ".join(p for p in paths.values() if p), file=stream)
    return paths


def plot_recall(Figure: Any, report: dict, names: Sequence[str], path: Path) -> Path:
    """Recall against fraction inspected, one panel per model, a line per method and backend."""
    figure = Figure(figsize=(9, 3.8), dpi=80)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    styles = ["-", "--", ":"]
    for column, model in enumerate(MODELS):
        ax = figure.add_subplot(1, len(MODELS), column + 1)
        entries = [v for v in report["methods"].values() if v[names[0]]["model"] == model]
        for color, per_backend in enumerate(entries):
            for style, name in zip(styles, names):
                entry = per_backend[name]
                label = entry["method"] if style == "-" else None
                ax.plot(grid, entry["recall_curve"], style, color=f"C{color}", lw=1.4, label=label)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, label="random (expected)")
        ax.axvline(0.1, color="0.8", lw=0.8)
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_title(_architecture_label(model, _config_of(report)))
        if column == 0:
            ax.set_ylabel("fraction of flipped labels found")
            ax.legend(loc="lower right", fontsize=8)
    figure.suptitle(
        "Self-influence finds flipped labels ("
        + ", ".join(f"{s} {n}" for s, n in zip(styles, names))
        + ")",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _config_of(report: dict) -> StudyConfig:
    hidden = int(report["problem"]["models"]["mlp"].split("-")[1])
    return StudyConfig(hidden=hidden)


def plot_test_influence(Figure: Any, section: dict, problem: DigitsProblem, path: Path) -> Path:
    """Each row: a test image, its most helpful and most harmful training images."""
    rows, k = len(section["test_indices"]), len(section["helpful"][0])
    figure = Figure(figsize=(1.0 * (2 * k + 1.4), 1.25 * rows + 0.4), dpi=80)
    columns = 2 * k + 1
    for r, t in enumerate(section["test_indices"]):
        ax = figure.add_subplot(rows, columns, r * columns + 1)
        _digit(ax, problem.X_test[t], f"test {problem.y_test[t]}", "C0")
        for j, kind in enumerate(("helpful", "harmful")):
            for c, i in enumerate(section[kind][r]):
                ax = figure.add_subplot(rows, columns, r * columns + 2 + j * k + c)
                if problem.flipped[i]:
                    title, color = f"{problem.y_train[i]} (was {problem.y_clean[i]})", "red"
                else:
                    title, color = f"{problem.y_train[i]}", "0.5"
                _digit(ax, problem.X_train[i], title, color)
    figure.suptitle(
        f"Most helpful (left {k}) and harmful (right {k}) training images for the test images "
        "of largest loss; red: flipped label",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _digit(ax: Any, pixels: np.ndarray, title: str, color: str) -> None:
    ax.imshow(pixels.reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8, color="red" if color == "red" else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(2.0 if color == "red" else 0.8)


def plot_loo(Figure: Any, loo: dict, names: Sequence[str], path: Path) -> Path:
    """Predicted against retrained change of the test loss, one panel per model."""
    figure = Figure(figsize=(8, 3.8), dpi=80)
    markers = ["o", "x", "+"]
    for column, model in enumerate(loo):
        ax = figure.add_subplot(1, len(loo), column + 1)
        values = []
        for marker, name in zip(markers, names):
            entry = loo[model][name]
            ax.scatter(
                entry["actual"],
                entry["predicted"],
                marker=marker,
                s=18,
                label=f"{name}: r = {entry['pearson_r']:.3f}",
            )
            values += entry["actual"] + entry["predicted"]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="0.6", lw=0.8)
        ax.set_xlabel("actual change of test loss (retrained)")
        ax.set_title(f"leave-one-out, {model}")
        if column == 0:
            ax.set_ylabel("predicted by influence")
        ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
