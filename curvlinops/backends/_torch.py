"""PyTorch backend, built on ``torch.func``.

Parameters are flattened in the order the user gave them: the order of the
list (``list(model.parameters())`` style) or the insertion order of the dict.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import array_api_compat.torch as xp_torch
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvlinops import losses
from curvlinops._checks import describe, type_error, value_error
from curvlinops.backends._arrays import (
    DLPACK_ERRORS,
    compact,
    device_label,
    dlpack_safe,
    host_view,
    is_host_array,
    library_of,
    map_structure,
    placement_error,
    real_numeric,
    rebuild_mapping,
)
from curvlinops.backends._attention import differentiable_attention
from curvlinops.backends._distributed_torch import torch_communicator
from curvlinops.backends._linearize_torch import (
    linearize,
    linearize_gradient,
    parameters_token,
    pull_back,
    pull_back_flat,
)
from curvlinops.backends._protocol import BackendDefaults, one_column_on_cpu, single_cotangent

__all__ = ["TorchBackend"]


class TorchBackend(BackendDefaults):
    """Backend for PyTorch models, parameters and arrays."""

    name = "torch"
    xp = xp_torch

    def __init__(self, model_func: Any, params: Any) -> None:
        names, tensors = _named_tensors(model_func, params)
        _check_uniform(names, tensors)
        self.param_names: list[str] = names
        self.param_shapes: list[tuple[int, ...]] = [tuple(t.shape) for t in tensors]
        self.primals: tuple[torch.Tensor, ...] = tuple(t.detach() for t in tensors)
        self.torch_dtype = tensors[0].dtype
        self.dtype = _numpy_dtype(self.torch_dtype)
        self.device = tensors[0].device
        self._sizes = [t.numel() for t in tensors]
        self.model_fn = _functional_model(model_func, params, names)
        # what the model reads: a change in place makes kept linearizations stale
        self._watched = _watched_tensors(model_func, self.primals)
        self._token_views: dict = {}  # parameters_token's views, kept per layout

    # --- set-up -----------------------------------------------------------
    def loss(self, loss_func: Any) -> Any:
        return losses.as_loss(_translate_torch_loss(loss_func))

    def import_batch(self, batch: Any, index: int) -> Any:
        def convert(leaf: Any) -> Any:
            if isinstance(leaf, torch.Tensor):
                leaf = leaf.to(self.device)
                if leaf.is_inference() and not torch.is_inference_mode_enabled():
                    leaf = leaf.clone()  # autograd cannot save inference tensors
                return leaf
            if library_of(leaf) in ("numpy", "jax", "cupy"):
                return torch.as_tensor(np.asarray(leaf), device=self.device)
            raise type_error(f"data batch {index}", "arrays (torch, numpy or jax)", leaf)

        return map_structure(convert, batch)

    def batch_size(self, X: Any) -> int:
        return int(X.shape[0])

    # --- arrays -----------------------------------------------------------
    def owns(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def import_array(self, x: Any, argument: str) -> tuple[torch.Tensor, bool]:
        """``x`` as a tensor on the parameters' device and dtype, and whether it shares memory.

        Device rules (see :mod:`curvlinops.backends._arrays`): tensors on the
        parameters' device are used in place, host arrays are read in place
        (CPU model) or copied to the device, arrays on another device raise.
        """
        _reject_jax_tracer(x, argument)
        if isinstance(x, torch.Tensor):
            tensor, shared = x.detach(), True
        elif is_host_array(x):
            tensor, shared = _from_host(x, argument)
        elif hasattr(x, "__dlpack__"):
            tensor, shared = _from_device_array(x, argument, self.device), True
        else:
            raise type_error(argument, "an array (numpy, torch, jax, cupy or DLPack-capable)", x)
        if tensor.device != self.device:
            if tensor.device.type != "cpu":
                raise placement_error(argument, str(tensor.device), str(self.device))
            tensor, shared = tensor.to(self.device), False
        if tensor.is_complex():
            raise type_error(argument, "a real array", x)
        if tensor.dtype != self.torch_dtype:
            tensor, shared = tensor.to(self.torch_dtype), False
        return tensor, shared

    def to_numpy(self, y: torch.Tensor) -> np.ndarray:
        y = y.detach().cpu()
        # numpy has no bfloat16 of its own: hand such results over as float32
        return (y.float() if y.dtype == torch.bfloat16 else y).numpy()

    def tree_flatten(self, tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
        return _flatten_structure(tree)

    def flatten(self, tree: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tree])

    def unflatten(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces = torch.split(vector, self._sizes)
        return tuple(p.reshape(s) for p, s in zip(pieces, self.param_shapes))

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.torch_dtype, device=self.device)

    def eye(self, n: int) -> torch.Tensor:
        return torch.eye(n, dtype=self.torch_dtype, device=self.device)

    def concat(self, arrays: Sequence[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def block_until_ready(self, y: torch.Tensor) -> torch.Tensor:
        if y.is_cuda:  # kernels run asynchronously on the current stream
            torch.cuda.current_stream(y.device).synchronize()
        return y

    def is_concrete(self, y: Any) -> bool:
        # under torch.func.vmap/grad a value cannot be read (no NaN check there)
        return not torch._C._functorch.is_functorch_wrapped_tensor(y)

    def all_finite(self, y: torch.Tensor) -> bool:
        # A sum is non-finite when an entry is (25x cheaper than isfinite().all());
        # only then look at the entries, since the sum alone may overflow.
        return bool(torch.isfinite(y.sum())) or bool(torch.isfinite(y).all())

    def equal(self, a: Any, b: Any) -> bool:
        leaves_a, _ = _flatten_structure(a)
        leaves_b, _ = _flatten_structure(b)
        return len(leaves_a) == len(leaves_b) and all(
            _leaf_equal(x, y) for x, y in zip(leaves_a, leaves_b)
        )

    def random_normal(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=gen, dtype=self.torch_dtype, device=self.device)

    def random_rademacher(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # drawn in the target dtype and shifted in place: 2.7x faster than int64 bits
        bits = torch.randint(0, 2, shape, generator=gen, dtype=self.torch_dtype, device=self.device)
        return bits.mul_(2).sub_(1)

    def random_uniform(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.rand(shape, generator=gen, dtype=self.torch_dtype, device=self.device)

    # --- autodiff ---------------------------------------------------------
    # The transforms run attention on its math kernel (see backends/_attention.py):
    # fused kernels have no second derivative, forward mode or vmap rule.
    @differentiable_attention()
    def jvp(self, f: Callable, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
        _load_forward_mode_quietly()
        return jvp(f, primals, tangents)

    @differentiable_attention()
    def vjp(self, f: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
        out, pullback, *aux = vjp(f, *primals, has_aux=has_aux)
        return (out, single_cotangent(pullback) if len(primals) == 1 else pullback, *aux)

    @differentiable_attention()
    def hvp_fn(self, f: Callable, primal: Any) -> Callable[[Any], Any]:
        # Reverse-over-reverse: on CPU it beat forward-over-reverse
        # (benchmarks/README.md has the measurement).
        _, pullback = vjp(grad(f), primal)
        return lambda v: pullback(v)[0]

    @differentiable_attention()
    def hvp(self, f: Callable, primal: Any, v: Any) -> Any:
        # Plain autograd's double backward, 2-13% faster than torch.func's for one
        # vector (benchmarks/README.md); it cannot run under torch.func transforms.
        if (
            torch.is_inference_mode_enabled()
            or any(p.is_inference() for p in primal)
            or _under_torch_func(primal, v)
        ):
            return self.hvp_fn(f, primal)(v)
        leaves = tuple(p.detach().requires_grad_(True) for p in primal)
        with torch.enable_grad():
            g = torch.autograd.grad(f(leaves), leaves, create_graph=True)
            return torch.autograd.grad(g, leaves, v)

    def vmap(self, f: Callable, in_axes: Any = 0, out_axes: Any = 0) -> Callable:
        return vmap(f, in_dims=in_axes, out_dims=out_axes)

    # --- linearizations kept for repeated products (_linearize_torch.py) ------
    @differentiable_attention()
    def linearize(self, f: Callable, primal: Any, *, transpose: bool = False) -> Any:
        return linearize(f, primal, transpose)

    @differentiable_attention()
    def linearize_gradient(self, f: Callable, primal: Any) -> Any:
        return linearize_gradient(f, primal)

    def linear_output(self, lin: Any) -> torch.Tensor:
        return lin.output

    def linear_vjp(self, lin: Any, cotangent: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return pull_back(lin.forward, (cotangent,))

    def linear_jvp(self, lin: Any, tangent: Sequence[torch.Tensor]) -> Any:
        if lin.transposed is None:  # a gradient's graph: H is symmetric
            return pull_back(lin.forward, tangent)
        return pull_back(lin.transposed, tangent)[0]

    def linear_hvp(self, lin: Any, v: torch.Tensor) -> torch.Tensor:
        return self.flatten(pull_back_flat(lin, v))

    def linearized_columns_per_pass(self, nbytes: int) -> int | None:
        # A kept graph replayed under vmap runs autograd's batched backward, whose
        # copies grow with the graph: on the CPU, graphs of 10-60 MB replayed one
        # column at a time at 1.0-0.4x the time per column (benchmark MLP, CNN,
        # transformer; H and G, 8 columns, 1 thread), while graphs of 0.1 MB, where
        # the per-call overhead rules, replayed 3-4x faster under vmap. Elsewhere:
        # unmeasured, vmap.
        return one_column_on_cpu(self.device.type == "cpu", nbytes)

    def cached_bytes(self, state: Any) -> int:
        leaves, _ = _flatten_structure(state)
        parts = {id(leaf): _kept_bytes(leaf) for leaf in leaves}
        return int(sum(parts.values()))

    @differentiable_attention()
    def saved_bytes(self, f: Callable, primal: Any) -> int:
        """Bytes autograd saves for one forward pass of ``f`` at ``primal`` (activations).

        Distinct storages seen by a saved-tensor hook, parameters not counted; the
        hook returns each tensor unchanged and the graph is dropped on return.
        """
        return _forward_saved_bytes(f, primal)

    def can_linearize(self, x: Any) -> bool:
        return not (
            torch.is_inference_mode_enabled()
            or any(p.is_inference() for p in self.primals)
            or _under_torch_func((x,))
        )

    def parameters_token(self) -> Any:
        return parameters_token(self._watched, self._token_views)

    compiles = False

    def compile(
        self,
        f: Callable,
        data_args: tuple[int, ...] = (),
        static_args: tuple[int, ...] = (),
        donate_args: tuple[int, ...] = (),
    ) -> Callable:
        return f

    # --- data parallelism -------------------------------------------------
    def distribute(self, process_group: Any, sharding: Any) -> Any:
        if sharding is not None:
            raise type_error(
                "sharding",
                "None for PyTorch operators (sharding= places JAX data on a device mesh)",
                sharding,
                "With torch.distributed, pass process_group= (default: the default group).",
            )
        return torch_communicator(process_group, self.device)


# --- helpers ---------------------------------------------------------------
def _watched_tensors(model_func: Any, primals: tuple) -> list[torch.Tensor]:
    """The parameters, and a module's other parameters and buffers (by identity, once)."""
    tensors = {(t.data_ptr(), t.shape): t for t in primals}
    if isinstance(model_func, nn.Module):
        for t in (*model_func.parameters(), *model_func.buffers()):
            tensors.setdefault((t.data_ptr(), t.shape), t)
    return list(tensors.values())


