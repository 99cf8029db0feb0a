r"""Inverses of curvature operators, as operators: conjugate gradients, Neumann series, LSMR.

:class:`CGInverseLinearOperator` applies :math:`(A + \lambda I)^{-1}` by solving
with conjugate gradients; :class:`NeumannInverseLinearOperator` approximates it
by a truncated Neumann series; :class:`LSMRInverseLinearOperator` applies the
(damped least-squares) inverse of any square operator by LSMR. All are
operators of this library: they compose (``Hinv @ G``, ``2.0 * Hinv``), work in
scipy's solvers, take and return arrays of any library, and compute in the
operator's own array library.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error, value_error
from curvlinops._compiled import traced_product
from curvlinops._operand import (
    ConvergenceError,
    ConvergenceWarning,
    as_operand,
    check_choice,
    check_int,
    check_real,
)
from curvlinops.backends._arrays import is_array

__all__ = [
    "CGInfo",
    "CGInverseLinearOperator",
    "ConvergenceError",
    "ConvergenceWarning",
    "LSMRInfo",
    "LSMRInverseLinearOperator",
    "NeumannInverseLinearOperator",
]


class _InverseBase(LinearOperator):
    """Shared set-up: the operand, damping, and products in the caller's library."""

    is_symmetric = True

    def __init__(self, A: Any, damping: Any) -> None:
        self._op = as_operand(A)
        self.damping = check_real(damping, "damping", minimum=0.0)
        self.backend = self._op.backend
        self._params_in = getattr(A, "_params_out", False)
        self._params_out = getattr(A, "_params_in", False)
        super().__init__(self._op.dtype, self._op.shape)
        if isinstance(A, LinearOperator):  # lists of A's output shapes in, A's input shapes out
            self._in_shape, self._out_shape = A._out_shape, A._in_shape

    def _damped(self, X: Any) -> Any:
        """``(A + damping I) X`` on native arrays."""
        AX = self._op.matmat(X)
        return AX if self.damping == 0.0 else AX + self.damping * X

    def _native(self, X: Any, adjoint: bool) -> Any:
        # A is symmetric, so the inverse is too: the adjoint is the same solve.
        if self.backend is not None:
            return self._solve(X)
        return self._op.export(self._solve(self._op.native(X, "x")), X)

    def _solve(self, B: Any) -> Any:
        raise NotImplementedError


@dataclass
class CGInfo:
    r"""Convergence report of the last :class:`CGInverseLinearOperator` product.

    One entry per right-hand side (column).

    Attributes:
        iterations: CG iterations run for each column.
        residual_norms: :math:`\|b - (A + \lambda I) x\|` at the end (from the CG
            recurrence).
        rhs_norms: :math:`\|b\|`.
        converged: Whether the column met ``tol``/``atol``.
        indefinite: Whether CG met a direction :math:`p` with
            :math:`p^\top (A + \lambda I) p \le 0` and stopped there (the matrix is
            not positive definite).
        nonfinite: Whether the residual became NaN or infinite.
        tol: The relative tolerance.
        atol: The absolute tolerance.
        num_products: Number of ``matmat`` calls of :math:`A` (each with all
            still active columns).
    """

    iterations: np.ndarray
    residual_norms: np.ndarray
    rhs_norms: np.ndarray
    converged: np.ndarray
    indefinite: np.ndarray
    nonfinite: np.ndarray
    tol: float
    atol: float
    num_products: int

    @property
    def relative_residuals(self) -> np.ndarray:
        """``residual_norms / rhs_norms`` (0 where the right-hand side is 0)."""
        safe = np.where(self.rhs_norms > 0, self.rhs_norms, 1.0)
        return self.residual_norms / safe

    def __str__(self) -> str:
        k = self.converged.size
        text = (
            f"CG: {int(self.converged.sum())}/{k} columns converged, iterations "
            f"{_span(self.iterations)}, relative residuals {_span(self.relative_residuals, 'e')}"
            f" (tol {self.tol:.1e}, atol {self.atol:.1e}), {self.num_products} products"
        )
        if self.indefinite.any():
            text += f"; {int(self.indefinite.sum())} columns stopped on non-positive curvature"
        if self.nonfinite.any():
            text += f"; {int(self.nonfinite.sum())} columns became NaN/inf"
        return text


def _span(values: np.ndarray, fmt: str = "d") -> str:
    if values.size == 0:
        return "-"
    low, high = values.min(), values.max()
    if fmt == "e":
        return f"{low:.1e}..{high:.1e}"
    return f"{int(low)}..{int(high)}" if low != high else f"{int(low)}"


