"""KFAC's framework part for JAX: find the layers of a plain function by tracing, capture them.

The model ``(params, X) -> outputs`` is traced to a jaxpr once per input
shape. A *dense layer* is a ``dot_general`` with one contracting axis whose
one operand is a parameter leaf (or its transpose) and whose other operand
carries the batch on axis 0; a *convolution* is a ``conv_general_dilated``
whose kernel is a parameter leaf (``feature_group_count=1``, no input
dilation). A bias is a 1-d leaf added to the layer's output (possibly after a
transpose, as ``jax.vmap`` of ``W @ x + b`` gives) along its output axis. So
``x @ W + b``, ``x @ W.T + b``, flax ``Dense``/``Conv`` and equinox
``Linear`` are found without registration.

The capture holds no arrays (the traced jaxprs live in a small module-level
cache keyed by the model function and the shapes), so KFAC's compiled
programs, whose static argument contains it, are shared between operators
of equal configuration.

The jaxpr is then evaluated by a small interpreter that records each layer's
input and adds a zero to its output, whose cotangent under ``jax.vjp`` is the
output gradient. Inputs come out as ``(N, S, d_in)`` (convolutions unfolded
into patches) and gradients as ``(k, N, S, d_out)``, as from the PyTorch
capture; weights are described by the permutation of their axes into
``(out, in, ...)`` order (``weight_layouts``), e.g. ``(1, 0)`` for a flax
kernel ``(in, out)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Literal

from curvlinops._checks import type_error, value_error

__all__ = ["JaxKFACCapture"]

_CALLS = ("pjit", "jit", "closed_call", "core_call")
_MAX_PLANS = 32
"""Traced models kept (model function and shapes); each holds a jaxpr and its constants."""
_PLANS: OrderedDict[tuple, tuple[Callable, _Plan]] = OrderedDict()
_PASS_THROUGH = ("convert_element_type", "copy", "copy_p")


@dataclass
class _Layer:
    """One layer found in the jaxpr."""

    kind: str  # "dense" or "conv"
    weight: int  # leaf position
    layout: tuple[int, ...]  # weight axes in (out, in, ...) order
    input_eqn: Any
    x_index: int  # which operand of the input equation is the layer input
    contract_axis: int = -1  # dense: the input's contracted axis
    conv: dict = field(default_factory=dict)  # conv: what the patches need
    output_eqn: Any = None
    batch_axis: int = 0  # of the output
    feature_axis: int = -1  # of the output
    bias: int | None = None


@dataclass
class _Plan:
    """A traced model and its layers, for one input shape."""

    jaxpr: Any
    layers: dict[str, _Layer]
    input_roles: dict[int, str]
    output_roles: dict[int, str]


class JaxKFACCapture:
    """Layers of a JAX function whose parameters KFAC approximates, and their capture.

    Attributes:
        mapping: Layer name -> ``{"weight": position, "bias": position}``, in
            the order the function applies the layers.
        weight_layouts: Layer name -> permutation of the weight's axes into
            ``(out, in, ...)`` order.
    """

    def __init__(self, backend: Any, X: Any, layers: dict | None = None) -> None:
        self.model_fn = backend.model_fn
        self._names = list(backend.param_names)
        self._explicit = _check_explicit_layers(layers, self._names)
        leaves, self._param_tree = jax.tree_util.tree_flatten(backend.primals)
        self._param_shapes = tuple((tuple(p.shape), str(p.dtype)) for p in leaves)
        plan = self._plan(X)
        self.mapping = {
            name: {"weight": layer.weight, **({} if layer.bias is None else {"bias": layer.bias})}
            for name, layer in plan.layers.items()
        }
        self.weight_layouts = {name: layer.layout for name, layer in plan.layers.items()}
        self._check_all_matched()

    def prepare(self, X: Any) -> None:
        """Trace the model for inputs like ``X`` (before a compiled function needs it)."""
        self._plan(X)

    def model_state(self, backend: Any) -> Any:
        """The parameter pytree (what ``KFACLinearOperator.state_dict`` saves for JAX)."""
        return backend.primals

    def check_model_state(self, state: Any, backend: Any) -> None:
        """Raise unless ``state`` is a parameter pytree of this operator's structure."""
        leaves, tree = jax.tree_util.tree_flatten(state)
        shapes = tuple((tuple(jnp.shape(p)), str(jnp.asarray(p).dtype)) for p in leaves)
        if tree != self._param_tree or shapes != self._param_shapes:
            raise value_error(
                "state_dict['model_func_state_dict']",
                f"a parameter pytree of this operator's structure {self._param_tree} and "
                f"(shape, dtype) {self._param_shapes}",
                f"{tree} with {shapes}",
                "Load a state saved from an operator of the same model and dtype.",
            )

    def load_model_state(self, state: Any, backend: Any) -> None:
        """Make ``state`` (a pytree like the parameters) the operator's parameters."""
        self.check_model_state(state, backend)
        leaves, tree = jax.tree_util.tree_flatten(state)
        arrays = jax.tree_util.tree_unflatten(tree, [jnp.asarray(p) for p in leaves])
        backend.primals = jax.device_put(arrays, backend.device)  # committed, as the backend's

    def forward(
        self, model_fn: Callable, primals: Any, X: Any, with_gradients: bool
    ) -> tuple[Any, dict[str, Any], Callable[[Any], dict[str, Any]] | None]:
        """One forward pass: ``(outputs, layer inputs, pullback)`` as for PyTorch."""
        plan = self._plan(X)
        args = [*jax.tree_util.tree_leaves(primals), *jax.tree_util.tree_leaves(X)]
        if not with_gradients:
            inputs: dict[str, Any] = {}
            (outputs,) = _interpret(plan, args, inputs, None)
            return outputs, inputs, None

        def run(offsets: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            recorded: dict[str, Any] = {}
            (outputs,) = _interpret(plan, args, recorded, offsets)
            return outputs, recorded

        zeros = {
            name: jnp.zeros(
                layer.output_eqn.outvars[0].aval.shape, layer.output_eqn.outvars[0].aval.dtype
            )
            for name, layer in plan.layers.items()
        }
        outputs, vjp_fn, inputs = jax.vjp(run, zeros, has_aux=True)

        def pullback(columns: Any) -> dict[str, Any]:
            (grads,) = jax.vmap(vjp_fn)(columns)
            return {
                name: _gradient_layout(layer, grads[name]) for name, layer in plan.layers.items()
            }

        return outputs, inputs, pullback

    # --- tracing ----------------------------------------------------------------------
    def _plan(self, X: Any) -> _Plan:
        """The traced model for inputs like ``X`` (from the cache, or traced now)."""
        leaves, tree = jax.tree_util.tree_flatten(X)
        x_shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
        key = (
            id(self.model_fn),
            self._param_tree,
            self._param_shapes,
            self._explicit,
            tree,
            x_shapes,
        )
        cached = _PLANS.get(key)
        if cached is not None and cached[0] is self.model_fn:
            _PLANS.move_to_end(key)
            plan = cached[1]
        else:
            plan = self._trace(X)
            _PLANS[key] = (self.model_fn, plan)
            if len(_PLANS) > _MAX_PLANS:
                _PLANS.popitem(last=False)
        if hasattr(self, "mapping"):
            self._check_same_layers(plan.layers)
        return plan

    def _trace(self, X: Any) -> _Plan:
        params = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in self._param_shapes]
        x_leaves, x_tree = jax.tree_util.tree_flatten(X)
        x_leaves = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in x_leaves]

        def flat_model(*args: Any) -> Any:
            p = jax.tree_util.tree_unflatten(self._param_tree, args[: len(params)])
            return self.model_fn(p, jax.tree_util.tree_unflatten(x_tree, args[len(params) :]))

        closed = jax.make_jaxpr(flat_model)(*params, *x_leaves)
        found: list[_Layer] = []
        leaves = {
            v: _Param(i, tuple(range(len(v.aval.shape))))
            for i, v in enumerate(closed.jaxpr.invars[: len(params)])
        }
        _find_layers(closed.jaxpr, leaves, found)
        self._check_untied(found)
        explicit = self._apply_explicit(found)
        names = [explicit.get(id(layer)) or self._layer_name(layer) for layer in found]
        # two weights under one parent path: each layer keeps its weight's full path
        names = [
            name if names.count(name) == 1 else self._names[layer.weight]
            for name, layer in zip(names, found)
        ]
        layers = dict(zip(names, found))
        return _Plan(
            closed,
            layers,
            {id(layer.input_eqn): name for name, layer in layers.items()},
            {id(layer.output_eqn): name for name, layer in layers.items()},
        )

    def _apply_explicit(self, found: list[_Layer]) -> dict[int, str]:
        """Give the layers named in ``layers`` their names and biases: ``{id(layer): name}``."""
        by_weight = {layer.weight: layer for layer in found}
        names = {}
        for name, weight, bias in self._explicit:
            layer = by_weight.get(self._names.index(weight))
            if layer is None:
                raise value_error(
                    f"layers[{name!r}]['weight']",
                    "a leaf that is the weight operand of a dot_general or "
                    "conv_general_dilated of model_func",
                    repr(weight),
                    "Name the leaf multiplied by the layer's input.",
                )
            if bias is not None:
                # the caller vouches that the bias is added to this layer's output
                layer.bias = self._names.index(bias)
            names[id(layer)] = name
        return names

    def _check_untied(self, found: list[_Layer]) -> None:
        weights = [layer.weight for layer in found]
        tied = sorted({self._names[w] for w in weights if weights.count(w) > 1})
        if tied:
            raise value_error(
                "model_func",
                "each weight leaf used by one layer, once per forward pass",
                f"{tied} used by several dot_general/conv_general_dilated operations",
                "Weight tying is not supported by KFAC here; close over the tied weights in "
                "model_func to leave them out of params.",
            )

    def _layer_name(self, layer: _Layer) -> str:
        """The weight's path without its last key where the bias shares that parent."""
        weight = self._names[layer.weight]
        parent = weight[: weight.rfind("[")] if weight.rfind("[") > 0 else ""
        bias = None if layer.bias is None else self._names[layer.bias]
        if parent and (bias is None or bias.startswith(parent + "[")):
            return parent
        return weight

    def _check_all_matched(self) -> None:
        matched = {pos for parts in self.mapping.values() for pos in parts.values()}
        unmatched = [name for i, name in enumerate(self._names) if i not in matched]
        if unmatched:
            raise value_error(
                "params",
                "leaves that are the weights or biases of dense layers (dot_general) or "
                "convolutions (conv_general_dilated) of model_func",
                f"leaves {unmatched} that are not",
                "Leave them out of the parameters KFAC approximates (close over them in "
                "model_func), or use the exact GGNLinearOperator.",
            )

    def _check_same_layers(self, layers: dict[str, _Layer]) -> None:
        found = {
            name: {"weight": layer.weight, **({} if layer.bias is None else {"bias": layer.bias})}
            for name, layer in layers.items()
        }
        if found != self.mapping:
            raise value_error(
                "model_func",
                f"the same layers on every batch ({self.mapping})",
                f"{found} on a batch of another shape",
            )


