"""Framework backends and the choice between them.

The backend is picked from the types of ``params`` (and ``model_func``)
without importing a framework the user does not use: a framework can only
have made the user's objects if it is already in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

from curvlinops._checks import type_error, value_error
from curvlinops.backends._arrays import is_torch_module, library_of, map_structure
from curvlinops.backends._protocol import Backend

__all__ = ["BACKENDS", "Backend", "make_backend"]

BACKENDS = {
    "torch": ("curvlinops.backends._torch", "TorchBackend"),
    "jax": ("curvlinops.backends._jax", "JaxBackend"),
}


def make_backend(model_func: Any, params: Any, backend: str | None = None) -> Backend:
    """The backend for ``params``: named by ``backend`` or read off their types."""
    name = _detect(model_func, params) if backend is None else _check_name(backend)
    module_name, class_name = BACKENDS[name]
    if importlib.util.find_spec(name) is None:
        raise ImportError(
            f"backend={name!r} needs {name}, which is not installed. "
            f"Install it with: pip install 'curvlinops[{name}]'"
        )
    module = importlib.import_module(module_name)
    return getattr(module, class_name)(model_func, params)


def _check_name(backend: Any) -> str:
    if not isinstance(backend, str):
        raise type_error("backend", "'torch', 'jax' or None", backend)
    if backend not in BACKENDS:
        raise value_error("backend", "'torch', 'jax' or None", repr(backend))
    return backend


def _detect(model_func: Any, params: Any) -> str:
    libraries = {library_of(leaf) for leaf in _leaves(params)}
    if is_torch_module(model_func):
        libraries.add("torch")
    frameworks = libraries & set(BACKENDS)
    if len(frameworks) > 1:
        raise TypeError(
            "params/model_func: expected objects of one framework, got both "
            f"{' and '.join(sorted(frameworks))} ({_describe_libraries(params, model_func)}). "
            "Use PyTorch tensors with a PyTorch model, or JAX arrays with a JAX function."
        )
    if frameworks:
        return frameworks.pop()
    if libraries == {"numpy"}:
        # Only JAX takes numpy leaves as parameters; PyTorch needs tensors.
        return "jax"
    raise type_error(
        "params",
        "PyTorch tensors (list or dict) or a JAX pytree of arrays",
        params,
        "Pass list(model.parameters()) for PyTorch, or your parameter pytree for JAX, "
        "or say backend='torch'/'jax'.",
    )


def _leaves(params: Any) -> list[Any]:
    jax = sys.modules.get("jax")
    if jax is not None:
        return jax.tree_util.tree_leaves(params)
    leaves: list[Any] = []
    map_structure(leaves.append, params)
    return leaves


def _describe_libraries(params: Any, model_func: Any) -> str:
    parts = sorted({library_of(leaf) for leaf in _leaves(params)})
    text = f"params from {', '.join(parts) or 'nothing'}"
    if is_torch_module(model_func):
        text += ", model_func a torch.nn.Module"
    return text