class CGInverseLinearOperator(_InverseBase):
    r"""The inverse :math:`(A + \lambda I)^{-1}`, applied by conjugate gradients.

    .. math:: x = (A + \lambda I)^{-1} b

    Each product solves :math:`(A + \lambda I) x = b` for all columns of ``b`` at
    once: the columns iterate together, each with its own step sizes
    :math:`\alpha_k = r_k^\top z_k / p_k^\top (A + \lambda I) p_k` and
    :math:`\beta_k = r_{k+1}^\top z_{k+1} / r_k^\top z_k` (:math:`z = M r` with the
    preconditioner :math:`M`, or :math:`z = r`), and each product with :math:`A` is
    one ``matmat`` of the columns still iterating. A column stops when
    :math:`\|r\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})`. CG needs
    :math:`A + \lambda I` symmetric positive definite (a GGN plus damping, or a
    Hessian near a minimum plus enough damping); the inverse is then symmetric,
    so the adjoint is the same solve.

    After each product, :attr:`info` (a :class:`CGInfo`) holds the iterations and
    residuals per column. Columns that do not converge within ``maxiter``
    iterations, or that meet non-positive curvature, give a
    :class:`~curvlinops.inverse.ConvergenceWarning` (or, with
    ``on_failure="raise"``, a :class:`~curvlinops.inverse.ConvergenceError`).

    Args:
        A: A symmetric operator of this library, a scipy ``LinearOperator`` or
            sparse matrix, or a dense (numpy, PyTorch, JAX, CuPy) array.
        damping: :math:`\lambda \ge 0`.
        tol: Relative tolerance on the residual norm.
        atol: Absolute tolerance on the residual norm.
        maxiter: Largest number of iterations (default ``10 * n``).
        preconditioner: An approximation :math:`M \approx (A + \lambda I)^{-1}`: an
            operator or matrix (as ``A``) or a function on native ``(n, K)``
            arrays. It must be symmetric positive definite.
        on_failure: ``"warn"`` or ``"raise"``.
        tolerance: curvlinops-for-pytorch 3.0.1's name of ``tol`` (there, GPyTorch's
            CG stopped when the mean relative residual over the columns fell below
            it, default 1; here each column meets it).
        max_iter: 3.0.1's name of ``maxiter``.

    Example:
        >>> import numpy as np
        >>> from curvlinops.inverse import CGInverseLinearOperator
        >>> A = np.array([[4.0, 1.0], [1.0, 3.0]])
        >>> Ainv = CGInverseLinearOperator(A, tol=1e-12)
        >>> np.allclose(Ainv @ np.array([1.0, 2.0]), np.linalg.solve(A, [1.0, 2.0]))
        True
        >>> int(Ainv.info.iterations[0])
        2
    """

    def __init__(
        self,
        A: Any,
        *,
        damping: float = 0.0,
        tol: float | None = None,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: Any = None,
        on_failure: str = "warn",
        tolerance: float | None = None,
        max_iter: int | None = None,
        **unsupported: Any,
    ) -> None:
        super().__init__(A, damping)
        gpytorch_options = _take_gpytorch_options(unsupported)
        _refuse_options(unsupported, "CGInverseLinearOperator", _CG_OPTIONS_3_0_1)
        tol = _one_of(tol, "tol", tolerance, "tolerance")
        if tol is None and gpytorch_options:  # GPyTorch's per-column stop, default 1e-10
            tol = gpytorch_options.get("stop_updating_after", _GPYTORCH_STOP_UPDATING_AFTER)
        maxiter = _one_of(maxiter, "maxiter", max_iter, "max_iter")
        self.tol = 1e-5 if tol is None else check_real(tol, "tol", minimum=0.0)
        self.atol = check_real(atol, "atol", minimum=0.0)
        n = self.shape[0]
        self.maxiter = 10 * n if maxiter is None else check_int(maxiter, "maxiter")
        self.on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
        self._precondition = self._preconditioner(preconditioner)
        self.eps, self.initial_guess = _gpytorch_meaning(gpytorch_options, self.tol)
        # GPyTorch's CG runs at least min(10, max_iter) iterations before its tolerance test
        self._min_iterations = min(10, self.maxiter) if gpytorch_options else 0
        self.info: CGInfo | None = None

    def _preconditioner(self, M: Any) -> Callable[[Any], Any] | None:
        """``M`` as a function on native ``(n, K)`` arrays."""
        if M is None:
            return None
        if isinstance(M, ScipyLinearOperator) or issparse(M) or is_array(M):
            operand = as_operand(M, "preconditioner")
            if operand.shape != self.shape:
                raise shape_error("preconditioner", f"shape {self.shape}", operand.shape)
            if operand.library != self._op.library:
                raise type_error(
                    "preconditioner",
                    f"an operator or matrix computing in {self._op.library}, like A",
                    M,
                )
            return operand.matmat
        if callable(M):
            return M
        raise type_error(
            "preconditioner", "an operator, a matrix, or a function on (n, K) arrays", M
        )

    def _solve(self, B: Any) -> Any:
        if self.initial_guess is None:
            solver = _BatchedCG(self, B)
            X = solver.run()
        else:  # solve for the correction d = x - x0: (A + λI) d = b - (A + λI) x0
            X0 = self._op.native(self.initial_guess, "initial_guess")
            X0 = X0[:, None] if X0.ndim == 1 else X0
            if X0.ndim != 2 or X0.shape[0] != B.shape[0] or X0.shape[1] not in (1, B.shape[1]):
                raise shape_error(
                    "initial_guess", f"shape ({B.shape[0]},) or {tuple(B.shape)}", X0.shape
                )
            X0 = X0 + self._op.xp.zeros_like(B)  # one guess for every column
            rhs_norms = self._op.to_host(self._op.xp.linalg.vector_norm(B, axis=0))
            solver = _BatchedCG(self, B - self._damped(X0), rhs_norms.astype(np.float64))
            X = X0 + solver.run()
        self.info = solver.info()
        if not self.info.converged.all():
            self._report(self.info)
        return X

    def _report(self, info: CGInfo) -> None:
        failed = ~info.converged
        message = (
            f"CGInverseLinearOperator: {int(failed.sum())} of {failed.size} columns did not "
            f"converge (largest relative residual {info.relative_residuals[failed].max():.2e}, "
            f"tol {self.tol:.1e}, maxiter {self.maxiter})."
        )
        if info.nonfinite.any():
            message += (
                f" {int(info.nonfinite.sum())} got NaN or infinite residuals: check A's "
                "products and the right-hand side for NaN."
            )
        if info.indefinite.any():
            message += (
                f" {int(info.indefinite.sum())} stopped because A + damping*I is not positive "
                "definite (p^T (A + damping I) p <= 0): use a positive semi-definite curvature "
                "(e.g. the GGN) or increase damping."
            )
        else:
            message += " Increase maxiter, increase damping, or pass a preconditioner."
        message += " Details per column: .info."
        if self.on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=6)