def _check_explicit_layers(layers: Any, names: list[str]) -> tuple:
    """``layers`` as ``((name, weight leaf name, bias leaf name or None), ...)``."""
    if layers is None:
        return ()
    expected = "a dict {layer name: {'weight': leaf name, 'bias': leaf name (optional)}}"
    if not isinstance(layers, dict):
        raise type_error("layers", expected, layers)
    explicit = []
    for name, parts in layers.items():
        if not isinstance(name, str) or not isinstance(parts, dict) or "weight" not in parts:
            raise type_error(f"layers[{name!r}]", expected, parts)
        if set(parts) - {"weight", "bias"}:
            raise value_error(
                f"layers[{name!r}]",
                "the keys 'weight' and 'bias'",
                f"the keys {sorted(parts)}",
            )
        for part, leaf in parts.items():
            if leaf not in names:
                raise value_error(
                    f"layers[{name!r}][{part!r}]",
                    f"the name of a parameter leaf, one of {names}",
                    repr(leaf),
                )
        explicit.append((name, parts["weight"], parts.get("bias")))
    return tuple(explicit)


# --- finding layers ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Param:
    """A value that is parameter leaf ``leaf``, with axes ``perm`` of it (or a vector's axis)."""

    leaf: int
    perm: tuple[int, ...] | None = None  # matrix: leaf axis of each axis
    vector_axis: int | None = None  # a 1-d leaf reshaped/broadcast: where its axis went


