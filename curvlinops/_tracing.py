"""One compilation per operator configuration, not per operator instance.

``jax.jit`` caches compilations per Python function object, and an
operator's per-batch product is a bound method: every new operator compiled
it again (0.2-1 s on the benchmark problems), although parameters and data
are arguments. A JAX user who builds an operator for the new parameters of
each training step, or calls ``gradient_and_loss`` in a loop, paid that each
time.

Here the operator itself, stripped of its data and parameter arrays, is the
*static* argument of one shared compiled function. Two operators share a
compilation when every attribute that tracing could read is equal: model
function (by identity), loss (by value), parameter structure, dtype, device,
options. An operator that holds some other array among its attributes is not
shared (it compiles its own function, as before), so a missed attribute can
cost a compilation but never gives a wrong result. As with ``jax.jit``
itself, a plain function is taken by identity: state it closes over and
changes later is not seen.
"""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from curvlinops.backends._arrays import is_array

__all__ = ["compiled_method"]

# Attributes an operator may hold that its per-batch products never read.
_DATA_ATTRIBUTES = ("_data", "_converted", "_compiled_methods", "_cache")
_BACKEND_ARRAYS = ("primals",)
_MAX_DEPTH = 6
_BY_IDENTITY = (types.FunctionType, types.BuiltinFunctionType, types.ModuleType, type)


class _Unshareable(Exception):
    """An attribute holds an array: this operator compiles its own function."""


def compiled_method(op: Any, name: str, data_args: tuple[int, ...]) -> Callable:
    """``op.<name>`` compiled by ``op``'s backend, shared with equal operators.

    ``data_args`` are the method's argument positions that hold a data batch.
    """
    b = op.backend
    method = getattr(op, name)
    if not b.compiles:
        return method
    try:
        state = _TraceState(op, name)
    except _Unshareable:
        return b.compile(method, data_args=data_args)
    shared = b.compile(_call_method, data_args=tuple(i + 1 for i in data_args), static_args=(0,))
    if shared is None:  # the backend does not share (e.g. data sharded over a mesh)
        return b.compile(method, data_args=data_args)
    return functools.partial(shared, state)


def _call_method(state: _TraceState, *args: Any) -> Any:
    return getattr(state.view, state.name)(*args)


class _TraceState:
    """An operator without arrays, equal to another when their products trace alike."""

    __slots__ = ("_hash", "key", "name", "view")

    def __init__(self, op: Any, name: str) -> None:
        view = object.__new__(type(op))  # no __new__/__init__ logic: a plain copy
        view.__dict__.update(op.__dict__)
        for attribute in _DATA_ATTRIBUTES:
            view.__dict__.pop(attribute, None)
        backend = copy.copy(op.backend)
        for attribute in _BACKEND_ARRAYS:
            backend.__dict__.pop(attribute, None)
        view.backend = backend
        self.view, self.name = view, name
        self.key = (type(op), name, _token(vars(view), 0))
        self._hash = hash(self.key)  # jit hashes its static argument on every call

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TraceState) and self.key == other.key


def _token(value: Any, depth: int) -> Any:
    """A hashable stand-in for ``value`` that is equal for values that trace alike."""
    if depth > _MAX_DEPTH or (is_array(value) and not isinstance(value, np.generic)):
        raise _Unshareable
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: repr(item[0]))
        return ("dict", tuple((repr(k), _token(v, depth + 1)) for k, v in items))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_token(v, depth + 1) for v in value))
    if isinstance(value, _BY_IDENTITY):
        return value
    if isinstance(value, types.MethodType):  # e.g. a Flax module's apply
        return ("method", value.__func__, _token(value.__self__, depth + 1))
    if type(value).__hash__ is object.__hash__ and hasattr(value, "__dict__"):
        # A plain object: equal when its state is. A callable one (a model object)
        # must also be the same object, and its state is read now: an attribute
        # changed before the next operator is built gives a new compilation.
        identity = id(value) if callable(value) else None
        return (type(value), identity, _token(vars(value), depth + 1))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # kept alive by the view, which holds it
    return value