class _BatchedCG:
    """Conjugate gradients on the columns of ``B``, all advancing together.

    A finished column is frozen (its search direction set to zero, so it takes
    no steps); once at most half of the columns are still running, the finished
    ones are set aside and the state arrays shrink (``take`` on the column axis).
    Shrinking only by halves bounds the number of distinct product widths
    (each of which a compiling backend such as JAX compiles once) by ``log2 K``.
    """

    def __init__(
        self, owner: CGInverseLinearOperator, B: Any, rhs_norms: np.ndarray | None = None
    ) -> None:
        self.owner, self.op, self.xp = owner, owner._op, owner._op.xp
        xp, K = self.xp, B.shape[1]
        self.iterations = np.zeros(K, dtype=int)
        self.converged = np.zeros(K, dtype=bool)
        self.indefinite = np.zeros(K, dtype=bool)
        self.nonfinite = np.zeros(K, dtype=bool)
        self.products = 0
        self.finished: list[tuple[np.ndarray, Any]] = []
        self.residuals = self.op.to_host(xp.linalg.vector_norm(B, axis=0)).astype(np.float64)
        # the tolerance is relative to b (not to the residual of an initial guess)
        self.rhs_norms = self.residuals.copy() if rhs_norms is None else rhs_norms
        self.thresholds = np.maximum(owner.tol * self.rhs_norms, owner.atol)
        self._update = self.op.compile(_cg_update(xp))
        self._direction = self.op.compile(_cg_direction(xp))
        self.active = np.arange(K)  # global column of each state column
        self.live = np.ones(K, dtype=bool)  # state columns still iterating
        self.X, self.R = xp.zeros_like(B), B
        self.P = self._precondition(self.R)
        self.rz = xp.sum(self.R * self.P, axis=0)
        done = self.residuals <= self.thresholds
        self._retire(done, np.zeros(K, dtype=bool), np.zeros(K, dtype=bool))

    def _precondition(self, R: Any) -> Any:
        M = self.owner._precondition
        return R if M is None else M(R)

    def run(self) -> Any:
        # JAX without a preconditioner: after the first step (an operator keeps its
        # linearizations then), the rest in one compiled loop where the product traces
        compiled = self.op.library == "jax" and self.owner._precondition is None
        for _ in range(self.owner.maxiter):
            if not self.live.any():
                break
            self._step()
            if compiled and self.live.any() and self.products < self.owner.maxiter:
                if self._run_compiled():
                    break
                compiled = False
        return self._assemble()

    def _run_compiled(self) -> bool:
        """The remaining iterations in one compiled loop (``False``: the product does not trace)."""
        from curvlinops.backends import _krylov_jax

        traced = traced_product(self.op, self.P.shape[1], self.owner._damped)
        if traced is None:
            return False
        thresholds = self.op.from_host(self.thresholds[self.active].astype(self.op.dtype))
        state = (self.X, self.R, self.P, self.rz, self.op.from_host(self.live))
        out = _krylov_jax.conjugate_gradients(
            *traced, state, thresholds, self.owner.maxiter - self.products
        )
        names = ("iterations", "residuals", "done", "indefinite", "nonfinite", "live")
        host = {name: self.op.to_host(out[name]) for name in names}
        steps = int(self.op.to_host(out["steps"]))
        self.products += steps
        self.op.num_products += steps
        stepped = host["iterations"] > 0
        self.iterations[self.active] += host["iterations"]
        self.residuals[self.active[stepped]] = host["residuals"][stepped]
        for name, flags in (("converged", "done"), ("indefinite", "indefinite"),
                            ("nonfinite", "nonfinite")):  # fmt: skip
            getattr(self, name)[self.active] |= host[flags]
        self.X, self.R = out["X"], out["R"]
        self.live = host["live"].astype(bool)
        return True

    def _step(self) -> None:
        AP = self.owner._damped(self.P)
        self.products += 1
        self.X, self.R, stats = self._update(self.X, self.R, self.P, AP, self.rz)
        host = self.op.to_host(stats).astype(np.float64)  # residual norms and pAp
        live, columns = self.live, self.active[self.live]
        self.iterations[columns] += 1
        self.residuals[columns] = host[0][live]
        nonfinite = live & ~np.isfinite(host[0])
        done = live & (host[0] <= self.thresholds[self.active])
        if self.owner._min_iterations:  # GPyTorch's: at least that many, unless all but exact
            exact = host[0] <= _GPYTORCH_STOP_UPDATING_AFTER * self.rhs_norms[self.active]
            done &= (self.iterations[self.active] >= self.owner._min_iterations) | exact
        indefinite = live & ~done & ~nonfinite & ~(host[1] > self.owner.eps)
        self._retire(done, indefinite, nonfinite)
        if self.live.any():
            mask = self.op.from_host(self.live)
            Z = self._precondition(self.R)
            self.P, self.rz = self._direction(self.R, Z, self.P, self.rz, mask)

    def _retire(self, done: np.ndarray, indefinite: np.ndarray, nonfinite: np.ndarray) -> None:
        """Freeze finished state columns; shrink the state once half of it is frozen."""
        leaving = done | indefinite | nonfinite
        if not leaving.any():
            return
        columns = self.active[leaving]
        self.converged[columns] = done[leaving]
        self.indefinite[columns] = indefinite[leaving]
        self.nonfinite[columns] = nonfinite[leaving]
        self.live = self.live & ~leaving
        if self.live.sum() <= self.live.size // 2:
            self._shrink()
        else:
            mask = self.op.from_host(self.live)
            self.P = self.xp.where(mask, self.P, self.xp.zeros_like(self.P))

    def _shrink(self) -> None:
        xp, op = self.xp, self.op
        gone = op.index(np.flatnonzero(~self.live))
        self.finished.append((self.active[~self.live], xp.take(self.X, gone, axis=1)))
        stay = op.index(np.flatnonzero(self.live))
        self.X, self.R = xp.take(self.X, stay, axis=1), xp.take(self.R, stay, axis=1)
        self.P, self.rz = xp.take(self.P, stay, axis=1), xp.take(self.rz, stay)
        self.active = self.active[self.live]
        self.live = np.ones(self.active.size, dtype=bool)

    def _assemble(self) -> Any:
        """All columns in their original order."""
        xp = self.xp
        pieces = [*self.finished, (self.active, self.X)]
        columns = np.concatenate([cols for cols, _ in pieces])
        X = xp.concat([block for _, block in pieces], axis=1)
        return xp.take(X, self.op.index(np.argsort(columns, kind="stable")), axis=1)

    def info(self) -> CGInfo:
        return CGInfo(
            iterations=self.iterations,
            residual_norms=self.residuals,
            rhs_norms=self.rhs_norms,
            converged=self.converged,
            indefinite=self.indefinite,
            nonfinite=self.nonfinite,
            tol=self.owner.tol,
            atol=self.owner.atol,
            num_products=self.products,
        )


