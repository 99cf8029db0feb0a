"""The backend interface: everything the operators need from a framework (version 1).

Hessian, GGN, Fisher and Jacobian are written once against this interface;
a framework plugs in through an object that provides it, bound to one set
of parameters (their structure, dtype and device). PyTorch and JAX are two
such backends (``_torch.py``, ``_jax.py``), registered like any other (see
:func:`curvlinops.backends.register`).

Required and optional
---------------------
:class:`Backend` lists what a backend must provide (:data:`REQUIRED`).
:class:`BackendDefaults` holds the optional part with working fallbacks
(:data:`OPTIONAL`); a backend subclasses it and overrides what its framework
does better (a seeded generator, a compiler, kept linearizations). The
operators check the required part when a backend is made and name what is
missing.

Conventions
-----------
* **Structures.** ``primals`` is the parameters in the backend's own
  structure (a tuple of tensors for PyTorch, the user's pytree for JAX).
  :meth:`Backend.tree_flatten` gives the leaves of such a structure in one
  fixed order, the order of :attr:`Backend.param_names`.
* **Flat vectors and matrices.** A *flat* vector has the ``P`` parameter
  entries concatenated in that order, each leaf flattened row-major; several
  vectors are the columns of a ``(P, K)`` matrix, and per-column functions
  are mapped over axis 1 with :meth:`Backend.vmap`.
* **Dtypes.** All parameters have one floating dtype; :attr:`Backend.dtype`
  is it as a numpy dtype. :meth:`Backend.import_array` casts the caller's
  arrays to it; results are cast back to the caller's dtype by the operators.
* **Devices.** Arrays called *native* belong to the backend's framework, on
  :attr:`Backend.device`. Host arrays are copied there; arrays on another
  device raise a ``ValueError`` naming both (``_arrays.placement_error``).
* **Purity.** A per-batch product is a pure function of ``(primals, X, y, V,
  weight)``; :meth:`BackendDefaults.compile` may trace it once and reuse the
  program. Nothing a product calls may read host values while it is traced.
* **Namespace.** :attr:`Backend.xp` is the array namespace of the loss
  formulas (``sum``, ``max``, ``exp``, ``log``, ``log1p``, ``sqrt``, ``abs``,
  ``maximum``, ``reshape``, ``expand_dims``, ``arange``, ``astype``,
  ``isdtype``, ``finfo``, ``ones_like``, ``isfinite``: array-API names). With
  :attr:`BackendDefaults.array_api` true, the matrix-free algorithms (eigsh,
  Lanczos, CG, trace estimators) also compute in it on the device; otherwise
  they compute in numpy on the host and call the operator through
  :meth:`Backend.import_array` and :meth:`Backend.to_numpy`.

The version (:data:`PROTOCOL_VERSION`) goes up when a required member is
added or a convention changes; a backend registered for another version is
refused with a message that says which one this library speaks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from curvlinops._checks import type_error

__all__ = [
    "OPTIONAL",
    "PROTOCOL_VERSION",
    "REQUIRED",
    "Backend",
    "BackendDefaults",
    "check_backend",
    "one_column_on_cpu",
    "single_cotangent",
]

PROTOCOL_VERSION = 1
"""The version of the interface this library speaks."""


@runtime_checkable
class Backend(Protocol):
    """What a framework must provide to the operators (the required part)."""

    name: str
    """The registered name (``"torch"``, ``"jax"``, ``"mlx"``, ...)."""

    xp: Any
    """Array namespace used by the loss formulas (see the module docstring)."""

    dtype: np.dtype
    """The parameters' dtype, as a numpy dtype."""

    device: Any
    """The device the parameters live on (computation runs there)."""

    primals: Any
    """The parameters in the backend's structure (see the module docstring)."""

    param_names: Sequence[str]
    """One name per parameter, in flattening order."""

    param_shapes: Sequence[tuple[int, ...]]
    """The parameters' shapes, in flattening order."""

    model_fn: Callable[[Any, Any], Any]
    """The user's model as a pure function ``(primals, X) -> outputs``."""

    def import_batch(self, batch: Any, index: int) -> Any:
        """Inputs or targets of one batch as native arrays (structure kept).

        ``index`` is the batch's position, for messages (``data batch 3``).
        """

    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's framework."""

    def import_array(self, x: Any, argument: str) -> tuple[Any, bool]:
        """Convert a caller's array to a native array of the operator's dtype.

        Returns the array and whether it shares memory with ``x`` (then the
        operator waits for the result before handing it back). Raises a
        ``TypeError`` naming ``argument`` for what is not a real array.
        """

    def to_numpy(self, y: Any) -> np.ndarray:
        """A writable host copy (or view) of a native array, as numpy."""

    def tree_flatten(self, tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
        """Leaves of a (list, tuple, dict or framework pytree) structure, and a rebuild function."""

    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        """Forward mode: ``(f(*primals), J tangents)``; structures as ``f`` takes and returns."""

    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
        """Reverse mode: ``(f(*primals), u -> Jᵀ u)``, plus ``aux`` when ``has_aux``.

        With ``has_aux``, ``f`` returns ``(output, aux)`` and only ``output`` is
        differentiated. For one primal the pullback returns its cotangent alone.
        The pullback is vectorisable with :meth:`vmap`.
        """

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """Vectorise ``f`` over an axis of its arguments (``in_axes`` as in ``jax.vmap``)."""


REQUIRED = (
    "name",
    "xp",
    "dtype",
    "device",
    "primals",
    "param_names",
    "param_shapes",
    "model_fn",
    "import_batch",
    "owns",
    "import_array",
    "to_numpy",
    "tree_flatten",
    "jvp",
    "vjp",
    "vmap",
)
"""The members every backend must have."""


class BackendDefaults:
    """The optional part of the interface, with fallbacks built on the required part.

    Subclass it and override what the framework does better. Each fallback
    works for any backend that provides :class:`Backend`; the cost of each
    is said where it is more than the framework's own would be.
    """

    array_api = True
    """Whether :attr:`Backend.xp` is a full array-API namespace (``linalg``,
    ``device=`` keywords) in which the matrix-free algorithms may run; if not,
    they run in numpy on the host."""

    compiles = False
    """Whether :meth:`compile` compiles (then per-batch products are traced once)."""

    # --- set-up -----------------------------------------------------------
    def loss(self, loss_func: Any) -> Any:
        """A loss descriptor (:mod:`curvlinops.losses`) for ``loss_func``.

        Fallback: the framework-free descriptors and callables with a
        ``reduction`` attribute; a loss module of another registered framework
        raises. Override to translate the framework's loss modules (as
        PyTorch's ``torch.nn.MSELoss``).
        """
        from curvlinops import losses
        from curvlinops.backends._registry import registered

        specs = registered()
        own = specs[self.name].modules if self.name in specs else ()
        foreign = {m for spec in specs.values() for m in spec.modules} - set(own)
        if type(loss_func).__module__.split(".")[0] in foreign:
            raise type_error(
                "loss_func",
                f"a loss for {self.name} (curvlinops.losses.* or a callable on its arrays)",
                loss_func,
                f"The parameters are {self.name} arrays; use curvlinops.losses."
                f"{type(loss_func).__name__}(reduction=...) or a function of {self.name} arrays.",
            )
        return losses.as_loss(loss_func)

    def batch_size(self, X: Any) -> int:
        """Leading dimension of ``X`` (a native array)."""
        return int(X.shape[0])

    # --- arrays -----------------------------------------------------------
    def flatten(self, tree: Any) -> Any:
        """Parameter-shaped tree -> flat vector ``(P,)``."""
        leaves, _ = self.tree_flatten(tree)
        return self.concat([self.xp.reshape(leaf, (-1,)) for leaf in leaves])

    def unflatten(self, vector: Any) -> Any:
        """Flat vector ``(P,)`` -> parameter-shaped tree (like :attr:`Backend.primals`)."""
        _, rebuild = self.tree_flatten(self.primals)
        pieces, start = [], 0
        for shape in self.param_shapes:
            size = int(np.prod(shape, dtype=int))
            pieces.append(self.xp.reshape(vector[start : start + size], shape))
            start += size
        return rebuild(pieces)

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """Native zeros of the operator's dtype and device."""
        return self.import_array(np.zeros(shape, self.dtype), "zeros")[0]

    def eye(self, n: int) -> Any:
        """Native identity matrix of the operator's dtype and device."""
        return self.import_array(np.eye(n, dtype=self.dtype), "eye")[0]

    def concat(self, arrays: Sequence[Any], axis: int = 0) -> Any:
        """Concatenate native arrays."""
        return self.xp.concat(list(arrays), axis=axis)

    def block_until_ready(self, y: Any) -> Any:
        """Wait until ``y`` is computed (for frameworks that dispatch asynchronously)."""
        return y

    def is_concrete(self, y: Any) -> bool:
        """False while ``y`` is being traced (then no host values can be read)."""
        return True

    def all_finite(self, y: Any) -> bool:
        """Whether a concrete native array holds no NaN or inf (fallback: on the host)."""
        return bool(np.isfinite(self.to_numpy(y)).all())

    def equal(self, a: Any, b: Any) -> bool:
        """Whether two native arrays (or structures of arrays) are identical (on the host)."""
        leaves_a, _ = self.tree_flatten(a)
        leaves_b, _ = self.tree_flatten(b)
        return len(leaves_a) == len(leaves_b) and all(
            np.array_equal(_host(self, x), _host(self, y)) for x, y in zip(leaves_a, leaves_b)
        )

    def random_normal(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded standard-normal native array (fallback: numpy's generator, copied in)."""
        host = np.random.default_rng(seed).standard_normal(shape)
        return self.import_array(host.astype(self.dtype), "random_normal")[0]

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded ±1 native array."""
        host = 2.0 * np.random.default_rng(seed).integers(0, 2, size=shape) - 1.0
        return self.import_array(host.astype(self.dtype), "random_rademacher")[0]

    def random_uniform(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded native array, uniform on ``[0, 1)``, of the operator's dtype."""
        host = np.random.default_rng(seed).random(shape)
        return self.import_array(host.astype(self.dtype), "random_uniform")[0]

    # --- autodiff ---------------------------------------------------------
    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        """``v -> ∇²f(primal) v`` for scalar ``f``, vectorisable with :meth:`Backend.vmap`.

        Fallback: forward-over-reverse, a JVP of the gradient built from :meth:`Backend.vjp`.
        """

        def gradient(p: Any) -> Any:
            value, pullback = self.vjp(f, p)
            return pullback(self.xp.ones_like(value))

        return lambda v: self.jvp(gradient, (primal,), (v,))[1]

    def hvp(self, f: Callable, primal: Any, v: Any) -> Any:
        """One product ``∇²f(primal) v`` (not under :meth:`Backend.vmap`)."""
        return self.hvp_fn(f, primal)(v)

    def saved_bytes(self, f: Callable, primal: Any) -> int:
        """Bytes one forward pass of ``f`` keeps for its derivative (fallback: 0, unknown).

        Used by ``memory_estimate`` for the activations; unknown ones count as none.
        """
        return 0

    # --- linearizations kept for repeated products ------------------------
    # At fixed parameters and data, a product need not recompute the forward
    # pass and the gradient's graph: they are built once per batch (the
    # linearization, kept by the operator) and each product only applies it.
    # Fallback: none is kept (can_linearize is False), every product recomputes.
    def can_linearize(self, x: Any) -> bool:
        """Whether a product with ``x`` may build or use kept linearizations now."""
        return False

    def linearize(self, f: Callable, primal: Any, *, transpose: bool = False) -> Any:
        """``f`` linearised at ``primal``, kept to apply often (see :meth:`can_linearize`)."""
        raise NotImplementedError(f"backend {self.name!r} keeps no linearizations")

    def linearize_gradient(self, f: Callable, primal: Any) -> Any:
        """The gradient of scalar ``f`` linearised at ``primal`` (``linear_jvp``: ``∇²f v``)."""
        raise NotImplementedError(f"backend {self.name!r} keeps no linearizations")

    def linear_output(self, lin: Any) -> Any:
        """The value of the linearised function."""
        raise NotImplementedError(f"backend {self.name!r} keeps no linearizations")

    def linear_vjp(self, lin: Any, cotangent: Any) -> Any:
        """``Jᵀ u`` (parameter-shaped) from a kept linearization; vectorisable."""
        raise NotImplementedError(f"backend {self.name!r} keeps no linearizations")

    def linear_jvp(self, lin: Any, tangent: Any) -> Any:
        """``J v`` (``H v`` for a gradient) from a kept linearization; vectorisable."""
        raise NotImplementedError(f"backend {self.name!r} keeps no linearizations")

    def linear_hvp(self, lin: Any, v: Any) -> Any:
        """``H v`` for a flat ``v`` from a kept gradient linearization, flat; vectorisable.

        Fallback: :meth:`linear_jvp` between :meth:`unflatten` and :meth:`flatten`.
        """
        return self.flatten(self.linear_jvp(lin, self.unflatten(v)))

    def cached_bytes(self, state: Any) -> int:
        """Bytes that ``state`` (linearizations and arrays) keeps, parameters not counted."""
        return 0

    def linearized_columns_per_pass(self, nbytes: int) -> int | None:
        """Columns a kept linearization of ``nbytes`` is applied to in one :meth:`vmap`.

        At most; the operator's ``columns_per_pass`` bounds it too. Fallback:
        ``None``, as many as the pass holds. A backend whose vectorised replay of
        large linearizations is slower than one column at a time says so (PyTorch
        on the CPU).
        """
        return None

    def parameters_token(self) -> Any:
        """A value that changes when the parameters change in place (``None``: they cannot)."""
        return None

    # --- compilation ------------------------------------------------------
    def compile(
        self,
        f: Callable,
        data_args: tuple[int, ...] = (),
        static_args: tuple[int, ...] = (),
        donate_args: tuple[int, ...] = (),
    ) -> Callable | None:
        """``f`` compiled (fallback: ``f`` itself; ``None`` with ``static_args``).

        ``data_args`` are the positions of ``f``'s arguments that hold a data
        batch (a data-parallel backend splits them over devices).
        ``static_args`` are hashable arguments compiled in; with them, the
        compiled function is shared by every backend object on the same
        device, or ``None`` where the backend cannot share it (the caller
        then compiles ``f`` without them). ``donate_args`` are arguments the
        caller replaces by the results (their buffers may be reused).
        """
        return None if static_args else f

    # --- data parallelism -------------------------------------------------
    def distribute(self, process_group: Any, sharding: Any) -> Any:
        """Set up data parallelism; return the communicator that sums over processes.

        Fallback: one process only; a process group or a sharding raises.
        """
        from curvlinops.backends._distributed import LOCAL, SingleProcess

        for argument, value in (("process_group", process_group), ("sharding", sharding)):
            if value is not None and not (argument == "process_group" and value == LOCAL):
                raise type_error(
                    argument,
                    f"None (the {self.name} backend computes in one process)",
                    value,
                    "Leave it out, or use a backend with data parallelism (torch, jax).",
                )
        return SingleProcess()


OPTIONAL = tuple(
    name for name in vars(BackendDefaults) if not name.startswith("_") and name not in REQUIRED
)
"""The members :class:`BackendDefaults` provides fallbacks for."""


def check_backend(backend: Any, name: str) -> Any:
    """``backend`` if it has every member of the interface, else a ``TypeError`` naming the gaps.

    Args:
        backend: What a registered factory returned.
        name: The name it was registered under (for the message).

    Returns:
        ``backend``.

    Raises:
        TypeError: Members are missing.
    """
    missing_required = [m for m in REQUIRED if not hasattr(backend, m)]
    missing_optional = [m for m in OPTIONAL if not hasattr(backend, m)]
    if not (missing_required or missing_optional):
        return backend
    parts = []
    if missing_required:
        parts.append(f"the required {', '.join(missing_required)}")
    if missing_optional:
        parts.append(
            f"the optional {', '.join(missing_optional)} "
            "(subclass curvlinops.backends.BackendDefaults for their fallbacks)"
        )
    raise TypeError(
        f"backend {name!r}: its factory made a {type(backend).__name__}, which lacks "
        f"{' and '.join(parts)} of the backend interface version {PROTOCOL_VERSION}."
    )


def single_cotangent(pullback: Callable) -> Callable:
    """The pullback of a one-argument function, returning that argument's cotangent.

    Both frameworks' ``vjp`` return a tuple of cotangents, one per primal;
    :meth:`Backend.vjp` hands back the one cotangent itself.
    """
    return lambda u: pullback(u)[0]


def _host(backend: Any, x: Any) -> Any:
    return backend.to_numpy(x) if backend.owns(x) else np.asarray(x)


REPLAY_ONE_COLUMN_BYTES = 8 << 20
"""Kept linearizations from this size on are applied one column at a time on a CPU
(PyTorch, JAX): measured faster from about 8 MB on, 3-6x slower at 0.1 MB. Between,
mixed: the influence job's 1.6 MB GGN took 1.6x longer in its CG one column at a
time, though a standalone product of it was 0.8x."""


def one_column_on_cpu(on_cpu: bool, nbytes: int) -> int | None:
    """Pass width for a backend that applies large linearizations one column at a time.

    :meth:`BackendDefaults.linearized_columns_per_pass` of PyTorch and JAX: 1 for a
    linearization of at least :data:`REPLAY_ONE_COLUMN_BYTES` on a CPU, else ``None``.
    """
    return 1 if on_cpu and nbytes >= REPLAY_ONE_COLUMN_BYTES else None
