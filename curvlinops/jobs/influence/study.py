"""The influence job on one backend: self-influence, test influence, leave-one-out."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.optimize
import scipy.stats

from curvlinops.ggn import GGNLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.influence import influence_on_test_loss
from curvlinops.inverse import CGInverseLinearOperator
from curvlinops.jobs.influence.problem import (
    CURVATURE_METHODS,
    CURVE_POINTS,
    EXAMPLES_PER_PASS,
    LOSS,
    MODELS,
    DigitsProblem,
    StudyConfig,
)
from curvlinops.jobs.influence.report import _loo_line, _method_line, _training_line
from curvlinops.jobs.influence.training import Model, minimise, train_model, training_report
from curvlinops.kfac import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator


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
