r"""Inverses of curvature operators, as operators: conjugate gradients and Neumann series.

:class:`CGInverseLinearOperator` applies :math:`(A + \lambda I)^{-1}` by solving
with conjugate gradients; :class:`NeumannInverseLinearOperator` approximates it
by a truncated Neumann series. Both are operators of this library: they
compose (``Hinv @ G``, ``2.0 * Hinv``), work in scipy's solvers, take and return
arrays of any library, and compute in the operator's own array library.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._base import LinearOperator
from curvlinops._checks import shape_error, type_error
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
        tol: float = 1e-5,
        atol: float = 0.0,
        maxiter: int | None = None,
        preconditioner: Any = None,
        on_failure: str = "warn",
    ) -> None:
        super().__init__(A, damping)
        self.tol = check_real(tol, "tol", minimum=0.0)
        self.atol = check_real(atol, "atol", minimum=0.0)
        n = self.shape[0]
        self.maxiter = 10 * n if maxiter is None else check_int(maxiter, "maxiter")
        self.on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
        self._precondition = self._preconditioner(preconditioner)
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
        solver = _BatchedCG(self, B)
        X = solver.run()
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

    def __init__(self, owner: CGInverseLinearOperator, B: Any) -> None:
        self.owner, self.op, self.xp = owner, owner._op, owner._op.xp
        xp, K = self.xp, B.shape[1]
        self.iterations = np.zeros(K, dtype=int)
        self.converged = np.zeros(K, dtype=bool)
        self.indefinite = np.zeros(K, dtype=bool)
        self.nonfinite = np.zeros(K, dtype=bool)
        self.products = 0
        self.finished: list[tuple[np.ndarray, Any]] = []
        self.rhs_norms = self.op.to_host(xp.linalg.vector_norm(B, axis=0)).astype(np.float64)
        self.residuals = self.rhs_norms.copy()
        self.thresholds = np.maximum(owner.tol * self.rhs_norms, owner.atol)
        self._update = self.op.compile(_cg_update(xp))
        self._direction = self.op.compile(_cg_direction(xp))
        self.active = np.arange(K)  # global column of each state column
        self.live = np.ones(K, dtype=bool)  # state columns still iterating
        self.X, self.R = xp.zeros_like(B), B
        self.P = self._precondition(self.R)
        self.rz = xp.sum(self.R * self.P, axis=0)
        done = self.rhs_norms <= self.thresholds
        self._retire(done, np.zeros(K, dtype=bool), np.zeros(K, dtype=bool))

    def _precondition(self, R: Any) -> Any:
        M = self.owner._precondition
        return R if M is None else M(R)

    def run(self) -> Any:
        for _ in range(self.owner.maxiter):
            if not self.live.any():
                break
            self._step()
        return self._assemble()

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
        indefinite = live & ~done & ~nonfinite & ~(host[1] > 0)
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
        *,
        num_terms: int,
        scale: float,
        damping: float = 0.0,
        on_failure: str = "warn",
    ) -> None:
        super().__init__(A, damping)
        self.num_terms = check_int(num_terms, "num_terms")
        self.scale = check_real(scale, "scale", minimum=0.0, strict=True)
        self.on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
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
            message = (
                "NeumannInverseLinearOperator: the series diverges (last term "
                f"{np.nanmax(ratios):.2e} times the first): scale = {s:g} must be below "
                "2 / lambda_max(A + damping I), and A + damping I positive definite. Use e.g. "
                "scale = 0.9 * curvlinops.eigen.max_stable_learning_rate(A)."
            )
            if self.on_failure == "raise":
                raise ConvergenceError(message)
            warnings.warn(message, ConvergenceWarning, stacklevel=6)
        return s * total