def _forward_saved_bytes(f: Callable, primal: Any) -> int:
    leaves = tuple(p.detach().requires_grad_(True) for p in primal)
    parameters = {p.untyped_storage().data_ptr() for p in leaves}
    storages: dict[int, int] = {}  # addresses and sizes only: no tensor kept alive

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(leaves)
    return int(sum(storages.values()))


def _kept_bytes(leaf: Any) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.nbytes
    return int(getattr(leaf, "nbytes", 0))  # a TorchLinearization's graphs


@functools.cache
def _load_forward_mode_quietly() -> None:
    """Load PyTorch's forward-mode decompositions once, without its own deprecation warnings.

    The first dual tensor of a process imports them, and they are built with
    ``torch.jit.script``, which warns 18 times: torch's business, not our users'.
    Only this warning, only during this import: the filters are restored after it.
    """
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is None:  # a PyTorch that loads them otherwise
        return
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning
        )
        load()


def _under_torch_func(*tensors: tuple) -> bool:
    """Whether a tensor in ``tensors`` (tuples) is wrapped by torch.func (vmap, grad)."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(t) for group in tensors for t in group)


def _from_host(x: Any, argument: str) -> tuple[torch.Tensor, bool]:
    """A CPU tensor of a host array: its memory where that is safe, else a copy."""
    if library_of(x) == "jax":
        # JAX arrays are always compact; DLPack also keeps bfloat16
        return torch.from_dlpack(x), True
    view = host_view(x)
    if not real_numeric(view.dtype):
        raise type_error(argument, "a real numeric array", x)
    if view.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: same bits as torch's
        return torch.from_numpy(np.array(view).view(np.uint16)).view(torch.bfloat16), False
    if dlpack_safe(view):
        return torch.from_dlpack(view), True
    # negative strides (which crash torch.from_dlpack), misaligned or odd strides
    return torch.from_numpy(np.array(view)), False


def _from_device_array(x: Any, argument: str, device: torch.device) -> torch.Tensor:
    """A tensor sharing the memory of another library's accelerator array (CuPy, JAX)."""
    try:
        return torch.from_dlpack(compact(x))
    except DLPACK_ERRORS as error:
        # an accelerator this PyTorch cannot use, or memory it cannot read
        raise placement_error(argument, device_label(x), str(device)) from error


