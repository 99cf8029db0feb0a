r"""The lecture's curvature study of a regularised linear autoencoder, on every backend.

``python -m curvlinops demo`` (or the console script ``curvlinops demo``)
reproduces the example of the seed lecture (Grosse, CSC 2541, lecture 2):
weak symmetry breaking in a linear autoencoder with a non-uniform
:math:`\ell_2` penalty,

.. math::
    \mathcal{J}(W_1, W_2) = \frac{1}{2N} \sum_{i=1}^N \|W_2 W_1 x_i - x_i\|^2
    + \tfrac12 \|\Lambda^{1/2} W_1\|_F^2 + \tfrac12 \|W_2 \Lambda^{1/2}\|_F^2,

with :math:`W_1 \in \mathbb{R}^{K \times D}`, :math:`W_2 \in \mathbb{R}^{D \times K}`
and :math:`\Lambda = \mathrm{diag}(\lambda_1 < \dots < \lambda_K)`.

Problem (embedded, no download): ``D = 20``, ``K = 5``, ``N = 2000`` training
and ``500`` held-out points, drawn from a Gaussian with covariance spectrum
:math:`4 \cdot 0.75^j` (``j = 0..19``) in a random basis, and centred;
:math:`\Lambda = \mathrm{diag}(0.1, 0.2, 0.3, 0.4, 0.5)`, below the top ``K``
eigenvalues :math:`s_k^2` of the empirical covariance
:math:`X^\top X / N = U S^2 U^\top` (so the optimum is non-degenerate). Everything
random comes from ``--seed`` (default 0).

Steps, per backend:

1. Train from a small random initialisation by full-batch gradient descent with
   heavy-ball momentum (step size 0.15, momentum 0.98) until the gradient norm is
   below ``1e-11`` (float64) or ``1e-5`` (float32), and compare the result with the
   closed form :math:`W_1^\star = (I - \Lambda S^{-2})^{1/2} U^\top`,
   :math:`W_2^\star = U (I - \Lambda S^{-2})^{1/2}` (unique up to the sign of each
   latent unit: the distance is reported after aligning signs, and the angle
   between row ``k`` of :math:`W_1` and the principal component :math:`u_k`).
2. The Hessian :math:`H` of :math:`\mathcal{J}` at the trained weights is
   ``HessianLinearOperator`` of the data term (the loss
   ``CallableLoss(half_squared_error, reduction="mean")``, which is the
   lecture's :math:`\frac{1}{2N}\sum_i` over batches of 500) plus the
   regulariser's Hessian, the constant diagonal matrix with :math:`\lambda_k` at
   every entry of row ``k`` of :math:`W_1` and column ``k`` of :math:`W_2`
   (``DiagonalLinearOperator``). The regulariser is quadratic, so the GGN of
   :math:`\mathcal{J}` is the data term's ``GGNLinearOperator`` plus the same
   diagonal.
3. Rayleigh quotients :math:`v^\top H v / v^\top v` along the tangents of the
   rescaling :math:`(\gamma W_1, \gamma W_2)` at :math:`\gamma = 1` and of the
   Givens rotation of latent coordinates 1 and 2,
   :math:`(Q_\theta W_1, W_2 Q_\theta^\top)` at :math:`\theta = 0`, both by a JVP
   (``transformation_tangent``); their ratio.
4. The top 5 eigenvalues of :math:`H` and of the GGN by ``eigsh``, the
   gradient-descent stability bound :math:`2/\lambda_{\max}`, all eigenvalues
   from the dense matrix (``P = 200``), and the SLQ spectral density of
   :math:`H` (16 probes, 60 Lanczos steps) against the exact eigenvalues, as a
   PNG ``hessian_spectrum_<backend>.png`` in ``--out``.
5. One conjugate-gradient solve :math:`(H + 10^{-3} I)\,x = g`, with :math:`g`
   the gradient of the data term on the held-out points (the vector of
   influence functions).

Finally one table compares every number across backends.

JSON report (``--json FILE``), schema ``"curvlinops-demo/1"``::

    {
      "schema": "curvlinops-demo/1",
      "command": [str, ...],                  # the arguments of the run
      "dtype": "float64" | "float32",
      "problem": {"seed", "D", "K", "N", "N_test": int,
                  "penalties": [K], "variances": [K],      # Λ and s² (top K)
                  "optimal_objective": float},             # J at the closed form
      "versions": {"python", "platform", "curvlinops", "numpy", "scipy",
                   "torch", "jax": str or null},
      "backends": {                            # one entry per backend that ran
        "<name>": {
          "device": str, "dtype": str,
          "training": {"learning_rate", "momentum", "gradient_tol": float,
                       "steps": int, "converged": bool, "initial_objective",
                       "final_objective", "gradient_norm", "distance_to_closed_form",
                       "relative_distance_to_closed_form": float,
                       "signs": [K] (±1), "angles_deg": [K],
                       "decoder_angles_deg": [K]},
          "weights": {"W1": [[D] x K], "W2": [[K] x D]},   # trained, as used below
          "rayleigh_quotients": {"scaling", "rotation", "ratio": float},
          "eigenvalues": {"k": int, "hessian_top": [k], "ggn_top": [k]  # descending
                          "hessian_dense_top": [k], "ggn_dense_top": [k],
                          "hessian_min_dense": float, "eigsh_max_abs_error": float,
                          "lambda_max": float, "max_stable_learning_rate": float},
          "spectral_density": {"num_probes", "num_steps": int, "kernel_width",
                               "l1_distance_to_exact", "mean_eigenvalue_slq",
                               "mean_eigenvalue_exact": float, "png": str or null},
          "cg": {"damping", "tol": float, "iterations": int, "num_products": int,
                 "converged": bool, "residual_norm", "relative_residual",
                 "true_relative_residual", "rhs_norm", "solution_norm",
                 "rhs_dot_solution": float},               # gᵀ(H + λI)⁻¹g
          "timings_s": {"setup", "training", "operators", "rayleigh", "eigsh",
                        "dense", "slq", "cg", "total": float}
        }
      },
      "comparison": {"rows": [{"quantity": str, "values": {"<name>": number},
                               "max_abs_difference": number or null}],
                     "largest_relative_difference": {"quantity": str or null,
                                                     "value": float or null}},
      "timings": {"wall_s", "cpu_user_s", "cpu_system_s": float}
    }

Numbers are Python floats (full precision); eigenvalue lists are in descending
order. ``max_abs_difference`` is ``null`` for a single backend and for timings.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from curvlinops.jobs._report import Clock, printer, versions, write_json
from curvlinops.jobs.demo.problem import (
    BATCH_SIZE,
    CHECK_EVERY,
    LEARNING_RATE,
    MOMENTUM,
    PENALTIES,
    PHASES,
    SCHEMA,
    SLQ_PROBES,
    SLQ_STEPS,
    D,
    K,
    N,
    Problem,
    align_signs,
    angles_to_components,
    closed_form_optimum,
    make_problem,
    objective,
    regulariser_diagonal,
)
from curvlinops.jobs.demo.report import (
    _describe,
    _problem_section,
    _summary,
    comparison,
    format_table,
)
from curvlinops.jobs.demo.study import run_backend
from curvlinops.jobs.demo.training import Framework, Progress, train

__all__ = [
    "BATCH_SIZE",
    "LEARNING_RATE",
    "MOMENTUM",
    "PENALTIES",
    "PHASES",
    "SLQ_PROBES",
    "CHECK_EVERY",
    "D",
    "K",
    "N",
    "SCHEMA",
    "SLQ_STEPS",
    "Framework",
    "Problem",
    "Progress",
    "align_signs",
    "angles_to_components",
    "closed_form_optimum",
    "comparison",
    "format_table",
    "make_problem",
    "objective",
    "regulariser_diagonal",
    "run_backend",
    "run_demo",
    "train",
    "versions",
]


# --- the whole run -------------------------------------------------------------------------------
def run_demo(
    backends: Iterable[str],
    *,
    dtype: str = "float64",
    out_dir: Path | None = None,
    json_path: Path | None = None,
    seed: int = 0,
    quiet: bool = False,
    progress: bool | None = None,
    stream: TextIO | None = None,
    command: Sequence[str] = (),
) -> dict:
    """Run the study on each backend, print the comparison table, and write the JSON.

    Args:
        backends: Installed framework names, in the order of the table's columns.
        dtype: ``"float32"`` or ``"float64"``.
        out_dir: Directory for the PNG files (created), or ``None`` for no plots.
        json_path: Where to write the JSON report, or ``None``.
        seed: Seed of the data and the initialisation.
        quiet: Print only the final table.
        progress: Show progress bars (default: not ``quiet`` and ``stream`` is a terminal).
        stream: Where to print (default ``sys.stdout``).
        command: The command line, recorded in the report.

    Returns:
        The report (the JSON document; see the module docstring).
    """
    stream = stream or sys.stdout
    names = list(backends)
    if progress is None:
        progress = not quiet and stream.isatty()
    clock = Clock()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    problem = make_problem(seed)
    W1_star, W2_star = closed_form_optimum(problem)
    say = printer(quiet, stream)
    say(_describe(problem, dtype, names))
    results = {}
    for name in names:
        results[name] = run_backend(
            name, dtype, problem, out_dir=out_dir, progress=Progress(enabled=progress)
        )
        say(_summary(name, results[name]))
    table = comparison(results)
    print(format_table(table, names), file=stream)
    report = {
        "schema": SCHEMA,
        "command": list(command),
        "dtype": dtype,
        "problem": _problem_section(problem, objective(problem, W1_star, W2_star)),
        "versions": versions(),
        "backends": results,
        "comparison": table,
        "timings": clock.timings(),
        "load": clock.load(),
    }
    pngs = [r["spectral_density"]["png"] for r in results.values() if r["spectral_density"]["png"]]
    if pngs:
        print("spectral density plots: " + ", ".join(pngs), file=stream)
    elif out_dir is not None:
        print("no plots: matplotlib is not installed (pip install 'curvlinops[plot]')", file=stream)
    write_json(report, json_path, stream)
    print(clock.summary(report["timings"]), file=stream)
    return report
