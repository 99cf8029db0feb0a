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

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import curvlinops
from curvlinops._checks import value_error
from curvlinops.backends import make_backend
from curvlinops.backends._namespaces import cpu_threads, framework_namespace, framework_version
from curvlinops.diagonal import DiagonalLinearOperator
from curvlinops.directional import rayleigh_quotient, transformation_tangent
from curvlinops.eigen import eigsh, max_stable_learning_rate
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient import gradient_and_loss
from curvlinops.hessian import HessianLinearOperator
from curvlinops.inverse import CGInverseLinearOperator
from curvlinops.losses import CallableLoss
from curvlinops.spectral import SpectralDensity, spectral_density

__all__ = [
    "Problem",
    "closed_form_optimum",
    "make_problem",
    "objective",
    "regulariser_diagonal",
    "run_backend",
    "run_demo",
]

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


# --- the model, written once for every framework ---------------------------------------------
def autoencoder(params: Sequence[Any], X: Any) -> Any:
    r"""The linear autoencoder :math:`x \mapsto W_2 W_1 x` on the rows of ``X``."""
    W1, W2 = params
    return (X @ W1.T) @ W2.T


def half_squared_error(outputs: Any, targets: Any) -> Any:
    r"""One batch's data term :math:`\frac{1}{2n}\sum_i \|\hat x_i - x_i\|^2`.

    As a ``reduction="mean"`` loss, batch ``b`` is weighted by :math:`n_b / N`, so the
    batches add up to the lecture's :math:`\frac{1}{2N}\sum_i`.
    """
    residual = outputs - targets
    return 0.5 * (residual * residual).sum() / residual.shape[0]


DATA_LOSS = CallableLoss(half_squared_error, reduction="mean")


def _objective_fn(xp: Any, X: Any, penalties: Any) -> Callable[[Any], Any]:
    r""":math:`\mathcal{J}` as a function of the parameter list (native arrays)."""

    def objective_of(params: Sequence[Any]) -> Any:
        W1, W2 = params
        residual = autoencoder(params, X) - X
        data = 0.5 * xp.sum(residual * residual) / X.shape[0]
        penalty = xp.sum(penalties[:, None] * W1 * W1) + xp.sum(W2 * W2 * penalties[None, :])
        return data + 0.5 * penalty

    return objective_of


def _rescaling(params: Sequence[Any], gamma: Any) -> list[Any]:
    r""":math:`T_\gamma(W_1, W_2) = (\gamma W_1, \gamma W_2)`."""
    return [gamma * params[0], gamma * params[1]]


def _rotation(xp: Any, dtype: Any) -> Callable[[Sequence[Any], Any], list[Any]]:
    r""":math:`T_\theta(W_1, W_2) = (Q_\theta W_1, W_2 Q_\theta^\top)`: latents 1, 2 rotated."""
    plane = np.zeros((K, K))
    plane[0, 0] = plane[1, 1] = 1.0
    generator = np.zeros((K, K))
    generator[0, 1], generator[1, 0] = -1.0, 1.0
    eye, plane = xp.eye(K, dtype=dtype), xp.asarray(plane, dtype=dtype)
    generator = xp.asarray(generator, dtype=dtype)

    def rotate(params: Sequence[Any], theta: Any) -> list[Any]:
        Q = eye + (xp.cos(theta) - 1.0) * plane + xp.sin(theta) * generator
        return [Q @ params[0], params[1] @ xp.matrix_transpose(Q)]

    return rotate


# --- one backend ---------------------------------------------------------------------------------
@dataclass
class Framework:
    """A framework's namespace and dtype, and conversions from and to numpy."""

    name: str
    dtype_name: str
    xp: Any = field(init=False)
    dtype: Any = field(init=False)

    def __post_init__(self) -> None:
        self.xp = framework_namespace(self.name, self.dtype_name)
        self.dtype = getattr(self.xp, self.dtype_name)

    def asarray(self, array: np.ndarray) -> Any:
        """A native array of the run's dtype."""
        return self.xp.asarray(np.asarray(array, dtype=self.dtype_name), dtype=self.dtype)

    @staticmethod
    def to_numpy(array: Any) -> np.ndarray:
        """A float64 numpy copy of a native array (any device)."""
        if hasattr(array, "detach"):  # a torch tensor
            array = array.detach().cpu().numpy()
        return np.array(array, dtype=np.float64)


