"""JAX backend.

Parameters may be any pytree of arrays; they are flattened in the order of
``jax.tree_util.tree_leaves`` (dict keys sorted, lists in order), and
``param_names`` holds each leaf's ``keystr`` path. Per-batch products are
jit-compiled with parameters and data as arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlinops import losses
from curvlinops._checks import describe, type_error, value_error
from curvlinops.backends._arrays import is_array, library_of

__all__ = ["JaxBackend", "x64_enabled"]

X64_FIX = "Enable float64 in JAX first: jax.config.update('jax_enable_x64', True)."


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


class JaxBackend:
    """Backend for JAX functions, parameter pytrees and arrays."""

    name = "jax"
    xp = jnp

    def __init__(self, model_func: Any, params: Any) -> None:
        if not callable(model_func):
            raise type_error("model_func", "a callable (params, X) -> outputs", model_func)
        paths_leaves, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        if not paths_leaves:
            raise value_error("params", "at least one array", "an empty pytree")
        names = [jax.tree_util.keystr(path) or "params" for path, _ in paths_leaves]
        leaves = [_import_param(name, leaf) for name, (_, leaf) in zip(names, paths_leaves)]
        _check_uniform(names, leaves)
        self.param_names: list[str] = names
        self.param_shapes: list[tuple[int, ...]] = [tuple(leaf.shape) for leaf in leaves]
        self.primals = jax.tree_util.tree_unflatten(self._treedef, leaves)
        self.dtype = np.dtype(leaves[0].dtype)
        self.device = next(iter(leaves[0].devices()))
        self._sizes = [int(np.prod(s, dtype=int)) for s in self.param_shapes]
        self.model_fn = model_func

    # --- set-up -----------------------------------------------------------
    def loss(self, loss_func: Any) -> Any:
        if type(loss_func).__module__.startswith("torch"):
            raise type_error(
                "loss_func",
                "a loss for JAX (curvlinops.losses.* or a callable on JAX arrays)",
                loss_func,
                "The parameters are JAX arrays; use curvlinops.losses."
                f"{type(loss_func).__name__}(reduction=...) instead of the PyTorch module.",
            )
        return losses.as_loss(loss_func)

    def import_batch(self, batch: Any, index: int) -> Any:
        def convert(leaf: Any) -> Any:
            if isinstance(leaf, jax.Array):
                return leaf
            if not is_array(leaf):
                raise type_error(f"data batch {index}", "arrays (numpy, jax or torch)", leaf)
            array = np.asarray(leaf)
            if array.dtype == np.float64 and not x64_enabled():
                array = array.astype(np.float32)
            return jnp.asarray(array)

        return jax.tree_util.tree_map(convert, batch)

    def batch_size(self, X: Any) -> int:
        return int(X.shape[0])

    # --- arrays -----------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def import_array(self, x: Any, argument: str) -> tuple[jax.Array, bool]:
        if isinstance(x, jax.Array):
            array, shared = x, True
            if self.is_concrete(x) and x.devices() != {self.device}:
                raise value_error(
                    argument,
                    f"an array on the parameters' device {self.device}",
                    f"an array on {sorted(map(str, x.devices()))}",
                    f"Move it first with jax.device_put(x, {self.device!r}).",
                )
        elif isinstance(x, np.ndarray):
            if x.dtype.kind not in "fiub":
                raise type_error(argument, "a real numeric array", x)
            array, shared = jnp.asarray(x, dtype=self.dtype), False
        elif hasattr(x, "__dlpack__"):
            if getattr(x, "requires_grad", False):
                x = x.detach()
            try:
                array, shared = jnp.from_dlpack(x), True
            except (BufferError, RuntimeError, TypeError, ValueError):
                array, shared = jnp.asarray(np.asarray(x)), False
        else:
            raise type_error(argument, "an array (numpy, jax, torch or DLPack-capable)", x)
        if jnp.iscomplexobj(array):
            raise type_error(argument, "a real array", x)
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        return array, shared

    def to_numpy(self, y: jax.Array) -> np.ndarray:
        return np.array(y)

    def tree_flatten(self, tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return leaves, treedef.unflatten

    def flatten(self, tree: Any) -> jax.Array:
        return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])

    def unflatten(self, vector: jax.Array) -> Any:
        leaves, start = [], 0
        for size, shape in zip(self._sizes, self.param_shapes):
            leaves.append(jnp.reshape(vector[start : start + size], shape))
            start += size
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def zeros(self, shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros(shape, dtype=self.dtype)

    def eye(self, n: int) -> jax.Array:
        return jnp.eye(n, dtype=self.dtype)

    def concat(self, arrays: Sequence[jax.Array], axis: int = 0) -> jax.Array:
        return jnp.concatenate(list(arrays), axis=axis)

    def block_until_ready(self, y: jax.Array) -> jax.Array:
        return jax.block_until_ready(y)

    def is_concrete(self, y: Any) -> bool:
        return not isinstance(y, jax.core.Tracer)

    def all_finite(self, y: jax.Array) -> bool:
        return bool(jnp.isfinite(y).all())

    def equal(self, a: Any, b: Any) -> bool:
        leaves_a, tree_a = jax.tree_util.tree_flatten(a)
        leaves_b, tree_b = jax.tree_util.tree_flatten(b)
        return tree_a == tree_b and all(
            np.shape(x) == np.shape(y) and bool(np.array_equal(x, y))
            for x, y in zip(leaves_a, leaves_b)
        )

    def random_normal(self, shape: tuple[int, ...], seed: int) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), shape, dtype=self.dtype)

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> jax.Array:
        return jax.random.rademacher(jax.random.key(seed), shape, dtype=self.dtype)

    # --- autodiff ---------------------------------------------------------
    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        return jax.jvp(f, primals, tangents)

    def vjp(self, f: Callable, *primals: Any) -> tuple[Any, Callable]:
        out, pullback = jax.vjp(f, *primals)
        return out, (lambda u: pullback(u)[0]) if len(primals) == 1 else pullback

    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        # Forward-over-reverse; XLA fuses it well (benchmarks/README.md).
        grad_f = jax.grad(f)
        return lambda v: jax.jvp(grad_f, (primal,), (v,))[1]

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)

    def compile(self, f: Callable) -> Callable:
        return jax.jit(f)


def _import_param(name: str, leaf: Any) -> jax.Array:
    if isinstance(leaf, jax.Array):
        return leaf
    if isinstance(leaf, np.ndarray):
        if leaf.dtype == np.float64 and not x64_enabled():
            raise value_error(
                f"params[{name}]",
                "float32 arrays while JAX's float64 mode is off",
                "a float64 numpy array",
                X64_FIX + " Or cast the parameters to float32.",
            )
        return jnp.asarray(leaf)
    library = library_of(leaf)
    if library == "torch":
        raise type_error(
            f"params[{name}]",
            "JAX or numpy arrays (all parameters of one framework)",
            leaf,
            "Mixed frameworks: use PyTorch tensors for a PyTorch model, JAX arrays for a JAX one.",
        )
    raise type_error(f"params[{name}]", "a JAX or numpy array", leaf)


def _check_uniform(names: list[str], leaves: list[jax.Array]) -> None:
    first = leaves[0]
    for name, leaf in zip(names, leaves):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise type_error(f"params[{name}]", "a floating-point array", leaf)
        if leaf.dtype != first.dtype:
            raise value_error(
                "params",
                f"one dtype for all parameters ({first.dtype})",
                f"{leaf.dtype} for {name}",
                "Cast them, e.g. jax.tree.map(lambda a: a.astype(jnp.float32), params).",
            )
        if leaf.devices() != first.devices():
            raise value_error(
                "params",
                "all parameters on one device",
                f"{describe(leaf)} on {leaf.devices()} for {name}",
            )
