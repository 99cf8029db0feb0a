r"""Eigenvalues of symmetric operators: Lanczos, ``eigsh``, sharpness.

All functions take an operator of this library, a scipy ``LinearOperator``
(or sparse matrix), or a dense numpy/PyTorch/JAX/CuPy array, and assume it is
symmetric (Hessians and GGNs are). They run in the operator's own array
library: PyTorch tensors or JAX arrays for operators with a backend, numpy for
scipy operators and numpy arrays, CuPy for CuPy arrays.

For gradient descent :math:`w \leftarrow w - \alpha \nabla \mathcal{J}(w)`
near a minimum with Hessian :math:`H`, the error along eigenvector :math:`i`
is multiplied by :math:`1 - \alpha \lambda_i` in each step, so the iteration
is stable if and only if :math:`\alpha < 2 / \lambda_{\max}`
(:func:`max_stable_learning_rate`); :math:`\lambda_{\max}` is called the
*sharpness* (:func:`sharpness`).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import array_api_compat
import numpy as np
import scipy.sparse.linalg

from curvlinops._checks import shape_error, type_error, value_error
from curvlinops._compiled import traced_product as _traced_product
from curvlinops._memory import (
    MemoryBudgetError,
    MemoryEstimate,
    format_bytes,
    product_memory,
    resolve_budget,
    where,
)
from curvlinops._operand import (
    ConvergenceError,
    ConvergenceWarning,
    Operand,
    as_operand,
    check_choice,
    check_int,
    check_real,
    raise_nonfinite,
)
from curvlinops.backends import _cupy
from curvlinops.backends._arrays import is_array

__all__ = [
    "ConvergenceError",
    "ConvergenceWarning",
    "LanczosResult",
    "MemoryBudgetError",
    "eigsh",
    "eigsh_memory",
    "lanczos",
    "max_stable_learning_rate",
    "sharpness",
]

WHICH = ("LA", "SA", "LM")
LANCZOS_WORK_VECTORS = 8
"""Vectors of size ``n`` per start vector that a Lanczos step holds besides the basis
(the current and previous vectors, the product, and the temporaries of the update)."""
NATIVE_WORK_VECTORS = 4
"""The same for a step of the native ``eigsh`` on writeable arrays (the product, its
projection and the projected vector, one spare); the eigenvectors at the end replace them."""
IMMUTABLE_WORK_VECTORS = 6
"""The same for immutable (JAX) arrays, where no update is in place."""
ARPACK_WORK_VECTORS = 6
"""ARPACK's work arrays besides its basis: ``resid``, ``workd`` (3 vectors) and the
two vectors scipy's operator call converts."""
DGKS_RATIO = 0.7071067811865476
"""Orthogonalise a Krylov vector again when one pass shrank it below this share
(Daniel, Gragg, Kaufman and Stewart, 1976; ARPACK's 0.717)."""

ACCURATE_BLOCK = 1 << 16
"""Length of the blocks whose inner products are summed in float64 (see :func:`_inner`).

Within a block BLAS sums in single precision: relative errors 8e-9 (2^16) and 2.6e-8
(2^14) on 269,322 entries, 3.9e-8 and 5.6e-9 on 10^7, against 1.4e-6 for one call;
each block costs five array operations, 17 of them per inner product at 2^14 on the
benchmark MLP (a tenth of its eigsh)."""
REORTHOGONALIZE_RATIO = 0.5**0.5
"""A Gram-Schmidt pass that leaves a vector above this share of its norm needs no second one."""
MIN_EXTRA_VECTORS = 3
"""The smallest basis ``eigsh`` shrinks to under a budget: ``k`` plus this many."""


# --- Lanczos -------------------------------------------------------------------------------
class LanczosResult(NamedTuple):
    r"""The output of :func:`lanczos`: :math:`A Q \approx Q T` with :math:`T` tridiagonal.

    For one start vector, ``alphas`` has shape ``(s,)``, ``betas`` ``(s - 1,)`` and
    ``basis`` ``(n, s)``; for ``m`` start vectors (the columns of an ``(n, m)``
    ``v0``) a leading axis of length ``m`` comes first: ``(m, s)``, ``(m, s - 1)``,
    ``(m, n, s)``. All are arrays of the operator's library.

    Attributes:
        alphas: Diagonal of :math:`T`, :math:`\alpha_j = q_j^\top A q_j`.
        betas: Off-diagonal of :math:`T`; a zero marks a breakdown (an invariant
            subspace was found), after which the basis vectors are zero.
        basis: The orthonormal Lanczos vectors :math:`Q` as columns, or ``None``
            when it was not kept.
    """

    alphas: Any
    betas: Any
    basis: Any

    def tridiagonal(self) -> Any:
        """The tridiagonal matrix :math:`T`, shape ``(s, s)`` or ``(m, s, s)``."""
        xp = array_api_compat.array_namespace(self.alphas)
        s = self.alphas.shape[-1]
        device = array_api_compat.device(self.alphas)
        eye = xp.eye(s, dtype=self.alphas.dtype, device=device)
        upper = xp.eye(s, k=1, dtype=self.alphas.dtype, device=device)
        pad = xp.zeros((*self.betas.shape[:-1], 1), dtype=self.betas.dtype, device=device)
        betas = xp.concat([self.betas, pad], axis=-1)
        U = betas[..., :, None] * upper
        return self.alphas[..., :, None] * eye + U + xp.matrix_transpose(U)


