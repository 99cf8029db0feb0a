r"""The spectrum job on one backend: train, and measure the curvature at each checkpoint.

At each checkpoint, over the full training set, with BN in evaluation mode:
the Hessian's SLQ quadrature (:func:`~curvlinops.spectral.spectral_density`),
its top eigenvalues and its smallest one (:func:`~curvlinops.eigen.eigsh`), the
share of the spectral mass below zero, and the GGN's quadrature for contrast;
the training loss and the accuracies. On a reduced network the same
measurements are checked against the dense Hessian's eigenvalues.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from curvlinops.backends import make_backend
from curvlinops.backends._jobs_resnet import population_stats, resnet, train_resnet
from curvlinops.eigen import eigsh
from curvlinops.ggn import GGNLinearOperator
from curvlinops.hessian import HessianLinearOperator
from curvlinops.jobs.spectrum.problem import (
    Digits,
    SpectrumConfig,
    initial_state,
    make_digits,
    measured_steps,
    minibatches,
)
from curvlinops.losses import CrossEntropyLoss
from curvlinops.spectral import spectral_density

__all__ = ["gaussian_mixture", "measure", "negative_mass", "run_backend", "validate"]

LOSS = CrossEntropyLoss(reduction="mean")


def run_backend(
    framework: str,
    digits: Digits,
    config: SpectrumConfig,
    primary: str,
    say: Callable[[str], None],
) -> dict:
    """Train in ``framework`` and measure at its checkpoints; the backend's report section.

    The ``primary`` backend (plotted) measures every checkpoint; another one,
    its twin, those of ``config.twin_steps`` (:func:`measured_steps`).
    """
    start = time.perf_counter()
    weights, stats = initial_state(digits.seed, config.channels, config.blocks, config.dtype)
    batches = minibatches(digits.seed, len(digits.y_train), config.batch_size, max(config.steps))
    kept = train_resnet(
        framework,
        weights,
        stats,
        digits.X_train,
        digits.y_train,
        batches,
        config.steps,
        lr=config.lr,
        momentum=config.momentum,
    )
    training_seconds = time.perf_counter() - start
    say(f"{framework}: trained {max(config.steps)} steps in {training_seconds:.1f} s")
    checkpoints = []
    for step in measured_steps(config, twin=framework != primary):
        entry = {"step": step, **measure(framework, *kept[step], digits, config)}
        checkpoints.append(entry)
        say(_checkpoint_line(framework, entry))
    section = {"training_seconds": training_seconds, "checkpoints": checkpoints}
    if config.validation_channels:
        section["validation"] = validate(framework, digits.seed, config)
        say(_validation_line(framework, section["validation"]))
    section["seconds"] = time.perf_counter() - start
    return section


def _operators(framework: str, weights: Any, stats: Any, X: np.ndarray, y: np.ndarray) -> Any:
    net = resnet(framework, weights, stats)
    b = make_backend(net.model_func, net.params, framework)
    data = [(b.import_batch(net.inputs(X), 0), b.import_batch(y, 0))]
    args = (net.model_func, LOSS, net.params, data)
    options = {"backend": framework, "batch_size_fn": net.batch_size_fn}
    hessian = HessianLinearOperator(*args, **options)
    return _Evaluator(b, net), hessian, GGNLinearOperator(*args, **options)


class _Evaluator:
    """The backend and the network: logits of numpy images."""

    def __init__(self, b: Any, net: Any) -> None:
        self.b, self.net = b, net

    def logits(self, X: np.ndarray) -> np.ndarray:
        b = self.b
        return np.asarray(b.to_numpy(b.model_fn(b.primals, b.import_batch(self.net.inputs(X), 0))))

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(self.b.to_numpy(x))


def measure(
    framework: str, weights: Any, stats: Any, digits: Digits, config: SpectrumConfig
) -> dict:
    """Loss, accuracies, Hessian and GGN quadratures and extreme eigenvalues at one checkpoint.

    BN runs in evaluation mode with the statistics of the whole training set at
    this checkpoint (the running averages lag behind the weights early in training).
    """
    start = time.perf_counter()
    stats = population_stats(framework, weights, stats, digits.X_train)
    b, hessian, ggn = _operators(framework, weights, stats, digits.X_train, digits.y_train)
    loss, train_accuracy = _loss_accuracy(b, digits.X_train, digits.y_train)
    _, test_accuracy = _loss_accuracy(b, digits.X_test, digits.y_test)
    options = {"num_probes": config.slq_probes, "num_steps": config.slq_steps, "seed": digits.seed}
    h_density, g_density = spectral_density(hessian, **options), spectral_density(ggn, **options)
    top, top_info = _eigsh(hessian, config.top_k, "LA", config)
    bottom, bottom_info = _eigsh(hessian, 1, "SA", config)
    largest, smallest = float(top[-1]), float(bottom[0])
    return {
        "loss": loss,
        "train_accuracy": train_accuracy,
        "test_accuracy": test_accuracy,
        "top_eigenvalues": [float(v) for v in top[::-1]],
        "smallest_eigenvalue": smallest,
        "ratio_smallest_to_largest": smallest / largest,
        "eigsh": {"top": top_info, "smallest": bottom_info},
        "negative_mass": negative_mass(h_density.nodes, h_density.weights, 0.0),
        "negative_mass_clear": negative_mass(
            h_density.nodes, h_density.weights, config.negative_threshold * largest
        ),
        "hessian": _quadrature(h_density),
        "ggn": _quadrature(g_density),
        "seconds": time.perf_counter() - start,
    }


def _eigsh(operator: Any, k: int, which: str, config: SpectrumConfig) -> tuple[np.ndarray, dict]:
    """Eigenvalues (ascending, numpy) and what the solver did; non-convergence is reported."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values, info = eigsh(
            operator,
            k,
            which,
            tol=config.eigsh_tol,
            return_eigenvectors=False,
            return_info=True,
        )
    values = np.asarray(operator.backend.to_numpy(values), dtype=np.float64)
    return values, {
        "converged": bool(info["converged"]),
        "products": int(info["products"]),
        "restarts": int(info["restarts"]),
        "warnings": [str(w.message) for w in caught],
    }


