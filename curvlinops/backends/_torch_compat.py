"""curvlinops-for-pytorch 3.0.1's base classes, as operators of this library.

Code written for 3.0.1 defines its own operators by subclassing
``curvlinops._torch_base.PyTorchLinearOperator`` (implement ``_matmat`` on a
list of ``(*shape, K)`` tensors, ``_adjoint``, and ``device``/``dtype``) or
``CurvatureLinearOperator`` (implement ``_matmat_batch(X, y, M)``). Here
those subclasses are :class:`~curvlinops.LinearOperator` objects: scipy's
solvers, this library's algorithms and composition with its operators take
them. The one difference: ``.dtype`` is a numpy dtype (scipy reads it); a
subclass's own ``dtype`` property is kept as ``.torch_dtype``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import numpy as np
import torch

from curvlinops._base import LinearOperator
from curvlinops._checks import value_error
from curvlinops.backends._torch import TorchBackend, _numpy_dtype

__all__ = ["CurvatureLinearOperator", "PyTorchLinearOperator"]


class PyTorchLinearOperator(LinearOperator):
    """A linear operator defined by ``_matmat`` on lists of tensors (3.0.1's contract).

    Args:
        in_shape: Shapes of the input space's tensors, e.g. ``[(2, 3), (4,)]``.
        out_shape: Shapes of the output space's tensors.

    Attributes:
        SELF_ADJOINT: Whether the operator is its own adjoint (then ``_adjoint``
            need not be implemented).
    """

    SELF_ADJOINT: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own_dtype = cls.__dict__.get("dtype")
        if isinstance(own_dtype, property):
            # 3.0.1's dtype is a torch.dtype; ours stays numpy (scipy reads dtype.char)
            cls.torch_dtype = own_dtype
            delattr(cls, "dtype")

    def __init__(self, in_shape: list[tuple[int, ...]], out_shape: list[tuple[int, ...]]):
        self._in_shape, self._out_shape = in_shape, out_shape
        # no scipy __init__: dtype is read off the subclass's torch_dtype
        self.shape = (sum(self._out_shape_flat), sum(self._in_shape_flat))

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of :attr:`torch_dtype`."""
        return _numpy_dtype(self._dtype_and_device()[0])

    @property
    def torch_dtype(self) -> torch.dtype:
        """The operator's ``torch.dtype``; subclasses implement it (3.0.1's ``dtype``)."""
        raise NotImplementedError(
            f"{type(self).__name__}: implement the property 'dtype' (a torch.dtype)."
        )

    @property
    def device(self) -> torch.device:
        """The operator's device; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__}: implement the property 'device'.")

    @property
    def is_symmetric(self) -> bool:
        """``SELF_ADJOINT``."""
        return bool(self.SELF_ADJOINT)

    @is_symmetric.setter
    def is_symmetric(self, value: bool) -> None:
        self.SELF_ADJOINT = bool(value)

    @property
    def backend(self) -> TorchBackend:
        """Array conversion to the operator's dtype and device (no model)."""
        key = self._dtype_and_device()
        cached = self.__dict__.get("_array_backend")
        if cached is None or cached[0] != key:
            cached = (key, _array_backend(*key))
            self.__dict__["_array_backend"] = cached
        return cached[1]

    def _dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        """The subclass's dtype and device, else torch's default dtype on the CPU.

        3.0.1 needs neither for ``@``; a subclass may leave them out.
        """
        try:
            return self.torch_dtype, torch.device(self.device)
        except NotImplementedError:
            return torch.get_default_dtype(), torch.device("cpu")

    def _matmat(self, X: list[torch.Tensor]) -> list[torch.Tensor]:
        """``A @ X`` for ``X`` a list of ``(*shape, K)`` tensors of :attr:`_in_shape`."""
        raise NotImplementedError(
            f"{type(self).__name__}: implement _matmat(X) on a list of tensors."
        )

    def adjoint(self) -> LinearOperator:
        """The adjoint: the operator itself if ``SELF_ADJOINT``, else ``_adjoint()``."""
        return self if self.SELF_ADJOINT else self._adjoint()

    H = property(adjoint)
    T = property(adjoint)

    def transpose(self) -> LinearOperator:
        """The transpose (the adjoint: the operators are real)."""
        return self.adjoint()

    def _adjoint(self) -> LinearOperator:
        raise NotImplementedError(
            f"{type(self).__name__}: implement _adjoint(), or set SELF_ADJOINT = True."
        )

    def _native(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        op = self.adjoint() if adjoint else self
        if not isinstance(op, PyTorchLinearOperator):
            return op._native(X, False)
        K = X.shape[1]
        pieces = [x.reshape(*s, K) for x, s in zip(X.split(op._in_shape_flat), op._in_shape)]
        out = op._matmat(pieces)
        _check_output(op, out, K)
        return torch.cat([o.reshape(-1, K) for o in out])


class CurvatureLinearOperator(PyTorchLinearOperator):
    """3.0.1's base of curvature operators over a data set (a PyTorch model's parameters).

    Subclasses implement ``_matmat_batch(X, y, M)`` (a mini-batch's product
    with a list of ``(*param.shape, K)`` tensors), which ``_matmat`` sums over
    the data with the loss's normalisation, or ``_matmat`` itself.

    Args:
        model_func, loss_func, params, data: As in 3.0.1 (``loss_func`` may be
            ``None`` where the matrix does not involve a loss).
        progressbar, check_deterministic, num_data, block_sizes, batch_size_fn:
            As in 3.0.1.
    """

    SUPPORTS_BLOCKS: bool = False
    FIXED_DATA_ORDER: bool = False

    def __init__(
        self,
        model_func: Callable,
        loss_func: Callable | None,
        params: list[torch.Tensor],
        data: Iterable,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        block_sizes: list[int] | None = None,
        batch_size_fn: Callable | None = None,
    ):
        if isinstance(next(iter(data))[0], MutableMapping) and batch_size_fn is None:
            raise value_error(
                "batch_size_fn",
                "a function X -> batch size when X is a dict",
                "None",
                "Pass e.g. batch_size_fn=lambda X: X['x'].shape[0].",
            )
        self._params = params
        self._block_sizes = self._checked_blocks(block_sizes, len(params))
        self._model_func, self._loss_func, self._data = model_func, loss_func, data
        self._progressbar = progressbar
        self._batch_size_fn = (lambda X: X.shape[0]) if batch_size_fn is None else batch_size_fn
        if num_data is None:
            num_data = sum(self._batch_size_fn(X) for X, _ in self._loop_over_data("_N_data"))
        self._N_data = num_data
        super().__init__(self._get_in_shape(), self._get_out_shape())
        if check_deterministic:
            self._check_deterministic()

    def _checked_blocks(self, block_sizes: list[int] | None, num_params: int) -> list[int]:
        if block_sizes is None:
            return [num_params]
        if not self.SUPPORTS_BLOCKS:
            raise value_error(
                "block_sizes", "None", repr(block_sizes), f"{type(self).__name__} has no blocks."
            )
        if sum(block_sizes) != num_params or any(s <= 0 for s in block_sizes):
            raise value_error(
                "block_sizes", f"positive sizes summing to {num_params}", repr(block_sizes)
            )
        return list(block_sizes)

    def _get_in_shape(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self._params]

    def _get_out_shape(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self._params]

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return _one_of({p.device for p in self._params}, "device")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameters' ``torch.dtype``."""
        return _one_of({p.dtype for p in self._params}, "dtype")

    def _matmat(self, M: list[torch.Tensor]) -> list[torch.Tensor]:
        AM = [torch.zeros_like(m) for m in M]
        for X, y in self._loop_over_data("_matmat"):
            factor = self._get_normalization_factor(X, y)
            for total, term in zip(AM, self._matmat_batch(X, y, M)):
                total.add_(term, alpha=factor)
        return AM

    def _matmat_batch(self, X: Any, y: torch.Tensor, M: list[torch.Tensor]) -> list:
        raise NotImplementedError(f"{type(self).__name__}: implement _matmat_batch(X, y, M).")

    def _loop_over_data(
        self, desc: str | None = None, add_device_to_desc: bool = True
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        """The batches ``(X, y)`` on the operator's device (a bar with ``progressbar``)."""
        batches, dev = self._data, self.device
        if self._progressbar:
            from tqdm import tqdm

            label = type(self).__name__ + ("" if desc is None else f".{desc}")
            batches = tqdm(batches, desc=f"{label} (on {dev})" if add_device_to_desc else label)
        for X, y in batches:
            yield (X.to(dev) if isinstance(X, torch.Tensor) else X), y.to(dev)

    def _get_normalization_factor(self, X: Any, y: torch.Tensor) -> float:
        reduction = self._loss_func.reduction
        if reduction not in ("sum", "mean"):
            raise value_error("loss_func.reduction", "'sum' or 'mean'", repr(reduction))
        return 1.0 if reduction == "sum" else self._batch_size_fn(X) / self._N_data

    def data_prediction_loss_gradient(self, desc: str = "batch_prediction_loss_gradient"):
        """``((X, y), prediction, loss, gradient)`` per batch (``None``s without a loss)."""
        for X, y in self._loop_over_data(desc):
            prediction = self._model_func(X)
            if self._loss_func is None:
                yield (X, y), prediction, None, None
                continue
            loss = self._loss_func(prediction, y) * self._get_normalization_factor(X, y)
            gradient = [g.detach() for g in torch.autograd.grad(loss, self._params)]
            yield (X, y), prediction, loss.detach(), gradient

    def gradient_and_loss(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The gradient (a list like ``params``) and the loss over the data."""
        if self._loss_func is None:
            raise value_error("loss_func", "a loss function", "None", "There is no loss here.")
        gradient, loss = _totals(self, "gradient_and_loss")
        return gradient, loss

    def _check_deterministic(self) -> None:
        """Two passes over the data (and two products) must agree; else RuntimeError."""
        rtol, atol = 5e-5, 1e-6
        first = self.data_prediction_loss_gradient()
        second = self.data_prediction_loss_gradient()
        totals = [_Totals(), _Totals()]
        for one, two in zip(first, second):
            if self.FIXED_DATA_ORDER:
                _same_batch(one, two, rtol, atol)
            totals[0].add(one)
            totals[1].add(two)
        if self._loss_func is not None and not totals[0].agrees(totals[1], rtol, atol):
            raise RuntimeError(
                f"{type(self).__name__}: the loss or gradient differs between two passes "
                "over the data (shuffled loader, dropout, or drop_last?)."
            )
        v = torch.rand(self.shape[1], device=self.device, dtype=self.torch_dtype)
        if not torch.allclose(self @ v, self @ v, rtol=rtol, atol=atol):
            raise RuntimeError(f"{type(self).__name__}: two equal products differ.")


class _Totals:
    """Sums of the losses and gradients of one pass over the data."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.gradient: list[torch.Tensor] | None = None

    def add(self, batch: tuple) -> None:
        _, _, loss, gradient = batch
        if loss is None:
            return
        self.loss = loss if self.loss is None else self.loss + loss
        if self.gradient is None:
            self.gradient = list(gradient)
        else:
            self.gradient = [t + g for t, g in zip(self.gradient, gradient)]

    def agrees(self, other: _Totals, rtol: float, atol: float) -> bool:
        pairs = [(self.loss, other.loss), *zip(self.gradient or [], other.gradient or [])]
        return all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in pairs)


def _totals(op: CurvatureLinearOperator, desc: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    totals = _Totals()
    for batch in op.data_prediction_loss_gradient(desc):
        totals.add(batch)
    zero = torch.zeros((), device=op.device, dtype=op.torch_dtype)
    gradient = totals.gradient or [torch.zeros_like(p) for p in op._params]
    return gradient, zero if totals.loss is None else totals.loss


def _same_batch(one: tuple, two: tuple, rtol: float, atol: float) -> None:
    """Raise RuntimeError where two passes gave a batch different inputs, outputs or grads."""
    (X1, y1), pred1, loss1, grad1 = one
    (X2, y2), pred2, loss2, grad2 = two
    if isinstance(X1, MutableMapping):
        X1 = [v for v in X1.values() if isinstance(v, torch.Tensor)]
        X2 = [v for v in X2.values() if isinstance(v, torch.Tensor)]
    else:
        X1, X2 = [X1], [X2]
    pairs = {
        "X": list(zip(X1, X2)),
        "y": [(y1, y2)],
        "prediction": [(pred1, pred2)],
        "loss": [] if loss1 is None else [(loss1, loss2)],
        "gradient": [] if grad1 is None else list(zip(grad1, grad2)),
    }
    for name, items in pairs.items():
        if not all(torch.allclose(a, b, rtol=rtol, atol=atol) for a, b in items):
            raise RuntimeError(
                f"Check for deterministic batch {name} failed: the data order "
                "or the model changes between passes."
            )


def _check_output(op: PyTorchLinearOperator, out: Any, K: int) -> None:
    """3.0.1's check of ``_matmat``'s result: one ``(*shape, K)`` tensor per output shape."""
    expected = [(*s, K) for s in op._out_shape]
    if not isinstance(out, (list, tuple)) or len(out) != len(expected):
        raise value_error(
            f"{type(op).__name__}._matmat", f"a list of {len(expected)} tensors", repr(type(out))
        )
    got = [tuple(o.shape) for o in out]
    if got != expected:
        raise value_error(f"{type(op).__name__}._matmat", f"shapes {expected}", str(got))


def _one_of(values: set, what: str) -> Any:
    if len(values) != 1:
        raise RuntimeError(f"params: expected one {what}, got {sorted(map(str, values))}.")
    return values.pop()


def _array_backend(dtype: torch.dtype, device: torch.device) -> TorchBackend:
    """A torch backend that converts arrays to ``dtype`` on ``device`` (it has no model)."""
    backend = TorchBackend.__new__(TorchBackend)
    backend.torch_dtype, backend.dtype = dtype, _numpy_dtype(dtype)
    backend.device = torch.device(device)
    backend.param_names, backend.param_shapes, backend.primals = [], [], ()
    return backend
