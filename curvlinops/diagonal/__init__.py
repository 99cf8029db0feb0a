r"""Diagonal operators: a given diagonal, and the GGN's diagonal.

The GGN's diagonal is computed without forming the GGN: with a square root
:math:`\nabla_z^2 \ell_n = S_n S_n^\top` of each example's output Hessian,

.. math::
    \mathrm{diag}(G) = \sum_n \sum_j \big(J_n^\top s_{nj}\big)^{\odot 2},

one VJP per example and column of :math:`S_n` (``C`` columns for ``C``
outputs per example; ``k`` sampled columns for the Monte-Carlo estimate),
vectorised over examples and columns.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat
import numpy as np

from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops.backends import make_backend
from curvlinops.backends._arrays import is_array, library_of
from curvlinops.fisher import (
    DEFAULT_SEED,
    _GradientMomentOperator,
    _per_example_diagonal,
    check_mc_samples,
    check_seed,
    draw_noise,
)

__all__ = ["DiagonalLinearOperator", "GGNDiagonalLinearOperator", "exact_ggn_diagonal"]


class _DiagonalProducts:
    """Products, diagonal and inverse of an operator that is a diagonal matrix."""

    backend: Any
    _vector_products = False  # a GGN diagonal must not take the Fisher's vector path

    def _diagonal_native(self) -> Any:
        raise NotImplementedError

    def _native(self, X: Any, adjoint: bool) -> Any:
        d = self._diagonal_native()
        if self.backend is None:
            d = _in_library_of(X, d)
        return d[:, None] * X

    def diagonal(self) -> Any:
        """The diagonal, a ``(n,)`` array of the operator's library (a copy)."""
        return self._diagonal_native() * 1.0  # a new array

    def inverse(self, damping: float = 0.0) -> DiagonalLinearOperator:
        r"""The inverse of this operator plus damping, :math:`(D + \lambda I)^{-1}`.

        Args:
            damping: :math:`\lambda \geq 0`, added to every diagonal entry.

        Returns:
            A :class:`DiagonalLinearOperator` of the same library and shape.

        Raises:
            ValueError: If an entry of :math:`D + \lambda I` is zero.
        """
        damping = _check_damping(damping)
        d = self._diagonal_native() + damping
        xp = array_api_compat.array_namespace(d)
        zeros = int(xp.sum(xp.astype(d == 0, xp.int32)))
        if zeros:
            raise value_error(
                "damping",
                "a value that makes every diagonal entry non-zero",
                f"{damping!r}, which leaves {zeros} of {d.shape[0]} entries zero",
                "Pass damping > 0.",
            )
        return DiagonalLinearOperator(1.0 / d, like=self)


class DiagonalLinearOperator(_DiagonalProducts, LinearOperator):
    r"""A diagonal matrix, :math:`D = \mathrm{diag}(d)`.

    The products use the diagonal's library: a PyTorch or JAX ``d`` makes an
    operator of that framework (products take and return any library, like
    the curvature operators); a numpy ``d`` makes a framework-free operator
    that computes in the library of each product's argument.

    Args:
        diagonal: The entries :math:`d`, a 1-d real array.
        like: Optional operator of the same size whose framework, device and
            parameter structure to take (then products also accept and return
            lists/pytrees of parameter-shaped arrays).

    Example:
        >>> import numpy as np
        >>> from curvlinops.diagonal import DiagonalLinearOperator
        >>> D = DiagonalLinearOperator(np.array([1.0, 2.0, 4.0]))
        >>> D @ np.ones(3)
        array([1., 2., 4.])
        >>> D.inverse(damping=1.0) @ np.ones(3)
        array([0.5       , 0.33333333, 0.2       ])
    """

    is_symmetric = True

    def __init__(self, diagonal: Any, *, like: Any = None) -> None:
        _check_diagonal(diagonal)
        if like is not None:
            if not isinstance(like, LinearOperator):
                raise type_error("like", "a curvlinops LinearOperator or None", like)
            if like.shape != (diagonal.shape[0], diagonal.shape[0]):
                raise shape_error(
                    "diagonal",
                    f"{like.shape[0]} entries to match like's shape {like.shape}",
                    tuple(diagonal.shape),
                )
            self.backend = like.backend
            self._params_in = self._params_out = like._params_in and like._params_out
        elif library_of(diagonal) in ("torch", "jax"):
            params = diagonal if library_of(diagonal) == "jax" else [diagonal]
            self.backend = make_backend(_no_model, params)
        if self.backend is None:
            self._diag = diagonal if library_of(diagonal) != "numpy" else _float(diagonal)
        else:
            self._diag = self.backend.import_array(diagonal, "diagonal")[0]
        dtype = self.backend.dtype if self.backend is not None else _numpy_dtype(self._diag)
        super().__init__(dtype, (diagonal.shape[0], diagonal.shape[0]))

    def _diagonal_native(self) -> Any:
        return self._diag