def lanczos(
    A: Any,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    seed: int = 0,
    v0: Any = None,
    keep_basis: bool = True,
    memory_budget: float | None = None,
) -> LanczosResult:
    r"""Lanczos tridiagonalisation of a symmetric operator.

    Builds an orthonormal basis :math:`Q = [q_1, \dots, q_s]` of the Krylov space
    :math:`\mathcal{K}_s(A, v_0) = \mathrm{span}\{v_0, A v_0, \dots, A^{s-1} v_0\}` by the
    three-term recurrence :math:`\beta_j q_{j+1} = A q_j - \alpha_j q_j - \beta_{j-1}
    q_{j-1}`, so that :math:`Q^\top A Q = T` is tridiagonal with diagonal
    :math:`\alpha` and off-diagonal :math:`\beta`. The eigenvalues of :math:`T`
    (Ritz values) approximate the extreme eigenvalues of :math:`A`. Costs one
    product per step; several start vectors (columns of ``v0``) run together as
    the columns of one ``matmat``.

    Args:
        A: A symmetric operator of this library, a scipy ``LinearOperator`` or
            sparse matrix, or a dense array.
        num_steps: Number of Lanczos steps ``s`` (products), ``1 <= s <= n``.
        reorthogonalize: Orthogonalise each new vector against all previous ones
            (classical Gram-Schmidt, twice). Keeps :math:`Q` orthonormal in
            floating point; without it, Ritz values repeat ("ghosts") and the
            basis is kept only if ``keep_basis``.
        seed: Seed of the standard-normal start vector when ``v0`` is ``None``.
        v0: Start vector ``(n,)``, or ``(n, m)`` for ``m`` independent runs; any
            array library (it is converted to the operator's). It is normalised.
        keep_basis: Return the basis (memory ``n * s`` per start vector).
        memory_budget: Bytes the call may allocate (basis and work vectors, not the
            operator's products). Default: half of the memory available where the
            operator's arrays live (see :mod:`curvlinops._memory`).

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis)`` in the operator's
        array library; ``result.tridiagonal()`` builds :math:`T`.

    Raises:
        ValueError: ``num_steps`` outside ``[1, n]``, or ``v0`` of a wrong shape.
        MemoryBudgetError: The basis and work vectors need more than
            ``memory_budget`` or than is available (checked before any product).

    Example:
        >>> import numpy as np
        >>> from curvlinops.eigen import lanczos
        >>> A = np.diag([1.0, 2.0, 3.0, 4.0])
        >>> result = lanczos(A, 4)
        >>> np.round(np.linalg.eigvalsh(result.tridiagonal()), 8)
        array([1., 2., 3., 4.])
    """
    op = as_operand(A)
    n = op.shape[0]
    num_steps = check_int(num_steps, "num_steps")
    if num_steps > n:
        raise value_error(
            "num_steps",
            f"at most the operator's size n = {n} (the Krylov space has at most n dimensions)",
            str(num_steps),
        )
    start, single = _start_vectors(op, v0, seed)
    keep = bool(reorthogonalize) or bool(keep_basis)
    estimate = lanczos_memory(op, start.shape[1], num_steps, keep, memory_budget)
    estimate.fixes = [
        "Lower num_steps or the number of start vectors, pass keep_basis=False and "
        "reorthogonalize=False (then only the work vectors are kept), or raise "
        "memory_budget."
    ]
    estimate.check()
    alphas, betas, basis = _lanczos(op, start, num_steps, bool(reorthogonalize), bool(keep_basis))
    if not bool(op.to_host(op.xp.all(op.xp.isfinite(alphas)))):
        raise_nonfinite("lanczos")
    if single:
        alphas, betas = alphas[0, ...], betas[0, ...]
        basis = None if basis is None else op.xp.matrix_transpose(basis[0, ...])
    elif basis is not None:
        basis = op.xp.matrix_transpose(basis)
    return LanczosResult(alphas, betas, basis)


def lanczos_memory(
    op: Operand,
    num_vectors: int,
    num_steps: int,
    keep: bool,
    memory_budget: Any,
    what: str = "lanczos",
) -> MemoryEstimate:
    """What :func:`lanczos` allocates for ``num_vectors`` start vectors of ``num_steps`` steps.

    The basis buffer (``num_vectors * num_steps`` vectors; twice that for immutable
    arrays updated eagerly, see :func:`_copies`) and the work
    vectors; the products' own memory counts against the available memory only.
    """
    budget, available = resolve_budget(memory_budget, op.memory_device)
    vector = op.shape[0] * op.dtype.itemsize
    parts = {}
    if keep:
        copies = _copies(op)
        label = f"basis ({num_vectors} x {num_steps} vectors" + (
            ", x2 immutable)" if copies == 2 else ")"
        )
        parts[label] = copies * num_vectors * num_steps * vector
    parts[f"work vectors ({LANCZOS_WORK_VECTORS} per start vector)"] = (
        LANCZOS_WORK_VECTORS * num_vectors * vector
    )
    return MemoryEstimate(
        what,
        parts,
        budget,
        available,
        where(op.memory_device),
        outside_budget=product_memory(op.source, num_vectors),
    )


def _copies(op: Operand) -> int:
    """Buffers alive per basis: 1 where arrays are updated in place, 2 for immutable arrays.

    JAX's arrays are immutable, but the compiled updates of a donated basis
    (``.at[...].set``; restarts: ``JaxBackend.rotate_rows``) write in place: 1
    for the operators of a JAX backend, 2 for dense JAX arrays (evaluated eagerly).
    """
    zeros = op.zeros((1,))
    if array_api_compat.is_writeable_array(zeros):
        return 1
    compiled = op.backend is not None and op.backend.compiles
    return 1 if compiled and hasattr(zeros, "at") else 2


def _start_vectors(op: Operand, v0: Any, seed: int) -> tuple[Any, bool]:
    """Normalised start vectors as an ``(n, m)`` native array, and whether ``v0`` was 1-d."""
    n, xp = op.shape[0], op.xp
    if v0 is None:
        V = op.random((n, 1), check_int(seed, "seed", minimum=0))
        single = True
    else:
        V = op.native(v0, "v0")
        if V.ndim not in (1, 2) or V.shape[0] != n:
            raise shape_error("v0", f"shape ({n},) or ({n}, m)", tuple(V.shape))
        single = V.ndim == 1
        V = V[:, None] if single else V
    norms = xp.sqrt(_column_dots(xp, V, V, array_api_compat.is_writeable_array(V)))
    if not bool(xp.all(norms > 0)):
        raise value_error("v0", "start vectors of non-zero norm", "a zero column")
    return V / norms, single


def _lanczos(
    op: Operand, Q0: Any, num_steps: int, reorthogonalize: bool, keep_basis: bool
) -> tuple[Any, Any, Any]:
    """Batched Lanczos on the columns of ``Q0`` (``(n, m)``, unit columns).

    Returns ``alphas (m, s)``, ``betas (m, s - 1)``, ``basis (m, s, n)`` or None.
    Columns that break down continue as zero vectors with zero coupling, which
    adds decoupled zero blocks to ``T`` that carry no quadrature weight.
    """
    if _traced_product(op, Q0.shape[1]) is not None:
        from curvlinops.backends import _krylov_jax

        W0 = op.matmat(Q0)  # eagerly: the operator keeps its linearizations now
        program, arrays = _traced_product(op, Q0.shape[1])
        op.num_products += num_steps - 1
        return _krylov_jax.tridiagonalize(
            program, arrays, Q0, W0, num_steps, reorthogonalize, keep_basis
        )
    xp = op.xp
    n, m = Q0.shape
    keep = reorthogonalize or keep_basis
    # The basis lives in one (m, s, n) buffer filled row by row. Where arrays are
    # writeable (numpy, PyTorch, CuPy), rows are written in place and only the
    # filled rows take part in the projections; JAX arrays are immutable, and
    # growing shapes would make JAX compile every step anew, so there the step
    # works on the whole (zero-padded) buffer with fixed shapes, compiled once.
    basis = op.zeros((m, num_steps, n)) if keep else None
    writeable = basis is not None and array_api_compat.is_writeable_array(basis)
    accurate = array_api_compat.is_writeable_array(Q0)  # evaluated eagerly: not JAX
    step_fn = _lanczos_update(xp, op.eps * math.sqrt(n), reorthogonalize, keep, writeable, accurate)
    # the basis (argument 4) is replaced by the result: JAX may write its new row in place
    update = step_fn if writeable else op.compile(step_fn, donate_args=(4,) if keep else ())
    positions = xp.arange(num_steps, device=op.device)
    q, q_prev = Q0, xp.zeros_like(Q0)
    beta = xp.zeros_like(Q0[0, ...])
    anorm = xp.zeros_like(beta)
    if keep:
        basis = _add_row(xp, basis, positions, 0, q, writeable)
    alphas, betas = [], []
    for step in range(num_steps - 1):
        w = op.matmat(q)
        alpha, q_next, beta, basis, anorm = update(
            q, q_prev, beta, w, basis, anorm, positions, step + 1
        )
        q_prev, q = q, q_next
        alphas.append(alpha)
        betas.append(beta)
    alphas.append(_column_dots(xp, q, op.matmat(q), accurate))
    alphas_out = xp.stack(alphas, axis=1)
    betas_out = xp.stack(betas, axis=1) if betas else xp.zeros_like(alphas_out[:, :0])
    return alphas_out, betas_out, basis if keep_basis else None


