"""Linearizations kept for repeated products: PyTorch's autograd graphs.

A product at fixed parameters recomputes the forward pass and the gradient's
graph every time. Here the graph is built once per batch and kept; each
product then only runs a backward pass through it (``retain_graph=True``):

* ``J^T u``: the backward pass of the model's graph.
* ``J v``: the backward pass of the graph of ``u -> J^T u`` (built once with
  ``create_graph=True``), which is linear in ``u``; its derivative is ``J``.
* ``H v``: the backward pass of the gradient's graph (``create_graph=True``).

``torch.func.vmap`` runs these backward passes for many columns at once (on
the CPU one column at a time instead, where that measured faster: see
``TorchBackend.linearized_columns_per_pass``: large graphs). The
memory a linearization keeps is that of the tensors its graphs saved, found
by walking the graphs (saved-tensor hooks would keep the tensors alive).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "TorchLinearization",
    "graph_bytes",
    "linearize",
    "linearize_gradient",
    "parameters_token",
    "pull_back",
    "pull_back_flat",
]


class TorchLinearization:
    """A function's autograd graphs at fixed parameters.

    Attributes:
        output: The function's value, detached (``None`` for a gradient).
        inputs: The leaves the graphs were built from (the parameters).
        forward: ``(roots, wrt)``: pulling cotangents of ``roots`` back to
            ``wrt`` gives ``Jᵀ u`` (``H v`` for a gradient).
        transposed: ``(roots, wrt)`` whose pullback gives ``J v``, or ``None``.
        nbytes: Bytes of the tensors the graphs keep (parameters not counted).
    """

    __slots__ = ("flat", "forward", "inputs", "nbytes", "output", "transposed")

    def __init__(
        self,
        output: torch.Tensor | None,
        inputs: tuple[torch.Tensor, ...],
        forward: tuple[Sequence[Any], Sequence[torch.Tensor]],
        transposed: tuple[Sequence[Any], Sequence[torch.Tensor]] | None,
    ) -> None:
        self.output, self.inputs = output, inputs
        self.forward, self.transposed = forward, transposed
        # a gradient's roots joined into one flat root (linear_hvp): one cotangent per
        # pullback instead of one per parameter (a fifth of a small transformer's
        # Hessian product went into checking those cotangents)
        self.flat = _joined(*forward, inputs) if output is None else (None, ())
        roots = list(forward[0]) + (list(transposed[0]) if transposed else [])
        parameters = {t.untyped_storage().data_ptr() for t in inputs}
        kept = [t for t in (output, self.flat[0]) if t is not None]
        self.nbytes = graph_bytes(roots, parameters) + sum(t.nbytes for t in kept)


def _joined(
    roots: Sequence[Any], wrt: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, Sequence[torch.Tensor]]:
    """``(root, wrt)``: parameter-shaped ``roots`` flattened into one (``None``: constant)."""
    if not any(r is not None and r.requires_grad for r in roots):
        return None, wrt
    with torch.enable_grad():
        parts = [
            (torch.zeros_like(p) if r is None else r).reshape(-1) for r, p in zip(roots, inputs)
        ]
        return torch.cat(parts), wrt


def linearize(f: Callable, primal: tuple[torch.Tensor, ...], transpose: bool) -> TorchLinearization:
    """The graph of ``f`` at ``primal``, and of its transpose when ``transpose``."""
    inputs = tuple(p.detach().requires_grad_(True) for p in primal)
    with torch.enable_grad():
        output = f(inputs)
        transposed = None
        if transpose:
            seed = torch.zeros_like(output, requires_grad=True)
            gradients = _gradients(output, inputs, seed)
            transposed = (gradients, (seed,))
    return TorchLinearization(output.detach(), inputs, ((output,), inputs), transposed)


def linearize_gradient(f: Callable, primal: tuple[torch.Tensor, ...]) -> TorchLinearization:
    """The graph of the gradient of scalar ``f`` at ``primal`` (for ``H v``)."""
    inputs = tuple(p.detach().requires_grad_(True) for p in primal)
    with torch.enable_grad():
        gradients = _gradients(f(inputs), inputs, None)
    return TorchLinearization(None, inputs, (gradients, inputs), None)


def _gradients(output: torch.Tensor, inputs: tuple, seed: Any) -> tuple:
    """The gradients' graph (``create_graph``); ``None`` where nothing depends on the inputs."""
    if not output.requires_grad:  # e.g. a model that ignores its parameters
        return (None,) * len(inputs)
    return torch.autograd.grad(output, inputs, seed, create_graph=True, allow_unused=True)


