"""Dense references with ``torch.func`` (the code behind :mod:`curvlinops.examples.functorch`).

Every function concatenates all batches into one and differentiates the
loss of that batch with the loss function's own reduction: the normalisation
of the operators (a mean over all ``N`` data points, or a sum). Matrices are
``P x P`` (or ``N C x P``) tensors over the parameters flattened in the order
of ``params``; meant for small models in tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.func import functional_call, grad, hessian, jacrev, vmap

from curvlinops._checks import type_error, value_error

__all__ = [
    "functorch_empirical_fisher",
    "functorch_ggn",
    "functorch_gradient_and_loss",
    "functorch_hessian",
    "functorch_jacobian",
]


def functorch_hessian(
    model_func: Any, loss_func: Any, params: list, data: Iterable, input_key: str | None = None
) -> torch.Tensor:
    """Hessian of the loss over all data, ``P x P``."""
    X, y, flat, call = _setup(model_func, params, data, input_key)
    return hessian(lambda w: loss_func(call(w, X), y))(flat)


def functorch_ggn(
    model_func: Any, loss_func: Any, params: list, data: Iterable, input_key: str | None = None
) -> torch.Tensor:
    """Generalised Gauss-Newton ``Jᵀ (∇²_z loss) J`` over all data, ``P x P``."""
    X, y, flat, call = _setup(model_func, params, data, input_key)
    outputs = call(flat, X).detach()
    J = jacrev(lambda w: call(w, X).reshape(-1))(flat)
    H_outputs = hessian(lambda z: loss_func(z.reshape(outputs.shape), y))(outputs.reshape(-1))
    return J.T @ H_outputs @ J


def functorch_gradient_and_loss(
    model_func: Any, loss_func: Any, params: list, data: Iterable, input_key: str | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradient (a list shaped like ``params``) and value of the loss over all data."""
    X, y, flat, call = _setup(model_func, params, data, input_key)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return loss_func(call(w, X), y)

    gradient = grad(loss)(flat)
    return _split(gradient, params), loss(flat).detach()


def functorch_empirical_fisher(
    model_func: Any, loss_func: Any, params: list, data: Iterable, input_key: str | None = None
) -> torch.Tensor:
    r"""Empirical Fisher :math:`c \sum_n g_n g_n^\top` over all data, ``P x P``.

    :math:`g_n` is the gradient of the summed loss of output row :math:`n` (a
    datum; for outputs with more axes, each position along them), and
    :math:`c` undoes the loss's ``"mean"`` (:math:`1/N` rows, times
    :math:`1/C` outputs for ``MSELoss`` and ``BCEWithLogitsLoss``) or is 1 for
    ``"sum"``.
    """
    X, y, flat, call = _setup(model_func, params, data, input_key)
    kind = _supported_loss(loss_func)
    summed = copy.copy(loss_func)
    summed.reduction = "sum"
    rows_y = _rows(y, kind, targets=True)

    def row_losses(w: torch.Tensor) -> torch.Tensor:
        rows = _rows(call(w, X), kind, targets=False)
        return vmap(lambda z, t: summed(z[None], t[None]))(rows, rows_y)

    G = jacrev(row_losses)(flat)  # one gradient per row
    if loss_func.reduction == "sum":
        return G.T @ G
    outputs_per_row = 1 if kind == "cross_entropy" else rows_y.shape[-1]
    return G.T @ G / (rows_y.shape[0] * outputs_per_row)


def functorch_jacobian(
    model_func: Any, params: list, data: Iterable, input_key: str | None = None
) -> torch.Tensor:
    """Jacobian of the model's outputs (flattened row-major) over all data, ``N C x P``."""
    X, _, flat, call = _setup(model_func, params, data, input_key)
    return jacrev(lambda w: call(w, X).reshape(-1))(flat)


# --- helpers -----------------------------------------------------------------------------------
def _setup(model_func: Any, params: list, data: Iterable, input_key: str | None) -> tuple:
    """All data as one batch, the flat parameters, and ``(flat, X) -> outputs``."""
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise type_error("params", "a non-empty list of tensors", params)
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise value_error("params", "tensors on one device", str(sorted(map(str, devices))))
    X, y = _concatenate(data, input_key, devices.pop())
    names = _names(model_func, params)
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def call(w: torch.Tensor, inputs: Any) -> torch.Tensor:
        pieces = torch.split(w, [s.numel() for s in shapes])
        values = {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}
        return functional_call(model_func, values, (inputs,))

    return X, y, flat, call


def _names(model_func: Any, params: list) -> list[str]:
    if not isinstance(model_func, torch.nn.Module):
        raise type_error("model_func", "a torch.nn.Module", model_func)
    by_identity = {id(p): name for name, p in model_func.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_identity]
    if missing:
        raise value_error(
            "params",
            "parameters of model_func",
            f"entries {missing} that are not",
            "Pass [p for p in model.parameters() if ...].",
        )
    return [by_identity[id(p)] for p in params]


def _concatenate(data: Iterable, input_key: str | None, device: torch.device) -> tuple[Any, Any]:
    """Inputs and targets of all batches along axis 0, on ``device``."""
    batches = list(data)
    if not batches:
        raise value_error("data", "at least one batch (X, y)", "an empty iterable")
    inputs, targets = zip(*batches)
    y = torch.cat([t.to(device) for t in targets])
    if isinstance(inputs[0], torch.Tensor):
        return torch.cat([x.to(device) for x in inputs]), y
    if not isinstance(inputs[0], Mapping):
        raise type_error("data", "batches (X, y) with X a tensor or a dict of tensors", inputs[0])
    keys = list(inputs[0]) if input_key is None else [input_key]
    return {k: torch.cat([x[k].to(device) for x in inputs]) for k in keys}, y


def _split(vector: torch.Tensor, params: list) -> list[torch.Tensor]:
    pieces = torch.split(vector, [p.numel() for p in params])
    return [piece.reshape(p.shape) for piece, p in zip(pieces, params)]


_KINDS = {
    torch.nn.MSELoss: "mse",
    torch.nn.CrossEntropyLoss: "cross_entropy",
    torch.nn.BCEWithLogitsLoss: "bce",
}


def _supported_loss(loss_func: Any) -> str:
    kind = _KINDS.get(type(loss_func))
    if kind is None:
        raise type_error(
            "loss_func", "torch.nn.MSELoss, CrossEntropyLoss or BCEWithLogitsLoss", loss_func
        )
    return kind


def _rows(z: torch.Tensor, kind: str, targets: bool) -> torch.Tensor:
    """Outputs (or targets) as rows, one per datum and position: ``(rows, C)`` or ``(rows,)``."""
    if kind != "cross_entropy":
        return z.reshape(-1, z.shape[-1])
    if targets and not torch.is_floating_point(z):
        return z.reshape(-1)  # class indices
    return torch.movedim(z, 1, -1).reshape(-1, z.shape[1]) if z.ndim > 1 else z