@dataclass
class Progress:
    """tqdm progress bars, or nothing (``--quiet``, or output not a terminal)."""

    enabled: bool
    stream: TextIO = field(default_factory=lambda: sys.stderr)

    def bar(self, total: int, description: str, unit: str = "it") -> Any:
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=description,
            unit=unit,
            disable=not self.enabled,
            leave=False,
            file=self.stream,
            dynamic_ncols=True,
        )


@dataclass
class TrainingResult:
    """Trained parameters (native) and what training did.

    ``converged``: the gradient norm fell below the tolerance within ``MAX_STEPS``
    steps (checked every ``CHECK_EVERY`` steps); ``gradient_norm`` is the norm at the
    returned parameters.
    """

    params: list[Any]
    steps: int
    converged: bool
    initial_objective: float
    final_objective: float
    gradient_norm: float


def train(fw: Framework, problem: Problem, progress: Progress) -> TrainingResult:
    r"""Full-batch gradient descent with heavy-ball momentum, from ``problem``'s initialisation.

    :math:`m \leftarrow \beta m - \alpha \nabla\mathcal{J}(w)`, :math:`w \leftarrow w + m`,
    until :math:`\|\nabla\mathcal{J}\| \le` the dtype's tolerance or ``MAX_STEPS``.
    The step is compiled by the backend (``jax.jit``); the gradient comes from its VJP.

    Raises:
        RuntimeError: If the objective becomes NaN or infinite.
    """
    xp = fw.xp
    params = [fw.asarray(problem.W1_init), fw.asarray(problem.W2_init)]
    b = make_backend(autoencoder, params, fw.name)
    objective_of = _objective_fn(xp, fw.asarray(problem.X), fw.asarray(problem.penalties))
    step = b.compile(_momentum_step(b, objective_of, LEARNING_RATE, MOMENTUM))
    velocity = [xp.zeros_like(p) for p in params]
    tol, steps, converged = GRADIENT_TOL[fw.dtype_name], 0, False
    initial = float(step(params, velocity)[2])  # J at the initialisation (update discarded)
    with progress.bar(MAX_STEPS, f"{fw.name}: training", unit="step") as bar:
        while steps < MAX_STEPS and not converged:
            for _ in range(CHECK_EVERY):
                params, velocity, value, squared_norm = step(params, velocity)
            steps += CHECK_EVERY
            value, norm = float(value), math.sqrt(float(squared_norm))
            if not (math.isfinite(value) and math.isfinite(norm)):
                raise RuntimeError(
                    f"{fw.name}: training diverged at step {steps} (objective {value}); "
                    "the step size is too large for this problem."
                )
            bar.update(CHECK_EVERY)
            bar.set_postfix_str(f"objective {value:.8f}, |grad| {norm:.1e}")
            converged = norm <= tol
    # the objective and gradient at the final weights (the step's update is discarded)
    _, _, value, squared_norm = step(params, velocity)
    return TrainingResult(
        params, steps, converged, initial, float(value), math.sqrt(float(squared_norm))
    )


def _momentum_step(b: Any, objective_of: Callable, lr: float, beta: float) -> Callable:
    """One heavy-ball step; returns parameters, velocity, objective, squared gradient norm."""
    xp = b.xp

    def step(params: list[Any], velocity: list[Any]) -> tuple[list, list, Any, Any]:
        value, pullback = b.vjp(objective_of, params)
        grads = pullback(xp.ones_like(value))
        velocity = [beta * v - lr * g for v, g in zip(velocity, grads)]
        params = [p + v for p, v in zip(params, velocity)]
        return params, velocity, value, sum(xp.sum(g * g) for g in grads)

    return step


def training_report(fw: Framework, problem: Problem, result: TrainingResult) -> dict:
    """The training section of the report: the trained weights against the closed form."""
    W1, W2 = (fw.to_numpy(p) for p in result.params)
    W1_star, W2_star = closed_form_optimum(problem)
    signs, distance, relative = align_signs(W1, W2, W1_star, W2_star)
    return {
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "gradient_tol": GRADIENT_TOL[fw.dtype_name],
        "steps": result.steps,
        "converged": result.converged,
        "initial_objective": result.initial_objective,
        "final_objective": result.final_objective,
        "gradient_norm": result.gradient_norm,
        "distance_to_closed_form": distance,
        "relative_distance_to_closed_form": relative,
        "signs": signs.tolist(),
        "angles_deg": angles_to_components(W1, problem.components).tolist(),
        "decoder_angles_deg": angles_to_components(W2.T, problem.components).tolist(),
    }