@functools.cache  # one function per setting: JAX compiles it once, not once per call
def _lanczos_update(
    xp: Any, tolerance: float, reorthogonalize: bool, keep: bool, writeable: bool, accurate: bool
) -> Any:
    """The vector arithmetic of one Lanczos step after the product ``w = A q``.

    A pure function of native arrays for immutable arrays (JAX compiles it once);
    with writeable arrays it writes the new row into ``basis`` in place.
    """

    def update(q, q_prev, beta, w, basis, anorm, positions, index):
        anorm = xp.maximum(anorm, xp.linalg.vector_norm(w, axis=0))
        alpha = _column_dots(xp, q, w, accurate)
        w = w - alpha * q - beta * q_prev
        norms = None
        if reorthogonalize and writeable:
            w, norms = _project_out_selective(xp, w, basis[:, :index, :], accurate)
        elif reorthogonalize:
            w = _project_out(xp, w, basis, accurate)
        q_next, beta_next = _normalize(xp, w, tolerance * anorm, accurate, norms)
        if keep:
            basis = _add_row(xp, basis, positions, index, q_next, writeable)
        return alpha, q_next, beta_next, basis, anorm

    return update


def _add_row(xp: Any, basis: Any, positions: Any, index: Any, q: Any, writeable: bool) -> Any:
    """``basis[:, index, :] = q.T``; without item assignment for immutable arrays."""
    if writeable:
        basis[:, index, :] = xp.matrix_transpose(q)
        return basis
    if hasattr(basis, "at"):  # JAX's functional update: in place when the buffer is donated
        return basis.at[:, index, :].set(xp.matrix_transpose(q))
    onehot = xp.astype(positions == index, basis.dtype)
    return basis + onehot[None, :, None] * xp.matrix_transpose(q)[:, None, :]


def _inner(xp: Any, A: Any, B: Any) -> Any:
    """``A @ B`` over a long inner axis ``n``, accurate in single precision.

    A float32 inner product of ``n = 10^7`` entries, summed by BLAS in float32,
    is off by about ``1e-3`` relative (a norm of a unit vector came out as
    0.9992), enough to break the orthogonality of a Lanczos basis and to make
    its Ritz values exceed the spectrum. Blocks of :data:`ACCURATE_BLOCK`
    entries are multiplied by BLAS and their results summed in float64, as fast
    as one call; below one block this is the plain product. For writeable
    (eagerly evaluated) arrays; JAX's compiled reductions are accurate already.
    """
    n = A.shape[-1]
    if n <= ACCURATE_BLOCK or A.dtype in (xp.float64, xp.complex128):
        return A @ B  # short, or summed in double precision already
    total = None
    for start in range(0, n, ACCURATE_BLOCK):
        stop = start + ACCURATE_BLOCK
        part = xp.astype(A[..., start:stop] @ B[..., start:stop, :], xp.float64)
        total = part if total is None else total + part
    return xp.astype(total, A.dtype)


def _column_dots(xp: Any, X: Any, Y: Any, accurate: bool) -> Any:
    """``sum(X * Y, axis=0)`` for ``(n, m)`` arrays (float64-summed blocks if ``accurate``)."""
    if not accurate or X.shape[0] <= ACCURATE_BLOCK:
        return xp.sum(X * Y, axis=0)
    Xt, Yt = xp.matrix_transpose(X)[:, None, :], xp.matrix_transpose(Y)[:, :, None]
    return _inner(xp, Xt, Yt)[:, 0, 0]


def _project_out(xp: Any, W: Any, B: Any, accurate: bool = False) -> Any:
    """Remove from each column ``W[:, i]`` its components along the rows of ``B[i]``.

    ``W`` is ``(n, m)`` and ``B`` is ``(m, j, n)`` with orthonormal rows; two
    passes of classical Gram-Schmidt ("twice is enough").
    """
    Wt = xp.matrix_transpose(W)[:, :, None]  # (m, n, 1)
    Bt = xp.matrix_transpose(B)  # (m, n, j)
    for _ in range(2):
        Wt = Wt - Bt @ (_inner(xp, B, Wt) if accurate else B @ Wt)
    return xp.matrix_transpose(Wt[:, :, 0])


def _project_out_selective(xp: Any, W: Any, B: Any, accurate: bool) -> tuple[Any, Any]:
    """:func:`_project_out` for eager arrays, with the second pass only where it is needed.

    The second pass runs only when the first one shrank some column below
    :data:`REORTHOGONALIZE_RATIO` of its norm (the Kahan-Parlett / DGKS test;
    the test reads the host): otherwise the first pass left it orthogonal to
    working precision, and the second would read the whole basis again for
    nothing (half of SLQ's time on a 3,466-parameter MLP). Returns the
    columns and, when one pass sufficed, their norms (else ``None``).
    """
    Bt = xp.matrix_transpose(B)  # (m, n, j)
    before = _column_norms(xp, W, accurate)
    Wt = xp.matrix_transpose(W)[:, :, None]  # (m, n, 1)
    Wt = Wt - Bt @ (_inner(xp, B, Wt) if accurate else B @ Wt)
    W = xp.matrix_transpose(Wt[:, :, 0])
    after = _column_norms(xp, W, accurate)
    if bool(xp.all(after > REORTHOGONALIZE_RATIO * before)):
        return W, after
    Wt = Wt - Bt @ (_inner(xp, B, Wt) if accurate else B @ Wt)
    return xp.matrix_transpose(Wt[:, :, 0]), None


def _column_norms(xp: Any, W: Any, accurate: bool) -> Any:
    if accurate and W.shape[0] > ACCURATE_BLOCK:
        return xp.sqrt(_column_dots(xp, W, W, True))
    return xp.linalg.vector_norm(W, axis=0)


def _normalize(
    xp: Any, W: Any, threshold: Any, accurate: bool = False, norms: Any = None
) -> tuple[Any, Any]:
    """Unit columns ``W / ||W||``; columns with norm below ``threshold`` become zero.

    ``norms``: the columns' norms where known. With eager (``accurate``)
    arrays, the common case of no small column is read on the host and takes
    one division instead of the masked one.
    """
    if norms is None:
        norms = _column_norms(xp, W, accurate)
    ok = norms > threshold
    if accurate and bool(xp.all(ok)):
        return W / norms, norms
    zeros = xp.zeros_like(norms)
    safe = xp.where(ok, norms, zeros + 1)
    return xp.where(ok, W / safe, xp.zeros_like(W)), xp.where(ok, norms, zeros)


