"""Framework backends: the public interface, their registry, and the choice between them.

A backend is what a framework gives the operators (:class:`Backend`, the
required part; :class:`BackendDefaults`, the optional part with fallbacks).
Backends are registered by name (:func:`register`, or the entry-point group
``curvlinops.backends`` of an installed package); PyTorch and JAX are
registered below the same way.

The backend is picked from the types of ``params`` (and ``model_func``)
without importing a framework the user does not use: a framework can only
have made the user's objects if it is already in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any

from curvlinops._checks import type_error, value_error
from curvlinops.backends._arrays import (
    host_view,
    is_host_array,
    library_of,
    map_structure,
    placement_error,
)
from curvlinops.backends._protocol import (
    OPTIONAL,
    PROTOCOL_VERSION,
    REQUIRED,
    Backend,
    BackendDefaults,
    check_backend,
)
from curvlinops.backends._registry import (
    ENTRY_POINT_GROUP,
    BackendSpec,
    lookup,
    register,
    registered,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "OPTIONAL",
    "PROTOCOL_VERSION",
    "REQUIRED",
    "Backend",
    "BackendDefaults",
    "BackendSpec",
    "check_backend",
    "detect_backend",
    "host_view",
    "is_host_array",
    "library_of",
    "make_backend",
    "map_structure",
    "placement_error",
    "register",
    "registered",
    "type_error",
    "unregister",
    "value_error",
]
# type_error ... placement_error: helpers for backend authors (messages in the library's
# form, the caller's host arrays without copies, structures of arrays).


def _is_torch(obj: Any) -> bool:
    torch = sys.modules["torch"]
    return isinstance(obj, (torch.Tensor, torch.nn.Module))


def _is_jax(obj: Any) -> bool:
    return isinstance(obj, sys.modules["jax"].Array)


# replace=True: this module may run twice in a process (pytest's importlib import mode
# collecting its doctests), the registry once.
register(
    "torch",
    "curvlinops.backends._torch:TorchBackend",
    detect=_is_torch,
    install="pip install 'curvlinops[torch]'",
    replace=True,
)
register(
    "jax",
    "curvlinops.backends._jax:JaxBackend",
    detect=_is_jax,
    numpy_params=True,  # jax.numpy takes numpy leaves as parameters; PyTorch needs tensors
    install="pip install 'curvlinops[jax]'",
    replace=True,
)


def make_backend(model_func: Any, params: Any, backend: str | None = None) -> Backend:
    """The backend for ``params``: named by ``backend`` or read off their types."""
    spec = lookup(backend) if backend is not None else lookup(detect_backend(model_func, params))
    return spec.make(model_func, params)


def detect_backend(model_func: Any, params: Any) -> str:
    """The name of the registered backend whose framework made ``params`` (and ``model_func``).

    Raises:
        TypeError: Objects of two frameworks, or of none that is registered.
    """
    specs = registered()
    leaves = _leaves(params)
    claims = {
        name
        for name, spec in specs.items()
        if spec.owns(model_func) or any(spec.owns(leaf) for leaf in leaves)
    }
    if len(claims) > 1:
        raise TypeError(
            "params/model_func: expected objects of one framework, got both "
            f"{' and '.join(sorted(claims))} ({_describe(params, model_func)}). "
            "Use the parameters and the model of one framework (e.g. PyTorch tensors with a "
            "PyTorch model, JAX arrays with a JAX function), or say backend=..."
        )
    if claims:
        return claims.pop()
    if leaves and all(type(leaf).__module__ == "numpy" for leaf in leaves):
        for name, spec in specs.items():
            if spec.numpy_params and spec.installed():
                return name
    others = sorted(set(specs) - {"torch", "jax"})
    raise type_error(
        "params",
        "PyTorch tensors (list or dict) or a JAX pytree of arrays"
        + (f" (or arrays of a registered backend: {', '.join(others)})" if others else ""),
        params,
        "Pass list(model.parameters()) for PyTorch, or your parameter pytree for JAX, "
        "or say backend=" + "/".join(repr(n) for n in specs) + ".",
    )


def _leaves(params: Any) -> list[Any]:
    jax = sys.modules.get("jax")
    if jax is not None:
        return jax.tree_util.tree_leaves(params)
    leaves: list[Any] = []
    map_structure(leaves.append, params)
    return leaves


def _describe(params: Any, model_func: Any) -> str:
    modules = sorted({type(leaf).__module__.split(".")[0] for leaf in _leaves(params)})
    text = f"params from {', '.join(modules) or 'nothing'}"
    top = type(model_func).__module__.split(".")[0]
    if top not in ("builtins", "__main__", "functools"):
        text += f", model_func a {_model_kind(model_func, top)}"
    return text


def _model_kind(model_func: Any, top: str) -> str:
    """``torch.nn.Module`` for any PyTorch module (likewise ``mlx.nn.Module``), else its class."""
    for cls in type(model_func).__mro__:
        if cls.__name__ == "Module" and cls.__module__.startswith(f"{top}.nn"):
            return f"{top}.nn.Module"
    return f"{type(model_func).__qualname__} of {top}"
