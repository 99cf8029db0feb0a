"""Views of operators: submatrices, parameter subsets, block diagonals.

* :class:`SubmatrixLinearOperator` ``A[rows][:, cols]`` of any operator;
* :func:`restrict_params` turns ``(model_func, params)`` into a model of a
  subset of the parameters (the others held fixed), so that any curvature
  operator can be built for one layer at the cost of that layer only;
* :class:`BlockDiagonalLinearOperator` of square blocks, e.g. one curvature
  block per layer (:meth:`BlockDiagonalLinearOperator.from_param_groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._base import LinearOperator, _common_backend, _wrap
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops.backends import make_backend

__all__ = ["BlockDiagonalLinearOperator", "SubmatrixLinearOperator", "restrict_params"]


class SubmatrixLinearOperator(LinearOperator):
    r"""The submatrix :math:`A_{I,J}` of rows ``I`` and columns ``J`` of an operator.

    A product embeds ``x`` into the columns ``J`` (zeros elsewhere), multiplies
    with ``A`` and keeps the rows ``I``, all in ``A``'s array library: it costs
    one product with ``A``. To study the curvature of some parameters, a
    curvature operator built with :func:`restrict_params` is cheaper.

    Args:
        A: A square or rectangular operator (curvlinops or scipy), or a matrix.
        row_idxs: Distinct row indices ``I`` (a sequence or 1-d int array).
        col_idxs: Distinct column indices ``J``.

    Example:
        >>> import numpy as np
        >>> from curvlinops.submatrix import SubmatrixLinearOperator
        >>> A = np.arange(16.0).reshape(4, 4)
        >>> S = SubmatrixLinearOperator(A, [3, 0], [1, 2])
        >>> S @ np.eye(2)
        array([[13., 14.],
               [ 1.,  2.]])
    """

    def __init__(self, A: Any, row_idxs: Any, col_idxs: Any) -> None:
        if not isinstance(A, ScipyLinearOperator) and not hasattr(A, "shape"):
            raise type_error("A", "a linear operator or a matrix", A)
        self.A = _wrap(A)
        self.backend = _common_backend(self.A)
        self.row_idxs = _check_indices(row_idxs, self.A.shape[0], "row_idxs")
        self.col_idxs = _check_indices(col_idxs, self.A.shape[1], "col_idxs")
        self.is_symmetric = self.A.is_symmetric and np.array_equal(self.row_idxs, self.col_idxs)
        self._native_indices: dict = {}
        super().__init__(self.A.dtype, (len(self.row_idxs), len(self.col_idxs)))

    def _native(self, X: Any, adjoint: bool) -> Any:
        rows, cols = (self.col_idxs, self.row_idxs) if adjoint else (self.row_idxs, self.col_idxs)
        n_in = self.A.shape[0] if adjoint else self.A.shape[1]
        xp = array_api_compat.array_namespace(X)
        gather = self._indices(X, ("embed", adjoint), _embedding(cols, n_in))
        padded = xp.concat([X, xp.zeros_like(X[:1])], axis=0)
        full = xp.take(padded, gather, axis=0)
        return xp.take(
            self.A._native(full, adjoint), self._indices(X, ("keep", adjoint), rows), axis=0
        )

    def set_submatrix(self, row_idxs: Any, col_idxs: Any) -> None:
        """Select other rows and columns of ``A`` (curvlinops-for-pytorch 3.0.1's method).

        Raises:
            ValueError: Indices that are not distinct integers within ``A``'s shape.
        """
        rows = _check_indices(row_idxs, self.A.shape[0], "row_idxs")
        cols = _check_indices(col_idxs, self.A.shape[1], "col_idxs")
        self.row_idxs, self.col_idxs = rows, cols
        self.is_symmetric = self.A.is_symmetric and np.array_equal(rows, cols)
        self._native_indices = {}
        self.shape = (len(rows), len(cols))
        self.__dict__.pop("_in_shapes", None)
        self.__dict__.pop("_out_shapes", None)

    def _indices(self, X: Any, key: Any, idx: np.ndarray) -> Any:
        """``idx`` as an index array of ``X``'s library and device (cached)."""
        xp = array_api_compat.array_namespace(X)
        key = (key, xp.__name__, str(array_api_compat.device(X)))
        if key not in self._native_indices:
            self._native_indices[key] = xp.asarray(idx, device=array_api_compat.device(X))
        return self._native_indices[key]

    def diagonal(self) -> Any:
        """The diagonal, when ``A`` has a ``diagonal()`` and the rows are the columns."""
        if not np.array_equal(self.row_idxs, self.col_idxs) or not hasattr(self.A, "diagonal"):
            raise ValueError(
                "SubmatrixLinearOperator.diagonal: needs row_idxs == col_idxs and an operator A "
                f"with a diagonal() method; got {type(self.A).__name__}. Use todense() instead."
            )
        d = self.A.diagonal()
        xp = array_api_compat.array_namespace(d)
        return xp.take(d, xp.asarray(self.row_idxs, device=array_api_compat.device(d)), axis=0)


class BlockDiagonalLinearOperator(LinearOperator):
    r"""A block-diagonal matrix of square operators, :math:`\mathrm{diag}(A_1, \dots, A_B)`.

    Rows and columns are the blocks' in order. The blocks compute natively
    (one product each); they must share a framework and device.

    Args:
        blocks: Square operators (curvlinops or scipy) or matrices.

    Example:
        >>> import numpy as np
        >>> from curvlinops.submatrix import BlockDiagonalLinearOperator
        >>> B = BlockDiagonalLinearOperator([np.diag([1.0, 2.0]), 3.0 * np.eye(1)])
        >>> B @ np.ones(3)
        array([1., 2., 3.])
    """

    def __init__(self, blocks: Sequence[Any]) -> None:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
            raise type_error("blocks", "a non-empty list of square operators", blocks)
        self.blocks = [_wrap(_check_block(block, i)) for i, block in enumerate(blocks)]
        for i, block in enumerate(self.blocks):
            if block.shape[0] != block.shape[1]:
                raise shape_error(f"blocks[{i}]", "a square operator", block.shape)
        self.backend = _common_backend(*self.blocks)
        self.is_symmetric = all(block.is_symmetric for block in self.blocks)
        self._sizes = [block.shape[0] for block in self.blocks]
        n = sum(self._sizes)
        super().__init__(np.result_type(*(block.dtype for block in self.blocks)), (n, n))

    @classmethod
    def from_param_groups(
        cls,
        operator_class: Callable[..., Any],
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        groups: Sequence[Sequence[str]] | None = None,
        backend: str | None = None,
        **options: Any,
    ) -> BlockDiagonalLinearOperator:
        """One block per group of parameters, each built by ``operator_class``.

        Block ``i`` is ``operator_class`` (e.g. ``GGNLinearOperator``) of the
        parameters in ``groups[i]`` with the others held fixed; it costs what
        the operator of those parameters costs (see :func:`restrict_params`).

        Args:
            operator_class: A curvature operator class taking ``(model_func,
                loss_func, params, data, **options)``.
            model_func, loss_func, params, data: As for the operator.
            groups: Lists of parameter names (PyTorch: as in
                ``model.named_parameters()`` or the dict's keys; JAX: the
                ``jax.tree_util.keystr`` paths); default one group per
                parameter array.
            backend: ``"torch"``, ``"jax"`` or ``None``.
            **options: Passed to every block.

        Returns:
            The block-diagonal operator. When the groups, concatenated, are
            all parameters in the operators' order, its rows are in that order
            and products also take and return parameter structures.

        Example:
            >>> import numpy as np, torch
            >>> from curvlinops import GGNLinearOperator
            >>> from curvlinops.submatrix import BlockDiagonalLinearOperator
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)).double()
            >>> X, y = torch.randn(5, 3).double(), torch.randn(5, 2).double()
            >>> B = BlockDiagonalLinearOperator.from_param_groups(
            ...     GGNLinearOperator, model, torch.nn.MSELoss(), list(model.parameters()),
            ...     [(X, y)], groups=[["0.weight", "0.bias"], ["1.weight", "1.bias"]])
            >>> [block.shape for block in B.blocks]
            [(8, 8), (6, 6)]
        """
        b = make_backend(model_func, params, backend)
        names = list(b.param_names)
        groups = [[name] for name in names] if groups is None else _check_groups(groups, names)
        blocks = []
        for group in groups:
            sub_model, sub_params = restrict_params(model_func, params, group, backend=b.name)
            blocks.append(
                operator_class(sub_model, loss_func, sub_params, data, backend=b.name, **options)
            )
        op = cls(blocks)
        if [name for group in groups for name in group] == names:
            # rows in the operators' parameter order: parameter structures in and out
            op.backend, op._params_in, op._params_out = b, True, True
        return op

    def _native(self, X: Any, adjoint: bool) -> Any:
        xp = array_api_compat.array_namespace(X)
        results, start = [], 0
        for block, size in zip(self.blocks, self._sizes):
            results.append(block._native(X[start : start + size], adjoint))
            start += size
        return xp.concat(results, axis=0)

    def diagonal(self) -> Any:
        """The blocks' diagonals, concatenated (each block needs a ``diagonal()``)."""
        missing = [i for i, block in enumerate(self.blocks) if not hasattr(block, "diagonal")]
        if missing:
            raise ValueError(
                f"BlockDiagonalLinearOperator.diagonal: blocks {missing} have no diagonal() "
                "method. Use todense() instead, or blocks that know their diagonal."
            )
        diagonals = [block.diagonal() for block in self.blocks]
        return array_api_compat.array_namespace(*diagonals).concat(diagonals, axis=0)


def restrict_params(
    model_func: Any, params: Any, keep: Any, *, backend: str | None = None
) -> tuple[Any, Any]:
    """A model of some of the parameters, the others held at their values.

    Any curvature operator built from the result is the corresponding block
    of the full operator (its rows and columns for the kept parameters),
    computed by differentiating with respect to the kept parameters only.

    Args:
        model_func: The model (as for the operators).
        params: All parameters (as for the operators).
        keep: The names of the parameters to keep (PyTorch: as in
            ``model.named_parameters()``, or the dict's keys; JAX: the
            ``jax.tree_util.keystr`` paths such as ``"['dense']['w']"``), or a
            predicate ``name -> bool``.
        backend: ``"torch"``, ``"jax"`` or ``None`` to read it off ``params``.

    Returns:
        ``(sub_model_func, sub_params)``: ``sub_params`` is the list of the
        kept arrays in the operators' order, and ``sub_model_func(sub_params,
        X)`` evaluates the model with the other parameters fixed at their
        current values (detached from any autograd graph). (PyTorch operators
        also accept a list with a subset of ``model.parameters()`` directly.)

    Example:
        >>> import jax.numpy as jnp
        >>> from curvlinops.submatrix import restrict_params
        >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
        >>> model, sub = restrict_params(lambda p, x: x @ p["w"] + p["b"], params, ["['w']"])
        >>> [a.shape for a in sub], model(sub, jnp.ones((1, 2))).tolist()
        ([(2, 3)], [[2.0, 2.0, 2.0]])
    """
    b = make_backend(model_func, params, backend)
    names = list(b.param_names)
    selected = _select(keep, names)
    leaves = b.tree_flatten(params)[0]
    # the others enter as constants: the backend's (detached) values
    fixed, rebuild = b.tree_flatten(b.primals)

    def sub_model_func(sub_params: Any, X: Any) -> Any:
        full = list(fixed)
        for i, leaf in zip(selected, sub_params):
            full[i] = leaf
        return b.model_fn(rebuild(full), X)

    return sub_model_func, [leaves[i] for i in selected]


# --- helpers ----------------------------------------------------------------------
class IndexKindError(TypeError, ValueError):
    """Indices that are not integers: a ``TypeError``, and the ``ValueError`` of 3.0.1."""


def _check_indices(idxs: Any, n: int, argument: str) -> np.ndarray:
    try:
        array = np.asarray(idxs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise type_error(argument, "a sequence of int indices", idxs) from error
    if array.ndim != 1:
        raise shape_error(argument, "a 1-d sequence of indices", array.shape)
    if array.size and array.dtype.kind not in "iu":
        raise IndexKindError(str(type_error(argument, "int indices", array)))
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n):
        bad = array[(array < 0) | (array >= n)]
        raise value_error(argument, f"indices in [0, {n})", f"{bad[:5].tolist()}")
    if len(np.unique(array)) != len(array):
        raise value_error(argument, "distinct indices", "repeated indices")
    return array


def _embedding(idxs: np.ndarray, n: int) -> np.ndarray:
    """Gather map that places ``x[k]`` at ``idxs[k]`` and zero (row ``K``) elsewhere."""
    gather = np.full(n, len(idxs), dtype=np.int64)
    gather[idxs] = np.arange(len(idxs))
    return gather


def _check_block(block: Any, i: int) -> Any:
    if isinstance(block, ScipyLinearOperator) or hasattr(block, "shape"):
        return block
    raise type_error(f"blocks[{i}]", "a linear operator or a matrix", block)


def _select(keep: Any, names: list[str]) -> list[int]:
    if callable(keep):
        selected = [i for i, name in enumerate(names) if keep(name)]
    elif isinstance(keep, (list, tuple, set)) and all(isinstance(k, str) for k in keep):
        unknown = [k for k in keep if k not in names]
        if unknown:
            raise value_error("keep", f"parameter names among {names}", f"unknown {unknown}")
        selected = [i for i, name in enumerate(names) if name in set(keep)]
    else:
        raise type_error("keep", "a list of parameter names or a predicate name -> bool", keep)
    if not selected:
        raise value_error("keep", f"at least one of the parameters {names}", "no parameter")
    return selected


def _check_groups(groups: Any, names: list[str]) -> list[list[str]]:
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise type_error("groups", "a non-empty list of lists of parameter names", groups)
    checked = []
    for i, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence) or not group:
            raise type_error(f"groups[{i}]", "a non-empty list of parameter names", group)
        unknown = [name for name in group if name not in names]
        if unknown:
            raise value_error(f"groups[{i}]", f"parameter names among {names}", f"{unknown}")
        checked.append(sorted(group, key=names.index))
    flat = [name for group in checked for name in group]
    if len(set(flat)) != len(flat):
        raise value_error("groups", "each parameter in at most one group", "a repeated name")
    return checked