def _loss_accuracy(b: Any, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits = b.logits(X).astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    loss = float(-np.mean(log_p[np.arange(len(y)), y]))
    return loss, float(np.mean(logits.argmax(axis=1) == y))


def _quadrature(result: Any) -> dict:
    return {
        "nodes": np.asarray(result.nodes, np.float64).tolist(),
        "weights": np.asarray(result.weights, np.float64).tolist(),
        "kernel_width": float(result.kernel_width),
    }


def negative_mass(nodes: Any, weights: Any, threshold: float) -> float:
    r"""Share of the spectral mass below ``-threshold``: quadrature weight of the Ritz values there.

    Example:
        >>> negative_mass([[-2.0, 0.5, 3.0]], [[0.25, 0.5, 0.25]], 1.0)
        0.25
    """
    nodes, weights = np.asarray(nodes), np.asarray(weights)
    return float(np.sum(weights[nodes < -threshold]) / len(nodes))


def gaussian_mixture(grid: np.ndarray, nodes: Any, weights: Any, width: float) -> np.ndarray:
    r""":math:`\frac1{n_v}\sum_{v,j} \tau_{vj}\, g_\sigma(t - \theta_{vj})` on ``grid``."""
    nodes, weights = np.ravel(nodes), np.ravel(weights) / len(np.atleast_2d(nodes))
    z = (np.asarray(grid)[:, None] - nodes[None, :]) / width
    return np.exp(-0.5 * z**2) @ weights / (width * math.sqrt(2 * math.pi))


def validate(framework: str, seed: int, config: SpectrumConfig) -> dict:
    """SLQ and ``eigsh`` on a reduced network against the dense Hessian's eigenvalues (step 0)."""
    small = SpectrumConfig(n_test=0, n_train=config.validation_n, dtype=config.dtype)
    digits = make_digits(seed, small)
    weights, stats = initial_state(seed, config.validation_channels, 1, config.dtype)
    stats = population_stats(framework, weights, stats, digits.X_train)
    b, hessian, _ = _operators(framework, weights, stats, digits.X_train, digits.y_train)
    dense = np.asarray(b.to_numpy(hessian.todense()), np.float64)
    exact = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    result = spectral_density(
        hessian, num_probes=config.slq_probes, num_steps=config.slq_steps, seed=seed
    )
    reference = gaussian_mixture(
        result.grid, exact[None], np.full((1, exact.size), 1 / exact.size), result.kernel_width
    )
    top, info = _eigsh(hessian, config.top_k, "LA", config)
    expected = exact[-config.top_k :]
    return {
        "num_params": int(exact.size),
        "num_data": len(digits.y_train),
        "channels": config.validation_channels,
        "blocks": 1,
        "slq_l1_to_exact": float(np.trapezoid(np.abs(result.density - reference), result.grid)),
        "top_eigenvalues": top[::-1].tolist(),
        "dense_top_eigenvalues": expected[::-1].tolist(),
        "top_max_relative_error": float(np.max(np.abs(top - expected) / np.abs(expected))),
        "negative_mass_slq": negative_mass(result.nodes, result.weights, 0.0),
        "negative_mass_exact": float(np.mean(exact < 0.0)),
        "eigsh_converged": info["converged"],
    }


def _checkpoint_line(framework: str, entry: dict) -> str:
    return (
        f"  {framework} step {entry['step']:>4}: loss {entry['loss']:.3f}, train acc "
        f"{entry['train_accuracy']:.3f}, lambda_max {entry['top_eigenvalues'][0]:.4g}, "
        f"lambda_min {entry['smallest_eigenvalue']:.4g}, negative mass "
        f"{entry['negative_mass']:.3f} ({entry['negative_mass_clear']:.3f} clearly), "
        f"{entry['seconds']:.1f} s"
    )


def _validation_line(framework: str, v: dict) -> str:
    return (
        f"  {framework} validation ({v['num_params']} parameters, dense): SLQ L1 "
        f"{v['slq_l1_to_exact']:.3f}, top-{len(v['top_eigenvalues'])} relative error "
        f"{v['top_max_relative_error']:.1e}"
    )


def checkpoint_steps(entries: Sequence[dict]) -> list[int]:
    """The steps of a backend's checkpoints."""
    return [entry["step"] for entry in entries]
