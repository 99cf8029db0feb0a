"""The backend protocol: everything the operators need from a framework.

Hessian, GGN and Jacobian are written once against this protocol; the
framework-specific code lives in ``_torch.py`` and ``_jax.py``. A backend
object is bound to one set of parameters (their structure, dtype and device).

Conventions
-----------
* ``primals`` is the parameters in the backend's own structure (a tuple of
  tensors for PyTorch, the user's pytree for JAX).
* A *flat* vector has the ``P`` parameter entries concatenated in the order
  of :attr:`Backend.param_names`, each entry flattened row-major.
* Arrays called *native* belong to the backend's framework, on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Backend", "single_cotangent"]


class Backend(Protocol):
    """What a framework provides to the operators."""

    name: str
    """``"torch"`` or ``"jax"``."""

    xp: Any
    """Array-API namespace used by the loss formulas."""

    dtype: np.dtype
    """The parameters' dtype, as a numpy dtype."""

    device: Any
    """The device the parameters live on (computation runs there)."""

    primals: Any
    """The parameters in the backend's structure (see module docstring)."""

    param_names: Sequence[str]
    """One name per parameter, in flattening order."""

    param_shapes: Sequence[tuple[int, ...]]
    """The parameters' shapes, in flattening order."""

    model_fn: Callable[[Any, Any], Any]
    """The user's model as a pure function ``(primals, X) -> outputs``."""

    # --- set-up -----------------------------------------------------------
    def loss(self, loss_func: Any) -> Any:
        """A loss descriptor (see :mod:`curvlinops.losses`) for ``loss_func``."""

    def import_batch(self, batch: Any, index: int) -> Any:
        """Inputs or targets of one batch as native arrays (structure kept)."""

    def batch_size(self, X: Any) -> int:
        """Leading dimension of ``X`` (a native array)."""

    # --- arrays -----------------------------------------------------------
    def owns(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's framework."""

    def import_array(self, x: Any, argument: str) -> tuple[Any, bool]:
        """Convert a caller's array to a native array of the operator's dtype.

        Returns the array and whether it shares memory with ``x``.
        """

    def to_numpy(self, y: Any) -> np.ndarray:
        """A writable host copy (or view) of a native array, as numpy."""

    def tree_flatten(self, tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
        """Leaves of a (list, tuple, dict or framework pytree) structure, and a rebuild function."""

    def flatten(self, tree: Any) -> Any:
        """Parameter-shaped tree -> flat vector ``(P,)``."""

    def unflatten(self, vector: Any) -> Any:
        """Flat vector ``(P,)`` -> parameter-shaped tree (like :attr:`primals`)."""

    def zeros(self, shape: tuple[int, ...]) -> Any:
        """Native zeros of the operator's dtype and device."""

    def eye(self, n: int) -> Any:
        """Native identity matrix of the operator's dtype and device."""

    def concat(self, arrays: Sequence[Any], axis: int = 0) -> Any:
        """Concatenate native arrays."""

    def block_until_ready(self, y: Any) -> Any:
        """Wait until ``y`` is computed (JAX dispatches asynchronously)."""

    def is_concrete(self, y: Any) -> bool:
        """False while ``y`` is being traced (then no host values can be read)."""

    def all_finite(self, y: Any) -> bool:
        """Whether a concrete native array holds no NaN or inf."""

    def equal(self, a: Any, b: Any) -> bool:
        """Whether two native arrays (or structures of arrays) are identical."""

    def random_normal(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded standard-normal native array."""

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded ±1 native array."""

    def random_uniform(self, shape: tuple[int, ...], seed: int) -> Any:
        """Seeded native array, uniform on ``[0, 1)``, of the operator's dtype."""

    # --- autodiff ---------------------------------------------------------
    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        """Forward mode: ``(f(*primals), J tangents)``."""

    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
        """Reverse mode: ``(f(*primals), u -> Jᵀ u)``, plus ``aux`` when ``has_aux``.

        With ``has_aux``, ``f`` returns ``(output, aux)`` and only ``output`` is
        differentiated. For one primal the pullback returns its cotangent alone.
        """

    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        """``v -> ∇²f(primal) v`` for scalar ``f``, vectorisable with :meth:`vmap`."""

    def hvp(self, f: Callable, primal: Any, v: Any) -> Any:
        """One product ``∇²f(primal) v`` (not under :meth:`vmap`): the fastest way for one."""

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        """Vectorise ``f`` over an axis of its arguments."""

    # --- linearizations kept for repeated products ------------------------
    # At fixed parameters and data, a product need not recompute the forward
    # pass and the gradient's graph: they are built once per batch (the
    # linearization, kept by the operator) and each product only applies it.
    def linearize(self, f: Callable, primal: Any, *, transpose: bool = False) -> Any:
        """``f`` linearised at ``primal``, kept to apply many times.

        :meth:`linear_vjp` applies it (and :meth:`linear_jvp` with
        ``transpose``). JAX: a pytree, which a compiled function can return.
        """

    def linearize_gradient(self, f: Callable, primal: Any) -> Any:
        """The gradient of scalar ``f`` linearised at ``primal`` (``linear_jvp``: ``∇²f v``)."""

    def linear_output(self, lin: Any) -> Any:
        """The value of the linearised function (without a graph)."""

    def linear_vjp(self, lin: Any, cotangent: Any) -> Any:
        """``Jᵀ u`` (parameter-shaped) from a kept linearization; vectorisable."""

    def linear_jvp(self, lin: Any, tangent: Any) -> Any:
        """``J v`` (``H v`` for a gradient) from a kept linearization; vectorisable."""

    def cached_bytes(self, state: Any) -> int:
        """Bytes that ``state`` (linearizations and arrays) keeps, parameters not counted."""

    def can_linearize(self, x: Any) -> bool:
        """Whether a product with ``x`` may build or use kept linearizations now.

        False while ``x`` is traced (``jax.jit``: products must stay pure) or
        when no graph can be kept (PyTorch inference mode, ``torch.func``).
        """

    def parameters_token(self) -> Any:
        """A value that changes when the parameters (or the model's state) change in place."""

    compiles: bool
    """Whether :meth:`compile` compiles (JAX) or hands ``f`` back (PyTorch)."""

    def compile(
        self,
        f: Callable,
        data_args: tuple[int, ...] = (),
        static_args: tuple[int, ...] = (),
        donate_args: tuple[int, ...] = (),
    ) -> Callable | None:
        """Compile ``f`` (``jax.jit``; identity for PyTorch).

        ``data_args`` are the positions of ``f``'s arguments that hold a data
        batch: a data-parallel JAX backend splits them over its device mesh.
        ``static_args`` are hashable arguments compiled in (``static_argnums``);
        with them, the compiled function is shared by every backend object on
        the same device, or ``None`` where the backend cannot share it.
        ``donate_args`` are arguments the caller replaces by the results
        (``donate_argnums``): XLA may update them in place instead of copying
        (a Krylov basis of hundreds of MB per step); ignored by PyTorch.
        """

    # --- data parallelism -------------------------------------------------
    def distribute(self, process_group: Any, sharding: Any) -> Any:
        """Set up data parallelism; return the communicator that sums over processes.

        ``process_group`` (PyTorch) and ``sharding`` (JAX) are the operators'
        options of the same names. The result is a
        :class:`~curvlinops.backends._distributed.Communicator`; the identity
        in one process, and for JAX, where XLA inserts the sums over devices.
        """


def single_cotangent(pullback: Callable) -> Callable:
    """The pullback of a one-argument function, returning that argument's cotangent.

    Both frameworks' ``vjp`` return a tuple of cotangents, one per primal;
    :meth:`Backend.vjp` hands back the one cotangent itself.
    """
    return lambda u: pullback(u)[0]
