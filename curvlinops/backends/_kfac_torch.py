"""KFAC's framework part for PyTorch: find the layers, capture their inputs and output gradients.

Everything else about KFAC (covariances, normalisation, products, inverses)
is in :mod:`curvlinops.kfac`, written against the backend's array namespace.
This module hands it, per layer, the inputs as ``(N, S, d_in)`` and the
gradients of the layer outputs as ``(k, N, S, d_out)``, with ``S`` the
weight-sharing positions (1 for a ``Linear`` on ``(N, d_in)``, the tokens of
a ``Linear`` on ``(N, ..., d_in)``, the output pixels for a convolution, whose
inputs are unfolded into patches here). Hugging Face's ``Conv1D`` (GPT-2's
linear layer, ``x @ W + b`` with ``W`` of shape ``(d_in, d_out)``) is a
linear layer whose weight is stored transposed (``weight_layouts``); it is
recognised by its class name and attributes, so transformers is not imported.

Output gradients come from forward hooks that add a zero tensor to each
layer's output: its gradient is the output gradient, and, unlike a hook on
the output tensor, it works behind in-place activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from curvlinops._checks import type_error, value_error

__all__ = ["TorchKFACCapture"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D``: ``x @ W + b``, ``W`` ``(nx, nf)``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS) or is_hf_conv1d(module)


class ModelStateError(ValueError, RuntimeError):
    """A model state that does not fit the model.

    A ``ValueError`` (a wrong value), and a ``RuntimeError`` as the one of
    ``nn.Module.load_state_dict`` that code written for curvlinops-for-pytorch
    catches.
    """


class TorchKFACCapture:
    """Layers of an ``nn.Module`` whose parameters KFAC approximates, and their capture.

    Attributes:
        mapping: Layer name -> ``{"weight": position, "bias": position}`` (the
            positions of the parameters in the operator's flat order), in the
            order of ``model.named_modules()``, as curvlinops-for-pytorch has it.
        weight_layouts: Layer name -> the permutation of its weight's axes
            into ``(out, in, ...)`` order (``(1, 0)`` for a ``Conv1D``).
    """

    def __init__(self, model_func: Any, param_names: list[str]) -> None:
        if not isinstance(model_func, nn.Module):
            raise type_error(
                "model_func",
                "a torch.nn.Module (KFAC finds its Linear and Conv2d layers among the submodules)",
                model_func,
                "Build the model from torch.nn layers, e.g. torch.nn.Sequential(...).",
            )
        self._model = model_func
        self.mapping, self._layers = _find_layers(model_func, param_names)
        self.weight_layouts = {
            name: (1, 0) if is_hf_conv1d(module) else _identity_layout(module)
            for name, module in self._layers.items()
        }

    def prepare(self, X: Any) -> None:
        """Nothing to prepare: hooks capture eagerly."""

    def model_state(self, backend: Any) -> dict[str, Any]:
        """The model's ``state_dict()`` (what ``KFACLinearOperator.state_dict`` saves)."""
        return self._model.state_dict()

    def check_model_state(self, state: Any, backend: Any) -> None:
        """Raise unless ``state`` fits the model: the same entries, shapes and dtypes.

        Checked before anything is loaded: ``load_state_dict`` writes entries one by
        one and would leave the model half-overwritten when a later one does not fit.
        """
        argument = "state_dict['model_func_state_dict']"
        fix = (
            "Load a state saved from an operator of the same model architecture and dtype "
            "(refused before loading state_dict into the model: nothing was written)."
        )
        if not isinstance(state, dict):
            raise type_error(argument, "the model's state_dict() (a dict of tensors)", state)
        own = self._model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ModelStateError(
                value_error(
                    argument,
                    "the entries of this operator's model",
                    f"missing {missing}, unexpected {unexpected}",
                    fix,
                )
            )
        for key, tensor in own.items():
            saved = state[key]
            if not isinstance(saved, torch.Tensor):
                raise type_error(f"{argument}[{key!r}]", "a tensor", saved)
            if saved.shape != tensor.shape or saved.dtype != tensor.dtype:
                raise ModelStateError(
                    value_error(
                        f"{argument}[{key!r}]",
                        f"shape {tuple(tensor.shape)} and dtype {tensor.dtype} (this model's)",
                        f"shape {tuple(saved.shape)} and dtype {saved.dtype}",
                        fix,
                    )
                )

    def load_model_state(self, state: dict[str, Any], backend: Any) -> None:
        """Load a model state in place: the operator's parameters share the model's memory."""
        self.check_model_state(state, backend)
        self._model.load_state_dict(state)

    def forward(
        self, model_fn: Callable, primals: Any, X: Any, with_gradients: bool
    ) -> tuple[Any, dict[str, Any], Callable[[Any], dict[str, Any]] | None]:
        """One forward pass: ``(outputs, layer inputs, pullback)``.

        ``layer inputs`` has one ``(N, S, d_in)`` array per layer with a weight;
        ``pullback(columns)`` maps output cotangents ``(k, *outputs.shape)`` to
        one ``(k, N, S, d_out)`` array of output gradients per layer
        (``None`` without ``with_gradients``).
        """
        inputs: dict[str, torch.Tensor] = {}
        offsets: dict[str, torch.Tensor] = {}
        context = torch.enable_grad() if with_gradients else torch.no_grad()
        with context, self._hooks(inputs, offsets, with_gradients):
            outputs = model_fn(primals, X)
        if not with_gradients:
            return outputs.detach(), inputs, None
        names = list(offsets)
        zeros = [offsets[name] for name in names]
        layers = [self._layers[name] for name in names]

        def pullback(columns: torch.Tensor) -> dict[str, torch.Tensor]:
            return dict(zip(names, _output_gradients(outputs, zeros, layers, columns)))

        return outputs.detach(), inputs, pullback

    @contextlib.contextmanager
    def _hooks(
        self, inputs: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor], offset: bool
    ) -> Iterator[None]:
        handles = [
            module.register_forward_hook(self._hook(name, inputs, offsets, offset))
            for name, module in self._layers.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(
        self,
        name: str,
        inputs: dict[str, torch.Tensor],
        offsets: dict[str, torch.Tensor],
        offset: bool,
    ) -> Callable:
        module, has_weight = self._layers[name], "weight" in self.mapping[name]

        called: set[str] = set()

        def hook(_: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if name in called:
                raise value_error(
                    "model_func",
                    "each Linear/Conv2d layer called once per forward pass",
                    f"layer {name!r} called more than once",
                    "Weight tying is not supported by KFAC here; exclude the tied "
                    "parameters from params.",
                )
            called.add(name)
            if has_weight:
                inputs[name] = _layer_input(module, args[0].detach())
            if not offset:
                return None
            zero = torch.zeros_like(output, requires_grad=True)
            offsets[name] = zero
            return output + zero

        return hook


def _output_gradients(
    outputs: torch.Tensor, zeros: list[torch.Tensor], layers: list[nn.Module], columns: Any
) -> list[torch.Tensor]:
    """Gradients ``(k, N, S, d_out)`` of ``<outputs, column>`` for each of ``k`` columns.

    All columns go through one backward pass batched by ``vmap``
    (``is_grads_batched``), not one pass per column (type-2: one per class).
    """
    batched = columns.shape[0] > 1
    grads = torch.autograd.grad(
        outputs,
        zeros,
        grad_outputs=columns if batched else columns[0],
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=batched,
    )
    return [
        _layer_output_gradient(
            layer,
            torch.zeros((columns.shape[0], *z.shape), dtype=z.dtype, device=z.device)
            if g is None
            else (g if batched else g[None]).detach(),
        )
        for layer, z, g in zip(layers, zeros, grads)
    ]


def _layer_output_gradient(layer: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Gradients ``(k, N, ..., d_out)`` (conv: ``(k, N, C, H, W)``) as ``(k, N, S, d_out)``."""
    if isinstance(layer, nn.Conv2d):
        return g.flatten(start_dim=3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _layer_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as ``(N, S, d_in)``: conv inputs unfolded into patches."""
    if isinstance(module, nn.Conv2d):
        return _patches(module, x)
    if x.ndim < 2:
        raise value_error(
            "X",
            "inputs of Linear layers with a batch axis, shape (N, ..., d_in)",
            f"shape {tuple(x.shape)}",
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded patches ``(N, output pixels, C_in * kh * kw)`` of a convolution's input."""
    padding = module.padding
    if isinstance(padding, str):
        x, padding = _explicit_padding(module, x), 0
    patches = functional.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )
    return patches.transpose(1, 2)


def _explicit_padding(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input padded as ``padding='same'``/``'valid'`` pads it (PyTorch puts the odd pixel last)."""
    if module.padding == "valid":
        return x
    pads = []
    for kernel, dilation in zip(reversed(module.kernel_size), reversed(module.dilation)):
        total = dilation * (kernel - 1)
        pads += [total // 2, total - total // 2]
    return functional.pad(x, pads)


def _identity_layout(module: nn.Module) -> tuple[int, ...]:
    weight = getattr(module, "weight", None)
    return tuple(range(2 if weight is None else weight.ndim))


def _find_layers(
    model: nn.Module, param_names: list[str]
) -> tuple[dict[str, dict[str, int]], dict[str, nn.Module]]:
    """The layer -> parameter positions mapping, and the layer modules."""
    position = {name: i for i, name in enumerate(param_names)}
    mapping: dict[str, dict[str, int]] = {}
    layers: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        if not _is_supported(module):
            continue
        prefix = f"{module_name}." if module_name else ""
        found = {
            p_name: position[prefix + p_name]
            for p_name, _ in module.named_parameters(recurse=False)
            if prefix + p_name in position
        }
        if found:
            _check_layer(module_name, module)
            mapping[module_name] = found
            layers[module_name] = module
    matched = {pos for found in mapping.values() for pos in found.values()}
    unmatched = [name for name in param_names if position[name] not in matched]
    if unmatched:
        raise value_error(
            "params",
            "parameters of torch.nn.Linear, torch.nn.Conv2d or Hugging Face Conv1D layers "
            "(KFAC has a Kronecker factorisation only for these)",
            f"{unmatched}, {_owners(model, unmatched)}",
            "Leave them out of params (e.g. {n: p for n, p in model.named_parameters() "
            "if ...}), or approximate them with another operator.",
        )
    return mapping, layers


def _owners(model: nn.Module, names: list[str]) -> str:
    """Which kind of module holds each of ``names``, for error messages."""
    modules = dict(model.named_modules())
    kinds = []
    for name in names:
        owner = name.rpartition(".")[0]
        module = modules.get(owner)
        kinds.append(type(module).__name__ if module is not None else "unknown")
    return f"held by {', '.join(kinds)}"


def _check_layer(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise value_error(
                f"model_func layer {name!r}",
                "a Conv2d with groups=1",
                f"groups={module.groups}",
                "Leave its parameters out of params.",
            )
        if module.padding_mode != "zeros":
            raise value_error(
                f"model_func layer {name!r}",
                "a Conv2d with padding_mode='zeros'",
                repr(module.padding_mode),
                "Leave its parameters out of params.",
            )