@functools.cache  # one function per namespace: JAX compiles it once, not once per solve
def _cg_update(xp: Any) -> Callable:
    """``x += alpha p``, ``r -= alpha A p`` per column (pure, compilable).

    Columns with ``pᵀAp <= 0`` take no step. Returns ``X, R`` and the stacked
    residual norms and ``pᵀAp`` (one transfer to the host per iteration).
    """

    def update(X: Any, R: Any, P: Any, AP: Any, rz: Any) -> tuple[Any, Any, Any]:
        pAp = xp.sum(P * AP, axis=0)
        positive = pAp > 0
        safe = xp.where(positive, pAp, xp.ones_like(pAp))
        alpha = xp.where(positive, rz / safe, xp.zeros_like(pAp))
        R = R - alpha * AP
        return X + alpha * P, R, xp.stack([xp.linalg.vector_norm(R, axis=0), pAp])

    return update


@functools.cache
def _cg_direction(xp: Any) -> Callable:
    """The next search directions ``p = z + beta p``; frozen columns get ``p = 0``."""

    def direction(R: Any, Z: Any, P: Any, rz: Any, mask: Any) -> tuple[Any, Any]:
        Z = xp.where(mask, Z, xp.zeros_like(Z))
        rz_next = xp.sum(R * Z, axis=0)
        beta = xp.where(mask, rz_next / xp.where(mask, rz, xp.ones_like(rz)), xp.zeros_like(rz))
        return Z + beta * P, rz_next

    return direction


@dataclass
class NeumannInfo:
    r"""Report of the last :class:`NeumannInverseLinearOperator` product.

    Attributes:
        last_term_ratios: :math:`\|(I - s(A + \lambda I))^{N-1} b\| / \|b\|` per
            column; above 1 the series diverges.
    """

    last_term_ratios: np.ndarray


