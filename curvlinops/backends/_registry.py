"""The registry of backends: registration, entry points, and detection from types.

A backend is registered under a name with a *factory* ``(model_func, params)
-> backend`` (or the ``"module:attribute"`` path of one, imported when first
used) and a *detector* that says whether an object (a parameter leaf, the
model) belongs to its framework. PyTorch and JAX are registered here like
any other backend; installed packages add theirs through the entry-point
group ``curvlinops.backends`` (read when a backend is first looked up, so
that ``import curvlinops`` stays cheap).

Detection imports nothing: a backend is asked about an object only when one
of its ``modules`` is in ``sys.modules`` (an object of a framework that was
never imported cannot exist).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from curvlinops._checks import type_error, value_error
from curvlinops.backends._protocol import PROTOCOL_VERSION, check_backend

__all__ = ["ENTRY_POINT_GROUP", "BackendSpec", "lookup", "register", "registered", "unregister"]

ENTRY_POINT_GROUP = "curvlinops.backends"
"""The entry-point group installed backends declare themselves in."""


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend: how to make it and how to recognise its objects.

    Attributes:
        name: The name users pass as ``backend=``.
        factory: ``(model_func, params) -> backend``, or ``"module:attribute"`` of it.
        detect: ``obj -> bool``: whether a parameter leaf or the model belongs to
            the framework. Called only when one of ``modules`` is imported.
        modules: Top-level modules of the framework. Also what must be
            importable for the backend to be used.
        numpy_params: Whether the backend takes plain numpy arrays as
            parameters (then it is chosen for numpy-only ``params``; JAX does).
        install: How to install the framework, for the message when it is missing.
        protocol: The interface version the backend was written for.
    """

    name: str
    factory: Callable[[Any, Any], Any] | str
    detect: Callable[[Any], bool] | None = None
    modules: tuple[str, ...] = ()
    numpy_params: bool = False
    install: str = ""
    protocol: int = PROTOCOL_VERSION
    _loaded: list = field(default_factory=list, compare=False, repr=False)

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` belongs to this backend's framework (imports nothing)."""
        if not any(module in sys.modules for module in self.modules):
            return False
        if self.detect is None:
            return type(obj).__module__.split(".")[0] in self.modules
        return bool(self.detect(obj))

    def installed(self) -> bool:
        """Whether the framework can be imported (without importing it)."""
        for module in self.modules:
            try:
                if importlib.util.find_spec(module) is None:
                    return False
            except (ImportError, ValueError):
                return False
        return True

    def make(self, model_func: Any, params: Any) -> Any:
        """The backend for ``params`` (the factory imported on first use)."""
        if not self.installed():
            missing = ", ".join(self.modules)
            raise ImportError(
                f"backend={self.name!r} needs {missing}, which is not installed. "
                f"Install it with: {self.install or 'pip install ' + self.modules[0]}"
            )
        if not self._loaded:
            self._loaded.append(_load(self.factory, f"backend {self.name!r}"))
        return check_backend(self._loaded[0](model_func, params), self.name)


_REGISTRY: dict[str, BackendSpec] = {}
_ENTRY_POINTS_READ: list[bool] = []


def register(
    name: str,
    factory: Callable[[Any, Any], Any] | str,
    *,
    detect: Callable[[Any], bool] | None = None,
    modules: tuple[str, ...] | None = None,
    numpy_params: bool = False,
    install: str = "",
    protocol: int = PROTOCOL_VERSION,
    replace: bool = False,
) -> BackendSpec:
    """Register a backend, so that operators accept ``backend=name`` and detect its objects.

    Args:
        name: The name (an identifier, e.g. ``"mlx"``).
        factory: ``(model_func, params) -> backend`` (an object with the
            members of :class:`~curvlinops.backends.Backend`; subclass
            :class:`~curvlinops.backends.BackendDefaults` for the optional
            ones), or the path ``"package.module:Class"`` of one, imported on
            first use.
        detect: ``obj -> bool``, whether a parameter leaf or the model
            function belongs to the framework. Asked only when one of
            ``modules`` is imported, so it may import them. Default: the
            top-level module of ``type(obj)`` is one of ``modules``.
        modules: The framework's top-level modules (default: ``(name,)``).
        numpy_params: The backend accepts numpy parameters (chosen for them
            when no framework's objects are among ``params``).
        install: Install command shown when the framework is missing.
        protocol: The interface version the backend implements.
        replace: Replace a backend registered under ``name`` (else that raises).

    Returns:
        The :class:`BackendSpec` registered.

    Raises:
        TypeError: An argument of the wrong kind.
        ValueError: ``name`` is taken, or ``protocol`` is not this library's version.

    Example:
        >>> from curvlinops.backends import register, registered, unregister
        >>> spec = register("toy", "toy_package.backend:ToyBackend", modules=("toy_package",))
        >>> "toy" in registered()
        True
        >>> unregister("toy")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise type_error("name", "an identifier string such as 'mlx'", name)
    if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
        raise type_error(
            "factory", "a callable (model_func, params) -> backend or 'module:attr'", factory
        )
    if detect is not None and not callable(detect):
        raise type_error("detect", "a callable obj -> bool or None", detect)
    modules = (name,) if modules is None else tuple(modules)
    if not modules or not all(isinstance(m, str) for m in modules):
        raise type_error("modules", "a non-empty tuple of module names", modules)
    if protocol != PROTOCOL_VERSION:
        raise value_error(
            "protocol",
            f"{PROTOCOL_VERSION}, the backend interface version of this curvlinops",
            repr(protocol),
            f"Update the backend {name!r} to interface version {PROTOCOL_VERSION}, or install "
            "the curvlinops version it was written for.",
        )
    if name in _REGISTRY and not replace:
        raise value_error(
            "name", "a name not registered yet", repr(name), "Pass replace=True to replace it."
        )
    spec = BackendSpec(name, factory, detect, modules, bool(numpy_params), install, protocol)
    _REGISTRY[name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the backend registered under ``name`` (a ``ValueError`` if there is none)."""
    _read_entry_points()
    if name not in _REGISTRY:
        raise value_error("name", f"one of {sorted(_REGISTRY)}", repr(name))
    del _REGISTRY[name]


def registered() -> dict[str, BackendSpec]:
    """The registered backends by name (entry points of installed packages included)."""
    _read_entry_points()
    return dict(_REGISTRY)


def lookup(name: Any) -> BackendSpec:
    """The backend registered as ``name``, or an error that lists the names there are."""
    names = registered()
    choices = ", ".join(repr(n) for n in names) + " or None"
    if not isinstance(name, str):
        raise type_error("backend", choices, name)
    if name not in names:
        raise value_error(
            "backend",
            choices,
            repr(name),
            "Install the package of that backend, or register it with "
            "curvlinops.backends.register(name, factory).",
        )
    return names[name]


def _read_entry_points() -> None:
    """Register the backends installed packages declare (once per process)."""
    if _ENTRY_POINTS_READ:
        return
    _ENTRY_POINTS_READ.append(True)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            continue  # registered at run time (or built in): that one wins
        try:
            _register_entry(entry)
        except Exception as error:  # a broken plugin must not break the other backends
            warnings.warn(
                f"curvlinops: the backend {entry.name!r} declared by {entry.value!r} "
                f"(entry point group {ENTRY_POINT_GROUP!r}) could not be registered: {error}",
                RuntimeWarning,
                stacklevel=3,
            )


def _register_entry(entry: Any) -> None:
    """Register one entry point: it names a :class:`BackendSpec` or a function returning one."""
    spec = entry.load()
    if callable(spec) and not isinstance(spec, BackendSpec):
        spec = spec()
    if not isinstance(spec, BackendSpec):
        raise type_error(entry.value, "a BackendSpec (curvlinops.backends.BackendSpec)", spec)
    if spec.name != entry.name:
        raise value_error("entry point name", repr(spec.name), repr(entry.name))
    register(
        spec.name,
        spec.factory,
        detect=spec.detect,
        modules=spec.modules,
        numpy_params=spec.numpy_params,
        install=spec.install,
        protocol=spec.protocol,
    )


def _load(path: Callable | str, what: str) -> Callable:
    """A callable, or the one a ``"module:attribute"`` path names (imported now)."""
    if callable(path):
        return path
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"{what}: cannot load its factory {path!r}: {error}") from error