@dataclass(frozen=True)
class _Pending:
    """The output of a layer (before its bias), with its batch and feature axes.

    ``residual``: a residual was added to the layer's output since (``x + h @ W``);
    a bias added next is still the layer's bias, and its output gradient the layer's.
    """

    layer: _Layer
    batch_axis: int
    feature_axis: int
    residual: bool = False


def _use_counts(jaxpr: Any) -> dict[Any, int]:
    """How often each variable of ``jaxpr`` is read (by its equations or as an output)."""
    counts: dict[Any, int] = {}
    for v in [*(v for eqn in jaxpr.eqns for v in eqn.invars), *jaxpr.outvars]:
        if not isinstance(v, Literal):
            counts[v] = counts.get(v, 0) + 1
    return counts


def _find_layers(jaxpr: Any, params: dict, found: list[_Layer]) -> None:
    pending: dict[Any, _Pending] = {}
    uses = _use_counts(jaxpr)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [None if isinstance(v, Literal) else v for v in eqn.invars]
        if name in _CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"].jaxpr
            inner_params = {iv: params[v] for v, iv in zip(ins, inner.invars) if v in params}
            _find_layers(inner, inner_params, found)
            continue
        finder = {"dot_general": _dense_layer, "conv_general_dilated": _conv_layer}.get(name)
        if finder is not None:
            layer = finder(eqn, ins, params)
            if layer is not None:
                found.append(layer)
                pending[eqn.outvars[0]] = _Pending(layer, layer.batch_axis, layer.feature_axis)
            continue
        _track_params(eqn, name, ins, params)
        _track_pending(eqn, name, ins, params, pending, uses)


