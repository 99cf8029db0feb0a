"""The conformance kit (curvlinops.testing) on every installed backend, and backend registration.

PyTorch and JAX are checked by the kit like any backend a user adds; MLX
comes from its own package (plugins/curvlinops-mlx), registered by entry point.
The same weights give the same numbers on every backend (test_same_numbers_everywhere).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np
import pytest

from curvlinops import losses
from curvlinops.testing import CHECKS, ConformanceProblem

HAS = {name: importlib.util.find_spec(name) is not None for name in ("torch", "jax", "mlx")}
HAS["mlx"] = HAS["mlx"] and importlib.util.find_spec("curvlinops_mlx") is not None
SIZES, BATCHES = (3, 4, 3), (4, 3)


def weights_and_data(real_targets: bool = False) -> tuple[list, list]:
    """A 3-4-3 tanh MLP's weights (``(out, in)`` layout) and two batches.

    Targets are class labels, or real ``(n, 3)`` arrays with ``real_targets``.
    """
    rng = np.random.default_rng(0)
    weights = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        weights += [rng.normal(size=(fan_out, fan_in)) / np.sqrt(fan_in), rng.normal(size=fan_out)]
    data = []
    for n in BATCHES:
        X = rng.normal(size=(n, SIZES[0]))
        y = rng.normal(size=(n, SIZES[-1])) if real_targets else rng.integers(0, SIZES[-1], n)
        data.append((X, y))
    return weights, data


def build_torch(dtype: str) -> tuple:
    import torch

    weights, data = weights_and_data()
    layers = [torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(), torch.nn.Linear(*SIZES[1:])]
    model = torch.nn.Sequential(*layers).to(getattr(torch, dtype))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.as_tensor(w))
    kind = getattr(torch, dtype)
    return (
        model,
        list(model.parameters()),
        [(torch.as_tensor(X, dtype=kind), torch.as_tensor(y)) for X, y in data],
    )


def mlp(xp: Any) -> Any:
    """The MLP as a function of a parameter dict, in the namespace ``xp``."""

    def forward(params: dict, X: Any) -> Any:
        hidden = xp.tanh(X @ params["w1"].T + params["b1"])
        return hidden @ params["w2"].T + params["b2"]

    return forward


def build_jax(dtype: str) -> tuple:
    import jax.numpy as jnp

    weights, data = weights_and_data()
    params = {n: jnp.asarray(w, dtype=dtype) for n, w in zip(("w1", "b1", "w2", "b2"), weights)}
    return mlp(jnp), params, [(jnp.asarray(X, dtype=dtype), jnp.asarray(y)) for X, y in data]


def build_mlx(dtype: str) -> tuple:
    import mlx.core as mx

    weights, data = weights_and_data()
    kind = getattr(mx, dtype)
    params = {n: mx.array(w, dtype=kind) for n, w in zip(("w1", "b1", "w2", "b2"), weights)}
    return mlp(mx), params, [(mx.array(X, dtype=kind), mx.array(y)) for X, y in data]


def build_mlx_module(dtype: str) -> tuple:
    """An ``mlx.nn.Module`` with the same weights, real targets (numpy: converted by the backend)."""
    import mlx.core as mx
    import mlx.nn as nn

    weights, data = weights_and_data(real_targets=True)
    kind = getattr(mx, dtype)
    model = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(*SIZES[1:]))
    names = ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    model.load_weights([(n, mx.array(w, dtype=kind)) for n, w in zip(names, weights)])
    return model, model.trainable_parameters(), [(mx.array(X, dtype=kind), y) for X, y in data]


def _torch_loss() -> Any:
    import torch

    return torch.nn.CrossEntropyLoss(reduction="sum")  # read by the backend as a closed form


PROBLEMS = {
    "torch": ("torch", build_torch, _torch_loss),
    "jax": ("jax", build_jax, losses.CrossEntropyLoss),
    "mlx": ("mlx", build_mlx, losses.CrossEntropyLoss),
    "mlx-module-mse": ("mlx", build_mlx_module, lambda: losses.MSELoss(reduction="sum")),
}


@functools.cache
def conformance_problem(key: str) -> ConformanceProblem:
    """One problem object per key: the kit computes its references once."""
    backend, build, loss = PROBLEMS[key]
    return ConformanceProblem(backend, build=build, loss_func=loss())


def _keys() -> list:
    return [
        pytest.param(key, marks=pytest.mark.skipif(not HAS[b], reason=f"{b} not installed"))
        for key, (b, _, _) in PROBLEMS.items()
    ]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("key", _keys())
def test_conformance(key: str, check: str) -> None:
    CHECKS[check](conformance_problem(key))
