"""JAX backend.

Parameters may be any pytree of arrays; they are flattened in the order of
``jax.tree_util.tree_leaves`` (dict keys sorted, lists in order), and
``param_names`` holds each leaf's ``keystr`` path. Per-batch products are
jit-compiled with parameters and data as arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as _jax_core  # trace_state_clean: no public equivalent

from curvlinops import losses
from curvlinops._checks import describe, type_error, value_error
from curvlinops.backends._arrays import (
    DLPACK_ERRORS,
    compact,
    device_label,
    host_view,
    is_array,
    is_host_array,
    library_of,
    placement_error,
    real_numeric,
    rebuild_mapping,
)
from curvlinops.backends._distributed import LOCAL, SingleProcess
from curvlinops.backends._distributed_jax import BatchSharding, gather_global
from curvlinops.backends._protocol import BackendDefaults, one_column_on_cpu, single_cotangent

__all__ = ["JaxBackend", "JaxLinearization", "x64_enabled"]

X64_FIX = "Enable float64 in JAX first: jax.config.update('jax_enable_x64', True)."


def x64_enabled() -> bool:
    return bool(jax.config.read("jax_enable_x64"))


class JaxBackend(BackendDefaults):
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
        self.dtype = np.dtype(leaves[0].dtype)
        self.device = next(iter(leaves[0].devices()))
        # committed to the device once, as every array the compiled products get
        # (see _committed_to)
        self.primals = jax.device_put(
            jax.tree_util.tree_unflatten(self._treedef, leaves), self.device
        )
        self._sizes = [int(np.prod(s, dtype=int)) for s in self.param_shapes]
        self.model_fn = model_func
        # Set by distribute(): batches sharded over a device mesh.
        self._sharding: BatchSharding | None = None

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

        # mappings JAX does not know as pytrees (UserDict, BatchEncoding) are read as dicts
        batch = jax.tree_util.tree_map(convert, _plain_mappings(batch))
        if self._sharding is None:
            return jax.device_put(batch, self.device)  # committed, see _committed_to
        return self._sharding.place_batch(batch)

    def batch_size(self, X: Any) -> int:
        return int(X.shape[0])

    # --- arrays -----------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def import_array(self, x: Any, argument: str) -> tuple[jax.Array, bool]:
        """``x`` as a JAX array on the parameters' device and dtype.

        Device rules (see :mod:`curvlinops.backends._arrays`): arrays on the
        parameters' device are used in place, host arrays are read in place
        or copied to the device, arrays on another device raise. JAX reads
        its inputs asynchronously, so the result always counts as sharing
        ``x``'s memory (the caller waits for it before handing it back).
        Tracers (``jax.jit``, ``jax.lax`` loops) pass through unchanged.
        """
        if self.dtype == np.float64 and not x64_enabled():
            raise value_error(
                "jax_enable_x64",
                "True for an operator of float64 parameters",
                "False (it was switched off after the operator was built)",
                X64_FIX,
            )
        if library_of(x) == "torch":
            x = x.detach()  # tensors that require grad cannot be exported
        if isinstance(x, jax.Array):
            array = self._own_array(x, argument)
        elif is_host_array(x):
            array = self._from_host(x, argument)
        elif hasattr(x, "__dlpack__"):
            array = self._from_device_array(x, argument)
        else:
            raise type_error(argument, "an array (numpy, jax, torch, cupy or DLPack-capable)", x)
        shared = True
        if jnp.iscomplexobj(array):
            raise type_error(argument, "a real array", x)
        if array.dtype != self.dtype:
            array = array.astype(self.dtype)
        if self._sharding is not None:
            array = self._sharding.replicate(array)
        return array, shared

    def _allowed_devices(self) -> set:
        return {self.device} if self._sharding is None else set(self._sharding.devices)

    def _own_array(self, x: jax.Array, argument: str) -> jax.Array:
        if not self.is_concrete(x) or x.devices() <= self._allowed_devices():
            return x
        on_host = all(d.platform == "cpu" for d in x.devices())
        if on_host and self.device.platform != "cpu":
            return jax.device_put(x, self.device)
        raise placement_error(argument, device_label(x), str(self.device))

    def _from_host(self, x: Any, argument: str) -> jax.Array:
        if not isinstance(x, np.ndarray):
            try:
                return self._to_params_device(jnp.from_dlpack(x))
            except DLPACK_ERRORS:
                x = host_view(x)  # strided or read-only memory: go through numpy
        if not real_numeric(x.dtype):
            raise type_error(argument, "a real numeric array", x)
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)  # on the host: moves fewer bytes, needs no x64
        return jax.device_put(x, self.device)

    def _from_device_array(self, x: Any, argument: str) -> jax.Array:
        try:
            array = jnp.from_dlpack(compact(x))
        except DLPACK_ERRORS as error:
            # an accelerator this JAX cannot use, or memory it cannot read
            raise placement_error(argument, device_label(x), str(self.device)) from error
        if not array.devices() <= self._allowed_devices():
            raise placement_error(argument, device_label(x), str(self.device))
        return array

    def _to_params_device(self, array: jax.Array) -> jax.Array:
        if array.devices() <= self._allowed_devices():
            return array
        return jax.device_put(array, self.device)

    def to_numpy(self, y: jax.Array) -> np.ndarray:
        out = np.array(gather_global(y))
        # numpy has no bfloat16 of its own: hand such results over as float32
        return out.astype(np.float32) if out.dtype == jnp.bfloat16 else out

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
        # A sum is non-finite when an entry is; only then look at the entries.
        return bool(_finite_sum(y)) or bool(jnp.isfinite(y).all())

    def equal(self, a: Any, b: Any) -> bool:
        leaves_a, tree_a = jax.tree_util.tree_flatten(a)
        leaves_b, tree_b = jax.tree_util.tree_flatten(b)
        return tree_a == tree_b and all(
            np.shape(x) == np.shape(y) and bool(np.array_equal(gather_global(x), gather_global(y)))
            for x, y in zip(leaves_a, leaves_b)
        )

    def random_normal(self, shape: tuple[int, ...], seed: int) -> jax.Array:
        return jax.random.normal(jax.random.key(seed), shape, dtype=self.dtype)

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> jax.Array:
        return _rademacher_from_bits(jax.random.key(seed), tuple(shape), np.dtype(self.dtype))

    def random_uniform(self, shape: tuple[int, ...], seed: int) -> jax.Array:
        return jax.random.uniform(jax.random.key(seed), shape, dtype=self.dtype)

    # --- autodiff ---------------------------------------------------------
    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        return jax.jvp(f, primals, tangents)

    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
        out, pullback, *aux = jax.vjp(f, *primals, has_aux=has_aux)
        return (out, single_cotangent(pullback) if len(primals) == 1 else pullback, *aux)

    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        # Forward-over-reverse; XLA fuses it well (benchmarks/README.md).
        grad_f = jax.grad(f)
        return lambda v: jax.jvp(grad_f, (primal,), (v,))[1]

    def hvp(self, f: Callable, primal: Any, v: Any) -> Any:
        return self.hvp_fn(f, primal)(v)

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        return jax.vmap(f, in_axes=in_axes, out_axes=out_axes)

    # --- linearizations kept for repeated products -------------------------------
    # Built inside a compiled function, returned from it as a pytree of residuals,
    # and applied by another compiled function that takes them as arguments.
    def linearize(self, f: Callable, primal: Any, *, transpose: bool = False) -> Any:
        output, pullback = jax.vjp(f, primal)
        return JaxLinearization(output, pullback, None)

    def linearize_gradient(self, f: Callable, primal: Any) -> Any:
        # forward-over-reverse, as hvp_fn
        _, pushforward = jax.linearize(jax.grad(f), primal)
        return JaxLinearization(None, None, pushforward)

    def linear_output(self, lin: Any) -> jax.Array:
        return lin.output

    def linear_vjp(self, lin: Any, cotangent: jax.Array) -> Any:
        return lin.pullback(cotangent)[0]

    def linear_jvp(self, lin: Any, tangent: Any) -> Any:
        if lin.pushforward is not None:
            return lin.pushforward(tangent)
        # J v as the transpose of the kept pullback: no second set of residuals
        _, transpose = jax.vjp(lambda u: lin.pullback(u)[0], jnp.zeros_like(lin.output))
        return transpose(tangent)[0]

    def linearized_columns_per_pass(self, nbytes: int) -> int | None:
        # XLA on the CPU: per column, linearizations of 8-125 MB applied one column at
        # a time took 0.74-1.0x the time of a vmap of 32 (benchmark MLP, CNN,
        # transformer; H and G, 1 thread), those of 0.1 MB 4-6x longer.
        return one_column_on_cpu(self.device.platform == "cpu", nbytes)

    def cached_bytes(self, state: Any) -> int:
        parameters = {id(leaf) for leaf in jax.tree_util.tree_leaves(self.primals)}
        arrays = {
            id(leaf): leaf.nbytes
            for leaf in jax.tree_util.tree_leaves(state)
            if isinstance(leaf, jax.Array) and id(leaf) not in parameters
        }
        return int(sum(arrays.values()))

    def rotate_rows(self, V: jax.Array, R: jax.Array) -> jax.Array:
        """``R @ V`` for an ``(m, n)`` basis ``V``, written over ``V`` (donated: invalid after).

        Block by block of columns in one compiled loop, so XLA keeps one basis
        (a restart of a Krylov basis of many vectors). An unrolled chain of
        ``.at[].set`` took 18x as long as ``R @ V`` (XLA copied the buffer);
        the loop takes as long as ``R @ V``.
        """
        return _rotate_rows(V, R)

    def compiled_memory(self, f: Callable, *args: Any) -> dict[str, int] | None:
        """XLA's memory analysis of ``f`` compiled for ``args``' shapes (``None``: not given).

        One compilation per call, of abstract arguments: nothing is allocated or run.
        """
        abstract = jax.tree_util.tree_map(_abstract, args)
        try:
            stats = jax.jit(f).lower(*abstract).compile().memory_analysis()
        except (NotImplementedError, AttributeError):  # a platform without the analysis
            return None
        if stats is None:
            return None
        names = ("temp", "argument", "output", "alias")
        return {n: int(getattr(stats, f"{n}_size_in_bytes", 0)) for n in names}

    def saved_bytes(self, f: Callable, primal: Any) -> int:
        """Bytes of the residuals ``jax.vjp`` of ``f`` keeps (found abstractly, not run)."""
        residuals = jax.eval_shape(lambda p: jax.vjp(f, p)[1], primal)
        leaves = jax.tree_util.tree_leaves(residuals)
        return int(sum(np.prod(a.shape, dtype=int) * np.dtype(a.dtype).itemsize for a in leaves))

    def can_linearize(self, x: Any) -> bool:
        # Under jax.jit (or another transformation) products stay pure: no kept
        # state. A concrete x can come while a trace is active (jax.scipy's cg
        # evaluates its first residual so): a new array then is a tracer.
        return self.is_concrete(x) and not _trace_active()

    def parameters_token(self) -> Any:
        return None  # JAX arrays cannot change: an operator keeps its parameters

    compiles = True

    def compile(
        self,
        f: Callable,
        data_args: tuple[int, ...] = (),
        static_args: tuple[int, ...] = (),
        donate_args: tuple[int, ...] = (),
    ) -> Callable | None:
        sharding = self._sharding
        if static_args:
            if sharding is not None:
                return None  # the mesh is part of the compiled function: not shared
            return _shared_jit(f, static_args, self.device)
        if sharding is None:
            return _committed_to(jax.jit(f, donate_argnums=donate_args), self.device)
        if not data_args:
            return jax.jit(f, donate_argnums=donate_args)

        def sharded(*args: Any) -> Any:
            args = tuple(
                sharding.constrain_batch(a) if i in data_args else a for i, a in enumerate(args)
            )
            return f(*args)

        return jax.jit(sharded, donate_argnums=donate_args)

    # --- data parallelism -------------------------------------------------
    def distribute(self, process_group: Any, sharding: Any) -> Any:
        if process_group is not None and not (
            isinstance(process_group, str) and process_group == LOCAL
        ):
            raise type_error(
                "process_group",
                "None for JAX operators (process groups are torch.distributed's)",
                process_group,
                "To spread JAX data over devices, pass "
                "sharding=NamedSharding(mesh, PartitionSpec('batch')).",
            )
        if sharding is not None:
            self._sharding = BatchSharding(sharding)
            self.primals = self._sharding.replicate(self.primals)
        return SingleProcess()


def _trace_active() -> bool:
    """Whether a JAX transformation is tracing now (then a new array is a tracer)."""
    clean = getattr(_jax_core, "trace_state_clean", None)
    if clean is not None:  # no array made: an eager zeros costs 0.3 ms per product
        return not clean()
    return isinstance(jnp.zeros(()), jax.core.Tracer)


@jax.tree_util.register_pytree_node_class
class JaxLinearization:
    """A function linearised at fixed parameters, as a pytree of its residuals.

    ``pullback`` is the function of ``jax.vjp`` (``u -> (Jᵀ u,)``) and
    ``pushforward`` that of ``jax.linearize`` (``v -> J v``); one of them is
    ``None``. Both are ``jax.tree_util.Partial``: their residual arrays are
    leaves, so a compiled function can return them and another take them.
    """

    def __init__(self, output: Any, pullback: Any, pushforward: Any) -> None:
        self.output, self.pullback, self.pushforward = output, pullback, pushforward

    def tree_flatten(self) -> tuple[tuple, None]:
        return (self.output, self.pullback, self.pushforward), None

    @classmethod
    def tree_unflatten(cls, _: None, children: tuple) -> JaxLinearization:
        return cls(*children)


def _plain_mappings(tree: Any) -> Any:
    """``tree`` with every mapping that is not a dict (nor a JAX pytree node) as a dict."""
    if isinstance(tree, Mapping) and not isinstance(tree, dict):
        if jax.tree_util.all_leaves([tree]):  # not registered as a pytree node
            return {k: _plain_mappings(v) for k, v in tree.items()}
    if isinstance(tree, dict):
        return rebuild_mapping(tree, {k: _plain_mappings(v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_plain_mappings(v) for v in tree)
    return tree


@functools.partial(jax.jit, donate_argnums=(0,))
def _rotate_rows(V: jax.Array, R: jax.Array) -> jax.Array:
    m, n = V.shape
    width = max(1, -(-n // m))  # one block: at most one vector's worth of temporary
    full = n // width

    def rotate_block(i: Any, V: jax.Array) -> jax.Array:
        block = jax.lax.dynamic_slice_in_dim(V, i * width, width, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(V, R @ block, i * width, axis=1)

    V = jax.lax.fori_loop(0, full, rotate_block, V)
    if full * width < n:
        V = V.at[:, full * width :].set(R @ V[:, full * width :])
    return V


@jax.jit
def _finite_sum(y: jax.Array) -> jax.Array:
    """Whether the sum of ``y`` is finite, in one dispatch.

    Eager ``sum`` and ``isfinite`` took two, about 0.5 ms of a 5 ms product.
    """
    return jnp.isfinite(jnp.sum(y))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rademacher_from_bits(key: jax.Array, shape: tuple[int, ...], dtype: np.dtype) -> jax.Array:
    """Independent ±1 entries, 32 from each random 32-bit word (one bit each).

    ``jax.random.rademacher`` draws a word per entry: 528 ms for a block of 32
    probes of 269,322 entries on one CPU core, against 47 ms here, a third of a
    trace estimate's time on the benchmark MLP.
    """
    size = int(np.prod(shape, dtype=np.int64))
    words = jax.random.bits(key, (-(-size // 32),), dtype=jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(-1)[:size].astype(dtype) - 1).reshape(shape)


@functools.cache
def _shared_jit(f: Callable, static_args: tuple[int, ...], device: Any) -> Callable:
    """One ``jax.jit`` of ``f`` per device: its compilations are cached across callers."""
    return _committed_to(jax.jit(f, static_argnums=static_args), device)


def _committed_to(jitted: Callable, device: Any) -> Callable:
    """Call ``jitted`` with its concrete array arguments committed to ``device``.

    ``jax.jit`` compiles once per argument placement: an uncommitted array
    (``jnp.asarray``, ``jax.random``) and a committed one (``jax.device_put``,
    DLPack) of the same shape would each compile the product anew.
    """

    def commit(a: Any) -> Any:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer) and not a.committed:
            return jax.device_put(a, device)
        return a

    def call(*args: Any) -> Any:
        # Top-level arguments only: parameters and data are committed when imported,
        # and a walk over the parameter tree costs more than the check it saves.
        return jitted(*(commit(a) for a in args))

    return call


def _abstract(leaf: Any) -> Any:
    """An array's shape and dtype (numpy too: large inputs are never allocated)."""
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    return leaf


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