def _track_params(eqn: Any, name: str, ins: list, params: dict) -> None:
    """Follow parameter leaves through transposes, casts, reshapes and broadcasts."""
    if not ins or ins[0] not in params:
        return
    source, out = params[ins[0]], eqn.outvars[0]
    if name in _PASS_THROUGH:
        params[out] = source
    elif name == "transpose" and source.perm is not None:
        perm = eqn.params["permutation"]
        params[out] = _Param(source.leaf, tuple(source.perm[p] for p in perm))
    elif name in ("reshape", "broadcast_in_dim", "expand_dims") and _is_vector(source, eqn):
        axis = _vector_axis_after(eqn, name, source)
        if axis is not None:
            params[out] = _Param(source.leaf, vector_axis=axis)


def _is_vector(source: _Param, eqn: Any) -> bool:
    return source.vector_axis is not None or (source.perm is not None and len(source.perm) == 1)


def _vector_axis_after(eqn: Any, name: str, source: _Param) -> int | None:
    axis = 0 if source.vector_axis is None else source.vector_axis
    shape = eqn.outvars[0].aval.shape
    if name == "broadcast_in_dim":
        return int(eqn.params["broadcast_dimensions"][axis])
    size = eqn.invars[0].aval.shape[axis]
    non_trivial = [i for i, n in enumerate(shape) if n != 1]
    if len(non_trivial) == 1 and shape[non_trivial[0]] == size:
        return non_trivial[0]
    return None


def _track_pending(eqn: Any, name: str, ins: list, params: dict, pending: dict, uses: dict) -> None:
    """Follow a layer's output through a transpose and a residual to the bias added to it."""
    if name == "transpose" and ins[0] in pending:
        old = pending.pop(ins[0])
        perm = list(eqn.params["permutation"])
        new = _Pending(old.layer, perm.index(old.batch_axis), perm.index(old.feature_axis))
        pending[eqn.outvars[0]] = new
        old.layer.output_eqn = eqn
        old.layer.batch_axis, old.layer.feature_axis = new.batch_axis, new.feature_axis
        return
    if name != "add" or len(ins) != 2:
        return
    for out_side, bias_side in ((ins[0], ins[1]), (ins[1], ins[0])):
        if out_side in pending and bias_side in params:
            state, bias = pending[out_side], params[bias_side]
            if bias.vector_axis == state.feature_axis and state.layer.bias is None:
                state.layer.bias = bias.leaf
                state.layer.output_eqn = eqn
                del pending[out_side]
                return
    _track_residual(eqn, ins, params, pending, uses)


def _track_residual(eqn: Any, ins: list, params: dict, pending: dict, uses: dict) -> None:
    """``x + h @ W``: the sum stands for the layer's output in the search for its bias.

    The sum's cotangent is the layer output's (an addition passes cotangents
    through) as long as the layer's output is read by this addition alone and
    keeps its shape; the sum must then also be read by the bias addition alone,
    which :func:`_track_pending` sees as ``residual``.
    """
    out_shape = eqn.outvars[0].aval.shape
    for out_side, other in ((ins[0], ins[1]), (ins[1], ins[0])):
        state = pending.get(out_side)
        if state is None or other in params or state.residual:
            continue
        if uses.get(out_side) != 1 or uses.get(eqn.outvars[0]) != 1:
            continue
        if tuple(out_side.aval.shape) != tuple(out_shape):
            continue
        pending[eqn.outvars[0]] = _Pending(
            state.layer, state.batch_axis, state.feature_axis, residual=True
        )
        return