def pull_back(
    graph: tuple[Sequence[Any], Sequence[torch.Tensor]], cotangents: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Cotangents of the graph's roots pulled back to its leaves; the graph is kept.

    Roots that do not depend on the leaves (a parameter the loss does not
    use) contribute nothing.
    """
    roots, wrt = graph
    kept = [(r, c) for r, c in zip(roots, cotangents) if r is not None and r.requires_grad]
    if not kept:
        return tuple(torch.zeros_like(w) for w in wrt)
    return torch.autograd.grad(
        [r for r, _ in kept],
        wrt,
        [c for _, c in kept],
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )


def pull_back_flat(lin: TorchLinearization, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``H v`` (parameter-shaped) of a gradient's linearization for a flat ``v``; kept.

    Raises:
        ValueError: ``lin`` is not a gradient's linearization.
    """
    if lin.output is not None:
        raise ValueError("pull_back_flat: expected a gradient's linearization (no output)")
    root, wrt = lin.flat
    if root is None:
        return tuple(torch.zeros_like(w) for w in wrt)
    return torch.autograd.grad(
        root, wrt, v, retain_graph=True, allow_unused=True, materialize_grads=True
    )


def graph_bytes(roots: Sequence[Any], excluded: set[int]) -> int:
    """Bytes of the distinct storages saved by the graphs of ``roots``, less ``excluded``."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [r.grad_fn for r in roots if r is not None and r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for name in _saved_attributes(node):
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed, or not a tensor to unpack
                continue
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in excluded:
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return int(sum(storages.values()))


_SAVED: dict[type, list[str]] = {}


def _saved_attributes(node: Any) -> list[str]:
    """Names of the saved values of a graph node's type (``_saved_self``, ...)."""
    kind = type(node)
    if kind not in _SAVED:
        _SAVED[kind] = [n for n in dir(node) if n.startswith("_saved_")]
    return _SAVED[kind]


def parameters_token(tensors: Sequence[torch.Tensor], views: dict | None = None) -> tuple:
    """A value that changes when any of ``tensors`` is changed or replaced in place.

    Version counters see in-place operations (an optimizer step,
    ``load_state_dict``); storage addresses see replaced memory; a sum of the
    bits of :data:`CHECKED_ENTRIES` evenly spaced entries per tensor sees
    writes through ``.data`` (``p.data.copy_(...)``), which bypass the version
    counter, unless they leave all of those entries alone. A sum over every
    entry cost up to 10% of a product on a busy 2-core machine (parallel
    reductions wait for descheduled threads); this one reads a few kB, in one
    reduction per element size (one per tensor cost 0.3 ms, a quarter of a
    small transformer's Hessian product).

    Args:
        tensors: The tensors to watch.
        views: A dict the caller keeps between calls: the integer views of the
            sampled entries are built once per layout of ``tensors`` and kept
            there (views share the tensors' memory, so they read their current
            values). ``None``: built anew.
    """
    if not tensors:
        return ()
    versions = tuple((t.data_ptr(), t._version) for t in tensors)
    groups = _sampled(tensors, {} if views is None else views)
    sums = torch.stack([torch.cat(group).sum(dtype=torch.int64) for group in groups])
    return versions, tuple(sums.tolist())  # one transfer for all tensors


CHECKED_ENTRIES = 4096
"""Entries per tensor whose bits :func:`parameters_token` sums."""

_INTEGER_VIEWS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _sampled(tensors: Sequence[torch.Tensor], views: dict) -> list[list[torch.Tensor]]:
    """Integer views of each tensor's sampled entries, grouped by element size.

    ``views`` keeps one layout (addresses, shapes, dtypes): a replaced tensor
    gets new views, and the old ones, which hold its memory, are dropped. A
    non-contiguous tensor has no flat view: its samples are copied each time.
    """
    key = tuple((t.data_ptr(), t.shape, t.dtype, t.device) for t in tensors)
    if views.get("key") == key:
        return views["groups"]
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        view = _integer_sample(t)
        groups.setdefault(view.element_size(), []).append(view)
    views.clear()
    if all(t.is_contiguous() for t in tensors):
        views.update(key=key, groups=list(groups.values()))
    return list(groups.values())


def _integer_sample(t: torch.Tensor) -> torch.Tensor:
    """Every ``numel // CHECKED_ENTRIES``-th entry of ``t``, its bits as integers."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    elif flat.is_floating_point():
        flat = flat.view(_INTEGER_VIEWS[flat.element_size()])
    return flat[:: max(1, flat.numel() // CHECKED_ENTRIES)]
