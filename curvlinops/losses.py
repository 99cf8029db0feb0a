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

import math
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

    # --- targets --------------------------------------------------------------------
    def check_targets(self, b: Any, outputs: Any, targets: Any, argument: str) -> None:
        """Raise if ``targets`` do not suit this loss for ``outputs``.

        Broadcasting or out-of-range targets would give numbers for a different
        loss without a word, so shapes and values are checked once per batch.
        """
        _check_array(targets, argument, type(self).__name__)
        _check_shape(targets, tuple(outputs.shape), argument, type(self).__name__)
        _check_finite(b, targets, argument)

    # --- loss terms, their gradients, and sampling (empirical / Monte-Carlo Fisher) ---
    # A *term* is the part of the loss that one target random variable contributes:
    # a row of the last axis for MSE and BCE, a position's class vector for
    # cross-entropy (the convention of curvlinops-for-pytorch).
    def normalization(self, outputs: Any) -> float:
        """The factor of the un-normalised terms in the batch loss (1/R or 1)."""
        return self._scale(outputs)

    def _term_axis(self, ndim: int) -> int | None:
        """Axis, counted from the end, along which one term's entries lie."""
        return -1 if ndim >= 2 else None

    def term_axis(self, ndim: int) -> int | None:
        """Axis (from the end) of one term's entries, for outputs of ``ndim`` axes (or None)."""
        return self._term_axis(ndim)

    def hessian_sqrt(self, b: Any, outputs: Any, E: Any) -> Any:
        """The output Hessian's square root (un-normalised) applied to columns ``E``."""
        return self._hessian_sqrt(b, outputs, E)

    def term_sum(self, b: Any, a: Any, outputs: Any) -> Any:
        """Sum ``a`` (shape ``(..., *outputs.shape)``) over each term's entries, keepdims."""
        axis = self._term_axis(outputs.ndim)
        return a if axis is None else b.xp.sum(a, axis=axis, keepdims=True)

    def output_gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        """Gradient of each un-normalised term with respect to the outputs (outputs' shape)."""
        return self._gradient(b, outputs, targets)

    def sample_noise(self, b: Any, shape: tuple[int, ...], num_samples: int, seed: int) -> Any:
        """The random numbers behind :meth:`sample_targets`, shape ``(k, *shape)``."""
        return b.random_uniform((num_samples, *shape), seed)

    def sampled_gradient(self, b: Any, outputs: Any, noise: Any) -> Any:
        """:meth:`output_gradient` at targets drawn from the model, ``(k, *outputs.shape)``.

        Its second moment is the output Hessian of the un-normalised terms.
        """
        return self._gradient(b, outputs, self.sample_targets(b, outputs, noise))

    def terms_per_example(self, shape: tuple[int, ...]) -> int:
        """How many terms an example has, for outputs of ``shape``."""
        axis = self._term_axis(len(shape))
        per_example = math.prod(shape[1:])
        return per_example if axis is None else per_example // shape[axis]

    def term_masks(self, b: Any, outputs: Any) -> Any:
        """Indicators ``(U, 1, *outputs.shape[1:])`` of each of an example's ``U`` terms.

        ``None`` when every example is one term (e.g. outputs of shape ``(N, C)``).
        """
        axis = self._term_axis(outputs.ndim)
        shape = list(outputs.shape[1:])
        if axis is not None:
            shape[axis] = 1
        num_terms = math.prod(shape)
        if num_terms == 1:
            return None
        return b.xp.reshape(b.eye(num_terms), (num_terms, 1, *shape))

    def hessian_sqrt_columns(self, b: Any, outputs: Any, targets: Any) -> Any:
        """Columns ``S`` with ``Σ_j S[j]_n S[j]_nᵀ`` = example ``n``'s output Hessian.

        Shape ``(m, *outputs.shape)`` with ``m`` the number of outputs per example;
        un-normalised (multiply by :meth:`normalization`).
        """
        return self._hessian_sqrt(b, outputs, _unit_columns(b, outputs))


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

    def _gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        return 2.0 * (outputs - targets)

    def sample_noise(self, b: Any, shape: tuple[int, ...], num_samples: int, seed: int) -> Any:
        return b.random_normal((num_samples, *shape), seed)

    def sample_targets(self, b: Any, outputs: Any, noise: Any) -> Any:
        """Targets from ``N(z, I/2)``, the distribution whose negative log is the loss."""
        return outputs + math.sqrt(0.5) * noise

    def _hessian_sqrt(self, b: Any, outputs: Any, E: Any) -> Any:
        return math.sqrt(2.0) * E * b.xp.ones_like(outputs)


