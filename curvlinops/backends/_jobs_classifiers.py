"""Small tanh classifiers in each framework, for ``python -m curvlinops influence``.

The influence study is written once against the backend protocol; only the
models differ by framework. PyTorch gets a ``torch.nn.Sequential`` of
``Linear`` layers (KFAC finds its layers among the submodules), JAX a plain
function of a list of arrays, ``x @ W.T + b`` per layer (KFAC finds its dense
layers by tracing). Both take the same numpy weights, so both frameworks
start from, and compute with, the same numbers.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from curvlinops._checks import value_error

__all__ = ["tanh_classifier"]


def tanh_classifier(framework: str, weights: Sequence[np.ndarray]) -> tuple[Any, list[Any]]:
    """A classifier with ``tanh`` between its dense layers, and its parameters (float64).

    Args:
        framework: ``"torch"`` or ``"jax"``.
        weights: ``[W_1, b_1, ..., W_L, b_L]`` with ``W_l`` of shape
            ``(out, in)`` and ``b_l`` of shape ``(out,)``; ``L = 1`` is
            multinomial logistic regression.

    Returns:
        ``(model_func, params)``: a ``torch.nn.Module`` and its parameter list,
        or a JAX function ``(params, X) -> logits`` and the parameter list.

    Example:
        >>> import numpy as np
        >>> model, params = tanh_classifier("torch", [np.eye(2), np.zeros(2)])
        >>> model(params[0][:1]).tolist()
        [[1.0, 0.0]]
    """
    if len(weights) % 2 or not weights:
        raise value_error("weights", "pairs [W_1, b_1, ..., W_L, b_L]", f"{len(weights)} arrays")
    arrays = [np.asarray(w, dtype=np.float64) for w in weights]
    if framework == "torch":
        return _torch_classifier(arrays)
    if framework == "jax":
        return _jax_classifier(arrays)
    raise value_error("framework", "'torch' or 'jax'", repr(framework))


def _torch_classifier(weights: list[np.ndarray]) -> tuple[Any, list[Any]]:
    torch = importlib.import_module("torch")
    layers: list[Any] = []
    for index in range(0, len(weights), 2):
        W, b = weights[index], weights[index + 1]
        if layers:
            layers.append(torch.nn.Tanh())
        linear = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
    model = torch.nn.Sequential(*layers)
    return model, list(model.parameters())


def _jax_classifier(weights: list[np.ndarray]) -> tuple[Any, list[Any]]:
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = importlib.import_module("jax.numpy")

    def classifier(params: Sequence[Any], X: Any) -> Any:
        h = X
        for index in range(0, len(params), 2):
            if index:
                h = jnp.tanh(h)
            h = h @ params[index].T + params[index + 1]
        return h

    return classifier, [jnp.asarray(w) for w in weights]