def _reject_jax_tracer(x: Any, argument: str) -> None:
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        raise type_error(
            argument,
            "a concrete array",
            x,
            "JAX is tracing this call (jax.jit, jax.lax loops, jax.scipy's cg), but the "
            "operator belongs to a PyTorch model and cannot be traced. Call it outside JAX "
            "transformations, or build the operator from JAX parameters.",
        )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype; bfloat16 comes from ``ml_dtypes``."""
    name = str(dtype).removeprefix("torch.")
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError as error:
        raise ImportError(
            "bfloat16 parameters need the ml_dtypes package (numpy has no bfloat16 of its "
            "own; JAX installs it): pip install ml_dtypes"
        ) from error
    return np.dtype(ml_dtypes.bfloat16)


def _leaf_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    return type(a) is type(b) and bool(np.all(a == b))


def _flatten_structure(tree: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """Leaves of nested lists, tuples and mappings, and a function that rebuilds them."""
    if isinstance(tree, Mapping):
        keys = list(tree)
        parts = [_flatten_structure(tree[k]) for k in keys]
        return _join_parts(parts, lambda children: rebuild_mapping(tree, dict(zip(keys, children))))
    if isinstance(tree, (list, tuple)):
        parts = [_flatten_structure(v) for v in tree]
        return _join_parts(parts, type(tree))
    return [tree], lambda leaves: leaves[0]


def _join_parts(parts: list, build: Callable) -> tuple[list[Any], Callable]:
    counts = [len(leaves) for leaves, _ in parts]
    leaves = [leaf for part, _ in parts for leaf in part]

    def rebuild(new_leaves: list[Any]) -> Any:
        children, start = [], 0
        for (_, sub_rebuild), n in zip(parts, counts):
            children.append(sub_rebuild(new_leaves[start : start + n]))
            start += n
        return build(children)

    return leaves, rebuild


def _named_tensors(model_func: Any, params: Any) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of ``params``; for modules, names as in ``named_parameters``."""
    if isinstance(params, dict):
        names, tensors = list(params), list(params.values())
        if isinstance(model_func, nn.Module):
            known = dict(model_func.named_parameters()) | dict(model_func.named_buffers())
            unknown = [n for n in names if n not in known]
            if unknown:
                raise value_error(
                    "params",
                    "names of model_func's parameters (as in model.named_parameters())",
                    f"unknown names {unknown}",
                )
    elif isinstance(params, (list, tuple)):
        tensors = list(params)
        names = _names_in_module(model_func, tensors)
    else:
        raise type_error(
            "params",
            "a list of the model's parameters or a dict name -> tensor",
            params,
            "Pass e.g. list(model.parameters()) or dict(model.named_parameters()).",
        )
    if not tensors:
        raise value_error("params", "at least one parameter", "an empty collection")
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise type_error(f"params[{name!r}]", "a torch.Tensor", t)
    return names, tensors