@dataclass
class Operators:
    r"""The curvature of :math:`\mathcal{J}` at the trained weights."""

    hessian: Any  # data-term Hessian + regulariser
    ggn: Any  # data-term GGN + regulariser


def curvature_operators(fw: Framework, problem: Problem, params: list[Any]) -> Operators:
    """Hessian and GGN of the whole objective (data term over 4 batches, plus regulariser)."""
    batches = [fw.asarray(problem.X[i : i + BATCH_SIZE]) for i in range(0, N, BATCH_SIZE)]
    data = [(X, X) for X in batches]
    options = {"backend": fw.name, "columns_per_pass": 2 * K * D}
    H_data = HessianLinearOperator(autoencoder, DATA_LOSS, params, data, **options)
    G_data = GGNLinearOperator(autoencoder, DATA_LOSS, params, data, **options)
    regulariser = DiagonalLinearOperator(regulariser_diagonal(problem), like=H_data)
    return Operators(H_data + regulariser, G_data + regulariser)


def rayleigh_report(fw: Framework, ops: Operators, params: list[Any]) -> dict:
    """Curvature along the rescaling and the latent-rotation tangents, and their ratio."""
    v_scale = transformation_tangent(_rescaling, params, at=1.0, backend=fw.name)
    v_rotation = transformation_tangent(_rotation(fw.xp, fw.dtype), params, at=0.0, backend=fw.name)
    scaling = float(rayleigh_quotient(ops.hessian, v_scale))
    rotation = float(rayleigh_quotient(ops.hessian, v_rotation))
    return {"scaling": scaling, "rotation": rotation, "ratio": scaling / rotation}


def eigsh_report(fw: Framework, ops: Operators) -> dict:
    """Top eigenvalues of the Hessian and the GGN by ``eigsh``, and ``2 / lambda_max``."""
    top = {}
    for name, op in (("hessian_top", ops.hessian), ("ggn_top", ops.ggn)):
        values = eigsh(op, k=TOP_K, which="LA", return_eigenvectors=False)
        top[name] = np.sort(fw.to_numpy(values))[::-1].tolist()
    rate = max_stable_learning_rate(ops.hessian)
    return {"k": TOP_K, **top, "lambda_max": 2.0 / rate, "max_stable_learning_rate": rate}


def dense_spectra(fw: Framework, ops: Operators) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues of the Hessian and the GGN from their dense matrices, ascending."""
    spectra = []
    for op in (ops.hessian, ops.ggn):
        matrix = fw.to_numpy(op.todense())
        spectra.append(np.linalg.eigvalsh(0.5 * (matrix + matrix.T)))
    return spectra[0], spectra[1]


def dense_report(top: dict, hessian: np.ndarray, ggn: np.ndarray) -> dict:
    """The dense eigenvalues next to ``eigsh``'s, and the largest difference."""
    h_top, g_top = hessian[::-1][:TOP_K], ggn[::-1][:TOP_K]
    error = max(
        float(np.max(np.abs(np.asarray(top["hessian_top"]) - h_top))),
        float(np.max(np.abs(np.asarray(top["ggn_top"]) - g_top))),
    )
    return {
        "hessian_dense_top": h_top.tolist(),
        "ggn_dense_top": g_top.tolist(),
        "hessian_min_dense": float(hessian[0]),
        "eigsh_max_abs_error": error,
    }


def smoothed_density(grid: np.ndarray, eigenvalues: np.ndarray, width: float) -> np.ndarray:
    r""":math:`\frac1n \sum_i g_\sigma(t - \lambda_i)`, Gaussian kernel of width :math:`\sigma`."""
    z = (grid[:, None] - eigenvalues[None, :]) / width
    return np.exp(-0.5 * z**2).mean(axis=1) / (width * math.sqrt(2 * math.pi))


def slq_report(
    fw: Framework, ops: Operators, exact: np.ndarray, out_dir: Path | None, seed: int
) -> dict:
    """SLQ density of the Hessian against the exact eigenvalues (and the PNG)."""
    result = spectral_density(ops.hessian, num_probes=SLQ_PROBES, num_steps=SLQ_STEPS, seed=seed)
    reference = smoothed_density(result.grid, exact, result.kernel_width)
    l1 = float(np.trapezoid(np.abs(result.density - reference), result.grid))
    png = None
    if out_dir is not None:
        png = plot_spectrum(
            result,
            exact,
            out_dir / f"hessian_spectrum_{fw.name}.png",
            f"Hessian spectrum at the optimum ({fw.name}, {fw.dtype_name})",
        )
    return {
        "num_probes": SLQ_PROBES,
        "num_steps": SLQ_STEPS,
        "kernel_width": float(result.kernel_width),
        "l1_distance_to_exact": l1,
        "mean_eigenvalue_slq": float(np.sum(result.weights * result.nodes) / SLQ_PROBES),
        "mean_eigenvalue_exact": float(np.mean(exact)),
        "png": None if png is None else str(png),
    }