# --- eigsh ----------------------------------------------------------------------------------
def eigsh(
    A: Any,
    k: int = 6,
    which: str = "LM",
    *,
    v0: Any = None,
    ncv: int | None = None,
    maxiter: int | None = None,
    tol: float | None = None,
    return_eigenvectors: bool = True,
    seed: int = 0,
    on_failure: str = "warn",
    memory_budget: float | None = None,
    return_info: bool = False,
) -> Any:
    r"""``k`` eigenvalues (and eigenvectors) of a symmetric operator.

    Solves :math:`A u_i = \lambda_i u_i` for the ``k`` eigenvalues selected by
    ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"``
    largest magnitude (scipy's default). The call and the results are those of
    :func:`scipy.sparse.linalg.eigsh`; where the computation runs depends on ``A``:

    * numpy arrays, scipy operators and sparse matrices, and this library's
      framework-free operators: :func:`scipy.sparse.linalg.eigsh` (ARPACK);
    * CuPy arrays and ``cupyx`` operators: ``cupyx.scipy.sparse.linalg.eigsh``;
    * operators with a PyTorch or JAX backend, and dense PyTorch/JAX arrays:
      thick-restart Lanczos in that framework, on its device. Each step is one
      product; the Krylov basis (at most ``ncv`` vectors) is kept orthonormal by
      Gram-Schmidt applied twice, its Rayleigh quotient :math:`V^\top A V` is
      diagonalised, and on restart the ``k`` wanted Ritz vectors and half of the
      others are kept (Wu & Simon, 2000). A Ritz pair :math:`(\theta, y)` counts as
      converged when :math:`\|A y - \theta y\| \le` ``tol`` :math:`\cdot \max|\theta|`.
      The test runs after every product (an eigenproblem of at most ``ncv`` rows),
      so the solver stops at the step its pairs converge, not at the next full
      basis (ARPACK tests only there); except where the basis is nearly invariant,
      whose exact pairs can miss copies of repeated eigenvalues.

    Memory: the basis takes ``ncv`` vectors of size ``n`` (for a model of 100 M
    parameters, 400 MB each in float32). Before the first product, the call adds
    up what it will keep -- basis, work vectors, eigenvectors -- and, unless
    ``ncv`` is given, shrinks the basis from its default until that fits
    ``memory_budget`` (down to ``k + 3`` vectors; a smaller basis needs more
    restarts, not more memory). Restarts rewrite the basis in place (in blocks of
    columns); JAX arrays are immutable, but the compiled steps and restarts take
    the basis as a donated buffer and XLA updates it in place too. When even
    the smallest basis does not fit, a :class:`MemoryBudgetError` says what is
    needed, what is available and which options lower it.

    JAX: the whole loop (products, Gram-Schmidt, restarts, convergence test) runs
    in one compiled program, the host reads the results once at the end; its
    inner products are summed in float64 (with ``jax_enable_x64``) or with a
    compensated sum of block partial sums; the basis is updated in place there
    too. Where the product cannot be traced (data from a loader, host reads),
    the loop steps eagerly.

    Args:
        A: A symmetric operator or matrix (see above).
        k: Number of eigenvalues, ``1 <= k < n``.
        which: ``"LA"``, ``"SA"`` or ``"LM"``.
        v0: Start vector ``(n,)`` (any array library); default: a standard-normal
            vector drawn with ``seed``.
        ncv: Largest basis size, ``k < ncv <= n`` (default ``min(n, max(2k + 1, 20))``).
        maxiter: Largest number of restarts (default ``10 * n``).
        tol: Relative accuracy of the eigenpairs. Default: machine precision for
            ARPACK (scipy's ``tol=0``); ``eps ** (2/3)`` of the dtype for the native
            solver (about ``2.4e-5`` in float32, ``3.7e-11`` in float64); the
            eigenvalue error is about the square of the residual over the gap to
            the rest of the spectrum, so well-separated eigenvalues come out to
            about machine precision.
        return_eigenvectors: Also return the eigenvectors.
        seed: Seed of the default start vector (results are reproducible).
        on_failure: ``"warn"`` (a :class:`ConvergenceWarning`, and the current
            estimates) or ``"raise"`` (a :class:`ConvergenceError`) when not all
            wanted pairs converge in ``maxiter`` restarts.
        memory_budget: Bytes the solver may allocate (basis, work vectors,
            eigenvectors; not the operator's products). Default: half of the memory
            available where the operator's arrays live when the call starts.
        return_info: Also return a dict: ``solver``, ``ncv`` (basis vectors kept),
            ``basis_bytes``, ``estimated_bytes`` (and its ``parts``),
            ``memory_budget``, ``available``, ``restarts``, ``products``, ``tol``,
            ``converged``, and per returned eigenpair (ascending) ``residuals``
            :math:`\|A y - \theta y\|` and ``relative_residuals`` (divided by
            :math:`|\theta|`): computed with ``k`` extra products when eigenvectors
            are returned (the native solver's own Lanczos estimates then in
            ``estimated_residuals``; a computed residual over ``tol`` makes
            ``converged`` false and warns or raises as ``on_failure`` says),
            else the Lanczos estimates.

    Returns:
        The eigenvalues ``(k,)`` in ascending order, and if ``return_eigenvectors``
        the unit eigenvectors as the columns of an ``(n, k)`` array, both in the
        array library the computation ran in; the info dict last if ``return_info``.

    Raises:
        ValueError: ``k``, ``which``, ``ncv`` out of range; ``v0`` of a wrong shape.
        MemoryBudgetError: The solver's arrays need more than ``memory_budget`` or
            than is available, even with the smallest basis (checked before any
            product).
        ConvergenceError: Not converged and ``on_failure="raise"``.
        FloatingPointError: The products with ``A`` gave NaN or inf.

    Example:
        >>> import numpy as np
        >>> from curvlinops.eigen import eigsh
        >>> A = np.diag(np.arange(1.0, 11.0))
        >>> eigsh(A, k=3, which="LA", return_eigenvectors=False)
        array([ 8.,  9., 10.])
    """
    on_failure = check_choice(on_failure, "on_failure", ("warn", "raise"))
    seed = check_int(seed, "seed", minimum=0)
    if not isinstance(return_info, bool):
        raise type_error("return_info", "True or False", return_info)
    if _cupy.is_cupy_operator(A) and not is_array(A):  # cupyx operator or sparse matrix
        options = _eigsh_options(A.shape[0], k, which, ncv, maxiter, tol)
        options["ncv"] = options["ncv"] or _default_ncv(A.shape[0], options["k"])
        return _eigsh_cupyx(A, v0, seed, return_eigenvectors, options)
    op = as_operand(A)
    options = _eigsh_options(op.shape[0], k, which, ncv, maxiter, tol)
    native = not (_cupy.is_cupy_operator(op.source) or op.library == "numpy")
    options["ncv"], estimate = _plan_basis(
        op, options["k"], options["ncv"], memory_budget, bool(return_eigenvectors), native
    )
    start, single = _start_vectors(op, v0, seed)
    if not single:
        raise shape_error("v0", f"a vector of shape ({op.shape[0]},)", tuple(start.shape))
    start = start[:, 0]
    compiled = native and op.library == "jax"  # the whole loop in one program
    if native:
        # handed over in a list, so that no reference here keeps the vector alive
        handover, start = [start], None
        result, info = _eigsh_native(
            op, handover, seed, bool(return_eigenvectors), on_failure, compiled, **options
        )
        if return_info and return_eigenvectors:
            _check_computed_residuals(op, result, info, on_failure)
    else:
        cupy = _cupy.is_cupy_operator(op.source)
        solver = _cupy.eigsh if cupy else scipy.sparse.linalg.eigsh
        result = _eigsh_library(solver, op, start, return_eigenvectors, on_failure, options)
        info = _library_info(op, result, return_eigenvectors, return_info, options)
    if not return_info:
        return result
    info.update(ncv=options["ncv"], **estimate.as_dict())
    info["basis_bytes"] = _copies(op) * options["ncv"] * op.shape[0] * op.dtype.itemsize
    return (*result, info) if return_eigenvectors else (result, info)