def _names_in_module(model_func: Any, tensors: list) -> list[str]:
    if not isinstance(model_func, nn.Module):
        return [f"param_{i}" for i in range(len(tensors))]
    by_id = {id(p): name for name, p in model_func.named_parameters()}
    names = []
    for i, t in enumerate(tensors):
        if id(t) not in by_id:
            raise value_error(
                "params",
                "parameters of model_func",
                f"params[{i}] ({describe(t)}), which is not one of them",
                "Pass tensors from model.parameters() of the same model, or a dict "
                "name -> tensor (then any tensors of the right shapes are used).",
            )
        names.append(by_id[id(t)])
    if len(set(names)) != len(names):
        raise value_error("params", "each parameter once", "a parameter listed twice")
    return names


def _check_uniform(names: list[str], tensors: list[torch.Tensor]) -> None:
    first = tensors[0]
    for name, t in zip(names, tensors):
        if not t.is_floating_point():
            raise type_error(f"params[{name!r}]", "a floating-point tensor", t)
        if t.dtype != first.dtype:
            raise value_error(
                "params",
                f"one dtype for all parameters ({first.dtype})",
                f"{t.dtype} for {name!r}",
                "Cast the model, e.g. model.double().",
            )
        if t.device != first.device:
            raise value_error(
                "params",
                f"one device for all parameters ({first.device})",
                f"{t.device} for {name!r}",
                "Move the model with model.to(device).",
            )


