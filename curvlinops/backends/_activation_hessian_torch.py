"""The Hessian of the loss with respect to an intermediate activation (PyTorch).

curvlinops-for-pytorch 3.0.1's ``curvlinops.experimental.activation_hessian``:
:class:`ActivationHessianLinearOperator` on one batch, and the context manager
:class:`store_activation` that records a layer's input or output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from curvlinops._checks import value_error
from curvlinops.backends._torch_compat import CurvatureLinearOperator

__all__ = ["ActivationHessianLinearOperator", "store_activation"]


class ActivationHessianLinearOperator(CurvatureLinearOperator):
    r"""Hessian of the loss on one batch with respect to a layer's input or output.

    .. math:: \nabla^2_{\mathbf{a}} \ell(f(\mathbf{X}), \mathbf{y})

    Args:
        model_func: The model (an ``nn.Module``).
        loss_func: The loss.
        activation: ``(layer name, "input" or "output", index)``: the tensor.
        data: One batch ``[(X, y)]``.
        progressbar, check_deterministic: As for the other operators.
    """

    SELF_ADJOINT = True

    def __init__(
        self,
        model_func: nn.Module,
        loss_func: Callable,
        activation: tuple[str, str, int],
        data: Iterable,
        progressbar: bool = False,
        check_deterministic: bool = True,
    ):
        self._activation = activation
        batches = iter(data)
        next(batches)
        if next(batches, None) is not None:
            raise value_error("data", "a single batch [(X, y)]", "two or more batches")
        params = [p for p in model_func.parameters() if p.requires_grad]
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=check_deterministic,
        )

    def _get_in_shape(self) -> list[tuple[int, ...]]:
        X, _ = next(iter(self._loop_over_data()))
        storage: list[torch.Tensor] = []
        with store_activation(self._model_func, *self._activation, storage):
            self._model_func(X)
        return [tuple(storage.pop().shape)]

    _get_out_shape = _get_in_shape

    def _matmat_batch(self, X: Any, y: torch.Tensor, M: list[torch.Tensor]) -> list:
        storage: list[torch.Tensor] = []
        with store_activation(self._model_func, *self._activation, storage):
            loss = self._loss_func(self._model_func(X), y)
        activation = storage.pop()
        (gradient,) = torch.autograd.grad(loss, activation, create_graph=True)
        (V,) = M
        columns = V.movedim(-1, 0)  # one Hessian-vector product per column, vmapped
        (HV,) = torch.autograd.grad(
            gradient, activation, grad_outputs=columns, is_grads_batched=True
        )
        return [HV.movedim(0, -1).detach()]

    def _get_normalization_factor(self, X: Any, y: torch.Tensor) -> float:
        return 1.0  # one batch: the loss as it is


class store_activation:  # noqa: N801 (3.0.1's name)
    """Context manager that appends a layer's input or output to ``destination``.

    Args:
        model: The model.
        module_name: The layer's name in ``model.named_modules()`` (``""``: the model).
        io_type: ``"input"`` or ``"output"``.
        io_idx: Which input (or output, for layers with several) to record.
        destination: An empty list that receives the tensor on each forward pass.
    """

    SUPPORTED_IO_TYPES = ("input", "output")

    def __init__(
        self, model: nn.Module, module_name: str, io_type: str, io_idx: int, destination: list
    ) -> None:
        names = [name for name, _ in model.named_modules()]
        if module_name not in names:
            raise value_error("module_name", f"one of {names}", repr(module_name))
        if io_type not in self.SUPPORTED_IO_TYPES:
            raise value_error("io_type", "'input' or 'output'", repr(io_type))
        if destination:
            raise value_error("destination", "an empty list", f"{len(destination)} entries")
        self._model, self._module_name = model, module_name
        self._io_type, self._io_idx = io_type, io_idx
        self._destination = destination
        self._handles: list[Any] = []

    def __enter__(self) -> None:
        layer = self._model.get_submodule(self._module_name)
        self._handles.append(layer.register_forward_hook(self.hook))

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        """Append the requested tensor to the destination."""
        if self._io_type == "input":
            self._destination.append(inputs[self._io_idx])
        elif isinstance(output, torch.Tensor):
            if self._io_idx != 0:
                raise value_error("io_idx", "0 for a layer with one output", str(self._io_idx))
            self._destination.append(output)
        else:
            self._destination.append(output[self._io_idx])