def eigsh_memory(
    A: Any,
    k: int = 6,
    which: str = "LM",
    *,
    ncv: int | None = None,
    return_eigenvectors: bool = True,
    memory_budget: float | None = None,
) -> MemoryEstimate:
    """What :func:`eigsh` with these arguments would allocate, without running it.

    The basis size :func:`eigsh` would choose for ``memory_budget``, the parts
    of the solver's own arrays (basis, work vectors, eigenvectors) and, in
    ``outside_budget``, what one product needs (for this library's curvature
    operators: columns, the model's activations on the largest batch and the
    linearizations the cache may keep, see ``A.memory_estimate``). Nothing is
    multiplied; a curvature operator runs one forward pass (PyTorch) or traces
    one (JAX) to size its activations.

    Args:
        A, k, which, ncv, return_eigenvectors, memory_budget: As for :func:`eigsh`.

    Returns:
        A :class:`~curvlinops.MemoryEstimate`: ``fits()`` says whether the call
        would run, ``describe()`` lists the parts, ``fixes`` what lowers them.

    Example:
        >>> import numpy as np
        >>> from curvlinops.eigen import eigsh_memory
        >>> estimate = eigsh_memory(np.eye(1000), k=3, memory_budget=2e5)
        >>> estimate.fits(), list(estimate.parts)[0]  # the default 20 vectors do not fit
        (True, 'basis (16 vectors)')
        >>> eigsh_memory(np.eye(1000), k=3, memory_budget=1e5).fits()
        False
    """
    op = as_operand(A)
    options = _eigsh_options(op.shape[0], k, which, ncv, None, None)
    native = not (_cupy.is_cupy_operator(op.source) or op.library == "numpy")
    try:
        return _plan_basis(
            op, options["k"], options["ncv"], memory_budget, bool(return_eigenvectors), native
        )[1]
    except MemoryBudgetError as error:
        return error.estimate


def _default_ncv(n: int, k: int) -> int:
    """The default basis size (scipy's)."""
    return min(n, max(2 * k + 1, 20))


def _plan_basis(
    op: Operand, k: int, ncv: int | None, memory_budget: Any, vectors: bool, native: bool
) -> tuple[int, MemoryEstimate]:
    """The basis size and the memory estimate of an ``eigsh`` call, checked.

    A given ``ncv`` is kept (and refused if it does not fit); the default shrinks
    to the largest size that fits the budget and, with what a product needs, the
    memory available, but not below ``k + 3``.
    """
    n = op.shape[0]
    budget, available = resolve_budget(memory_budget, op.memory_device)
    vector = n * op.dtype.itemsize
    copies = _copies(op) if native else 1
    writeable = array_api_compat.is_writeable_array(op.zeros((1,)))
    work = NATIVE_WORK_VECTORS if writeable or not native else IMMUTABLE_WORK_VECTORS
    outside = product_memory(op.source, 1)

    def estimate(size: int) -> MemoryEstimate:
        immutable = ", x2 immutable" if copies == 2 else ""
        parts = {f"basis ({size} vectors{immutable})": copies * size * vector}
        if not native:  # ARPACK keeps its work arrays while it forms the eigenvectors
            parts["work vectors"] = ARPACK_WORK_VECTORS * vector
            if vectors:
                parts[f"eigenvectors ({k})"] = k * vector
        elif vectors and k > work:  # the eigenvectors come after the work vectors are gone
            parts[f"eigenvectors ({k}, after the work vectors)"] = k * vector
        else:
            parts["work vectors"] = work * vector
        return MemoryEstimate("eigsh", parts, budget, available, where(op.memory_device),
                              outside_budget=outside)  # fmt: skip

    if ncv is None:
        ncv, smallest = _default_ncv(n, k), min(n, k + MIN_EXTRA_VECTORS)
        # within the budget, and with the products within what is available
        while ncv > smallest and not estimate(ncv).fits():
            ncv -= 1
        single = " or compute in float32" if op.dtype.itemsize > 4 else ""
        fixes = (
            f"The basis is already at its smallest ({ncv} = k + {ncv - k} vectors of "
            f"{format_bytes(vector)}): raise memory_budget, lower k{single}, or pass "
            "return_eigenvectors=False."
        )
    else:
        fixes = f"Lower ncv (at least k + 1 = {k + 1}) or leave it out, or raise memory_budget."
    result = estimate(ncv)
    result.fixes = [fixes]
    result.check()
    return ncv, result


def _eigsh_cupyx(A: Any, v0: Any, seed: int, return_eigenvectors: bool, options: dict) -> Any:
    """``cupyx.scipy.sparse.linalg.eigsh`` for CuPy operators and sparse matrices."""
    options = {**options, "tol": options["tol"] or 0}
    start = _cupy.random_vector(A.shape[0], A.dtype, seed) if v0 is None else v0
    return _cupy.eigsh(A, v0=start, return_eigenvectors=return_eigenvectors, **options)


def _eigsh_options(n: int, k: Any, which: Any, ncv: Any, maxiter: Any, tol: Any) -> dict[str, Any]:
    """Checked ``k, which, ncv, maxiter, tol`` with their defaults filled in."""
    k = check_int(k, "k")
    if k >= n:
        raise value_error(
            "k", f"k < n = {n}", str(k), "For all eigenvalues, use numpy.linalg.eigh on todense()."
        )
    which = check_choice(which, "which", WHICH)
    if ncv is not None:
        ncv = check_int(ncv, "ncv")
        if not k < ncv <= n:
            raise value_error("ncv", f"k < ncv <= n (k = {k}, n = {n})", str(ncv))
    maxiter = 10 * n if maxiter is None else check_int(maxiter, "maxiter")
    tol = None if tol is None else check_real(tol, "tol", minimum=0.0)
    return dict(k=k, which=which, ncv=ncv, maxiter=maxiter, tol=tol)