class GGNDiagonalLinearOperator(_DiagonalProducts, _GradientMomentOperator):
    r"""Diagonal of the GGN (exact, or a Monte-Carlo estimate), as an operator.

    .. math::
        \mathrm{diag}(G) = \sum_b w_b \sum_{n \in b} \sum_j
        \big(J_n^\top s_{nj}\big)^{\odot 2},
        \qquad \sum_j s_{nj} s_{nj}^\top = \nabla_z^2 \ell_n,

    with the closed-form square roots :math:`\sqrt{2}\, e_j` (MSE),
    :math:`\sqrt{p_c}\,(e_c - p)` per position (cross-entropy) and
    :math:`\sqrt{\sigma(1-\sigma)}\, e_j` (BCE), normalised like
    :class:`~curvlinops.GGNLinearOperator`. With ``mc_samples=k`` the columns
    are ``k`` sampled output gradients per term instead, and the result is the
    exact diagonal of :class:`~curvlinops.fisher.FisherMCLinearOperator` with
    the same ``mc_samples`` and ``seed``.

    The diagonal is computed once, at construction: per batch one VJP per
    example and column (``C`` columns for ``C`` outputs per example, ``k``
    for the estimate), vectorised over examples in chunks of
    ``examples_per_pass``; memory ``examples_per_pass x columns x P``.

    Args:
        model_func, loss_func, params, data: As for
            :class:`~curvlinops.GGNLinearOperator`; the exact diagonal needs
            MSE, cross-entropy or BCE-with-logits.
        mc_samples: ``None`` for the exact diagonal, or the number of samples.
        seed: Seed of the samples (used with ``mc_samples``).
        examples_per_pass: Examples per vectorised pass (default: as many as
            keep a pass under 2**25 numbers).
        **options: ``progressbar``, ``check_deterministic``, ``num_data``,
            ``batch_size_fn``, ``backend``.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import GGNLinearOperator
        >>> from curvlinops.diagonal import GGNDiagonalLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> args = (model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
        >>> D = GGNDiagonalLinearOperator(*args)
        >>> G = GGNLinearOperator(*args) @ np.eye(8)
        >>> bool(np.allclose(D.diagonal().numpy(), np.diag(G)))
        True
    """

    def __init__(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        mc_samples: int | None = None,
        seed: int = DEFAULT_SEED,
        examples_per_pass: int | None = None,
        **options: Any,
    ) -> None:
        self.mc_samples = None if mc_samples is None else check_mc_samples(mc_samples)
        self.seed = check_seed(seed)
        self.examples_per_pass = _check_positive_int_or_none(examples_per_pass)
        self._diag: Any = None
        super().__init__(model_func, loss_func, params, data, **options)
        self._diagonal_native()

    def _noise(self, index: int, X: Any) -> Any:
        return None if self.mc_samples is None else draw_noise(self, index, X)

    def _gradients(self, z: Any, y: Any, noise: Any) -> Any:
        return self._loss.sampled_gradient(self.backend, z, noise)

    def _diagonal_columns(self, primals: Any, X: Any, y: Any, noise: Any) -> Any:
        if self.mc_samples is not None:
            return super()._diagonal_columns(primals, X, y, noise)
        return _exact_columns(self.backend, self._loss, primals, X, y)

    def _columns_per_example(self, shape: tuple[int, ...]) -> int:
        if self.mc_samples is not None:
            return super()._columns_per_example(shape)
        return math.prod(shape[1:])

    def _diagonal_native(self) -> Any:
        if self._diag is None:
            self._diag = _per_example_diagonal(self)
        return self._diag


