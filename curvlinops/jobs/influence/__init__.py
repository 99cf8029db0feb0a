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

import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from curvlinops.jobs._parallel import plan_threads, run_backends
from curvlinops.jobs._report import Clock, printer, write_json
from curvlinops.jobs.influence.problem import (
    CURVE_POINTS,
    DEFAULT_PLAN,
    METHODS,
    MODELS,
    SCHEMA,
    DigitsProblem,
    StudyConfig,
    architecture,
    make_problem,
)
from curvlinops.jobs.influence.report import _assemble, _describe, _plots, format_table
from curvlinops.jobs.influence.study import method_report, recall_at, recall_curve, run_backend
from curvlinops.jobs.influence.training import train_model

__all__ = [
    "CURVE_POINTS",
    "DEFAULT_PLAN",
    "METHODS",
    "MODELS",
    "SCHEMA",
    "DigitsProblem",
    "StudyConfig",
    "architecture",
    "make_problem",
    "method_report",
    "recall_at",
    "recall_curve",
    "run_backend",
    "run_influence_study",
    "train_model",
]


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
    clock, names = Clock(), list(backends)
    plan = DEFAULT_PLAN if methods is None else {model: tuple(methods) for model in MODELS}
    problem = make_problem(seed, config)
    if config.block_size > len(problem.y_train):
        config = replace(config, block_size=len(problem.y_train))
    say = printer(quiet, stream)
    say(_describe(problem, config, names))
    threads = plan_threads(names, processes=config.processes)
    say(threads.describe())
    outcome, observed = run_backends(names, threads, run_backend, (problem, config, plan), say)
    results = {name: r[0] for name, r in outcome.items()}
    scores = {name: r[1] for name, r in outcome.items()}
    report = _assemble(problem, config, names, results, scores, command)
    print(format_table(report, names), file=stream)
    report["plots"] = _plots(report, problem, config, names, out_dir, stream)
    # the backends' processes, if any, have ended: their times are the children's
    report["timings"] = clock.timings()
    report["threads"] = {**threads.as_dict(), "observed": observed}
    report["load"] = clock.load()
    write_json(report, json_path, stream)
    print(clock.summary(report["timings"]), file=stream)
    return report
