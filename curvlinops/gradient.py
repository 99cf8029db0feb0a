"""Gradient and value of the empirical risk over a data set."""

from __future__ import annotations

from typing import Any

from curvlinops._curvature import CurvatureOperator

__all__ = ["gradient_and_loss"]


def gradient_and_loss(
    model_func: Any,
    loss_func: Any,
    params: Any,
    data: Any,
    *,
    flat: bool = False,
    progressbar: bool = False,
    check_deterministic: bool = False,
    num_data: int | None = None,
    batch_size_fn: Any = None,
    backend: str | None = None,
) -> tuple[Any, Any]:
    r"""The loss over a data set and its gradient, normalised like the operators.

    .. math::
        \mathcal L(\theta) = \sum_b w_b \, \ell\big(f(\theta, X_b), y_b\big),
        \qquad \nabla_\theta \mathcal L(\theta),

    with :math:`w_b = N_b / N` for ``reduction="mean"`` (the loss averaged over
    all ``N`` data points, whatever the batch sizes) and :math:`w_b = 1` for
    ``"sum"``: the function whose Hessian is
    :class:`~curvlinops.HessianLinearOperator`. One pass over the data, one
    gradient per batch.

    Args:
        model_func, loss_func, params, data: As for
            :class:`~curvlinops.HessianLinearOperator`.
        flat: Return the gradient as one flat ``(P,)`` vector (in the
            operators' parameter order) instead of in ``params``' structure.
        progressbar: Show a progress bar over batches.
        check_deterministic: Compute everything twice and check that data,
            model and gradient agree (off by default: this function runs once).
        num_data: Number of data points (counted when ``None``).
        batch_size_fn: ``X -> batch size`` when ``X`` is not an array.
        backend: ``"torch"``, ``"jax"``, or ``None`` to read it off ``params``.

    Returns:
        ``(gradient, loss)``: the gradient in ``params``' structure (PyTorch: a
        list or dict of tensors like ``params``; JAX: a pytree like
        ``params``), or a flat vector with ``flat=True``; the loss as a 0-d
        array. Both are arrays of the backend, on the parameters' device.

    Example:
        >>> import torch
        >>> from curvlinops.gradient import gradient_and_loss
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> params = list(model.parameters())
        >>> data = [(X[:5], y[:5]), (X[5:], y[5:])]
        >>> grad, loss = gradient_and_loss(model, torch.nn.MSELoss(), params, data)
        >>> ref = torch.autograd.grad(torch.nn.MSELoss()(model(X), y), params)
        >>> all(torch.allclose(g, r) for g, r in zip(grad, ref))
        True
    """
    op = _GradientOperator(
        model_func,
        loss_func,
        params,
        data,
        progressbar=progressbar,
        check_deterministic=check_deterministic,
        num_data=num_data,
        batch_size_fn=batch_size_fn,
        backend=backend,
    )
    gradient, loss = op._flat_gradient_and_loss()  # (the base class walks the data)
    if flat:
        return gradient, loss
    return _like_params(op.backend, params, gradient), loss


class _GradientOperator(CurvatureOperator):
    """The gradient as a ``P x 1`` operator (``x -> g x``); it walks the data."""

    def _shape(self) -> tuple[int, int]:
        return (self.num_params, 1)

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any) -> Any:
        return self._batch_gradient_and_loss(primals, X, y, weight)[0][:, None] * V

    def _batch_rmatmat(self, primals: Any, X: Any, y: Any, U: Any, weight: Any) -> Any:
        g = self._batch_gradient_and_loss(primals, X, y, weight)[0]
        return self.backend.xp.sum(g[:, None] * U, axis=0, keepdims=True)


def _like_params(b: Any, params: Any, gradient: Any) -> Any:
    """Split a flat gradient into the structure of the user's ``params``."""
    leaves, rebuild = b.tree_flatten(params)
    pieces = b.tree_flatten(b.unflatten(gradient))[0]
    if len(pieces) != len(leaves):
        return b.unflatten(gradient)
    return rebuild(pieces)