class NeumannInverseLinearOperator(_InverseBase):
    r"""The inverse :math:`(A + \lambda I)^{-1}` by a truncated Neumann series.

    .. math::
        (A + \lambda I)^{-1} \approx s \sum_{k=0}^{N-1} \bigl(I - s (A + \lambda I)\bigr)^k

    with scale :math:`s` and :math:`N` = ``num_terms`` terms (:math:`N - 1` products).
    The series converges for symmetric positive definite :math:`A + \lambda I` if
    :math:`0 < s < 2 / \lambda_{\max}(A + \lambda I)` (see
    :func:`curvlinops.eigen.max_stable_learning_rate`); each term is one step of
    gradient descent on :math:`\frac12 x^\top (A + \lambda I) x - b^\top x` from
    zero with step size :math:`s`. Where the last term is larger than the first
    (then :math:`s` is too large or :math:`A + \lambda I` is indefinite), the
    product warns with a :class:`~curvlinops.inverse.ConvergenceWarning`;
    :attr:`info` has the ratio per column.

    Args:
        A: A symmetric operator or matrix (as for :class:`CGInverseLinearOperator`).
        num_terms: :math:`N \ge 1`.
        scale: :math:`s > 0`.
        damping: :math:`\lambda \ge 0`.
        on_failure: ``"warn"`` or ``"raise"`` when the series diverges.
        check_nan: Raise a :class:`~curvlinops.inverse.ConvergenceError` when the
            result holds NaN or inf, whatever ``on_failure`` says (as
            curvlinops-for-pytorch 3.0.1, which raised a ``ValueError``).

    The defaults ``num_terms=100, scale=1.0`` and the positional order are those
    of curvlinops-for-pytorch 3.0.1. There, ``num_terms`` counted the products
    (the sum ran over :math:`k = 0, \dots, N`, :math:`N + 1` terms); here it
    counts the terms: pass ``num_terms + 1`` for 3.0.1's numbers.

    Example:
        >>> import numpy as np
        >>> from curvlinops.inverse import NeumannInverseLinearOperator
        >>> A = np.diag([1.0, 2.0])
        >>> Ainv = NeumannInverseLinearOperator(A, num_terms=60, scale=0.5)
        >>> np.round(Ainv @ np.ones(2), 6)
        array([1. , 0.5])
    """

    def __init__(
        self,
        A: Any,
        num_terms: int = 100,
        scale: float = 1.0,
        check_nan: bool = True,
        *,
        damping: float = 0.0,
        on_failure: str = "warn",
    ) -> None:
        super().__init__(A, damping)
        self.num_terms = check_int(num_terms, "num_terms")
        self.scale = check_real(_scalar(scale), "scale", minimum=0.0, strict=True)
        self.on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
        if not isinstance(check_nan, bool):
            raise type_error("check_nan", "True or False", check_nan)
        self.check_nan = check_nan
        self.info: NeumannInfo | None = None

    def _solve(self, B: Any) -> Any:
        xp, s = self._op.xp, self.scale
        term, total = B, B
        for _ in range(self.num_terms - 1):
            term = term - s * self._damped(term)
            total = total + term
        norms = xp.stack([xp.linalg.vector_norm(term, axis=0), xp.linalg.vector_norm(B, axis=0)])
        host = self._op.to_host(norms).astype(np.float64)
        ratios = host[0] / np.where(host[1] > 0, host[1], 1.0)
        self.info = NeumannInfo(last_term_ratios=ratios)
        if ratios.size and not bool(np.all(ratios <= 1.0)):
            largest = np.nanmax(ratios) if np.isfinite(ratios).any() else np.nan
            message = (
                "NeumannInverseLinearOperator: the series diverges (last term "
                f"{largest:.2e} times the first): scale = {s:g} must be below "
                "2 / lambda_max(A + damping I), and A + damping I positive definite. Use e.g. "
                "scale = 0.9 * curvlinops.eigen.max_stable_learning_rate(A)."
            )
            nonfinite = not bool(np.isfinite(host).all())
            if nonfinite:
                message += " The result holds NaN or inf."
            if self.on_failure == "raise" or (self.check_nan and nonfinite):
                raise ConvergenceError(message)
            warnings.warn(message, ConvergenceWarning, stacklevel=6)
        return s * total


# --- LSMR --------------------------------------------------------------------------------
@dataclass
class LSMRInfo:
    r"""Report of the last :class:`LSMRInverseLinearOperator` product, one entry per column.

    Attributes:
        iterations: LSMR iterations run for each column.
        residual_norms: Estimate of :math:`\|b - A x\|` (with damping
            :math:`d`: of :math:`\|(b, 0) - (A; d I) x\|`).
        normal_residual_norms: Estimate of :math:`\|A^\top r - d^2 x\|`.
        stop_reasons: Why each column stopped: ``"zero rhs"`` (:math:`x = 0`
            solves it), ``"atol/btol"`` (:math:`Ax \approx b`), ``"least squares"``
            (the normal equations are met to ``atol``), ``"conlim"`` (the estimated
            condition number passed ``conlim``) or ``"maxiter"``.
        converged: Whether the column stopped on one of the first three reasons.
    """

    iterations: np.ndarray
    residual_norms: np.ndarray
    normal_residual_norms: np.ndarray
    stop_reasons: np.ndarray
    converged: np.ndarray


_CONVERGED = ("zero rhs", "atol/btol", "least squares")


