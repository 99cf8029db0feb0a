"""Jacobian of the model outputs over a data set, and its transpose."""

from __future__ import annotations

from typing import Any

from curvlinops._base import LinearOperator
from curvlinops._curvature import CurvatureOperator, map_columns

__all__ = ["JacobianLinearOperator", "TransposedJacobianLinearOperator"]


class JacobianLinearOperator(CurvatureOperator):
    r"""Jacobian of the stacked model outputs with respect to the parameters.

    .. math::
        J = \begin{pmatrix} \partial\, \mathrm{vec} f(\theta, X_1) / \partial \theta \\
        \vdots \\ \partial\, \mathrm{vec} f(\theta, X_B) / \partial \theta \end{pmatrix}
        \in \mathbb{R}^{(N C) \times P}.

    Rows are the model outputs of each batch, flattened row-major
    (``outputs.reshape(-1)``), batches in the data's order. ``J @ v`` is a
    JVP per batch; ``J.T @ u`` (:meth:`rmatvec`) a VJP per batch. There is no
    normalisation by ``N``. The targets ``y`` of the data are not used.

    With ``process_group`` (``torch.distributed``), each process has the rows
    of its own data: the shape is (this process's rows) x ``P``, ``J @ v``
    returns them, and ``J.T @ u`` takes them and sums over processes (the
    rows of all processes, stacked in rank order, form the full :math:`J`).
    With ``sharding`` (JAX), rows are those of all the data, as in one device.

    Args:
        model_func, params, data: As for :class:`~curvlinops.HessianLinearOperator`.
        **options: ``progressbar``, ``check_deterministic``, ``num_data``,
            ``batch_size_fn``, ``backend``, ``columns_per_pass``,
            ``process_group``, ``sharding``.

    Example:
        >>> import torch
        >>> from curvlinops import JacobianLinearOperator
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), None), (torch.randn(1, 3), None)]
        >>> JacobianLinearOperator(model, list(model.parameters()), data).shape
        (10, 8)
    """

    _needs_loss = False
    _params_in = True
    _vector_products = True

    def __init__(self, model_func: Any, params: Any, data: Any, **options: Any):
        super().__init__(model_func, None, params, data, **options)

    def _shape(self) -> tuple[int, int]:
        return (sum(self._output_sizes), self.num_params)

    def _accumulate(self, V: Any, adjoint: bool) -> Any:
        b, primals = self.backend, self.backend.primals
        if not adjoint:
            blocks = [
                self._compiled_matmat(primals, X, y, V, 1.0)
                for _, X, y, _ in self._batches("JacobianLinearOperator product")
            ]
            if len(blocks) == 1:  # a concatenation would copy (and, in JAX, dispatch)
                return blocks[0]
            # A process with an empty data shard has no rows.
            return b.concat(blocks, axis=0) if blocks else b.zeros((0, *V.shape[1:]))
        result, start, whole = None, 0, len(self._output_sizes) == 1
        for (_, X, y, _), rows in zip(
            self._batches("TransposedJacobianLinearOperator product"), self._output_sizes
        ):
            U = V if whole else V[start : start + rows]
            term = self._compiled_rmatmat(primals, X, y, U, 1.0)
            result = term if result is None else result + term
            start += rows
        return result

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any) -> Any:
        b, model = self.backend, self.backend.model_fn

        def column(v: Any) -> Any:
            _, Jv = b.jvp(lambda p: model(p, X), (primals,), (b.unflatten(v),))
            return b.xp.reshape(Jv, (-1,))

        return map_columns(b, column, V)

    def _batch_rmatmat(self, primals: Any, X: Any, y: Any, U: Any, weight: Any) -> Any:
        b, model = self.backend, self.backend.model_fn
        z, pullback = b.vjp(lambda p: model(p, X), primals)

        def column(u: Any) -> Any:
            return b.flatten(pullback(b.xp.reshape(u, z.shape)))

        return map_columns(b, column, U)


class TransposedJacobianLinearOperator(LinearOperator):
    r"""Transpose of :class:`JacobianLinearOperator`.

    :math:`J^\top \in \mathbb{R}^{P \times (N C)}`. Takes the same
    arguments; ``Jᵀ @ u`` is a VJP per batch.

    Example:
        >>> import torch
        >>> from curvlinops import TransposedJacobianLinearOperator
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), None)]
        >>> TransposedJacobianLinearOperator(model, list(model.parameters()), data).shape
        (8, 8)
    """

    _params_out = True

    def __init__(self, model_func: Any, params: Any, data: Any, **options: Any):
        self.jacobian = JacobianLinearOperator(model_func, params, data, **options)
        self.backend = self.jacobian.backend
        super().__init__(self.jacobian.dtype, self.jacobian.shape[::-1])

    def _native(self, X: Any, adjoint: bool) -> Any:
        return self.jacobian._native(X, not adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        return self.jacobian._native_vector(x, not adjoint)

    def _adjoint(self) -> LinearOperator:
        return self.jacobian