def exact_ggn_diagonal(op: Any) -> Any:
    """The exact GGN diagonal of a curvature operator's model, loss and data.

    Used by :meth:`curvlinops.GGNLinearOperator.diagonal`; see
    :class:`GGNDiagonalLinearOperator` for the method.
    """
    if "_exact_diagonal" not in op.__dict__:  # keeps the compiled functions with op
        op._exact_diagonal = _ExactColumns(op)
    return _per_example_diagonal(op._exact_diagonal)


class _ExactColumns:
    """A view of a curvature operator that supplies the exact square-root columns."""

    examples_per_pass = None

    def __init__(self, op: Any) -> None:
        self.op = op
        self.backend, self.num_params, self._comm = op.backend, op.num_params, op._comm
        self._shapes: dict[int, tuple[int, ...]] = {}
        self._batches, self._weight = op._batches, op._weight

    def _noise(self, index: int, X: Any) -> None:
        return None

    def _output_shape(self, index: int, X: Any) -> tuple[int, ...]:
        if index not in self._shapes:
            b = self.backend
            self._shapes[index] = tuple(b.model_fn(b.primals, X).shape)
        return self._shapes[index]

    def _columns_per_example(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape[1:])

    def _diagonal_columns(self, primals: Any, X: Any, y: Any, noise: Any) -> Any:
        return _exact_columns(self.backend, self.op._loss, primals, X, y)


def _exact_columns(b: Any, loss: Any, primals: Any, X: Any, y: Any) -> Any:
    z = b.model_fn(primals, X)
    return math.sqrt(loss.normalization(z)) * loss.hessian_sqrt_columns(b, z, y)


# --- helpers ------------------------------------------------------------------------
def _no_model(params: Any, X: Any) -> Any:
    raise NotImplementedError("a DiagonalLinearOperator has no model")


def _check_diagonal(diagonal: Any) -> None:
    if not is_array(diagonal):
        raise type_error("diagonal", "a 1-d array (numpy, torch or jax)", diagonal)
    if len(diagonal.shape) != 1:
        raise shape_error("diagonal", "a 1-d array (n,)", tuple(diagonal.shape))
    kind = _numpy_dtype(diagonal).kind
    if kind not in "fiub":
        raise type_error("diagonal", "a real array", diagonal)


def _numpy_dtype(x: Any) -> np.dtype:
    try:
        return np.dtype(x.dtype)
    except TypeError:
        return np.dtype(str(x.dtype).rsplit(".", 1)[-1])


def _float(diagonal: np.ndarray) -> np.ndarray:
    return diagonal if diagonal.dtype.kind == "f" else diagonal.astype(np.float64)


def _in_library_of(X: Any, d: Any) -> Any:
    """``d`` as an array of ``X``'s library and device (framework-free operators)."""
    if library_of(X) == library_of(d):
        return d
    xp = array_api_compat.array_namespace(X)
    return xp.asarray(np.asarray(d), device=array_api_compat.device(X))


def _check_damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise type_error("damping", "a non-negative real number", damping)
    if not damping >= 0:
        raise value_error("damping", "a non-negative real number", repr(damping))
    return float(damping)


def _check_positive_int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise type_error("examples_per_pass", "a positive int or None", value)
    if value <= 0:
        raise value_error("examples_per_pass", "a positive int or None", str(value))
    return int(value)