def _eigsh_library(
    solver: Any,
    op: Operand,
    start: Any,
    return_eigenvectors: bool,
    on_failure: str,
    options: dict,
) -> Any:
    """ARPACK through scipy (numpy) or cupyx (CuPy), from the start vector ``start``."""
    options = {**options, "tol": 0 if options["tol"] is None else options["tol"]}
    try:
        result = solver(op.source, v0=start, return_eigenvectors=return_eigenvectors, **options)
    except scipy.sparse.linalg.ArpackNoConvergence as error:
        message = f"eigsh: ARPACK did not converge ({error}). Increase maxiter or ncv, or tol."
        if on_failure == "raise":
            raise ConvergenceError(message) from error
        warnings.warn(message + " Returning the converged pairs only.", ConvergenceWarning, 3)
        result = (error.eigenvalues, error.eigenvectors)
        if not return_eigenvectors:
            result = result[0]
    if return_eigenvectors:
        return result
    xp = array_api_compat.array_namespace(result)
    return xp.sort(result)


def _library_info(
    op: Operand, result: Any, return_eigenvectors: bool, return_info: bool, options: dict
) -> dict[str, Any]:
    """Info of an ARPACK run: residuals from ``k`` extra products when vectors are returned."""
    info: dict[str, Any] = {"solver": "ARPACK", "tol": options["tol"] or 0.0}
    if not (return_info and return_eigenvectors):
        return info
    info.update(_computed_residuals(op, *result))
    info["products"] = None  # ARPACK's own count is not reported by scipy
    return info


def _computed_residuals(op: Operand, values: Any, vectors: Any) -> dict[str, list[float]]:
    """``||A y - theta y||`` and its ratio to ``|theta|`` per pair, one product each.

    Column by column: two vectors beside the eigenvectors, not two ``(n, k)`` arrays.
    """
    xp = op.xp
    host_values = np.asarray(op.to_host(values), np.float64)
    residuals = []
    for i in range(host_values.shape[0]):
        y = vectors[:, i : i + 1]
        r = op.matmat(y) - y * values[i]
        residuals.append(float(op.to_host(xp.linalg.vector_norm(r))))
    host = np.asarray(residuals)
    return {"residuals": host.tolist(), "relative_residuals": _relative(host, host_values).tolist()}


