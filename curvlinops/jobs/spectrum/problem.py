"""The spectrum job's problem: scikit-learn's digits as images, the network's initial weights.

Everything here is numpy, shared by both backends, so that PyTorch and JAX
start from the same numbers and see the same mini-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from curvlinops._checks import value_error

__all__ = ["Digits", "SpectrumConfig", "initial_state", "make_digits", "minibatches", "num_params"]

NUM_CLASSES = 10


@dataclass(frozen=True)
class SpectrumConfig:
    r"""Sizes, training and measurement settings (the command line uses the defaults).

    Attributes:
        channels: Channels of every convolution.
        blocks: Residual blocks.
        n_test: Test images (the rest of the 1,797 digits train, all of them).
        n_train: Training images (``None``: all that are not test images).
        batch_size: Mini-batch of SGD.
        lr: Learning rate :math:`\eta`.
        momentum: Heavy-ball coefficient :math:`\mu`.
        steps: Checkpoints (steps of SGD after which the curvature is measured).
        slq_probes: Probes of SLQ (columns of one ``matmat`` per Lanczos step).
        slq_steps: Lanczos steps per probe.
        top_k: Top eigenvalues by ``eigsh``.
        eigsh_tol: Relative residual tolerance of ``eigsh``.
        negative_threshold: A Ritz value counts as clearly negative below
            ``-negative_threshold * lambda_max`` (the bulk at zero is smeared by
            the quadrature to about this size).
        validation_channels: Channels of the reduced network checked against the
            dense Hessian (``0``: no validation).
        validation_n: Training images of the reduced network.
        dtype: ``"float32"`` (as networks are trained) or ``"float64"``.
        twin_steps: Checkpoints a second backend (the twin of the first, from
            the same weights) measures: ``"ends"``, the first and the last (the
            cross-check of the same weights at the first, the finding at both),
            or ``"all"``. One backend alone always measures every checkpoint.
    """

    channels: int = 6
    blocks: int = 2
    n_test: int = 500
    n_train: int | None = None
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    steps: tuple[int, ...] = (0, 50, 100, 200, 400)
    slq_probes: int = 4
    slq_steps: int = 30
    top_k: int = 4
    eigsh_tol: float = 1e-4
    negative_threshold: float = 1e-3
    validation_channels: int = 2
    validation_n: int = 100
    dtype: str = "float32"
    twin_steps: str = "ends"


def measured_steps(config: SpectrumConfig, twin: bool) -> tuple[int, ...]:
    """The checkpoints a backend measures: all, or the twin's (``config.twin_steps``).

    Example:
        >>> measured_steps(SpectrumConfig(), twin=True)
        (0, 400)
        >>> measured_steps(SpectrumConfig(twin_steps="all"), twin=True)
        (0, 50, 100, 200, 400)
    """
    steps = tuple(sorted(config.steps))
    if not twin or config.twin_steps == "all":
        return steps
    if config.twin_steps != "ends":
        raise value_error(
            "twin_steps",
            "'ends' or 'all'",
            repr(config.twin_steps),
            "Use 'all' to measure every checkpoint on both backends.",
        )
    return tuple(sorted({steps[0], steps[-1]}))


@dataclass(frozen=True)
class Digits:
    """Train and test images ``(N, 1, 8, 8)`` in ``[0, 1]``, and labels."""

    seed: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def make_digits(seed: int, config: SpectrumConfig) -> Digits:
    """A seeded split of scikit-learn's digits, as images of ``config.dtype``.

    Example:
        >>> digits = make_digits(0, SpectrumConfig())
        >>> digits.X_train.shape, digits.X_test.shape, digits.X_train.dtype
        ((1297, 1, 8, 8), (500, 1, 8, 8), dtype('float32'))
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "The spectrum job needs scikit-learn's digits. Install it with: "
            "pip install 'curvlinops[data]'"
        ) from None
    digits = load_digits()
    X = (np.asarray(digits.data) / 16.0).reshape(-1, 1, 8, 8).astype(config.dtype)
    y = np.asarray(digits.target, dtype=np.int64)
    order = np.random.default_rng([seed, 1]).permutation(len(y))
    test, train = order[: config.n_test], order[config.n_test :]
    if config.n_train is not None:
        train = train[: config.n_train]
    return Digits(seed, X[train], y[train], X[test], y[test])


def initial_state(
    seed: int, channels: int, blocks: int, dtype: str = "float32"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """He-normal convolutions, BN scale 1 and shift 0, PyTorch's default dense layer.

    Returns:
        ``(weights, stats)`` in the order of :func:`curvlinops.backends._jobs_resnet.resnet`:
        BN running means 0 and variances 1.
    """
    rng = np.random.default_rng([seed, 2])

    def conv(c_in: int) -> np.ndarray:
        return rng.normal(0.0, math.sqrt(2.0 / (9 * c_in)), (channels, c_in, 3, 3))

    bn = [np.ones(channels), np.zeros(channels)]
    weights = [conv(1), *bn]
    for _ in range(blocks):
        weights += [conv(channels), *bn, conv(channels), *bn]
    bound = 1.0 / math.sqrt(channels)
    weights += [
        rng.uniform(-bound, bound, (NUM_CLASSES, channels)),
        rng.uniform(-bound, bound, NUM_CLASSES),
    ]
    stats = [np.zeros(channels), np.ones(channels)] * (1 + 2 * blocks)
    return [w.astype(dtype) for w in weights], [s.astype(dtype) for s in stats]


def num_params(channels: int, blocks: int) -> int:
    """Parameters of the network (for the report)."""
    weights, _ = initial_state(0, channels, blocks)
    return sum(w.size for w in weights)


def minibatches(seed: int, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """Indices of each step's mini-batch: seeded epochs without replacement."""
    rng = np.random.default_rng([seed, 3])
    per_epoch = n // batch_size
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(n)
        batches += [order[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
    return batches[:steps]
