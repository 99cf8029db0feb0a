r"""Sensitivity of a trained model: response Jacobians and influence functions.

For weights that minimise an objective, :math:`w_\star(\theta) = \arg\min_w
\mathcal{J}(w; \theta)`, the implicit function theorem gives the *response
Jacobian*

.. math::
    J_{w_\star\theta} = \frac{d w_\star}{d\theta}
    = -\big[\nabla^2_{w} \mathcal{J}\big]^{-1} \nabla^2_{w\theta} \mathcal{J},

(:class:`ResponseJacobianLinearOperator`), and the first-order effect of
up-weighting one training point on the loss at a test point, the *influence*
(Koh and Liang, 2017)

.. math::
    \mathcal{I}(z_{\mathrm{test}}, z_i)
    = -\nabla_w \ell(z_{\mathrm{test}})^\top H^{-1} \nabla_w \ell(z_i)

(:func:`influence_on_test_loss`). Neither forms :math:`H^{-1}`: solves go
through :class:`~curvlinops.inverse.CGInverseLinearOperator`, batched over
columns, and mixed second derivatives are JVPs (VJPs for the adjoint) of the
gradient with respect to the hyperparameters. Given a
:class:`~curvlinops.KFACLinearOperator` or
:class:`~curvlinops.EKFACLinearOperator` as the curvature, both invert it from
its Kronecker factors instead (EK-FAC influence, Grosse et al. 2023); given an
operator that already is an inverse, they apply it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops._curvature import (
    DEFAULT_COLUMNS_PER_PASS,
    _check_data,
    _split_batch,
    check_batch,
    model_outputs,
)
from curvlinops._operand import check_int, check_real
from curvlinops.backends import Backend, make_backend
from curvlinops.inverse import CGInverseLinearOperator, _InverseBase
from curvlinops.kfac import KFACInverseLinearOperator, KFACLinearOperator

__all__ = ["ResponseJacobianLinearOperator", "influence_on_test_loss"]

DEFAULT_EXAMPLES_PER_PASS = 64
"""Per-example gradients computed together by ``vmap`` (bounds memory at ``P × 64``)."""


# --- response Jacobian ----------------------------------------------------------------
class ResponseJacobianLinearOperator(LinearOperator):
    r"""The response Jacobian of the optimum with respect to hyperparameters.

    .. math::
        J = \frac{d w_\star}{d \theta}
        = -\big(\nabla^2_{w} \mathcal{J} + \lambda I\big)^{-1}
          \nabla^2_{w\theta} \mathcal{J} \in \mathbb{R}^{P \times Q},
        \qquad \mathcal{J}(w; \theta) = \sum_b \mathrm{objective}(w, \theta, X_b, y_b),

    evaluated at the given weights (which should minimise :math:`\mathcal{J}`
    for the given hyperparameters). ``J @ v`` is one JVP of
    :math:`\nabla_w \mathcal{J}` in :math:`\theta` per batch and one CG solve;
    ``J.T @ u`` (the hypergradient of a validation loss with gradient
    :math:`u`) is one solve and one VJP per batch. Columns are batched.

    Args:
        objective: ``(params, hyperparams, X, y) -> scalar`` (or
            ``(params, hyperparams) -> scalar`` when ``data`` is ``None``) in
            the framework of ``params``. Its sum over batches is
            :math:`\mathcal{J}`: scale terms that do not depend on the data
            (regularisers) so that they add up to the intended objective.
        params: The optimal weights :math:`w_\star` (PyTorch list/dict of
            tensors, or a JAX pytree).
        hyperparams: :math:`\theta`, in the same framework (e.g.
            ``[torch.tensor(0.1)]``, or a JAX array). The columns of ``J``
            follow their flattening order.
        data: A re-iterable of ``(X, y)`` batches, or ``None``.
        hessian: An operator for :math:`\nabla^2_w \mathcal{J}` (e.g. a GGN
            plus the regulariser), solved by CG; a
            :class:`~curvlinops.KFACLinearOperator` or
            :class:`~curvlinops.EKFACLinearOperator` :math:`K` (e.g. of the
            data term, with the L2 strength as ``damping``), inverted from its
            factors as :math:`(K + \lambda I)^{-1}`; or an inverse operator
            (:class:`~curvlinops.KFACInverseLinearOperator`,
            :class:`~curvlinops.CGInverseLinearOperator`,
            :class:`~curvlinops.NeumannInverseLinearOperator`), applied as it
            is. Default: Hessian-vector products of ``objective``.
        damping: :math:`\lambda \ge 0`, added for the solves (not with an
            inverse operator, which holds its own damping).
        tol: Relative residual tolerance of CG (default: square root of the
            dtype's machine epsilon; CG only).
        maxiter: CG iterations at most (default ``10 P``; CG only).
        backend: ``"torch"``, ``"jax"`` or ``None`` to read it off ``params``.
        columns_per_pass: Columns per vectorised pass.

    Attributes:
        hessian: The operator :math:`\nabla^2_w \mathcal{J}` (``P × P``).
        mixed: The operator :math:`\nabla^2_{w\theta} \mathcal{J}` (``P × Q``).
        inverse: The operator that applies :math:`(\nabla^2_w \mathcal{J} +
            \lambda I)^{-1}`: a :class:`~curvlinops.inverse.CGInverseLinearOperator`
            (its ``info`` reports the last solve), a
            :class:`~curvlinops.KFACInverseLinearOperator`, or the inverse given.

    Example:
        >>> import torch
        >>> from curvlinops.influence import ResponseJacobianLinearOperator
        >>> def objective(w, theta):  # minimised by w = theta / 2
        ...     return ((w[0] - theta[0]) ** 2).sum() + (w[0] ** 2).sum()
        >>> theta = [torch.tensor([1.0, 2.0], dtype=torch.float64)]
        >>> J = ResponseJacobianLinearOperator(objective, [theta[0] / 2], theta)
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> torch.allclose(J @ eye, 0.5 * eye)  # dw/dθ = I / 2
        True
    """

    _params_out = True

    def __init__(
        self,
        objective: Callable[..., Any],
        params: Any,
        hyperparams: Any,
        data: Iterable | None = None,
        *,
        hessian: Any = None,
        damping: float = 0.0,
        tol: float | None = None,
        maxiter: int | None = None,
        backend: str | None = None,
        columns_per_pass: int = DEFAULT_COLUMNS_PER_PASS,
    ) -> None:
        problem = _Objective(objective, params, hyperparams, data, backend)
        columns = check_int(columns_per_pass, "columns_per_pass")
        self.backend = problem.b
        P, Q = problem.num_params, problem.num_hyperparams
        self.hessian = (
            _ObjectiveHessian(problem, columns)
            if hessian is None
            else _check_hessian(hessian, P, problem.b)
        )
        self.mixed = _MixedSecondDerivative(problem, columns)
        self.inverse = _damped_inverse(self.hessian, problem.b, damping, tol, maxiter)
        super().__init__(problem.b.dtype, (P, Q))

    def _native(self, X: Any, adjoint: bool) -> Any:
        if adjoint:
            return -self.mixed._native(self.inverse._native(X, False), True)
        return -self.inverse._native(self.mixed._native(X, False), False)


class _Objective:
    """``objective`` summed over batches, with its derivatives as pure per-batch functions."""

    def __init__(
        self, objective: Any, params: Any, hyperparams: Any, data: Any, backend: str | None
    ) -> None:
        if not callable(objective):
            raise type_error(
                "objective", "a callable (params, hyperparams, X, y) -> scalar", objective
            )
        self.fn = objective
        self.b = make_backend(objective, params, backend)
        if isinstance(hyperparams, (int, float, complex)) or hyperparams is None:
            raise type_error(
                "hyperparams",
                f"arrays of the params' framework ({self.b.name})",
                hyperparams,
                "Wrap the number, e.g. [torch.tensor(0.1, dtype=...)] or jnp.asarray(0.1).",
            )
        self.hb = make_backend(objective, hyperparams, self.b.name)
        if self.hb.dtype != self.b.dtype:
            raise value_error(
                "hyperparams",
                f"the dtype of params ({self.b.dtype})",
                str(self.hb.dtype),
                "Cast the hyperparameters like the weights.",
            )
        self.data = None if data is None else _check_data(data)
        self.num_params = _size(self.b)
        self.num_hyperparams = _size(self.hb)
        self._params_like = _user_structure(self.b, params)
        self._hyper_like = _user_structure(self.hb, hyperparams)
        self._check_scalar()

    def _check_scalar(self) -> None:
        """One evaluation on the first batch: the objective must be a scalar."""
        batch = next(self.batches(), ())
        value = self.value(self.b.primals, self.hb.primals, batch)
        shape = tuple(getattr(value, "shape", ()))
        if shape:
            raise value_error(
                "objective",
                "a scalar value (the objective summed over its terms)",
                f"an array of shape {shape}",
                "Reduce it, e.g. return loss.sum() or loss.mean().",
            )

    def batches(self) -> Iterator[tuple[Any, ...]]:
        """The native arguments after ``(params, hyperparams)``, one tuple per batch."""
        if self.data is None:
            yield ()
            return
        for index, batch in enumerate(self.data):
            X, y = _split_batch(batch, index)
            yield (
                self.b.import_batch(X, index),
                None if y is None else self.b.import_batch(y, index),
            )

    def value(self, w: Any, theta: Any, batch: tuple) -> Any:
        return self.fn(self._params_like(w), self._hyper_like(theta), *batch)

    def gradient(self, w: Any, theta: Any, batch: tuple) -> Any:
        r"""Flat :math:`\nabla_w` of the batch objective."""
        b = self.b
        value, pullback = b.vjp(lambda p: self.value(p, theta, batch), w)
        return b.flatten(pullback(b.xp.ones_like(value)))


class _ObjectiveOperator(LinearOperator):
    """Second derivatives of an :class:`_Objective`, accumulated over its batches."""

    def __init__(self, problem: _Objective, columns_per_pass: int, shape: tuple) -> None:
        self.problem, self.columns_per_pass = problem, columns_per_pass
        self.backend = problem.b
        self._forward = problem.b.compile(self._batch_matmat)
        self._backward = None if self.is_symmetric else problem.b.compile(self._batch_rmatmat)
        super().__init__(problem.b.dtype, shape)

    def _batch_matmat(self, w: Any, theta: Any, batch: tuple, V: Any) -> Any:
        raise NotImplementedError

    def _batch_rmatmat(self, w: Any, theta: Any, batch: tuple, U: Any) -> Any:
        raise NotImplementedError

    def _native(self, X: Any, adjoint: bool) -> Any:
        size = self.columns_per_pass
        if X.shape[1] == 0:
            return self.backend.zeros((self.shape[1] if adjoint else self.shape[0], 0))
        blocks = [self._accumulate(X[:, s : s + size], adjoint) for s in range(0, X.shape[1], size)]
        return blocks[0] if len(blocks) == 1 else self.backend.concat(blocks, axis=1)

    def _accumulate(self, V: Any, adjoint: bool) -> Any:
        product = self._backward if adjoint else self._forward
        w, theta = self.problem.b.primals, self.problem.hb.primals
        total = None
        for batch in self.problem.batches():
            term = product(w, theta, batch, V)
            total = term if total is None else total + term
        if total is None:
            raise value_error("data", "at least one batch (X, y)", "an empty iterable")
        return total


class _ObjectiveHessian(_ObjectiveOperator):
    r""":math:`\nabla^2_w \mathcal{J}` by Hessian-vector products (``P × P``)."""

    is_symmetric = True
    _params_in = _params_out = True

    def __init__(self, problem: _Objective, columns_per_pass: int) -> None:
        P = problem.num_params
        super().__init__(problem, columns_per_pass, (P, P))

    def _batch_matmat(self, w: Any, theta: Any, batch: tuple, V: Any) -> Any:
        b, problem = self.problem.b, self.problem
        hvp = b.hvp_fn(lambda p: problem.value(p, theta, batch), w)
        return b.vmap(lambda v: b.flatten(hvp(b.unflatten(v))), in_axes=1, out_axes=1)(V)


class _MixedSecondDerivative(_ObjectiveOperator):
    r""":math:`\nabla^2_{w\theta} \mathcal{J}` (``P × Q``): JVPs, and VJPs for the adjoint."""

    _params_out = True

    def __init__(self, problem: _Objective, columns_per_pass: int) -> None:
        shape = (problem.num_params, problem.num_hyperparams)
        super().__init__(problem, columns_per_pass, shape)

    def _batch_matmat(self, w: Any, theta: Any, batch: tuple, V: Any) -> Any:
        hb, problem = self.problem.hb, self.problem

        def column(v: Any) -> Any:
            gradient = lambda t: problem.gradient(w, t, batch)  # noqa: E731
            return hb.jvp(gradient, (theta,), (hb.unflatten(v),))[1]

        return hb.vmap(column, in_axes=1, out_axes=1)(V)

    def _batch_rmatmat(self, w: Any, theta: Any, batch: tuple, U: Any) -> Any:
        hb, problem = self.problem.hb, self.problem
        _, pullback = hb.vjp(lambda t: problem.gradient(w, t, batch), theta)
        return hb.vmap(lambda u: hb.flatten(pullback(u)), in_axes=1, out_axes=1)(U)


# --- influence functions ----------------------------------------------------------------
def influence_on_test_loss(
    hessian: Any,
    model_func: Any,
    loss_func: Any,
    params: Any,
    train_data: Iterable,
    test_data: tuple[Any, Any],
    *,
    damping: float = 0.0,
    tol: float | None = None,
    maxiter: int | None = None,
    examples_per_pass: int = DEFAULT_EXAMPLES_PER_PASS,
    backend: str | None = None,
) -> Any:
    r"""Influence of every training point on the loss at every test point.

    .. math::
        \mathcal{I}_{ti} = -\nabla_w \ell(z_t)^\top \,(H + \lambda I)^{-1}\,
        \nabla_w \ell(z_i),

    with :math:`\ell(z)` the loss of one example (``loss_func`` on a batch of
    one) and :math:`H` the Hessian of the training objective at its minimum.
    :math:`\mathcal{I}_{ti}` is the derivative of the test loss with respect
    to the weight :math:`\epsilon` of point :math:`i` in the objective
    :math:`\ldots + \epsilon\,\ell(z_i)`. Removing point :math:`i` from an
    objective :math:`\frac{1}{N}\sum_i \ell(z_i) + R(w)` is
    :math:`\epsilon = -1/N`, so the loss at test point :math:`t` changes by about
    :math:`-\mathcal{I}_{ti}/N` (by :math:`-\mathcal{I}_{ti}` for a summed
    objective).

    Cost: one CG solve with the test gradients as columns, then per-example
    training gradients by ``vmap``, ``examples_per_pass`` at a time; neither
    :math:`H^{-1}` nor an ``N × P`` matrix is formed.

    **EK-FAC influence** (Grosse et al. 2023, as in kronfluence): pass a
    :class:`~curvlinops.EKFACLinearOperator` (or a
    :class:`~curvlinops.KFACLinearOperator`) :math:`K` as ``hessian``; then
    :math:`(K + \lambda I)^{-1}` is applied from its factors' eigenbases
    (``KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)``)
    instead of a CG solve. An inverse built beforehand (e.g. a
    :class:`~curvlinops.KFACInverseLinearOperator` with heuristic damping) is
    applied as it is.

    Args:
        hessian: The training objective's Hessian (``P × P``), solved by
            CG: e.g. ``HessianLinearOperator(...) + lam * IdentityLinearOperator(...)``,
            or a GGN for a positive definite approximation. Or a
            :class:`~curvlinops.KFACLinearOperator` /
            :class:`~curvlinops.EKFACLinearOperator`, inverted from its
            factors; or an inverse operator
            (:class:`~curvlinops.KFACInverseLinearOperator`,
            :class:`~curvlinops.CGInverseLinearOperator`,
            :class:`~curvlinops.NeumannInverseLinearOperator`), used as
            :math:`(H + \lambda I)^{-1}` as it is.
        model_func, loss_func, params: As for :class:`~curvlinops.HessianLinearOperator`;
            ``params`` are the trained weights.
        train_data: A re-iterable of ``(X, y)`` batches; the columns of the
            result follow its order.
        test_data: One batch ``(X_test, y_test)``; rows of the result.
        damping: :math:`\lambda \ge 0`, added for the solve (not with an
            inverse operator, which holds its own damping).
        tol: Relative residual tolerance of CG (default: square root of the
            dtype's machine epsilon; CG only).
        maxiter: CG iterations at most (default ``10 P``; CG only).
        examples_per_pass: Training examples per vectorised gradient pass.
        backend: ``"torch"``, ``"jax"`` or ``None`` to read it off ``params``.

    Returns:
        :math:`\mathcal{I}`, a native ``(T, N)`` array for ``T`` test and
        ``N`` training points.

    Example:
        >>> import torch
        >>> from curvlinops import HessianLinearOperator, IdentityLinearOperator
        >>> from curvlinops.influence import influence_on_test_loss
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
        >>> loss, params = torch.nn.MSELoss(), list(model.parameters())
        >>> H = HessianLinearOperator(model, loss, params, [(X, y)])
        >>> H = H + 0.1 * IdentityLinearOperator(H)
        >>> influence_on_test_loss(H, model, loss, params, [(X, y)], (X[:2], y[:2])).shape
        torch.Size([2, 10])
    """
    b = make_backend(model_func, params, backend)
    hessian = _check_hessian(hessian, _size(b), b)
    loss = b.loss(loss_func)
    per_example = _PerExampleGradients(b, loss, examples_per_pass)
    inverse = _damped_inverse(hessian, b, damping, tol, maxiter)
    batches = iter(_check_data(train_data))
    first = next(batches, None)
    if first is None:
        raise value_error("train_data", "at least one batch (X, y)", "an empty iterable")
    X, y = _imported(b, loss, first, 0, "train_data batch 0")
    like = f"like the training inputs of train_data batch 0 ({_shapes(b, X)})"
    X_test, y_test = _imported(b, loss, _check_test_data(test_data), 0, "test_data", like)
    S = inverse._native(per_example(X_test, y_test), False)  # (P, T): one batched solve
    blocks = [-(S.T @ per_example(X, y))]
    for index, batch in enumerate(batches, start=1):
        X, y = _imported(b, loss, batch, index, f"train_data batch {index}", like)
        blocks.append(-(S.T @ per_example(X, y)))
    return blocks[0] if len(blocks) == 1 else b.concat(blocks, axis=1)


def _imported(b: Backend, loss: Any, batch: Any, index: int, where: str, like: str = "") -> tuple:
    """A batch as native arrays, checked as the operators check theirs (naming ``where``)."""
    X, y = _split_batch(batch, index)
    X, y = b.import_batch(X, index), b.import_batch(y, index)
    check_batch(b, loss, where, X, y, model_outputs(b, b.primals, X, where, like))
    return X, y


def _shapes(b: Backend, X: Any) -> str:
    shapes = [tuple(leaf.shape) for leaf in b.tree_flatten(X)[0]]
    return f"shape {shapes[0]}" if len(shapes) == 1 else f"shapes {shapes}"


class _PerExampleGradients:
    r"""Columns :math:`\nabla_w \ell(z_n)` of a batch, by ``vmap`` over chunks of examples."""

    def __init__(self, b: Backend, loss: Any, examples_per_pass: int) -> None:
        self.b, self.loss = b, loss
        self.chunk = check_int(examples_per_pass, "examples_per_pass")
        self._compiled = b.compile(self._gradients)

    def _gradients(self, w: Any, X: Any, y: Any) -> Any:
        b, loss, model = self.b, self.loss, self.b.model_fn

        def example(x: Any, t: Any) -> Any:
            x1, t1 = _add_batch_axis(b, x), _add_batch_axis(b, t)
            value, pullback = b.vjp(lambda p: loss.value(b, model(p, x1), t1), w)
            return b.flatten(pullback(b.xp.ones_like(value)))

        return b.vmap(example, in_axes=(0, 0), out_axes=1)(X, y)

    def __call__(self, X: Any, y: Any) -> Any:
        n = _leading_size(self.b, X)
        chunks = [
            self._compiled(
                self.b.primals,
                _rows(self.b, X, s, s + self.chunk),
                _rows(self.b, y, s, s + self.chunk),
            )
            for s in range(0, n, self.chunk)
        ]
        return chunks[0] if len(chunks) == 1 else self.b.concat(chunks, axis=1)


# --- helpers ------------------------------------------------------------------------------
def _size(b: Backend) -> int:
    return sum(int(np.prod(s, dtype=int)) for s in b.param_shapes)


def _user_structure(b: Backend, like: Any) -> Callable[[Any], Any]:
    """Backend primals (tuple for PyTorch, the pytree for JAX) -> the user's structure."""
    _, rebuild = b.tree_flatten(like)
    return lambda primals: rebuild(list(b.tree_flatten(primals)[0]))


def _add_batch_axis(b: Backend, tree: Any) -> Any:
    leaves, rebuild = b.tree_flatten(tree)
    return rebuild([leaf[None] for leaf in leaves])


def _rows(b: Backend, tree: Any, start: int, stop: int) -> Any:
    leaves, rebuild = b.tree_flatten(tree)
    return rebuild([leaf[start:stop] for leaf in leaves])


def _leading_size(b: Backend, tree: Any) -> int:
    leaves, _ = b.tree_flatten(tree)
    return int(leaves[0].shape[0])


def _check_hessian(hessian: Any, P: int, b: Backend, argument: str = "hessian") -> Any:
    if not (isinstance(hessian, ScipyLinearOperator) or hasattr(hessian, "shape")):
        raise type_error(argument, f"a {P} x {P} operator (e.g. HessianLinearOperator)", hessian)
    if tuple(hessian.shape) != (P, P):
        raise shape_error(
            argument,
            f"a ({P}, {P}) operator for the {P} parameters",
            tuple(hessian.shape),
            "Build it from the same parameters.",
        )
    other = getattr(hessian, "backend", None)
    if other is not None and other.name != b.name:
        raise type_error(argument, f"an operator of the {b.name} backend, like params", hessian)
    return hessian


def _damped_inverse(
    hessian: Any, b: Backend, damping: Any, tol: float | None, maxiter: int | None
) -> Any:
    r"""The operator applying :math:`(H + \lambda I)^{-1}` for a checked ``hessian``.

    An inverse operator is used as it is; a KFAC or EKFAC operator is inverted
    from its factors, with the damping added to the eigenvalues of its
    Kronecker blocks; any other operator is solved by CG.
    """
    if isinstance(hessian, (KFACInverseLinearOperator, _InverseBase)):
        if damping != 0.0:
            raise value_error(
                "damping",
                f"0 when hessian is already an inverse ({type(hessian).__name__})",
                repr(damping),
                "Give the damping to the inverse when you build it.",
            )
        _check_no_cg_options(hessian, tol, maxiter)
        return hessian
    if isinstance(hessian, KFACLinearOperator):
        _check_no_cg_options(hessian, tol, maxiter)
        damping = check_real(damping, "damping", minimum=0.0)
        return KFACInverseLinearOperator(hessian, damping=damping, use_exact_damping=True)
    return CGInverseLinearOperator(
        hessian,
        damping=damping,
        tol=_default_tol(b.dtype) if tol is None else tol,
        maxiter=maxiter,
    )


def _check_no_cg_options(hessian: Any, tol: float | None, maxiter: int | None) -> None:
    """``tol`` and ``maxiter`` are CG's: refuse them where no CG runs."""
    for argument, value in (("tol", tol), ("maxiter", maxiter)):
        if value is not None:
            raise value_error(
                argument,
                f"None when hessian is a {type(hessian).__name__} (no CG solve runs)",
                repr(value),
                f"Leave {argument} out, or pass an operator to solve by CG.",
            )


def _check_test_data(test_data: Any) -> tuple[Any, Any]:
    if not (isinstance(test_data, (tuple, list)) and len(test_data) == 2):
        raise type_error(
            "test_data",
            "one batch (X_test, y_test)",
            test_data,
            "Pass the pair itself, not a list of batches.",
        )
    return test_data[0], test_data[1]


def _default_tol(dtype: Any) -> float:
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))