class LSMRInverseLinearOperator(_InverseBase):
    r"""The (pseudo-)inverse of a square operator, applied by LSMR.

    .. math::
        x = \arg\min_x \|b - A x\|^2 + d^2 \|x\|^2
          = (A^\top A + d^2 I)^{-1} A^\top b ,

    which is :math:`A^{-1} b` for an invertible :math:`A` and ``damp`` :math:`d = 0`.
    LSMR (Fong and Saunders, 2011) is MINRES on the normal equations, built on
    Golub-Kahan bidiagonalisation: each iteration costs one product with
    :math:`A` and one with :math:`A^\top`, for all columns of ``b`` together
    (one ``matmat`` each). Unlike CG it needs neither symmetry nor
    definiteness, so it suits indefinite Hessians and singular matrices (it
    returns the minimum-norm least-squares solution when started from zero).

    A column stops, as in scipy's ``lsmr``, when :math:`\|r\| \le
    \mathrm{btol}\,\|b\| + \mathrm{atol}\,\|A\|\,\|x\|`, or when
    :math:`\|A^\top r\| \le \mathrm{atol}\,\|A\|\,\|r\|`, or when the estimated
    condition number of :math:`A` exceeds ``conlim``; after ``maxiter``
    iterations it gives up with a :class:`~curvlinops.inverse.ConvergenceWarning`
    (or :class:`~curvlinops.inverse.ConvergenceError` with ``on_failure="raise"``).
    :attr:`info` (an :class:`LSMRInfo`) holds the details per column.

    The keywords are those of scipy's ``lsmr``, which curvlinops-for-pytorch
    3.0.1 called column by column on the host; here the columns run together in
    the operator's own array library.

    Args:
        A: A square operator of this library, a scipy ``LinearOperator`` or sparse
            matrix, or a dense array (symmetric or not).
        damp: :math:`d \ge 0`.
        atol: Relative tolerance on the normal equations (and on :math:`\|r\|`
            relative to :math:`\|A\|\,\|x\|`).
        btol: Relative tolerance on :math:`\|r\|` relative to :math:`\|b\|`.
        conlim: Stop when the estimated condition number exceeds it (``0``: never).
        maxiter: Largest number of iterations (default ``n``, as scipy).
        on_failure: ``"warn"`` or ``"raise"``.

    Example:
        >>> import numpy as np
        >>> from curvlinops import LSMRInverseLinearOperator
        >>> A = np.array([[2.0, 1.0], [0.0, 3.0]])
        >>> Ainv = LSMRInverseLinearOperator(A, atol=1e-12, btol=1e-12)
        >>> bool(np.allclose(Ainv @ np.array([3.0, 3.0]), [1.0, 1.0]))
        True
    """

    def __init__(
        self,
        A: Any,
        *,
        damp: float = 0.0,
        atol: float = 1e-6,
        btol: float = 1e-6,
        conlim: float = 1e8,
        maxiter: int | None = None,
        on_failure: str = "warn",
        **unsupported: Any,
    ) -> None:
        super().__init__(A, 0.0)
        _refuse_options(unsupported, "LSMRInverseLinearOperator", _LSMR_OPTIONS_SCIPY)
        self.is_symmetric = bool(getattr(A, "is_symmetric", False))
        self.damp = check_real(damp, "damp", minimum=0.0)
        self.atol = check_real(atol, "atol", minimum=0.0)
        self.btol = check_real(btol, "btol", minimum=0.0)
        self.conlim = check_real(conlim, "conlim", minimum=0.0)
        n = self.shape[0]
        self.maxiter = n if maxiter is None else check_int(maxiter, "maxiter")
        self.on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
        self.info: LSMRInfo | None = None

    def _native(self, X: Any, adjoint: bool) -> Any:
        # (A^T A + d^2 I)^{-1} A^T is the adjoint of the same map for A^T
        if self.backend is not None:
            return self._solve(X, adjoint)
        return self._op.export(self._solve(self._op.native(X, "x"), adjoint), X)

    def _solve(self, B: Any, adjoint: bool = False) -> Any:
        solver = _BatchedLSMR(self, B, adjoint)
        X = solver.run()
        self.info = solver.info()
        if not self.info.converged.all():
            self._report(self.info)
        return X

    def _report(self, info: LSMRInfo) -> None:
        failed = ~info.converged
        reasons = sorted(set(info.stop_reasons[failed].tolist()))
        message = (
            f"LSMRInverseLinearOperator: {int(failed.sum())} of {failed.size} columns did not "
            f"converge (stopped on {', '.join(reasons)}; atol {self.atol:.1e}, btol "
            f"{self.btol:.1e}, conlim {self.conlim:.1e}, maxiter {self.maxiter}). Increase "
            "maxiter or conlim, loosen atol/btol, or add damping (damp). Details per column: "
            ".info."
        )
        if self.on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=6)


class _BatchedLSMR:
    """LSMR on the columns of ``B``, all advancing together.

    Vectors stay native (on the device); the scalar recurrences of each
    column (plane rotations, norm estimates, stopping tests) run on the host
    in float64, one ``(K,)`` array per quantity, with two small transfers per
    iteration. A column that stops keeps its solution (``where``) while the
    others go on. Notation of Fong and Saunders (2011).
    """

    def __init__(self, owner: LSMRInverseLinearOperator, B: Any, adjoint: bool) -> None:
        self.owner, self.op, self.xp = owner, owner._op, owner._op.xp
        op = self.op
        self.A = op.rmatmat if adjoint else op.matmat
        self.At = op.matmat if adjoint else op.rmatmat
        K = B.shape[1]
        self.iterations = np.zeros(K, dtype=int)
        self.reasons = np.full(K, "", dtype=object)
        beta, self.U = self._normalize(B)
        alpha, self.V = self._normalize(self.At(self.U))
        self.alpha = alpha
        self.X = self.xp.zeros_like(self.V)
        self.H, self.Hbar = self.V, self.xp.zeros_like(self.V)
        self.s = _LSMRScalars(alpha, beta, owner.damp)
        self.reasons[beta == 0] = "zero rhs"
        self.reasons[(beta > 0) & (alpha == 0)] = "least squares"

    def _normalize(self, W: Any) -> tuple[np.ndarray, Any]:
        """Column norms on the host and the columns scaled to unit norm (zero stays zero)."""
        norms = self.op.to_host(self.xp.linalg.vector_norm(W, axis=0)).astype(np.float64)
        safe = np.where(norms > 0, norms, 1.0)
        return norms, W / self._device(safe)

    def _device(self, values: np.ndarray) -> Any:
        return self.op.from_host(values.astype(self.op.dtype))

    def run(self) -> Any:
        for _ in range(self.owner.maxiter):
            live = self.reasons == ""
            if not live.any():
                break
            self._step(live)
        self.reasons[self.reasons == ""] = "maxiter"
        return self.X

    def _step(self, live: np.ndarray) -> None:
        xp, s = self.xp, self.s
        beta, self.U = self._normalize(self.A(self.V) - self._device(self.alpha) * self.U)
        alpha, self.V = self._normalize(self.At(self.U) - self._device(beta) * self.V)
        self.alpha = alpha
        hbar_coef, x_coef, h_coef = s.advance(alpha, beta)
        mask = self.op.from_host(live)
        self.Hbar = self.H - self._device(hbar_coef) * self.Hbar
        step = self._device(x_coef) * self.Hbar
        self.X = xp.where(mask, self.X + step, self.X)
        self.H = self.V - self._device(h_coef) * self.H
        self.iterations[live] += 1
        norm_x = self.op.to_host(xp.linalg.vector_norm(self.X, axis=0)).astype(np.float64)
        stop = s.stop_reasons(norm_x, self.owner.atol, self.owner.btol, self.owner.conlim)
        self.reasons[live] = stop[live]

    def info(self) -> LSMRInfo:
        reasons = self.reasons.astype(str)
        return LSMRInfo(
            iterations=self.iterations,
            residual_norms=self.s.norm_r,
            normal_residual_norms=self.s.norm_ar,
            stop_reasons=reasons,
            converged=np.isin(reasons, _CONVERGED),
        )


