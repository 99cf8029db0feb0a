"""The MLX backend: ``mx.jvp``/``mx.vjp``/``mx.vmap`` behind curvlinops' backend interface.

Parameters are a tree of ``mx.array`` (dicts, lists, tuples), as
``mlx.nn.Module.trainable_parameters()`` gives them, or a module itself.
Leaves are flattened in the tree's order (dict insertion order, lists in
order); ``param_names`` holds each leaf's dotted path (``layers.0.weight``),
as ``mlx.utils.tree_flatten`` writes it.

MLX's transforms take and return flat lists of arrays; the wrappers here
flatten the trees the operators pass. Per-batch products are compiled with
``mx.compile``, parameters and data as arguments. Results of products are
MLX arrays for MLX callers and numpy arrays for scipy (``to_numpy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from curvlinops.backends import (
    BackendDefaults,
    host_view,
    is_host_array,
    library_of,
    map_structure,
    type_error,
    value_error,
)

__all__ = ["MlxBackend"]

_DTYPES = ("float16", "float32", "float64")  # float64: MLX's CPU only; bfloat16 has no numpy


class MlxBackend(BackendDefaults):
    """Backend for MLX functions ``(params, X) -> outputs`` and ``mlx.nn.Module``s."""

    name = "mlx"
    xp = mx
    # mlx.core has the array-API names the losses use, but neither ``device=``
    # keywords nor every linalg routine on every device: the Krylov algorithms
    # compute in numpy, on the host that MLX shares with the CPU.
    array_api = False
    compiles = True

    def __init__(self, model_func: Any, params: Any) -> None:
        if isinstance(model_func, nn.Module) and params is None:
            params = model_func.trainable_parameters()
        names, leaves, rebuild = _named_leaves(params)
        leaves = [_import_param(name, leaf) for name, leaf in zip(names, leaves)]
        _check_uniform(names, leaves)
        self.param_names: list[str] = names
        self.param_shapes: list[tuple[int, ...]] = [tuple(leaf.shape) for leaf in leaves]
        self.primals = rebuild(leaves)
        self.mx_dtype = leaves[0].dtype
        self.dtype = np.dtype(_dtype_name(self.mx_dtype))
        # MLX arrays have no device: operations run on the default device (unified memory)
        self.device = mx.default_device()
        self._offsets = np.cumsum([int(np.prod(s, dtype=int)) for s in self.param_shapes])[:-1]
        self.model_fn = _functional_model(model_func)

    # --- set-up (loss: the default, curvlinops.losses and callables) ----
    def import_batch(self, batch: Any, index: int) -> Any:
        def convert(leaf: Any) -> Any:
            if not isinstance(leaf, mx.array):
                if not (is_host_array(leaf) or isinstance(leaf, (np.generic, np.ndarray))):
                    raise type_error(f"data batch {index}", "arrays (mlx, numpy or host)", leaf)
                leaf = _from_numpy(np.asarray(host_view(leaf)))
            if mx.issubdtype(leaf.dtype, mx.floating) and leaf.dtype != self.mx_dtype:
                leaf = leaf.astype(self.mx_dtype)  # a float64 input would promote the model
            return leaf

        return map_structure(convert, batch)

    # --- arrays -----------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, mx.array)

    def import_array(self, x: Any, argument: str) -> tuple[mx.array, bool]:
        """``x`` as an MLX array of the parameters' dtype, and whether it shares memory with ``x``.

        MLX arrays are used as they are; host arrays (numpy, CPU tensors of
        other libraries) are copied in; arrays on an accelerator raise.
        """
        if isinstance(x, mx.array):
            array, shared = x, True
        elif is_host_array(x):
            view = np.asarray(host_view(x))
            if view.dtype.kind not in "fiub":
                raise type_error(argument, "a real array", x)
            array, shared = mx.array(view, dtype=self.mx_dtype), False
        else:
            raise type_error(
                argument,
                "an MLX array or an array in host memory (numpy, CPU tensors)",
                x,
                "Copy it to the host first (e.g. tensor.cpu()).",
            )
        if mx.issubdtype(array.dtype, mx.complexfloating):
            raise type_error(argument, "a real array", x)
        if array.dtype != self.mx_dtype:
            array = array.astype(self.mx_dtype)
        return array, shared

    def to_numpy(self, y: mx.array) -> np.ndarray:
        if y.dtype == mx.bfloat16:  # numpy has no bfloat16 of its own
            y = y.astype(mx.float32)
        return np.array(y)

    def tree_flatten(self, tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
        _, leaves, rebuild = _named_leaves(tree, check=False)
        return leaves, rebuild

    def flatten(self, tree: Any) -> mx.array:
        leaves, _ = self.tree_flatten(tree)
        return mx.concatenate([leaf.reshape(-1) for leaf in leaves])

    def unflatten(self, vector: mx.array) -> Any:
        pieces = mx.split(vector, self._offsets.tolist()) if len(self._offsets) else [vector]
        _, rebuild = self.tree_flatten(self.primals)
        return rebuild([p.reshape(s) for p, s in zip(pieces, self.param_shapes)])

    def zeros(self, shape: tuple[int, ...]) -> mx.array:
        return mx.zeros(shape, dtype=self.mx_dtype)

    def eye(self, n: int) -> mx.array:
        return mx.eye(n, dtype=self.mx_dtype)

    def block_until_ready(self, y: Any) -> Any:
        mx.eval(y)  # MLX is lazy: compute now
        return y

    def all_finite(self, y: mx.array) -> bool:
        return bool(mx.all(mx.isfinite(y)).item())

    def equal(self, a: Any, b: Any) -> bool:
        leaves_a, leaves_b = self.tree_flatten(a)[0], self.tree_flatten(b)[0]
        return len(leaves_a) == len(leaves_b) and all(
            _leaf_equal(x, y) for x, y in zip(leaves_a, leaves_b)
        )

    def random_normal(self, shape: tuple[int, ...], seed: int) -> mx.array:
        return mx.random.normal(shape, dtype=self.mx_dtype, key=mx.random.key(seed))

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> mx.array:
        bits = mx.random.bernoulli(0.5, shape, key=mx.random.key(seed))
        return 2 * bits.astype(self.mx_dtype) - 1

    def random_uniform(self, shape: tuple[int, ...], seed: int) -> mx.array:
        # MLX draws uniform numbers in at most single precision
        draws = mx.random.uniform(shape=shape, dtype=mx.float32, key=mx.random.key(seed))
        return draws.astype(self.mx_dtype)

    # --- autodiff: MLX's transforms on flat lists of arrays ---------------
    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        leaves, rebuild = self.tree_flatten(tuple(primals))
        flat_f, rebuild_out = _flat_function(f, rebuild, self.tree_flatten)
        outputs, pushed = mx.jvp(flat_f, leaves, self.tree_flatten(tuple(tangents))[0])
        return rebuild_out[0](outputs), rebuild_out[0](pushed)

    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
        leaves, rebuild = self.tree_flatten(primals)
        result = f(*primals)
        output, aux = result if has_aux else (result, None)
        first = (lambda r: r[0]) if has_aux else (lambda r: r)
        flat_f, _ = _flat_function(lambda *p: first(f(*p)), rebuild, self.tree_flatten)

        def pullback(cotangent: Any) -> Any:
            # MLX's vjp takes the cotangents with the primals; under mx.compile the
            # forward pass it repeats is the same graph as ``output``'s and is shared
            _, grads = mx.vjp(flat_f, leaves, self.tree_flatten(cotangent)[0])
            pieces = rebuild(grads)
            return pieces[0] if len(primals) == 1 else pieces

        return (output, pullback, aux) if has_aux else (output, pullback)

    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        # forward-over-reverse: benchmarks/bench_mlx.py measured it against reverse-over-reverse
        leaves, rebuild = self.tree_flatten(primal)
        gradient = mx.grad(lambda *p: f(rebuild(list(p))), argnums=list(range(len(leaves))))

        def gradient_leaves(*p: mx.array) -> list[mx.array]:
            g = gradient(*p)  # one array (not a tuple) for one leaf
            return list(g) if isinstance(g, (tuple, list)) else [g]

        def product(v: Any) -> Any:
            _, pushed = mx.jvp(gradient_leaves, leaves, self.tree_flatten(v)[0])
            return rebuild(pushed)

        return product

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        return mx.vmap(f, in_axes=in_axes, out_axes=out_axes)

    # --- compilation ------------------------------------------------------
    def compile(
        self,
        f: Callable,
        data_args: tuple[int, ...] = (),
        static_args: tuple[int, ...] = (),
        donate_args: tuple[int, ...] = (),
    ) -> Callable | None:
        if static_args:
            return None  # each operator compiles its own products (see curvlinops/_tracing.py)
        return mx.compile(f)


# --- trees ----------------------------------------------------------------------
def _named_leaves(tree: Any, check: bool = True) -> tuple[list[str], list[Any], Callable]:
    """Dotted names, leaves, and a function that rebuilds ``tree`` from new leaves."""
    names: list[str] = []
    leaves: list[Any] = []

    def visit(node: Any, path: str) -> Callable[[Any], Any]:
        if isinstance(node, dict):  # an mlx.nn.Module is a dict too: rebuilt as one
            parts = [(k, visit(v, f"{path}.{k}" if path else str(k))) for k, v in node.items()]
            return lambda it: {k: build(it) for k, build in parts}
        if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
            builds = [visit(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
            kind = type(node)
            return lambda it: kind(build(it) for build in builds)
        names.append(path or "params")
        leaves.append(node)
        return lambda it: next(it)

    build = visit(tree, "")
    if check and not leaves:
        raise value_error("params", "at least one array", "an empty structure")
    return names, leaves, lambda new_leaves: build(iter(new_leaves))


def _flat_function(f: Callable, rebuild: Callable, flatten: Callable) -> tuple[Callable, list]:
    """``f`` of a tuple of trees as a function of flat arrays returning a list of arrays.

    The second item receives the function that rebuilds ``f``'s output tree.
    """
    rebuild_out: list[Callable] = [lambda leaves: leaves]

    def flat_f(*leaves: mx.array) -> list[mx.array]:
        out_leaves, rebuild_output = flatten(f(*rebuild(list(leaves))))
        rebuild_out[0] = rebuild_output
        return out_leaves

    return flat_f, rebuild_out


def _functional_model(model_func: Any) -> Callable[[Any, Any], Any]:
    """The model as a pure function ``(params, X) -> outputs``."""
    if isinstance(model_func, nn.Module):
        module = model_func

        def module_fn(params: Any, X: Any) -> Any:
            # the module's own arrays are put back after the call, also while mx.compile
            # traces (it then holds placeholders during the call only)
            current = module.trainable_parameters()
            module.update(params, strict=False)
            try:
                return module(X)
            finally:
                module.update(current, strict=False)

        return module_fn
    if not callable(model_func):
        raise type_error(
            "model_func", "an mlx.nn.Module or a callable (params, X) -> outputs", model_func
        )
    return model_func


def _import_param(name: str, leaf: Any) -> mx.array:
    if isinstance(leaf, mx.array):
        return leaf
    if isinstance(leaf, np.ndarray) and leaf.dtype.name in _DTYPES:
        return _from_numpy(leaf)
    raise type_error(
        f"params[{name}]",
        "an MLX array (all parameters of one framework)"
        if library_of(leaf) in ("torch", "jax")
        else "an MLX array",
        leaf,
    )


def _check_uniform(names: list[str], leaves: list[mx.array]) -> None:
    first = leaves[0].dtype
    for name, leaf in zip(names, leaves):
        if _dtype_name(leaf.dtype) not in _DTYPES:
            raise type_error(f"params[{name}]", f"an array of dtype {' or '.join(_DTYPES)}", leaf)
        if leaf.dtype != first:
            raise value_error(
                "params",
                f"one dtype for all parameters ({first})",
                f"{leaf.dtype} for {name}",
                "Cast them, e.g. tree_map(lambda a: a.astype(mx.float32), params).",
            )


def _from_numpy(array: np.ndarray) -> mx.array:
    """An MLX copy of ``array`` in its own dtype (``mx.array`` alone makes float64 float32)."""
    kind = getattr(mx, array.dtype.name, None) if array.dtype.kind in "fiub" else None
    return mx.array(array) if kind is None else mx.array(array, dtype=kind)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _leaf_equal(a: Any, b: Any) -> bool:
    if isinstance(a, mx.array) and isinstance(b, mx.array):
        return a.shape == b.shape and a.dtype == b.dtype and bool(mx.array_equal(a, b).item())
    return type(a) is type(b) and bool(np.array_equal(np.asarray(a), np.asarray(b)))