def plot_spectrum(
    result: SpectralDensity, exact: np.ndarray, path: Path, title: str
) -> Path | None:
    """Save the SLQ density over a histogram of the exact eigenvalues as a PNG.

    Returns:
        The path, or ``None`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(7, 4.2), dpi=120)
    ax = figure.add_subplot()
    ax.hist(exact, bins=60, density=True, color="0.8", edgecolor="0.6", label="exact eigenvalues")
    ax.plot(result.grid, result.density, color="C0", lw=1.8, label="SLQ density")
    reference = smoothed_density(result.grid, exact, result.kernel_width)
    ax.plot(result.grid, reference, "--", color="C1", lw=1.2, label="exact, same smoothing")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-3)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (integrates to 1)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def cg_report(fw: Framework, problem: Problem, ops: Operators, params: list[Any]) -> dict:
    r"""One CG solve of :math:`(H + \lambda I) x = g`, ``g`` the held-out data gradient."""
    X_test = fw.asarray(problem.X_test)
    g, _ = gradient_and_loss(
        autoencoder, DATA_LOSS, params, [(X_test, X_test)], flat=True, backend=fw.name
    )
    tol = CG_TOL[fw.dtype_name]
    inverse = CGInverseLinearOperator(ops.hessian, damping=CG_DAMPING, tol=tol)
    x = inverse @ g
    info = inverse.info
    residual = ops.hessian @ x + CG_DAMPING * x - g
    g_host, x_host = fw.to_numpy(g), fw.to_numpy(x)
    rhs_norm = float(np.linalg.norm(g_host))
    return {
        "damping": CG_DAMPING,
        "tol": tol,
        "iterations": int(info.iterations[0]),
        "num_products": int(info.num_products),
        "converged": bool(info.converged[0]),
        "residual_norm": float(info.residual_norms[0]),
        "relative_residual": float(info.relative_residuals[0]),
        "true_relative_residual": float(np.linalg.norm(fw.to_numpy(residual)) / rhs_norm),
        "rhs_norm": rhs_norm,
        "solution_norm": float(np.linalg.norm(x_host)),
        "rhs_dot_solution": float(g_host @ x_host),
    }


class _Clock:
    """Wall-clock seconds per phase."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self._last
        self._last = now