def _dense_layer(eqn: Any, ins: list, params: dict) -> _Layer | None:
    (contract_lhs, contract_rhs), (batch_lhs, _) = eqn.params["dimension_numbers"]
    if batch_lhs or len(contract_lhs) != 1:
        return None
    for w_index in (0, 1):
        weight = params.get(ins[w_index])
        x = eqn.invars[1 - w_index]
        if (
            weight is None
            or weight.perm is None
            or len(weight.perm) != 2
            or ins[1 - w_index] in params
        ):
            continue
        w_contract = (contract_lhs, contract_rhs)[w_index][0]
        x_contract = (contract_lhs, contract_rhs)[1 - w_index][0]
        x_ndim = len(x.aval.shape)
        if x_ndim < 2 or x_contract == 0:
            return None  # no batch axis in front
        in_axis = weight.perm[w_contract]
        layout = (1 - in_axis, in_axis)
        out_ndim = x_ndim  # (x free axes) + one output axis
        if w_index == 1:  # x @ W: (x free axes..., out)
            batch_axis, feature_axis = 0, out_ndim - 1
        else:  # W @ x: (out, x free axes...)
            batch_axis, feature_axis = 1, 0
        return _Layer(
            "dense",
            weight.leaf,
            layout,
            eqn,
            1 - w_index,
            contract_axis=x_contract,
            output_eqn=eqn,
            batch_axis=batch_axis,
            feature_axis=feature_axis,
        )
    return None


def _conv_layer(eqn: Any, ins: list, params: dict) -> _Layer | None:
    kernel = params.get(ins[1])
    p = eqn.params
    if kernel is None or kernel.perm is None or ins[0] in params:
        return None
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    if any(d != 1 for d in p["lhs_dilation"]):
        return None
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    kernel_shape = eqn.invars[1].aval.shape
    layout = tuple(kernel.perm[axis] for axis in rhs_spec)
    conv = {
        "lhs_spec": tuple(lhs_spec),
        "filter_shape": tuple(kernel_shape[axis] for axis in rhs_spec[2:]),
        "window_strides": tuple(p["window_strides"]),
        "padding": tuple(tuple(pad) for pad in p["padding"]),
        "rhs_dilation": tuple(p["rhs_dilation"]),
    }
    return _Layer(
        "conv",
        kernel.leaf,
        layout,
        eqn,
        0,
        conv=conv,
        output_eqn=eqn,
        batch_axis=out_spec[0],
        feature_axis=out_spec[1],
    )


# --- evaluating with capture ------------------------------------------------------------
def _interpret(plan: _Plan, args: list, inputs: dict, offsets: dict | None) -> list:
    return _evaluate(plan.jaxpr.jaxpr, plan.jaxpr.consts, args, plan, inputs, offsets)


def _evaluate(
    jaxpr: Any, consts: list, args: list, plan: _Plan, inputs: dict, offsets: dict | None
) -> list:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        if eqn.primitive.name in _CALLS and "jaxpr" in eqn.params:
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, values, plan, inputs, offsets)
        else:
            bound = eqn.primitive.get_bind_params(eqn.params)
            # (sub-functions, parameters) in older JAX, the parameters alone in newer
            subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
            outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
        name = plan.input_roles.get(id(eqn))
        if name is not None:
            layer = plan.layers[name]
            inputs[name] = _input_layout(layer, lax.stop_gradient(values[layer.x_index]))
        name = plan.output_roles.get(id(eqn))
        if name is not None and offsets is not None:
            outs[0] = outs[0] + offsets[name]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _input_layout(layer: _Layer, x: Any) -> Any:
    """A layer's input as ``(N, S, d_in)``."""
    if layer.kind == "dense":
        x = jnp.moveaxis(x, layer.contract_axis, -1)
        return jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    conv = layer.conv
    spec = conv["lhs_spec"]  # (batch, feature, *spatial) axes of the input
    x = jnp.transpose(x, spec)
    patches = lax.conv_general_dilated_patches(
        x,
        conv["filter_shape"],
        conv["window_strides"],
        conv["padding"],
        rhs_dilation=conv["rhs_dilation"],
    )  # (N, C * prod(filter), *out spatial), features ordered as a (C, *filter) kernel
    patches = jnp.reshape(patches, (patches.shape[0], patches.shape[1], -1))
    return jnp.swapaxes(patches, 1, 2)


def _gradient_layout(layer: _Layer, g: Any) -> Any:
    """Output gradients ``(k, *output.shape)`` as ``(k, N, S, d_out)``."""
    g = jnp.moveaxis(g, (layer.batch_axis + 1, layer.feature_axis + 1), (1, -1))
    return jnp.reshape(g, (g.shape[0], g.shape[1], -1, g.shape[-1]))