@dataclass(frozen=True)
class CrossEntropyLoss(_StandardLoss):
    """Softmax cross-entropy on logits, like ``torch.nn.CrossEntropyLoss``.

    Targets are class indices (outputs' shape without the class axis) or
    class probabilities (outputs' shape). ``class_axis`` is -1 by default, the
    JAX/optax convention; PyTorch's module uses axis 1, and a
    ``torch.nn.CrossEntropyLoss`` given to an operator is read that way. For
    2-d outputs both are the same. The output Hessian per row is
    ``diag(p) - p pᵀ`` with ``p = softmax(z)``; for probabilities ``y`` that do
    not sum to 1 (the loss ``-Σ y log p``, as PyTorch computes it), it is
    ``(Σ y)(diag(p) - p pᵀ)`` and the gradient ``(Σ y) p - y``.
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

    def check_targets(self, b: Any, outputs: Any, targets: Any, argument: str) -> None:
        _check_array(targets, argument, "CrossEntropyLoss")
        xp, shape = b.xp, tuple(outputs.shape)
        axis = self.class_axis % len(shape)
        num_classes = shape[axis]
        index_shape = shape[:axis] + shape[axis + 1 :]
        if tuple(targets.shape) == index_shape:
            if not xp.isdtype(targets.dtype, "integral"):
                raise type_error(
                    argument,
                    f"integer class indices of shape {index_shape} (CrossEntropyLoss)",
                    targets,
                    "Cast them, e.g. y.long() (PyTorch) or y.astype(int) (numpy, JAX); class "
                    f"probabilities would have the outputs' shape {shape}.",
                )
            _check_range(
                b,
                targets,
                argument,
                f"class indices in [0, {num_classes}) for outputs with {num_classes} classes "
                f"(axis {self.class_axis})",
                0,
                num_classes - 1,
                "Number the classes 0..C-1, or give the model as many outputs as there are "
                "classes. Ignored positions (ignore_index, e.g. -100) are not supported: "
                "leave them out of the batch.",
            )
            return
        if tuple(targets.shape) != shape:
            raise value_error(
                argument,
                f"class indices of shape {index_shape} or class probabilities of the outputs' "
                f"shape {shape} (CrossEntropyLoss, classes on axis {self.class_axis})",
                f"shape {tuple(targets.shape)}",
            )
        if not xp.isdtype(targets.dtype, "real floating"):
            raise type_error(
                argument,
                f"floating-point class probabilities of shape {shape} (CrossEntropyLoss)",
                targets,
                f"Cast one-hot targets to float, or pass class indices of shape {index_shape}.",
            )
        _check_finite(b, targets, argument)
        _check_range(b, targets, argument, "class probabilities in [0, 1]", 0, 1)

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        terms = -self._target_probs(b, outputs, targets) * self._log_probs(b, outputs)
        return self._reduce(b.xp, terms, outputs)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        xp = b.xp
        probs = xp.exp(self._log_probs(b, outputs))
        pu = xp.sum(probs * u, axis=self.class_axis, keepdims=True)
        return self._target_mass(b, outputs, targets) * (probs * u - probs * pu)

    def _target_mass(self, b: Any, outputs: Any, targets: Any) -> Any:
        """``Σ y`` per position (keepdims) times the normalisation; 1 for class indices."""
        if targets is None or targets.ndim != outputs.ndim:
            return self._scale(outputs)
        axis = self._term_axis(outputs.ndim)
        return self._scale(outputs) * b.xp.sum(targets, axis=axis, keepdims=True)

    def hessian_sqrt_columns(self, b: Any, outputs: Any, targets: Any) -> Any:
        columns = super().hessian_sqrt_columns(b, outputs, targets)
        if targets is None or targets.ndim != outputs.ndim:
            return columns
        axis = self._term_axis(outputs.ndim)
        return b.xp.sqrt(b.xp.sum(targets, axis=axis, keepdims=True)) * columns

    def _term_axis(self, ndim: int) -> int | None:
        return self.class_axis % ndim - ndim

    def _gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        axis = self._term_axis(outputs.ndim)  # from the end: targets may be (k, *shape)
        mass = b.xp.sum(targets, axis=axis, keepdims=True)  # Σ y, 1 for one-hot
        return b.xp.exp(self._log_probs(b, outputs)) * mass - targets

    def output_gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        return self._gradient(b, outputs, self._target_probs(b, outputs, targets))

    def sample_targets(self, b: Any, outputs: Any, noise: Any) -> Any:
        """One-hot classes drawn from ``softmax(z)`` (Gumbel-max with uniform ``noise``)."""
        xp = b.xp
        axis = self._term_axis(outputs.ndim)
        perturbed = self._log_probs(b, outputs) - xp.log(-xp.log(noise))
        top = xp.max(perturbed, axis=axis, keepdims=True)
        return xp.astype(perturbed == top, outputs.dtype)

    def _hessian_sqrt(self, b: Any, outputs: Any, E: Any) -> Any:
        # per position: diag(p) - p pᵀ = Σ_c s_c s_cᵀ with s_c = √p_c (e_c - p)
        probs = b.xp.exp(self._log_probs(b, outputs))
        p_j = self.term_sum(b, probs * E, outputs)
        return b.xp.sqrt(p_j) * (E - probs * self.term_sum(b, E, outputs))


@dataclass(frozen=True)
class BCEWithLogitsLoss(_StandardLoss):
    """Binary cross-entropy on logits, like ``torch.nn.BCEWithLogitsLoss``.

    Targets are probabilities of the outputs' shape. The output Hessian is
    ``diag(σ(z)(1 - σ(z)))``.
    """

    reduction: str = "mean"

    def check_targets(self, b: Any, outputs: Any, targets: Any, argument: str) -> None:
        super().check_targets(b, outputs, targets, argument)
        _check_range(b, targets, argument, "probabilities in [0, 1] (BCEWithLogitsLoss)", 0, 1)

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        xp = b.xp
        # softplus(z) - y z, written so that it never overflows
        softplus = xp.maximum(outputs, 0.0) + xp.log1p(xp.exp(-xp.abs(outputs)))
        return self._reduce(xp, softplus - targets * outputs, outputs)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        xp = b.xp
        sig = 1.0 / (1.0 + xp.exp(-outputs))
        return self._scale(outputs) * (sig * (1.0 - sig)) * u

    def _gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        return 1.0 / (1.0 + b.xp.exp(-outputs)) - targets

    def sample_targets(self, b: Any, outputs: Any, noise: Any) -> Any:
        """Targets in {0, 1} drawn from ``Bernoulli(σ(z))``."""
        sig = 1.0 / (1.0 + b.xp.exp(-outputs))
        return b.xp.astype(noise < sig, outputs.dtype)

    def _hessian_sqrt(self, b: Any, outputs: Any, E: Any) -> Any:
        sig = 1.0 / (1.0 + b.xp.exp(-outputs))
        return b.xp.sqrt(sig * (1.0 - sig)) * E


@dataclass(frozen=True)
class CallableLoss:
    """Any loss ``fn(outputs, targets) -> scalar`` with a stated reduction.

    The GGN gets its output Hessian by autodiff. ``reduction`` says how
    ``fn`` combines the terms of a batch, which fixes how batches of
    different sizes are combined.
    """

    fn: Callable[[Any, Any], Any]
    reduction: str = "mean"
    variant: str = ""
    """What a framework loss module adds to its closed-form counterpart (e.g.
    ``"class weights (weight=...)"``), for the messages of what cannot use it."""
    weighted_mean: bool = False
    """Whether ``"mean"`` divides by a sum of weights rather than the number of
    terms (PyTorch's cross-entropy with class weights): terms are then coupled
    within a batch, and per-example gradients and batch sizes do not combine."""

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise type_error("loss_func", "a callable (outputs, targets) -> scalar", self.fn)
        check_reduction(self.reduction, "loss_func.reduction")

    def describe(self) -> str:
        """The loss as messages name it: its type, and what it adds to a standard loss."""
        cls = type(self.fn)
        name = getattr(self.fn, "__qualname__", None) or f"{cls.__module__}.{cls.__qualname__}"
        return f"{name} with {self.variant}" if self.variant else name

    def coupled_error(self, needed: str) -> ValueError:
        """The error for a weighted mean where ``needed`` takes terms one by one."""
        return value_error(
            "loss_func",
            f"a loss whose 'mean' divides by the number of terms, for {needed}",
            f"{self.describe()} and reduction='mean', which divides by the batch's sum "
            "of the selected class weights",
            "Use reduction='sum' (class weights are honoured there) and scale the operator "
            "by 1 / (the sum of the selected weights over your data).",
        )

    def check_targets(self, b: Any, outputs: Any, targets: Any, argument: str) -> None:
        _check_finite(b, targets, argument)

    def value(self, b: Any, outputs: Any, targets: Any) -> Any:
        return self.fn(outputs, targets)

    def output_hessian_vp(self, b: Any, outputs: Any, targets: Any, u: Any) -> Any:
        return b.hvp_fn(lambda z: self.fn(z, targets), outputs)(u)

    # Terms of a callable are its values on single examples (batches of one).
    def normalization(self, outputs: Any) -> float:
        return 1.0 / outputs.shape[0] if self.reduction == "mean" else 1.0

    def term_sum(self, b: Any, a: Any, outputs: Any) -> Any:
        axes = tuple(range(a.ndim - outputs.ndim + 1, a.ndim))
        return b.xp.sum(a, axis=axes, keepdims=True) if axes else a

    def terms_per_example(self, shape: tuple[int, ...]) -> int:
        return 1

    def term_masks(self, b: Any, outputs: Any) -> Any:
        return None

    def output_gradient(self, b: Any, outputs: Any, targets: Any) -> Any:
        if self.weighted_mean and self.reduction == "mean":
            raise self.coupled_error("per-example gradients (empirical Fisher, KFAC)")

        def example_gradient(z_n: Any, y_n: Any) -> Any:
            value, pullback = b.vjp(lambda z: self.fn(z[None], y_n[None]), z_n)
            return pullback(b.xp.ones_like(value))

        return b.vmap(example_gradient)(outputs, targets)

    def sample_noise(self, b: Any, shape: tuple[int, ...], num_samples: int, seed: int) -> Any:
        raise _no_distribution(self)

    def sampled_gradient(self, b: Any, outputs: Any, noise: Any) -> Any:
        raise _no_distribution(self)

    def hessian_sqrt_columns(self, b: Any, outputs: Any, targets: Any) -> Any:
        raise self.closed_form_error("a closed-form output Hessian")

    def closed_form_error(self, needed: str) -> Exception:
        """The error for a use that needs a standard loss's closed form."""
        expected = f"MSELoss, CrossEntropyLoss or BCEWithLogitsLoss ({needed})"
        if self.variant:  # a standard loss module with weights or smoothing
            return value_error(
                "loss_func",
                f"{expected} without weights or label smoothing",
                self.describe(),
                f"Closed forms and sampling cover the unweighted losses only: {self.variant} "
                "is what is not supported here. Use the empirical Fisher or "
                "GGNLinearOperator/HessianLinearOperator (autodiff of the weighted loss).",
            )
        return type_error(
            "loss_func",
            expected,
            self.fn,
            "Pass mc_samples=k for a Monte-Carlo estimate with one of these losses, or use "
            "GGNLinearOperator(...).todense() for small models.",
        )


def _unit_columns(b: Any, outputs: Any) -> Any:
    """One-hot arrays ``(m, 1, *outputs.shape[1:])``, one per output of an example."""
    m = _size(outputs) // outputs.shape[0]
    return b.xp.reshape(b.eye(m), (m, 1, *outputs.shape[1:]))


def _no_distribution(loss: CallableLoss) -> Exception:
    if loss.variant:
        return loss.closed_form_error("a predictive distribution to sample targets from")
    return type_error(
        "loss_func",
        "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss (a loss with a predictive "
        "distribution to sample targets from)",
        loss.fn,
        "A custom callable defines no distribution; use a standard loss, or the exact "
        "GGNLinearOperator.",
    )


def _check_array(targets: Any, argument: str, loss: str) -> None:
    if not hasattr(targets, "shape") or not hasattr(targets, "dtype"):
        raise type_error(argument, f"an array of targets ({loss})", targets)


def _check_shape(targets: Any, shape: tuple[int, ...], argument: str, loss: str) -> None:
    if tuple(targets.shape) != shape:
        raise value_error(
            argument,
            f"targets of the outputs' shape {shape} ({loss})",
            f"shape {tuple(targets.shape)}",
            "Reshape them to the outputs' shape, e.g. y[:, None] for one output per example: "
            "broadcasting would silently change the loss.",
        )


def _check_finite(b: Any, targets: Any, argument: str) -> None:
    """No NaN or inf in any floating-point array of ``targets`` (an array or a structure)."""
    for leaf in b.tree_flatten(targets)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and b.xp.isdtype(dtype, "real floating") and not b.all_finite(leaf):
            raise value_error(
                argument,
                "finite targets",
                "NaN or inf values",
                "Remove or impute the examples with missing targets.",
            )


def _check_range(
    b: Any, targets: Any, argument: str, expected: str, low: float, high: float, fix: str = ""
) -> None:
    if not _size(targets):
        return
    xp = b.xp
    smallest, largest = xp.min(targets), xp.max(targets)
    if float(smallest) < low or float(largest) > high:
        got = f"values from {_scalar(smallest)} to {_scalar(largest)}"
        raise value_error(argument, expected, got, fix)


def _scalar(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:.4g}"


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
