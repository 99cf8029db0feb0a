"""Framework-free helpers for the caller's arrays.

Nothing here imports a framework: libraries are recognised through
``array_api_compat``'s type checks, which look in ``sys.modules``.

Device rules (shared by the backends): an array on the parameters' device is
used in place; an array in host memory (numpy, or a CPU array of any library)
is copied to the parameters' device; an array on any other device raises a
``ValueError`` naming both devices (see :func:`placement_error`). Results go
back to the caller's library and device.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import numpy as np

from curvlinops._checks import type_error, value_error

__all__ = [
    "compact",
    "device_label",
    "dlpack_device",
    "dlpack_safe",
    "export_like",
    "host_view",
    "is_array",
    "is_host_array",
    "library_of",
    "map_structure",
    "rebuild_mapping",
    "placement_error",
    "real_numeric",
    "to_device_of",
]

# DLPack device types (dlpack.h, DLDeviceType) and short names for messages.
_DLPACK_DEVICE_NAMES = {
    1: "cpu",
    2: "cuda",
    3: "cuda_host",
    4: "opencl",
    7: "vulkan",
    8: "metal",
    9: "vpi",
    10: "rocm",
    11: "rocm_host",
    13: "cuda_managed",
    14: "oneapi",
}
# Host memory: plain CPU memory and page-locked (pinned) host memory.
_HOST_DEVICE_TYPES = (1, 3, 11)
# What the DLPack producers raise when they cannot export an array.
DLPACK_ERRORS = (BufferError, RuntimeError, TypeError, ValueError)


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
    """Apply ``fn`` to every leaf of nested lists, tuples and mappings.

    A mapping keeps its type where it can be built from a dict (``dict``,
    ``UserDict``, Hugging Face's ``BatchEncoding``), and becomes a dict otherwise.
    """
    if isinstance(tree, Mapping):
        return rebuild_mapping(tree, {k: map_structure(fn, v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(map_structure(fn, v) for v in tree)
    return fn(tree)


def rebuild_mapping(like: Mapping, items: dict) -> Mapping:
    """``items`` in a mapping of the type of ``like``, or a dict where that type cannot."""
    try:
        return type(like)(items)
    except TypeError:  # e.g. a defaultdict, or a mapping with its own constructor
        return items


# --- devices ------------------------------------------------------------------
def dlpack_device(x: Any) -> tuple[int, int] | None:
    """``(DLPack device type, index)`` of ``x``, or ``None`` if it has none.

    Example:
        >>> import numpy as np
        >>> dlpack_device(np.zeros(2))
        (1, 0)
    """
    method = getattr(x, "__dlpack_device__", None)
    if method is None:
        return None
    try:
        kind, index = method()
    except DLPACK_ERRORS:  # e.g. PyTorch's 'meta' tensors
        return None
    return int(kind), int(index)


def is_host_array(x: Any) -> bool:
    """Whether ``x`` lives in host memory: numpy, or a CPU array of any library."""
    if library_of(x) == "numpy":
        return True
    device = dlpack_device(x)
    return device is not None and device[0] in _HOST_DEVICE_TYPES


def device_label(x: Any) -> str:
    """Where ``x`` lives, in its library's words where it has them (for messages).

    Example:
        >>> import numpy as np
        >>> device_label(np.zeros(2))
        'cpu'
    """
    library = library_of(x)
    if library == "numpy":
        return "cpu"
    if library == "torch":
        return str(x.device)
    if library == "jax" and hasattr(x, "devices"):
        return ", ".join(sorted(str(d) for d in x.devices()))
    device = dlpack_device(x)
    if device is None:
        return "an unknown device"
    kind, index = device
    return f"{_DLPACK_DEVICE_NAMES.get(kind, f'DLPack device type {kind}')}:{index}"


def placement_error(argument: str, got: str, params_device: str) -> ValueError:
    """The error for an array on a device other than the parameters' (and not the host).

    Example:
        >>> print(placement_error("x", "cuda:1", "cuda:0"))  # doctest: +NORMALIZE_WHITESPACE
        x: expected an array on the parameters' device cuda:0 (or in host memory, which
        is copied there), got an array on cuda:1. Move the array to cuda:0 first, or
        build the operator from parameters on cuda:1.
    """
    return value_error(
        argument,
        f"an array on the parameters' device {params_device} (or in host memory, which is "
        "copied there)",
        f"an array on {got}",
        f"Move the array to {params_device} first, or build the operator from parameters on {got}.",
    )


def to_device_of(y: Any, like: Any) -> Any:
    """``y`` on the device of ``like`` (the same library); ``y`` itself if it is there.

    Arrays of a library without devices (MLX: one memory, computation on a
    default device) are where they belong already.
    """
    try:
        target = array_api_compat.device(like)
    except AttributeError:
        return y
    if array_api_compat.device(y) == target:
        return y
    return array_api_compat.to_device(y, target)


# --- memory layout ----------------------------------------------------------------
def host_view(x: Any) -> np.ndarray:
    """A numpy array of a host array's memory, without a copy where DLPack allows.

    PyTorch tensors are detached first (a tensor that requires grad cannot be
    exported). The view may be read-only, misaligned or have negative strides;
    callers that hand it to a framework check that (see :func:`dlpack_safe`).
    """
    if isinstance(x, np.ndarray):
        return x
    if library_of(x) == "torch":
        x = x.detach()
    try:
        return np.from_dlpack(x)
    except DLPACK_ERRORS:
        return np.asarray(x)


def real_numeric(dtype: np.dtype) -> bool:
    """Whether a numpy dtype holds real numbers (``ml_dtypes``' bfloat16 included)."""
    return dtype.kind in "fiub" or dtype.name == "bfloat16"


def dlpack_safe(view: np.ndarray) -> bool:
    """Whether a framework may read ``view`` through DLPack without a copy.

    DLPack describes strides in elements; negative strides crash some
    importers (PyTorch 2.13 aborts the process), and misaligned memory is
    undefined behaviour for vectorised kernels. Such arrays are copied instead.
    """
    itemsize = view.dtype.itemsize
    return (
        view.flags.aligned
        and all(s >= 0 and s % itemsize == 0 for s in view.strides)
        and view.dtype.kind in "fiub"
    )


def compact(x: Any) -> Any:
    """``x``, or a C-contiguous copy in its own library (on its own device) if it is strided."""
    if library_of(x) == "torch":
        return x if x.is_contiguous() else x.contiguous()
    flags = getattr(x, "flags", None)
    contiguous = getattr(flags, "c_contiguous", True) if flags is not None else True
    if contiguous:
        return x
    xp = array_api_compat.array_namespace(x)
    make = getattr(xp, "ascontiguousarray", None)
    return make(x) if make is not None else xp.asarray(x, copy=True)


# --- results ---------------------------------------------------------------------
def _read_only(x: Any) -> bool:
    """Whether ``x`` is a host array of a numpy-based library in read-only memory."""
    if library_of(x) in ("torch", "jax") or not is_host_array(x):
        return False  # PyTorch has no read-only tensors; JAX arrays are immutable anyway
    return not host_view(x).flags.writeable


def export_like(y: Any, like: Any, dtype: np.dtype, to_numpy: Callable[[Any], np.ndarray]) -> Any:
    """Hand the native result ``y`` to the caller, in the library and on the device of ``like``.

    Goes through DLPack (no copy) where the caller's library can read ``y``'s
    device; numpy callers get a writable array; ``to_numpy`` is the backend's
    host copy, used where DLPack cannot cross devices. The result is moved to
    ``like``'s device when it is elsewhere (e.g. a CPU tensor for a CUDA model).
    """
    library = library_of(like)
    if str(y.dtype).endswith("bfloat16") and np.dtype(dtype).name != "bfloat16":
        # widen in y's own library: not every library has bfloat16 (CuPy has not)
        y_xp = array_api_compat.array_namespace(y)
        y = y_xp.astype(y, y_xp.float32)
    if library == "numpy":
        out = to_numpy(y)
        return out if out.dtype == dtype else out.astype(dtype)
    xp = array_api_compat.array_namespace(like)
    try:
        out = xp.from_dlpack(y)
    except DLPACK_ERRORS:
        if not is_host_array(like):
            raise
        out = xp.asarray(to_numpy(y))
    if _read_only(out):
        out = xp.asarray(to_numpy(y))  # JAX exports read-only memory; callers get a writable array
    out = to_device_of(out, like)
    target = getattr(xp, np.dtype(dtype).name, None)
    if target is None:
        raise type_error(
            "x",
            f"an array whose library has the result dtype {np.dtype(dtype).name}",
            like,
            "Pass a float32 or float64 array.",
        )
    return out if out.dtype == target else xp.astype(out, target)
