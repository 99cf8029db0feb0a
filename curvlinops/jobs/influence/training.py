"""The influence job's training: the objective in each framework, L-BFGS then Newton."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import scipy.stats

from curvlinops.backends import Backend, make_backend
from curvlinops.backends._jobs_classifiers import tanh_classifier
from curvlinops.influence import _PerExampleGradients
from curvlinops.jobs.influence.problem import (
    EXAMPLES_PER_PASS,
    LBFGS_TOL,
    LOSS,
    NUM_CLASSES,
    DigitsProblem,
    StudyConfig,
    _split,
    initial_weights,
)


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
        self._kept, self._kept_key = None, None

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
        """The objective's Hessian at ``w`` times ``v`` (numpy).

        Newton's inner CG asks for hundreds of products at one ``w``. Where the
        backend does not compile (PyTorch), the gradient's graph at ``w`` is
        kept and each product is one backward pass through it: 1.8 ms instead
        of 10 ms per product for the MLP (``torch.func``'s forward-over-reverse
        redoes the forward pass and the gradient every time). Compiled (JAX),
        XLA fuses forward-over-reverse to about the same cost.
        """
        b = self.b
        v_native = b.import_array(np.array(v), "v")[0]
        if b.compiles:
            product = self._hessian_product(self.primals(w), self.X, self.Y, weights, v_native)
        else:
            kept = self._kept_gradient(w, weights)
            product = b.flatten(b.linear_jvp(kept, b.unflatten(v_native)))
        return np.asarray(b.to_numpy(product), dtype=np.float64)

    def _kept_gradient(self, w: np.ndarray, weights: Any) -> Any:
        """The gradient's graph at ``w`` (reused while ``w`` and ``weights`` stay)."""
        key = self._kept_key
        if key is None or key[1] is not weights or not np.array_equal(key[0], w):
            objective = self._objective(self.X, self.Y, weights)
            self._kept = self.b.linearize_gradient(objective, self.primals(w))
            self._kept_key = (np.array(w, copy=True), weights)
        return self._kept

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
