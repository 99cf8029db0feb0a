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
    _activation_factors = (1.0, 0.6)

    def __init__(self, model_func: Any, params: Any, data: Any, **options: Any):
        super().__init__(model_func, None, params, data, **options)
        self._out_shape = _stacked_output_shape(self._batch_output_shapes, self.shape[0])

    def _shape(self) -> tuple[int, int]:
        return (sum(self._output_sizes), self.num_params)

    def _batch_extras(self, index: int, X: Any, n: int) -> tuple:
        return (1.0,)  # no normalisation

    def _batch_operand(self, V: Any, index: int, adjoint: bool) -> Any:
        """``Jᵀ``: the rows of ``U`` that belong to batch ``index``."""
        if not adjoint or len(self._output_sizes) == 1:
            return V
        start = sum(self._output_sizes[:index])
        return V[start : start + self._output_sizes[index]]

    def _combine(self, terms: Any, V: Any, adjoint: bool) -> Any:
        if adjoint:
            return super()._combine(terms, V, adjoint)
        blocks = [block for _, block in terms]
        if len(blocks) == 1:  # a concatenation would copy (and, in JAX, dispatch)
            return blocks[0]
        b = self.backend
        # A process with an empty data shard has no rows.
        return b.concat(blocks, axis=0) if blocks else b.zeros((0, *V.shape[1:]))

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

    # --- kept linearization: the model's graph and its transpose (JAX: jax.vjp) --
    def _batch_linearize(self, primals: Any, X: Any, y: Any, weight: Any) -> Any:
        b, model = self.backend, self.backend.model_fn
        return b.linearize(lambda p: model(p, X), primals, transpose=True)

    def _linearized_matmat(self, lin: Any, V: Any) -> Any:
        b = self.backend

        def column(v: Any) -> Any:
            return b.xp.reshape(b.linear_jvp(lin, b.unflatten(v)), (-1,))

        return map_columns(b, column, V)

    def _linearized_rmatmat(self, lin: Any, U: Any) -> Any:
        b = self.backend
        shape = b.linear_output(lin).shape

        def column(u: Any) -> Any:
            return b.flatten(b.linear_vjp(lin, b.xp.reshape(u, shape)))

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
        self._in_shape = self.jacobian._out_shape

    def _native(self, X: Any, adjoint: bool) -> Any:
        return self.jacobian._native(X, not adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        return self.jacobian._native_vector(x, not adjoint)

    def _adjoint(self) -> LinearOperator:
        return self.jacobian

    def cache_info(self) -> dict:
        """What the Jacobian behind it keeps (see :meth:`JacobianLinearOperator.cache_info`)."""
        return self.jacobian.cache_info()

    def clear_cache(self) -> None:
        """Forget the kept linearizations."""
        self.jacobian.clear_cache()


def _stacked_output_shape(shapes: list[tuple[int, ...]], rows: int) -> list[tuple[int, ...]]:
    """The output space as curvlinops-for-pytorch lists it: ``[(N, *output shape)]``.

    One flat ``(rows,)`` when the batches' outputs differ beyond the batch axis.
    """
    per_example = {s[1:] for s in shapes if len(s) > 0}
    if len(per_example) != 1 or any(len(s) == 0 for s in shapes):
        return [(rows,)]
    return [(sum(s[0] for s in shapes), *per_example.pop())]