def _relative(residuals: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``residuals / |values|`` (infinite for zero eigenvalues)."""
    with np.errstate(divide="ignore"):
        return np.asarray(residuals, np.float64) / np.abs(np.asarray(values, np.float64))


class _Krylov:
    """Orthonormal basis ``V`` (rows), its projection ``H``, and the next vector.

    Invariant: ``A V^T = V^T T + resid * next e_last^T`` with ``T`` the symmetric
    part of ``H`` and ``next`` orthogonal to the rows of ``V``. ``V`` and ``H``
    are fixed-size buffers (``ncv`` rows, the unused ones zero), so that every
    step works on arrays of the same shapes (JAX compiles each shape once).
    """

    def __init__(self, op: Operand, start: Any, ncv: int, seed: int) -> None:
        self.op, self.ncv, self.seed = op, ncv, seed
        self.V = op.zeros((ncv, op.shape[0]))
        self.H = op.zeros((ncv, ncv))
        self.positions = op.xp.arange(ncv, device=op.device)
        self.writeable = array_api_compat.is_writeable_array(self.V)
        update = _krylov_update(op.xp, self.writeable)
        # V and H (arguments 0, 1) are replaced by the results: JAX updates them in place
        self._update = update if self.writeable else op.compile(update, donate_args=(0, 1))
        # JAX: restarts rotate the (donated) basis in place, see JaxBackend.rotate_rows
        self._rotate = getattr(op.backend, "rotate_rows", None) if not self.writeable else None
        self.size = 0
        self.next, self.resid = start, 0.0
        self.anorm = 0.0
        self.breakdowns = 0
        self.restarts = 0

    def step(self) -> None:
        """One product: add ``next`` to the basis and its column to ``H``."""
        n = self.op.shape[0]
        if self.writeable:  # the row is the only copy of the vector while A multiplies it
            self.V[self.size, :] = self.next
            self.next = self.V[self.size, :]
        w = self.op.matmat(self.next[:, None])[:, 0]
        self.V, self.H, w, norms = self._update(
            self.V, self.H, self.next, w, self.positions, self.size
        )
        self.next = None
        self.size += 1
        norms = self.op.to_host(norms)
        if not np.isfinite(norms).all():
            raise_nonfinite("eigsh")
        self.anorm = max(self.anorm, float(norms[0]))
        if self.size == n:  # the basis spans everything: no residual
            self.next, self.resid = None, 0.0
        elif float(norms[1]) > self.op.eps * math.sqrt(n) * self.anorm:
            if self.writeable:  # w is this step's own array: scaled in place
                w /= float(norms[1])  # (the compiled update returns it scaled)
            self.next, self.resid = w, float(norms[1])
        else:  # invariant subspace found: continue with a fresh direction
            self.next, self.resid = self._fresh_direction(), 0.0

    def _fresh_direction(self) -> Any:
        self.breakdowns += 1
        xp = self.op.xp
        w = self.op.random((self.op.shape[0],), self.seed + 7919 * self.breakdowns)
        writeable = array_api_compat.is_writeable_array(self.V)
        for _ in range(2):
            h = _inner(xp, self.V, w[:, None])[:, 0] if writeable else self.V @ w
            w = w - h @ self.V
        return w / xp.sqrt(_column_dots(xp, w[:, None], w[:, None], writeable))[0]

    def ritz(self) -> tuple[Any, Any, np.ndarray, np.ndarray]:
        """Ritz values and vectors of ``T`` (native), and values and residuals on the host.

        ``T`` is the filled ``size x size`` block: with a full basis before a
        restart, and after each step while the basis fills (a test then stops as
        soon as the pairs converge, not at the next full basis).
        """
        xp, m = self.op.xp, self.size
        H = self.H if m == self.ncv else self.H[:m, :m]
        T = xp.triu(H) + xp.matrix_transpose(xp.triu(H, k=1))
        theta, S = xp.linalg.eigh(T)
        residuals = self.resid * xp.abs(S[m - 1, :])
        host = self.op.to_host(xp.stack([theta, residuals]))
        return theta, S, host[0], host[1]

    def ritz_on_host(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values and residual estimates of the filled block, computed on the host.

        The test after each step: a small eigenproblem, which on a GPU would cost
        more in launches than on the host (the block is at most ``ncv`` square).
        """
        m = self.size
        T = np.triu(self.op.to_host(self.H[:m, :m]).astype(np.float64))
        theta, S = np.linalg.eigh(T + np.triu(T, k=1).T)
        return theta, self.resid * np.abs(S[m - 1, :])

    def basis(self) -> Any:
        """The filled rows of ``V``."""
        return self.V if self.size == self.ncv else self.V[: self.size, :]

    def restart(self, theta: Any, S: Any, order: np.ndarray, keep: int) -> None:
        """Keep the Ritz vectors ``order[:keep]``: ``V <- S_keep^T V``, ``H <- diag(theta)``."""
        xp, op = self.op.xp, self.op
        index = op.index(order)
        mask = xp.astype(xp.arange(self.ncv, device=op.device) < keep, op.native_dtype)
        S_keep = xp.take(S, index, axis=1) * mask[None, :]
        if array_api_compat.is_writeable_array(self.V):
            _rotate_in_place(self.V, xp.matrix_transpose(S_keep))
        elif self._rotate is not None:
            self.V = self._rotate(self.V, xp.matrix_transpose(S_keep))
        else:
            self.V = xp.matrix_transpose(S_keep) @ self.V
        self.H = op.eye(self.ncv) * (xp.take(theta, index) * mask)[None, :]
        self.size = keep
        self.restarts += 1


def _rotate_in_place(V: Any, R: Any) -> None:
    """``V <- R V`` for a writeable ``(m, n)`` array, block by block of columns.

    Each block of columns is replaced by its own image, so the only temporary
    is one block of ``m * (n / m)`` entries (one vector's worth), not a second
    copy of the basis.
    """
    m, n = V.shape
    width = max(1, -(-n // m))
    for start in range(0, n, width):
        V[:, start : start + width] = R @ V[:, start : start + width]


@functools.cache  # one function per setting: JAX compiles it once, not once per call
def _krylov_update(xp: Any, writeable: bool) -> Any:
    """Vector arithmetic of a Krylov step after the product ``w = A v``.

    Puts ``v`` into row ``index`` of ``V``, orthogonalises ``w`` against ``V`` (two
    passes of classical Gram-Schmidt), and puts the coefficients into column
    ``index`` of ``H``. Returns ``V, H, w`` and the norms of ``A v`` and of ``w``.
    Writeable arrays are updated in place and only the filled rows of ``V`` are
    read; otherwise (JAX) the function is pure, with fixed shapes, and compiled.
    """

    def update(V, H, v, w, positions, index):
        w_in = w
        if writeable:  # row `index` holds v already (see _Krylov.step)
            filled = V[: index + 1, :]
        elif hasattr(V, "at"):  # JAX: in place, V being donated
            V = filled = V.at[index, :].set(v)
        else:
            e = xp.astype(positions == index, V.dtype)
            V = V + e[:, None] * v[None, :]
            filled = V
        if writeable:  # eager: float64-summed blocks (see _inner); in place after a copy
            h = _inner(xp, filled, w[:, None])[:, 0]
            w = w - h @ filled  # a new array: the product's result may be shared
            norm_in = xp.linalg.vector_norm(w_in)
            norm_w = xp.sqrt(_inner(xp, w[None, :], w[:, None])[0, 0])
            # A second pass only where the first cancelled much of w (DGKS, as
            # ARPACK): it is 2 of the step's 5 passes over the basis.
            if float(norm_w) < DGKS_RATIO * float(norm_in):
                h2 = _inner(xp, filled, w[:, None])[:, 0]
                w -= h2 @ filled
                h = h + h2
                norm_w = xp.sqrt(_inner(xp, w[None, :], w[:, None])[0, 0])
            H[: index + 1, index] = h
            return V, H, w, xp.stack([norm_in, norm_w])
        h = filled @ w
        w = w - h @ filled
        h2 = filled @ w
        w, h = w - h2 @ filled, h + h2
        H = H.at[:, index].set(h) if hasattr(H, "at") else H + h[:, None] * e[None, :]
        norm_w = xp.linalg.vector_norm(w)
        # scaled here (one dispatch less); after a breakdown the caller discards it
        w = w / xp.where(norm_w > 0, norm_w, xp.ones_like(norm_w))
        return V, H, w, xp.stack([xp.linalg.vector_norm(w_in), norm_w])

    return update


def _order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of Ritz values, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _eigsh_native(
    op: Operand,
    start: list,
    seed: int,
    return_eigenvectors: bool,
    on_failure: str,
    compiled: bool,
    *,
    k: int,
    which: str,
    ncv: int,
    maxiter: int,
    tol: float | None,
) -> Any:
    """Thick-restart Lanczos in the operator's array library (``start``: a list to empty).

    ``compiled``: try the whole loop in one compiled program (JAX).
    """
    xp = op.xp
    tol = op.eps ** (2 / 3) if tol is None else tol
    if compiled:
        compiled = _eigsh_compiled(op, start, seed, return_eigenvectors, on_failure,
                                   k=k, which=which, ncv=ncv, maxiter=maxiter, tol=tol)  # fmt: skip
        if compiled is not None:
            return compiled
    krylov = _Krylov(op, start.pop(), ncv, seed)
    while True:
        while krylov.size < ncv and krylov.next is not None:
            krylov.step()
            # not where the basis is (nearly) invariant: its exact pairs miss the copies
            # of repeated eigenvalues that the next, (nearly) fresh directions find
            if k < krylov.size < ncv and krylov.resid > math.sqrt(op.eps) * krylov.anorm:
                if not _ritz_test(op, *krylov.ritz_on_host(), which, k, tol)[1].any():
                    theta, S, theta_host, residuals = krylov.ritz()
                    order, bad = _ritz_test(op, theta_host, residuals, which, k, tol)
                    if not bad.any():
                        break
        else:
            theta, S, theta_host, residuals = krylov.ritz()
            order, bad = _ritz_test(op, theta_host, residuals, which, k, tol)
        wanted = order[:k]
        if not bad.any() or krylov.next is None or krylov.restarts >= maxiter:
            break
        m = krylov.size
        krylov.restart(theta, S, order, max(k, min(m - 1, k + (m - k) // 2)))
    if bad.any():
        relative = residuals[wanted] / _ritz_scale(op, theta_host)
        _report_eigsh_failure(on_failure, bad, relative, tol, krylov.restarts, op)
    wanted = wanted[np.argsort(theta_host[wanted], kind="stable")]
    info = _native_info("thick-restart Lanczos", krylov.restarts, op, tol, bad,
                        residuals[wanted], theta_host[wanted])  # fmt: skip
    index = op.index(wanted)
    values = xp.take(theta, index)
    if not return_eigenvectors:
        return values, info
    krylov.next = None  # the work vectors go before the eigenvectors come
    # the Ritz vectors are V^T S[:, wanted] over the filled rows of V
    vectors = xp.matrix_transpose(krylov.basis()) @ xp.take(S, index, axis=1)
    return (values, vectors), info


def _ritz_scale(op: Operand, theta: np.ndarray) -> float:
    """What ``tol`` is relative to: the largest Ritz value's magnitude."""
    return max(float(np.max(np.abs(theta))), np.finfo(op.dtype).tiny)


def _ritz_test(
    op: Operand, theta: np.ndarray, residuals: np.ndarray, which: str, k: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """The Ritz values' order (most wanted first) and which wanted pairs miss ``tol``."""
    if not np.isfinite(theta).all():
        raise_nonfinite("eigsh")
    order = _order(theta, which)
    return order, residuals[order[:k]] > tol * _ritz_scale(op, theta)


def _native_info(
    solver: str,
    restarts: int,
    op: Operand,
    tol: float,
    bad: np.ndarray,
    residuals: np.ndarray,
    values: np.ndarray,
) -> dict[str, Any]:
    """The info dict of the native solver, for the returned pairs (ascending)."""
    return {
        "solver": solver,
        "restarts": restarts,
        "products": op.num_products,
        "tol": tol,
        "criterion": "residual <= tol * max|Ritz value|",
        "converged": not bool(bad.any()),
        "residuals": residuals.tolist(),
        "relative_residuals": _relative(residuals, values).tolist(),
    }


def _eigsh_compiled(
    op: Operand,
    start: list,
    seed: int,
    return_eigenvectors: bool,
    on_failure: str,
    *,
    k: int,
    which: str,
    ncv: int,
    maxiter: int,
    tol: float,
) -> Any:
    """:func:`_eigsh_native` for JAX operands in one compiled loop (``None``: not traceable).

    The first product runs eagerly (an operator keeps its linearizations then, and
    the product is traced again to read them), the rest inside the program; the
    host reads the results once.
    """
    from curvlinops.backends import _krylov_jax

    if _traced_product(op, 1) is None:
        return None
    first = op.matmat(start[-1][:, None])[:, 0]
    traced = _traced_product(op, 1)
    out = _krylov_jax.thick_restart(*traced, start.pop(), first, ncv=ncv, k=k, which=which,
                                    maxiter=maxiter, tol=tol, seed=seed,
                                    vectors=return_eigenvectors)  # fmt: skip
    host = {key: op.to_host(out[key])
            for key in ("theta", "residuals", "order", "scale", "status")}  # fmt: skip
    counters = {key: int(op.to_host(out[key])) for key in ("restarts", "products")}
    op.num_products += counters["products"]
    if int(host["status"]) == _krylov_jax.NONFINITE:
        raise_nonfinite("eigsh")
    theta_host, residuals = np.asarray(host["theta"], np.float64), host["residuals"]
    wanted = np.asarray(host["order"])[:k]
    scale = float(host["scale"])  # over the filled block's Ritz values only
    bad = residuals[wanted] > tol * scale
    if bad.any():
        _report_eigsh_failure(on_failure, bad, residuals[wanted] / scale, tol,
                              counters["restarts"], op)  # fmt: skip
    wanted = wanted[np.argsort(theta_host[wanted], kind="stable")]
    info = _native_info("thick-restart Lanczos (compiled loop)", counters["restarts"], op, tol,
                        bad, residuals[wanted], theta_host[wanted])  # fmt: skip
    index = op.index(wanted)
    values = op.xp.take(out["theta"], index)
    if not return_eigenvectors:
        return values, info
    vectors = out.pop("ritz_vectors")(op.xp.take(out["S"], index, axis=1))
    return (values, vectors), info


def _check_computed_residuals(op: Operand, result: Any, info: dict, on_failure: str) -> None:
    """Replace the Lanczos residual estimates in ``info`` by computed ones (``k`` products).

    The estimate assumes an orthonormal basis; in float32 over tens of millions of
    entries rounding undoes some of the orthogonality (JAX's compiled steps sum in
    float32), and the computed residual of a GPT-2-sized Hessian came out up to
    1.4x the estimate. A pair over ``tol`` after all is reported as not converged.
    """
    info["estimated_residuals"] = info["residuals"]
    info.update(_computed_residuals(op, *result))
    info["products"] = op.num_products
    scale = max(np.max(np.abs(np.asarray(op.to_host(result[0]), np.float64))), 1e-300)
    relative = np.asarray(info["residuals"]) / scale
    bad = relative > info["tol"]
    if bad.any() and info["converged"]:
        info["converged"] = False
        message = (
            f"eigsh: the Lanczos estimate said converged, but {int(bad.sum())} computed "
            f"residual(s) exceed tol: largest {float(relative.max()):.2e} > {info['tol']:.2e} "
            "(relative to the largest |eigenvalue|; rounding in a long float32 basis). "
            "Compute in float64, or loosen tol."
        )
        if on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)


def _report_eigsh_failure(
    on_failure: str, bad: np.ndarray, relative: np.ndarray, tol: float, restarts: int, op: Operand
) -> None:
    message = (
        f"eigsh: {int(bad.sum())} of {bad.size} wanted eigenpairs did not converge after "
        f"{restarts} restarts ({op.num_products} products): largest relative residual "
        f"{float(np.max(relative)):.2e} > tol = {tol:.2e}. Increase maxiter or ncv, or "
        "loosen tol; the returned values are the current estimates."
    )
    if on_failure == "raise":
        raise ConvergenceError(message)
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


# --- derived quantities -------------------------------------------------------------------
def sharpness(A: Any, *, return_info: bool = False, **eigsh_options: Any) -> Any:
    r"""The largest eigenvalue :math:`\lambda_{\max}(A)` ("sharpness" of a loss' Hessian).

    Args:
        A: A symmetric operator or matrix (as for :func:`eigsh`).
        return_info: Also return :func:`eigsh`'s info dict (basis size, memory,
            residual bound).
        **eigsh_options: Passed to :func:`eigsh` (``tol``, ``seed``, ``ncv``,
            ``memory_budget``, ...).

    Returns:
        :math:`\lambda_{\max}` as a Python float; with ``return_info``, the pair
        ``(value, info)``.

    Example:
        >>> import numpy as np
        >>> from curvlinops.eigen import sharpness
        >>> round(sharpness(np.diag([-5.0, 1.0, 2.0, 3.0])), 12)
        3.0
    """
    values, info = eigsh(
        A, k=1, which="LA", return_eigenvectors=False, return_info=True, **eigsh_options
    )
    xp = array_api_compat.array_namespace(values)
    top = float(xp.max(values))
    return (top, info) if return_info else top


def max_stable_learning_rate(A: Any, **eigsh_options: Any) -> float:
    r"""The gradient-descent stability bound :math:`2 / \lambda_{\max}(A)`.

    On the quadratic model :math:`\frac12 (w - w_\star)^\top H (w - w_\star)`,
    gradient descent with step size :math:`\alpha` multiplies the error along
    eigenvector :math:`i` by :math:`1 - \alpha\lambda_i` each step; it converges
    if and only if :math:`\alpha < 2 / \lambda_{\max}` (for :math:`H` positive
    definite).

    Args:
        A: The Hessian (or another symmetric curvature operator or matrix).
        **eigsh_options: Passed to :func:`eigsh`.

    Returns:
        :math:`2 / \lambda_{\max}` as a Python float.

    Raises:
        ValueError: :math:`\lambda_{\max} \le 0`: there is no positive curvature,
            and no step size makes gradient descent converge to a minimum.

    Example:
        >>> import numpy as np
        >>> from curvlinops.eigen import max_stable_learning_rate
        >>> round(max_stable_learning_rate(np.diag([0.5, 1.0, 4.0])), 12)
        0.5
    """
    top = sharpness(A, **eigsh_options)
    if top <= 0:
        raise value_error(
            "A",
            "an operator with a positive largest eigenvalue (a local minimum's Hessian)",
            f"lambda_max = {top:.3e}",
            "The stability bound 2 / lambda_max exists only for positive curvature.",
        )
    return 2.0 / top