def _functional_model(model_func: Any, params: Any, names: list[str]) -> Callable:
    if isinstance(model_func, nn.Module):
        module = model_func
        # Parameters not differentiated are held as constants: left to the
        # module, they would make every product record an autograd graph.
        frozen = {n: p.detach() for n, p in module.named_parameters() if n not in set(names)}

        def module_fn(primals: tuple, X: Any) -> Any:
            return functional_call(module, {**frozen, **dict(zip(names, primals))}, (X,))

        return module_fn
    if not callable(model_func):
        raise type_error(
            "model_func", "a torch.nn.Module or a callable (params, X) -> outputs", model_func
        )
    if isinstance(params, dict):
        return lambda primals, X: model_func(dict(zip(names, primals)), X)
    return lambda primals, X: model_func(list(primals), X)


def _translate_torch_loss(loss_func: Any) -> Any:
    """Map PyTorch's standard loss modules to descriptors with closed forms."""
    if isinstance(loss_func, nn.MSELoss):
        return losses.MSELoss(losses.check_reduction(loss_func.reduction, "loss_func.reduction"))
    if isinstance(loss_func, nn.BCEWithLogitsLoss) and (
        loss_func.weight is None and loss_func.pos_weight is None
    ):
        return losses.BCEWithLogitsLoss(
            losses.check_reduction(loss_func.reduction, "loss_func.reduction")
        )
    if isinstance(loss_func, nn.CrossEntropyLoss) and (
        loss_func.weight is None and loss_func.label_smoothing == 0.0
    ):
        reduction = losses.check_reduction(loss_func.reduction, "loss_func.reduction")
        return losses.CrossEntropyLoss(reduction, class_axis=1)
    variant = _loss_variant(loss_func)
    if variant:  # autodiff of the module; what needs a closed form says why not
        reduction = losses.check_reduction(loss_func.reduction, "loss_func.reduction")
        weighted_mean = isinstance(loss_func, nn.CrossEntropyLoss) and (
            loss_func.weight is not None
        )
        return losses.CallableLoss(loss_func, reduction, variant, weighted_mean)
    return loss_func


def _loss_variant(loss_func: Any) -> str:
    """What a standard loss module adds to the closed form ("" for anything else)."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        parts = ["class weights (weight=...)"] if loss_func.weight is not None else []
        if loss_func.label_smoothing:
            parts.append(f"label smoothing ({loss_func.label_smoothing})")
        return " and ".join(parts)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        names = [n for n in ("weight", "pos_weight") if getattr(loss_func, n) is not None]
        return " and ".join(f"{n}=..." for n in names)
    return ""