def run_backend(
    name: str,
    dtype: str,
    problem: Problem,
    *,
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """The whole study on one backend; returns its section of the JSON report.

    Args:
        name: ``"torch"`` or ``"jax"``.
        dtype: ``"float32"`` or ``"float64"``.
        problem: From :func:`make_problem`.
        out_dir: Where to save the PNG (``None``: no plot).
        progress: Progress bars (default: none).
    """
    progress = progress or Progress(enabled=False)
    clock, start = _Clock(), time.perf_counter()
    with cpu_threads(name, TORCH_THREADS):
        fw = Framework(name, dtype)
        clock.lap("setup")
        with progress.bar(len(PHASES), f"{name}: study", unit="phase") as phases:
            phases.set_postfix_str(PHASES[0])
            report = _study(
                fw, problem, out_dir, progress, lambda phase: _advance(phases, clock, phase)
            )
    report["timings_s"] = {**clock.times, "total": time.perf_counter() - start}
    return report


def _study(
    fw: Framework,
    problem: Problem,
    out_dir: Path | None,
    progress: Progress,
    done: Callable[[str], None],
) -> dict:
    """The steps of :func:`run_backend`; ``done(phase)`` is called after each."""
    report: dict[str, Any] = {"dtype": fw.dtype_name}
    trained = train(fw, problem, progress)
    report["training"] = training_report(fw, problem, trained)
    report["weights"] = {
        "W1": fw.to_numpy(trained.params[0]).tolist(),
        "W2": fw.to_numpy(trained.params[1]).tolist(),
    }
    done("training")
    ops = curvature_operators(fw, problem, trained.params)
    report["device"] = str(ops.hessian.backend.device)
    done("operators")
    report["rayleigh_quotients"] = rayleigh_report(fw, ops, trained.params)
    done("rayleigh")
    report["eigenvalues"] = eigsh_report(fw, ops)
    done("eigsh")
    hessian_spectrum, ggn_spectrum = dense_spectra(fw, ops)
    report["eigenvalues"].update(
        dense_report(report["eigenvalues"], hessian_spectrum, ggn_spectrum)
    )
    done("dense")
    report["spectral_density"] = slq_report(fw, ops, hessian_spectrum, out_dir, problem.seed)
    done("slq")
    report["cg"] = cg_report(fw, problem, ops, trained.params)
    done("cg")
    return report


def _advance(bar: Any, clock: _Clock, phase: str) -> None:
    clock.lap(phase)
    bar.update(1)
    following = PHASES.index(phase) + 1
    if following < len(PHASES):
        bar.set_postfix_str(PHASES[following])


# --- comparison table ------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One quantity of the table: where it is in a backend's report, and how to print it."""

    label: str
    get: Callable[[dict], float | int]
    fmt: str
    compare: bool = True  # timings are not compared
    # a curvature number (eigenvalue, Rayleigh quotient, solve): enters the largest difference
    curvature: bool = False


def _rows() -> list[Row]:
    rows = [
        Row("training steps", lambda r: r["training"]["steps"], "d"),
        Row("final gradient norm", lambda r: r["training"]["gradient_norm"], ".2e"),
        Row("distance to closed form", lambda r: r["training"]["distance_to_closed_form"], ".2e"),
        Row("max angle W1 row vs PC (deg)", lambda r: max(r["training"]["angles_deg"]), ".2e"),
        Row("objective at the optimum", lambda r: r["training"]["final_objective"], ".10f"),
        Row(
            "Rayleigh quotient, scaling",
            lambda r: r["rayleigh_quotients"]["scaling"],
            ".8f",
            curvature=True,
        ),
        Row(
            "Rayleigh quotient, rotation",
            lambda r: r["rayleigh_quotients"]["rotation"],
            ".4e",
            curvature=True,
        ),
        Row(
            "ratio scaling / rotation",
            lambda r: r["rayleigh_quotients"]["ratio"],
            ".2f",
            curvature=True,
        ),
    ]
    for kind, key in (("Hessian", "hessian_top"), ("GGN", "ggn_top")):
        for i in range(TOP_K):
            rows.append(
                Row(
                    f"{kind} eigenvalue {i + 1}",
                    _getter("eigenvalues", key, i),
                    ".8f",
                    curvature=True,
                )
            )
    rows += [
        Row(
            "eigsh vs dense, max |error|", lambda r: r["eigenvalues"]["eigsh_max_abs_error"], ".1e"
        ),
        Row(
            "Hessian smallest eigenvalue",
            lambda r: r["eigenvalues"]["hessian_min_dense"],
            ".4e",
            curvature=True,
        ),
        Row(
            "2 / lambda_max",
            lambda r: r["eigenvalues"]["max_stable_learning_rate"],
            ".8f",
            curvature=True,
        ),
        Row(
            "SLQ vs exact density, L1",
            lambda r: r["spectral_density"]["l1_distance_to_exact"],
            ".3f",
        ),
        Row("CG iterations", lambda r: r["cg"]["iterations"], "d"),
        Row("CG relative residual", lambda r: r["cg"]["true_relative_residual"], ".1e"),
        Row("g^T (H + 1e-3 I)^-1 g", lambda r: r["cg"]["rhs_dot_solution"], ".8f", curvature=True),
        Row("time (s)", lambda r: r["timings_s"]["total"], ".1f", compare=False),
    ]
    return rows


def _getter(section: str, key: str, index: int) -> Callable[[dict], float]:
    return lambda report: report[section][key][index]


def comparison(backends: dict[str, dict]) -> dict:
    """Every row's values per backend and the largest difference between backends."""
    rows, worst = [], (None, None)
    for row in _rows():
        values = {name: row.get(report) for name, report in backends.items()}
        difference = None
        if row.compare and len(values) > 1:
            numbers = list(values.values())
            difference = max(numbers) - min(numbers)
            if row.curvature:
                relative = float(difference) / max(abs(v) for v in numbers)
                if worst[1] is None or relative > worst[1]:
                    worst = (row.label, relative)
        rows.append({"quantity": row.label, "values": values, "max_abs_difference": difference})
    return {
        "rows": rows,
        "largest_relative_difference": {"quantity": worst[0], "value": worst[1]},
    }


def format_table(table: dict, names: Sequence[str]) -> str:
    """The comparison as aligned text: a column per backend and the largest difference."""
    formats = {row.label: row.fmt for row in _rows()}
    header = ["quantity", *names] + (["max |diff|"] if len(names) > 1 else [])
    lines = [header]
    for row in table["rows"]:
        fmt = formats[row["quantity"]]
        cells = [row["quantity"]] + [format(row["values"][n], fmt) for n in names]
        if len(names) > 1:
            diff = row["max_abs_difference"]
            cells.append("-" if diff is None else format(diff, "d" if fmt == "d" else ".1e"))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for j, cells in enumerate(lines):
        text.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
        if j == 0:
            text.append("  ".join("-" * w for w in widths))
    worst = table["largest_relative_difference"]
    if worst["quantity"] is not None:
        text.append(
            f"largest relative difference between backends (curvature): {worst['value']:.1e} "
            f"({worst['quantity']})"
        )
    return "\n".join(text)


# --- the whole run -------------------------------------------------------------------------------
def versions(**packages: str) -> dict:
    """Versions of Python, the platform and the libraries (``None``: not installed).

    ``packages`` maps report keys to distribution names reported besides scipy,
    torch and jax (``sklearn="scikit-learn"``).
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "curvlinops": curvlinops.__version__,
        "numpy": np.__version__,
        "scipy": framework_version("scipy"),
        **{key: framework_version(name) for key, name in packages.items()},
        "torch": framework_version("torch"),
        "jax": framework_version("jax"),
    }


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
    wall, usage = time.perf_counter(), os.times()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    problem = make_problem(seed)
    W1_star, W2_star = closed_form_optimum(problem)
    say = (lambda text: None) if quiet else (lambda text: print(text, file=stream, flush=True))
    say(_describe(problem, dtype, names))
    results = {}
    for name in names:
        results[name] = run_backend(
            name, dtype, problem, out_dir=out_dir, progress=Progress(enabled=progress)
        )
        say(_summary(name, results[name]))
    table = comparison(results)
    print(format_table(table, names), file=stream)
    after = os.times()
    report = {
        "schema": SCHEMA,
        "command": list(command),
        "dtype": dtype,
        "problem": _problem_section(problem, objective(problem, W1_star, W2_star)),
        "versions": versions(),
        "backends": results,
        "comparison": table,
        "timings": {
            "wall_s": time.perf_counter() - wall,
            "cpu_user_s": after.user - usage.user,
            "cpu_system_s": after.system - usage.system,
        },
    }
    pngs = [r["spectral_density"]["png"] for r in results.values() if r["spectral_density"]["png"]]
    if pngs:
        print("spectral density plots: " + ", ".join(pngs), file=stream)
    elif out_dir is not None:
        print("no plots: matplotlib is not installed (pip install 'curvlinops[plot]')", file=stream)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"JSON report: {json_path}", file=stream)
    timing = report["timings"]
    print(
        f"total: {timing['wall_s']:.1f} s wall, {timing['cpu_user_s']:.1f} s user CPU",
        file=stream,
    )
    return report


def _problem_section(problem: Problem, optimal_objective: float) -> dict:
    return {
        "seed": problem.seed,
        "D": D,
        "K": K,
        "N": N,
        "N_test": N_TEST,
        "penalties": problem.penalties.tolist(),
        "variances": problem.variances.tolist(),
        "optimal_objective": optimal_objective,
    }


def _describe(problem: Problem, dtype: str, names: Sequence[str]) -> str:
    variances = ", ".join(f"{v:.3f}" for v in problem.variances)
    penalties = ", ".join(f"{p:g}" for p in problem.penalties)
    return (
        f"Regularised linear autoencoder (lecture 2): D={D}, K={K}, N={N}, seed {problem.seed}, "
        f"{dtype}\n  top variances s^2 = [{variances}], penalties Lambda = [{penalties}]\n"
        f"  backends: {', '.join(names)}"
    )


def _summary(name: str, report: dict) -> str:
    training, rq = report["training"], report["rayleigh_quotients"]
    trained = "trained in" if training["converged"] else "NOT converged after"
    return (
        f"{name}: {trained} {training['steps']} steps (|grad| {training['gradient_norm']:.1e}, "
        f"{training['distance_to_closed_form']:.1e} from the closed form); curvature along "
        f"scaling {rq['scaling']:.4f}, rotation {rq['rotation']:.3e}, ratio {rq['ratio']:.0f}; "
        f"{report['timings_s']['total']:.1f} s"
    )
