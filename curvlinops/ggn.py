"""Generalized Gauss-Newton matrix of the empirical risk."""

from __future__ import annotations

from typing import Any

from curvlinops._curvature import CurvatureOperator

__all__ = ["GGNLinearOperator"]


class GGNLinearOperator(CurvatureOperator):
    r"""Generalized Gauss-Newton matrix, as a matrix-free operator.

    .. math::
        G = \sum_{b} w_b \, J_b^\top \, \nabla^2_{z} \ell(z_b, y_b) \, J_b,
        \qquad z_b = f(\theta, X_b), \quad J_b = \partial z_b / \partial \theta,

    with :math:`z` the model outputs (logits for classification) and
    :math:`w_b` as for :class:`~curvlinops.HessianLinearOperator`. The output
    Hessian is in closed form for MSE, cross-entropy and BCE-with-logits, and
    by autodiff for other losses. Each product is a JVP, the output-Hessian
    product and a VJP; :math:`G` is symmetric positive semi-definite for
    convex losses.

    Args:
        model_func, loss_func, params, data: As for
            :class:`~curvlinops.HessianLinearOperator`.
        **options: ``progressbar``, ``check_deterministic``, ``num_data``,
            ``batch_size_fn``, ``backend``, ``columns_per_pass``.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import GGNLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> loss_func, params = torch.nn.CrossEntropyLoss(), list(model.parameters())
        >>> G = GGNLinearOperator(model, loss_func, params, [(X, y)])
        >>> bool(np.linalg.eigvalsh(G @ np.eye(8)).min() > -1e-12)
        True
    """

    is_symmetric = True
    _params_in = _params_out = True

    def __init__(self, model_func: Any, loss_func: Any, params: Any, data: Any, **options: Any):
        super().__init__(model_func, loss_func, params, data, **options)

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any) -> Any:
        b, loss, model = self.backend, self._loss, self.backend.model_fn

        def outputs(p: Any) -> Any:
            return model(p, X)

        z, pullback = b.vjp(outputs, primals)

        def column(v: Any) -> Any:
            _, Jv = b.jvp(outputs, (primals,), (b.unflatten(v),))
            return b.flatten(pullback(loss.output_hessian_vp(b, z, y, Jv)))

        return weight * b.vmap(column, in_axes=1, out_axes=1)(V)
