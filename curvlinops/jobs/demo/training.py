"""The demo's model, written once for every framework, and its training by momentum."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from curvlinops.backends import make_backend
from curvlinops.backends._namespaces import framework_namespace
from curvlinops.jobs.demo.problem import (
    CHECK_EVERY,
    GRADIENT_TOL,
    LEARNING_RATE,
    MAX_STEPS,
    MOMENTUM,
    K,
    Problem,
    align_signs,
    angles_to_components,
    closed_form_optimum,
)
from curvlinops.losses import CallableLoss


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
