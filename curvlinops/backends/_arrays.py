"""Framework-free helpers for the caller's arrays.

Nothing here imports a framework: libraries are recognised through
``array_api_compat``'s type checks, which look in ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from curvlinops._checks import type_error

__all__ = [
    "export_like",
    "is_array",
    "library_of",
    "map_structure",
]


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of some array library (numpy scalars included)."""
    return isinstance(x, np.generic) or array_api_compat.is_array_api_obj(x)


def library_of(x: Any) -> str:
    """Short name of the array library ``x`` belongs to."""
    if array_api_compat.is_numpy_array(x) or isinstance(x, np.generic):
        return "numpy"
    if array_api_compat.is_torch_array(x):
        return "torch"
    if array_api_compat.is_jax_array(x):
        return "jax"
    if array_api_compat.is_cupy_array(x):
        return "cupy"
    return type(x).__module__.split(".")[0]


def is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def map_structure(fn: Callable[[Any], Any], tree: Any) -> Any:
    """Apply ``fn`` to every leaf of nested lists, tuples and dicts."""
    if isinstance(tree, dict):
        return type(tree)((k, map_structure(fn, v)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(map_structure(fn, v) for v in tree)
    return fn(tree)


def export_like(y: Any, like: Any, dtype: np.dtype, to_numpy: Callable[[Any], np.ndarray]) -> Any:
    """Hand the native result ``y`` to the caller, in the library of ``like``.

    Goes through DLPack (no copy) where the two libraries share a device;
    numpy callers get a writable array; ``to_numpy`` is the backend's
    host copy, used where DLPack cannot cross devices.
    """
    library = library_of(like)
    if library == "numpy":
        out = to_numpy(y)
        return out if out.dtype == dtype else out.astype(dtype)
    xp = array_api_compat.array_namespace(like)
    try:
        out = xp.from_dlpack(y)
    except (BufferError, RuntimeError, TypeError, ValueError):
        out = xp.asarray(to_numpy(y))
    target = getattr(xp, np.dtype(dtype).name, None)
    if target is None:
        raise type_error("x", "an array of a floating dtype", like)
    return out if out.dtype == target else xp.astype(out, target)