class _LSMRScalars:
    """The scalar recurrences of LSMR for ``K`` columns, as float64 ``(K,)`` arrays."""

    def __init__(self, alpha: np.ndarray, beta: np.ndarray, damp: float) -> None:
        ones, zeros = np.ones_like(alpha), np.zeros_like(alpha)
        self.damp = damp
        self.alphabar, self.zetabar = alpha, alpha * beta
        self.rho, self.rhobar, self.cbar, self.sbar = ones, ones, ones, zeros
        # for the estimate of ||r||
        self.betadd, self.betad, self.rhodold = beta, zeros, ones
        self.tautildeold, self.thetatilde, self.zeta, self.d = zeros, zeros, zeros, zeros
        # for the estimates of ||A|| and cond(A)
        self.norm_a2 = alpha**2
        self.max_rbar, self.min_rbar = zeros, np.full_like(alpha, np.inf)
        self.norm_b, self.norm_r, self.norm_ar = beta, beta, alpha * beta
        self.norm_a, self.cond_a = np.sqrt(self.norm_a2), ones
        self.first = True

    def advance(self, alpha: np.ndarray, beta: np.ndarray) -> tuple[Any, Any, Any]:
        """One iteration; returns the coefficients of the vector updates."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._advance(alpha, beta)

    def _advance(self, alpha: np.ndarray, beta: np.ndarray) -> tuple[Any, Any, Any]:
        # rotation that absorbs the damping, then the rotations Q_k and Qbar_k
        chat, shat, alphahat = _rotation(self.alphabar, np.full_like(alpha, self.damp))
        rho_old = self.rho
        c, s, self.rho = _rotation(alphahat, beta)
        theta_new = s * alpha
        self.alphabar = c * alpha
        rhobar_old, zeta_old = self.rhobar, self.zeta
        thetabar = self.sbar * self.rho
        rho_temp = self.cbar * self.rho
        self.cbar, self.sbar, self.rhobar = _rotation(self.cbar * self.rho, theta_new)
        self.zeta = self.cbar * self.zetabar
        self.zetabar = -self.sbar * self.zetabar
        coefficients = (
            _safe_divide(thetabar * self.rho, rho_old * rhobar_old),
            _safe_divide(self.zeta, self.rho * self.rhobar),
            _safe_divide(theta_new, self.rho),
        )
        self._estimate_norm_r(chat, shat, c, s, thetabar, zeta_old)
        self._estimate_norm_a(alpha, beta, rhobar_old, rho_temp)
        self.norm_ar = np.abs(self.zetabar)
        return coefficients

    def _estimate_norm_r(self, chat, shat, c, s, thetabar, zeta_old) -> None:
        betaacute = chat * self.betadd
        betacheck = -shat * self.betadd
        betahat = c * betaacute
        self.betadd = -s * betaacute
        thetatilde_old = self.thetatilde
        ctilde, stilde, rhotilde = _rotation(self.rhodold, thetabar)
        self.thetatilde = stilde * self.rhobar
        self.rhodold = ctilde * self.rhobar
        self.betad = -stilde * self.betad + ctilde * betahat
        self.tautildeold = _safe_divide(zeta_old - thetatilde_old * self.tautildeold, rhotilde)
        taud = _safe_divide(self.zeta - self.thetatilde * self.tautildeold, self.rhodold)
        self.d = self.d + betacheck**2
        self.norm_r = np.sqrt(self.d + (self.betad - taud) ** 2 + self.betadd**2)

    def _estimate_norm_a(self, alpha, beta, rhobar_old, rho_temp) -> None:
        self.norm_a2 = self.norm_a2 + beta**2
        self.norm_a = np.sqrt(self.norm_a2)
        self.norm_a2 = self.norm_a2 + alpha**2
        self.max_rbar = np.maximum(self.max_rbar, rhobar_old)
        if not self.first:
            self.min_rbar = np.minimum(self.min_rbar, rhobar_old)
        self.first = False
        self.cond_a = np.maximum(self.max_rbar, rho_temp) / np.minimum(self.min_rbar, rho_temp)

    def stop_reasons(self, norm_x: np.ndarray, atol: float, btol: float, conlim: float) -> Any:
        """Per column: the reason to stop now, or ``""``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            relative_r = self.norm_r / self.norm_b
            normal = self.norm_ar / (self.norm_a * self.norm_r)
            inverse_cond = 1.0 / self.cond_a
            ratio = self.norm_a * norm_x / self.norm_b
            compatible = (relative_r <= btol + atol * ratio) | (
                1.0 + relative_r / (1.0 + ratio) <= 1.0
            )
            least_squares = (normal <= atol) | (1.0 + normal <= 1.0) | (self.norm_ar == 0)
            ill = (inverse_cond <= (1.0 / conlim if conlim > 0 else 0.0)) | (
                1.0 + inverse_cond <= 1.0
            )
        reasons = np.full(norm_x.shape, "", dtype=object)
        reasons[ill] = "conlim"
        reasons[least_squares] = "least squares"
        reasons[compatible] = "atol/btol"
        return reasons


