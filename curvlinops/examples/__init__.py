r"""Small operators of curvlinops-for-pytorch 3.0.1's ``curvlinops.examples``.

:class:`TensorLinearOperator` (a matrix), :class:`OuterProductLinearOperator`
(:math:`\sum_i c_i a_i a_i^\top`) and :class:`IdentityLinearOperator` with 3.0.1's
signatures, as operators of this library: products take arrays of any
library and compute in the library of the matrix given (PyTorch for a
tensor). Products also take (and return) a list of one ``(n,)`` or
``(n, K)`` array, as 3.0.1's tensor lists. The top-level :class:`curvlinops.IdentityLinearOperator`
keeps its own signature. Dense references built with ``torch.func`` are in
:mod:`curvlinops.examples.functorch`. Importing this module imports no
framework.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from curvlinops import _base
from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error
from curvlinops._operand import Operand, _host_copy, as_operand
from curvlinops.backends._arrays import is_array

__all__ = ["IdentityLinearOperator", "OuterProductLinearOperator", "TensorLinearOperator"]


class _DenseOperator(LinearOperator):
    """An operator whose products are those of an :class:`Operand` (no backend)."""

    def __init__(self, operand: Operand, is_symmetric: bool) -> None:
        self._op = operand
        self.is_symmetric = is_symmetric
        super().__init__(operand.dtype, operand.shape)

    def _native(self, X: Any, adjoint: bool) -> Any:
        op = self._op
        native = op.native(X, "x")
        return op.export(op.rmatmat(native) if adjoint else op.matmat(native), X)

    @property
    def device(self) -> Any:
        """The device of the matrix (``torch.device`` for a tensor, ``"cpu"`` for numpy)."""
        return self._op.device

    @property
    def _library_operand(self) -> Operand:
        """The matrix's products in its own library (estimators return its arrays)."""
        return self._op


class TensorLinearOperator(_DenseOperator):
    r"""A matrix :math:`A` as an operator (its adjoint is :math:`A^\top`).

    Args:
        A: A 2-d array of any library (a ``torch.Tensor`` in 3.0.1).

    Example:
        >>> import numpy as np
        >>> from curvlinops.examples import TensorLinearOperator
        >>> A = TensorLinearOperator(np.array([[1.0, 2.0], [3.0, 4.0]]))
        >>> A @ np.ones(2)
        array([3., 7.])
    """

    def __init__(self, A: Any) -> None:
        if not is_array(A):
            raise type_error("A", "a 2-d array (torch.Tensor, numpy, jax)", A)
        if getattr(A, "ndim", 0) != 2:
            raise shape_error("A", "a 2-d array (a matrix)", tuple(A.shape))
        operand = as_operand(A, square=False)
        matrix = _host_copy(A, "A")
        symmetric = A.shape[0] == A.shape[1] and bool(np.allclose(matrix, matrix.T))
        super().__init__(operand, symmetric)


class OuterProductLinearOperator(_DenseOperator):
    r"""The low-rank matrix :math:`\sum_{i=1}^K c_i a_i a_i^\top`.

    Args:
        c: The coefficients :math:`c_i`, shape ``(K,)``.
        A: The vectors :math:`a_i` as columns, shape ``(D, K)``; same library as ``c``.

    Example:
        >>> import numpy as np
        >>> from curvlinops.examples import OuterProductLinearOperator
        >>> op = OuterProductLinearOperator(np.array([2.0]), np.array([[1.0], [1.0]]))
        >>> op @ np.array([1.0, 0.0])
        array([2., 2.])
    """

    def __init__(self, c: Any, A: Any) -> None:
        for name, value, ndim in (("c", c, 1), ("A", A, 2)):
            if not is_array(value):
                raise type_error(name, f"a {ndim}-d array", value)
            if value.ndim != ndim:
                raise shape_error(name, f"a {ndim}-d array", tuple(value.shape))
        if c.shape[0] != A.shape[1]:
            raise shape_error(
                "c", f"shape ({A.shape[1]},), one coefficient per column of A", c.shape
            )
        self._factor, self._coefficients = A, c
        D = A.shape[0]
        operand = as_operand(A, square=False)
        scaled = A * c[None, :]

        def matmat(X: Any) -> Any:
            # A diag(c) Aᵀ X, without forming the D x D matrix
            return scaled @ (operand.xp.matrix_transpose(A) @ X)

        product = Operand(
            A,
            shape=(D, D),
            dtype=operand.dtype,
            library=operand.library,
            xp=operand.xp,
            matmat=matmat,
            rmatmat=matmat,
            like=A,
        )
        super().__init__(product, True)


class IdentityLinearOperator(_base.IdentityLinearOperator):
    """The identity on a space of tensors, with 3.0.1's signature ``(shapes, device, dtype)``.

    Args:
        shape: The shapes of the tensors of the space, e.g. ``[(3, 2), (4,)]``
            (the identity is then ``10 x 10``).
        device: Reported by :attr:`device` (products keep the input's device).
        dtype: A ``torch.dtype`` (or numpy dtype) of the operator.

    Example:
        >>> import numpy as np
        >>> from curvlinops.examples import IdentityLinearOperator
        >>> eye = IdentityLinearOperator([(2,), (1,)], "cpu", np.float64)
        >>> eye @ np.arange(3.0)
        array([0., 1., 2.])
    """

    def __init__(self, shape: Any, device: Any, dtype: Any) -> None:
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) for s in shape
        ):
            raise type_error("shape", "a list of shapes, e.g. [(3, 2), (4,)]", shape)
        size = sum(int(np.prod(s, dtype=int)) for s in shape)
        super().__init__(size, _numpy_dtype(dtype))
        self._device = device
        self._in_shape = self._out_shape = shape  # lists of tensors of these shapes

    @property
    def device(self) -> Any:
        """The device given at construction."""
        return self._device


def _numpy_dtype(dtype: Any) -> np.dtype:
    """A torch, JAX or numpy dtype as a numpy dtype (``torch.float32`` -> ``float32``)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        name = str(dtype).rsplit(".", 1)[-1]
        try:
            return np.dtype(name)
        except TypeError as error:
            raise type_error("dtype", "a floating dtype (torch, numpy or JAX)", dtype) from error
