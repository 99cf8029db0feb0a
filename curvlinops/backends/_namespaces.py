"""A framework's array-API namespace, by name, for code that makes arrays from scratch.

Operators and algorithms get their namespace from arrays the user passed
(``array_api_compat.array_namespace(x)``). Programs that start from numpy
data, such as ``python -m curvlinops demo``, ask for it by the framework's
name here, so that frameworks are still imported only in this package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from typing import Any

from curvlinops._checks import value_error

__all__ = [
    "FRAMEWORKS",
    "cpu_threads",
    "framework_namespace",
    "framework_version",
    "intra_op_threads",
    "is_installed",
    "xla_knows",
]

FRAMEWORKS = ("torch", "jax")
"""Framework names, as the ``backend=`` options of the operators spell them."""

DTYPES = ("float32", "float64")


def is_installed(name: str) -> bool:
    """Whether the framework ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a module set to None, or one without a spec
        return False


def framework_version(name: str) -> str | None:
    """The installed version of package ``name``, or ``None`` if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def framework_namespace(name: str, dtype: str = "float32") -> Any:
    """The array-API namespace of a framework, ready for arrays of ``dtype``.

    PyTorch gives ``array_api_compat.torch``, JAX ``jax.numpy``. For
    ``dtype="float64"``, JAX's float64 mode (``jax_enable_x64``) is switched
    on, a process-wide setting without which JAX makes float32 arrays.

    Args:
        name: ``"torch"`` or ``"jax"``.
        dtype: ``"float32"`` or ``"float64"``.

    Returns:
        The namespace (``xp.asarray``, ``xp.float64``, ``xp.sum``, ...).

    Raises:
        ValueError: An unknown framework or dtype.
        ImportError: The framework is not installed (the message names the extra).

    Example:
        >>> xp = framework_namespace("torch", "float64")
        >>> x = xp.asarray([1.0, 2.0], dtype=xp.float64)
        >>> float(xp.sum(x * x))
        5.0
    """
    if name not in FRAMEWORKS:
        raise value_error("name", " or ".join(repr(f) for f in FRAMEWORKS), repr(name))
    if dtype not in DTYPES:
        raise value_error("dtype", " or ".join(repr(d) for d in DTYPES), repr(dtype))
    if not is_installed(name):
        raise ImportError(
            f"{name} is not installed. Install it with: pip install 'curvlinops[{name}]'"
        )
    if name == "torch":
        return importlib.import_module("array_api_compat.torch")
    jax = importlib.import_module("jax")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return importlib.import_module("jax.numpy")


@contextlib.contextmanager
def cpu_threads(name: str, threads: int) -> Iterator[None]:
    """Run the block with at most ``threads`` CPU threads per PyTorch operation.

    For tiny problems, PyTorch's intra-op thread pool costs more than it
    gains, and on a machine shared with other processes its spinning threads
    can slow each operation down tenfold. The previous setting is restored
    afterwards. JAX sizes its thread pool at start-up: a no-op there.

    Args:
        name: ``"torch"`` or ``"jax"``.
        threads: Positive number of threads.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with cpu_threads("torch", 1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    if name != "torch":
        yield
        return
    torch = importlib.import_module("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def intra_op_threads(name: str) -> int | None:
    """PyTorch's intra-op threads (``None`` for JAX, whose Eigen pool has no count to read)."""
    if name != "torch":
        return None
    return int(importlib.import_module("torch").get_num_threads())


def xla_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA has the flag ``flag`` (no leading dashes).

    XLA aborts the process on a flag in ``XLA_FLAGS`` that it does not know, and lists
    its flags nowhere at run time; their names are strings in jaxlib's shared libraries.
    """
    import mmap
    from pathlib import Path

    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = flag.encode()
    for folder in spec.submodule_search_locations:
        for path in Path(folder).iterdir():
            if path.suffix not in (".so", ".dylib", ".pyd", ".dll"):
                continue
            try:
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(needle) >= 0:
                        return True
            except (OSError, ValueError):  # unreadable, or empty
                continue
    return False