def _rotation(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Plane rotation ``(c, s, r)`` with ``[c s; -s c] (a, b) = (r, 0)`` (``a, b >= 0``)."""
    r = np.hypot(a, b)
    positive = r > 0
    c = np.where(positive, a / np.where(positive, r, 1.0), 1.0)
    s = np.where(positive, b / np.where(positive, r, 1.0), 0.0)
    return c, s, r


def _safe_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b``, and 0 where ``b`` is 0 (columns that stopped)."""
    nonzero = b != 0
    return np.where(nonzero, a / np.where(nonzero, b, 1.0), 0.0)


# --- keywords of curvlinops-for-pytorch 3.0.1 ---------------------------------------------
_CG_OPTIONS_3_0_1 = {
    "eps": (
        "eps (GPyTorch's guard of CG's divisions) is taken as the breakdown threshold: a "
        "column stops (as indefinite, see .info) when p^T (A + damping I) p <= eps"
    ),
    "stop_updating_after": (
        "stop_updating_after (GPyTorch: a column stops updating below this relative residual) "
        "is taken as tol when tol/tolerance is not given; each column meets tol here"
    ),
    "initial_guess": (
        "initial_guess starts CG from it (one guess for all products); the tolerance stays "
        "relative to b"
    ),
    "n_tridiag": (
        "n_tridiag: no tridiagonal matrices are returned (0 is the only value taken); use "
        "curvlinops.lanczos for them"
    ),
    "max_tridiag_iter": "max_tridiag_iter has no effect (no tridiagonal matrices are returned)",
}
_WARNED_3_0_1: set[str] = set()
_GPYTORCH_STOP_UPDATING_AFTER = 1e-10
_GPYTORCH_STOPPING = (
    "with any of GPyTorch's keywords, CG runs at least min(10, max_iter) iterations (unless "
    "a residual is below 1e-10 of b) and, without tol/tolerance, each column iterates until "
    "its relative residual is below stop_updating_after (GPyTorch's default 1e-10) or "
    "max_iter iterations have run, as in GPyTorch"
)
_LSMR_OPTIONS_SCIPY = {
    "x0": "LSMR starts from zero; solve for the correction b - A x0 instead",
    "show": "the iterations are reported in .info after each product",
}


def _take_gpytorch_options(options: dict) -> dict:
    """Remove curvlinops-for-pytorch 3.0.1's (GPyTorch's) CG keywords from ``options``.

    Each warns once per process, saying what it means here.
    """
    taken = {name: options.pop(name) for name in list(options) if name in _CG_OPTIONS_3_0_1}
    if taken and "stopping" not in _WARNED_3_0_1:
        _WARNED_3_0_1.add("stopping")
        warnings.warn(f"CGInverseLinearOperator: {_GPYTORCH_STOPPING}.", UserWarning, stacklevel=4)
    for name in sorted(taken):
        if name not in _WARNED_3_0_1:
            _WARNED_3_0_1.add(name)
            warnings.warn(
                f"CGInverseLinearOperator({name}=...): curvlinops-for-pytorch 3.0.1's (GPyTorch's) "
                f"keyword. Here: {_CG_OPTIONS_3_0_1[name]}.",
                UserWarning,
                stacklevel=4,
            )
    return taken


def _gpytorch_meaning(options: dict, tol: float) -> tuple[float, Any]:
    """``(eps, initial_guess)`` from 3.0.1's keywords (``stop_updating_after`` is read before)."""
    if options.get("n_tridiag", 0) not in (0, None):
        raise value_error(
            "n_tridiag",
            "0 (no tridiagonal matrices are returned here)",
            repr(options["n_tridiag"]),
            "Use curvlinops.lanczos for a tridiagonalisation.",
        )
    eps = check_real(options.get("eps", 0.0), "eps", minimum=0.0)
    guess = options.get("initial_guess")
    if guess is not None and not is_array(guess):
        raise type_error("initial_guess", "an array of shape (n,) or (n, K)", guess)
    return eps, guess


def _scalar(value: Any) -> Any:
    """A 0-d real array (3.0.1's tests pass a tensor ``scale``) as a float; else as given."""
    if is_array(value) and getattr(value, "ndim", None) == 0 and not isinstance(value, bool):
        return float(value)
    return value


def _refuse_options(options: dict, owner: str, known: dict) -> None:
    """A TypeError for keywords the operator does not take, with what to do instead."""
    if not options:
        return
    name = sorted(options)[0]
    fix = known.get(name, "see the operator's docstring for its keywords")
    raise type_error(f"{owner}({name}=...)", "a supported keyword", options[name], fix + ".")


def _one_of(ours: Any, our_name: str, theirs: Any, their_name: str) -> Any:
    """The value of an option that has two names (ours and 3.0.1's); refuse both at once."""
    if ours is not None and theirs is not None:
        raise value_error(
            their_name,
            f"None when {our_name} is given (they are the same option)",
            repr(theirs),
            f"Pass only {our_name}.",
        )
    return theirs if ours is None else ours


def __getattr__(name: str) -> Any:
    # curvlinops-for-pytorch 3.0.1's path of the KFAC inverse (it lives in curvlinops.kfac)
    if name == "KFACInverseLinearOperator":
        from curvlinops.kfac import KFACInverseLinearOperator

        return KFACInverseLinearOperator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
