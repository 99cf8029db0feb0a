"""Hessian of the empirical risk."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error
from curvlinops._curvature import CurvatureOperator, map_columns

__all__ = ["HessianLinearOperator"]


class HessianLinearOperator(CurvatureOperator):
    r"""Hessian of the loss over a data set, as a matrix-free operator.

    .. math::
        H = \sum_{b} w_b \, \nabla^2_{\theta} \ell\big(f(\theta, X_b), y_b\big)
        \in \mathbb{R}^{P \times P},

    with :math:`w_b = N_b / N` for ``reduction="mean"`` (the loss averaged over
    all ``N`` data points) and :math:`w_b = 1` for ``"sum"``. Products are
    Hessian-vector products (no :math:`P \times P` matrix is formed); ``K``
    columns go through one vectorised pass.

    Args:
        model_func: PyTorch: an ``nn.Module`` or a callable ``(params, X)``;
            JAX: a callable ``(params, X) -> outputs``.
        loss_func: ``curvlinops.losses.*``, a PyTorch loss module, or a
            callable ``(outputs, targets) -> scalar`` with a ``reduction``.
        params: PyTorch: list of the model's parameters or dict name -> tensor;
            JAX: any pytree of arrays.
        data: A re-iterable of ``(X, y)`` batches.
        progressbar: Show a progress bar over batches.
        check_deterministic: Check at construction that data and model give
            the same results on two passes.
        num_data: Number of data points (counted when ``None``); with data
            spread over processes, the total over all of them.
        batch_size_fn: ``X -> batch size`` when ``X`` is not an array.
        backend: ``"torch"``, ``"jax"``, or ``None`` to read it off ``params``.
        block_sizes: Block-diagonal Hessian (as curvlinops-for-pytorch 3.0.1): the
            numbers of consecutive parameters (tensors, in the order of ``params``;
            leaves for JAX) forming each block, summing to their count; ``None``
            for the full Hessian. Cross-block entries are zero.
        columns_per_pass: Columns per vectorised pass in ``matmat``.
        process_group: PyTorch data parallelism: ``data`` is this process's
            shard and products are those of all processes' data, summed with
            ``all_reduce``. ``None``: the default group when
            ``torch.distributed`` is initialised, else this process alone;
            ``"local"``: this process's data only; or a ``ProcessGroup``.
        sharding: JAX data parallelism: a ``NamedSharding`` whose spec
            splits axis 0 of every batch over a device mesh, e.g.
            ``NamedSharding(mesh, PartitionSpec("batch"))``.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import HessianLinearOperator
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> loss_func, params = torch.nn.MSELoss(), list(model.parameters())
        >>> H = HessianLinearOperator(model, loss_func, params, [(X, y)])
        >>> H.shape
        (4, 4)
        >>> bool(np.allclose(H @ np.eye(4), (H @ np.eye(4)).T))
        True
    """

    is_symmetric = True
    _params_in = _params_out = True
    _vector_products = True

    def __init__(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        block_sizes: Any = None,
        check_deterministic: bool = True,
        **options: Any,
    ):
        self._block_ranges: tuple[tuple[int, int], ...] | None = None
        super().__init__(model_func, loss_func, params, data, check_deterministic=False, **options)
        if block_sizes is not None:
            self._block_ranges = _block_ranges(block_sizes, self.backend.param_shapes)
        if check_deterministic:  # (after the blocks are known: it multiplies)
            self._check_deterministic()

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any) -> Any:
        if self._block_ranges is not None:
            return weight * self._block_diagonal_matmat(primals, X, y, V)
        b, loss, model = self.backend, self._loss, self.backend.model_fn

        def batch_loss(p: Any) -> Any:
            return loss.value(b, model(p, X), y)

        def one(v: Any) -> Any:
            return b.flatten(b.hvp(batch_loss, primals, b.unflatten(v)))

        if V.ndim == 1 or V.shape[1] == 1:  # no vmap: the backend's fastest single product
            return weight * map_columns(b, one, V)
        hvp = b.hvp_fn(batch_loss, primals)  # linearised once for all columns

        def column(v: Any) -> Any:
            return b.flatten(hvp(b.unflatten(v)))

        return weight * map_columns(b, column, V)

    # --- kept linearization: the gradient's graph (JAX: its jax.linearize) -------
    def _linearizable(self) -> bool:
        return self._block_ranges is None  # the blocks differentiate their own losses

    def _batch_linearize(self, primals: Any, X: Any, y: Any, weight: Any) -> Any:
        b, loss, model = self.backend, self._loss, self.backend.model_fn
        return b.linearize_gradient(lambda p: loss.value(b, model(p, X), y), primals), weight

    def _linearized_matmat(self, state: Any, V: Any) -> Any:
        b, (lin, weight) = self.backend, state

        def column(v: Any) -> Any:
            return b.linear_hvp(lin, v)

        return weight * map_columns(b, column, V)

    def _block_diagonal_matmat(self, primals: Any, X: Any, y: Any, V: Any) -> Any:
        """``diag(H_11, H_22, ...) V``: per block, Hessian products in its parameters only."""
        b, loss, model = self.backend, self._loss, self.backend.model_fn
        flat = b.flatten(primals)
        products = []
        for start, stop in self._block_ranges:

            def block_loss(u: Any, start: int = start, stop: int = stop) -> Any:
                params = b.unflatten(b.concat([flat[:start], u, flat[stop:]]))
                return loss.value(b, model(params, X), y)

            hvp = b.hvp_fn(block_loss, flat[start:stop])
            products.append(map_columns(b, hvp, V[start:stop]))
        return b.concat(products, axis=0)


def _block_ranges(block_sizes: Any, param_shapes: Any) -> tuple[tuple[int, int], ...]:
    """Rows ``(start, stop)`` of each block of consecutive parameters."""
    if not isinstance(block_sizes, (list, tuple)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in block_sizes
    ):
        raise type_error("block_sizes", "a list of ints (parameters per block)", block_sizes)
    if any(s <= 0 for s in block_sizes) or sum(block_sizes) != len(param_shapes):
        raise value_error(
            "block_sizes",
            f"positive numbers of parameters summing to len(params) = {len(param_shapes)}",
            repr(list(block_sizes)),
            f"E.g. [{len(param_shapes)}] for the full Hessian, or [1] * {len(param_shapes)} "
            "for one block per parameter.",
        )
    sizes = [int(np.prod(shape, dtype=int)) for shape in param_shapes]
    bounds = np.cumsum([0, *sizes])[np.cumsum([0, *block_sizes])]
    return tuple((int(a), int(z)) for a, z in zip(bounds[:-1], bounds[1:]))
