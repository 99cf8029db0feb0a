"""Loss descriptors that work with every backend.

A descriptor says which loss is meant and how it is reduced; the formulas
below are written once against the array-API namespace ``xp`` of the backend
(``array_api_compat.torch`` or ``jax.numpy``), so PyTorch and JAX compute the
same numbers. Each standard loss also knows its output Hessian in closed form,
which the GGN uses instead of a second autodiff pass.

The reduction is the one of PyTorch's loss modules: ``"mean"`` averages over
all loss terms of a batch (all output entries for MSE and BCE, all rows for
cross-entropy), ``"sum"`` adds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curvlinops._checks import type_error, value_error

__all__ = ["BCEWithLogitsLoss", "CallableLoss", "CrossEntropyLoss", "MSELoss"]

REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: Any, argument: str = "reduction") -> str:
    if not isinstance(reduction, str):
        raise type_error(argument, "'mean' or 'sum'", reduction)
    if reduction not in REDUCTIONS:
        raise value_error(
            argument,
            "'mean' or 'sum'",
            repr(reduction),
            "Curvature operators need a scalar loss; 'none' is not supported.",
        )
    return reduction


class _StandardLoss:
    """Shared parts of the closed-form losses."""

    reduction: str

    def __post_init__(self) -> None:
        check_reduction(self.reduction)

    def _num_terms(self, outputs: Any) -> int:
        """How many loss terms a batch has (what 'mean' divides by)."""
        return _size(outputs)

    def _reduce(self, xp: Any, terms: Any, outputs: Any) -> Any:
        total = xp.sum(terms)
        if self.reduction == "mean":
            return total / self._num_terms(outputs)
        return total

    def _scale(self, outputs: Any) -> float:
        return 1.0 / self._num_terms(outputs) if self.reduction == "mean" else 1.0


@dataclass(frozen=True)
class MSELoss(_StandardLoss):
    """Squared error ``Σ (z - y)²``, like ``torch.nn.MSELoss``.

    Its output Hessian is ``2 I`` (divided by the number of entries for 'mean').
    """

    reduction: str = "mean"

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        diff = outputs - targets
        return self._reduce(b.xp, diff * diff, outputs)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        return (2.0 * self._scale(outputs)) * u


@dataclass(frozen=True)
class CrossEntropyLoss(_StandardLoss):
    """Softmax cross-entropy on logits, like ``torch.nn.CrossEntropyLoss``.

    Targets are class indices (outputs' shape without the class axis) or
    class probabilities (outputs' shape). ``class_axis`` is -1 by default, the
    JAX/optax convention; PyTorch's module uses axis 1, and a
    ``torch.nn.CrossEntropyLoss`` given to an operator is read that way. For
    2-d outputs both are the same. The output Hessian per row is
    ``diag(p) - p pᵀ`` with ``p = softmax(z)``.
    """

    reduction: str = "mean"
    class_axis: int = -1

    def _num_terms(self, outputs: Any) -> int:
        return _size(outputs) // outputs.shape[self.class_axis]

    def _log_probs(self, b: Any, outputs: Any) -> Any:
        xp = b.xp
        shifted = outputs - xp.max(outputs, axis=self.class_axis, keepdims=True)
        log_norm = xp.log(xp.sum(xp.exp(shifted), axis=self.class_axis, keepdims=True))
        return shifted - log_norm

    def _target_probs(self, b: Any, outputs: Any, targets: Any) -> Any:
        xp = b.xp
        if targets.ndim == outputs.ndim:
            return targets
        num_classes = outputs.shape[self.class_axis]
        axis = self.class_axis % outputs.ndim
        labels = xp.expand_dims(targets, axis=axis)
        classes = xp.reshape(
            xp.arange(num_classes, dtype=targets.dtype),
            tuple(num_classes if i == axis else 1 for i in range(outputs.ndim)),
        )
        return xp.astype(labels == classes, outputs.dtype)

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        terms = -self._target_probs(b, outputs, targets) * self._log_probs(b, outputs)
        return self._reduce(b.xp, terms, outputs)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        xp = b.xp
        probs = xp.exp(self._log_probs(b, outputs))
        pu = xp.sum(probs * u, axis=self.class_axis, keepdims=True)
        return self._scale(outputs) * (probs * u - probs * pu)


@dataclass(frozen=True)
class BCEWithLogitsLoss(_StandardLoss):
    """Binary cross-entropy on logits, like ``torch.nn.BCEWithLogitsLoss``.

    Targets are probabilities of the outputs' shape. The output Hessian is
    ``diag(σ(z)(1 - σ(z)))``.
    """

    reduction: str = "mean"

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        xp = b.xp
        # softplus(z) - y z, written so that it never overflows
        softplus = xp.maximum(outputs, 0.0) + xp.log1p(xp.exp(-xp.abs(outputs)))
        return self._reduce(xp, softplus - targets * outputs, outputs)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        xp = b.xp
        sig = 1.0 / (1.0 + xp.exp(-outputs))
        return self._scale(outputs) * (sig * (1.0 - sig)) * u


@dataclass(frozen=True)
class CallableLoss:
    """Any loss ``fn(outputs, targets) -> scalar`` with a stated reduction.

    The GGN gets its output Hessian by autodiff. ``reduction`` says how
    ``fn`` combines the terms of a batch, which fixes how batches of
    different sizes are combined.
    """

    fn: Callable[[Any, Any], Any]
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise type_error("loss_func", "a callable (outputs, targets) -> scalar", self.fn)
        check_reduction(self.reduction, "loss_func.reduction")

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        return self.fn(outputs, targets)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        return b.hvp_fn(lambda z: self.fn(z, targets), outputs)(u)


def _size(array: Any) -> int:
    size = 1
    for n in array.shape:
        size *= int(n)
    return size


def as_loss(loss_func: Any) -> Any:
    """Turn what the user gave into a descriptor (framework-free part).

    Framework loss modules are translated by the backend before this is called.
    """
    if isinstance(loss_func, (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss, CallableLoss)):
        return loss_func
    if loss_func is None:
        raise type_error(
            "loss_func",
            "a loss (curvlinops.losses.MSELoss/CrossEntropyLoss/BCEWithLogitsLoss, "
            "a framework loss module, or a callable)",
            loss_func,
        )
    if not callable(loss_func):
        raise type_error("loss_func", "a callable (outputs, targets) -> scalar", loss_func)
    reduction = getattr(loss_func, "reduction", None)
    if reduction is None:
        raise value_error(
            "loss_func",
            "a loss whose reduction is known",
            f"{type(loss_func).__name__} without a 'reduction' attribute",
            "Wrap it as curvlinops.losses.CallableLoss(fn, reduction='mean') or 'sum' "
            "to say how it combines the terms of a batch.",
        )
    return CallableLoss(loss_func, check_reduction(reduction, "loss_func.reduction"))
