"""Krylov loops of JAX operators compiled whole: products, Gram-Schmidt, restarts, tests.

An eager Krylov step leaves compiled code for Python after every product
(dispatch, a host read of the norms for the convergence test); the cheaper the
product, the more that weighs. Here the operator's product is traced once into
a jaxpr whose arrays (parameters, data, kept linearizations) become arguments
of one compiled program that runs the whole thick-restart Lanczos
(:func:`thick_restart`) or the whole Lanczos tridiagonalisation
(:func:`tridiagonalize`) in ``lax.while_loop``/``lax.fori_loop``; the host reads
the results once at the end.

Inner products over the long axis ``n`` are summed accurately: with
``jax_enable_x64`` each term is summed in float64 (as the eager path of
:mod:`curvlinops.eigen` does); without it, in blocks of :data:`BLOCK` entries
whose float32 partial sums are added pairwise with their rounding errors
carried along (Knuth's TwoSum), so the result is as if summed in about twice
the working precision across blocks.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlinops.backends._jax import x64_enabled

__all__ = [
    "BLOCK",
    "TRACE_ERRORS",
    "Program",
    "accurate_dot",
    "slow_in_loops",
    "thick_restart",
    "trace_product",
    "tridiagonalize",
]

BLOCK = 4096
"""Entries per block of an accurate inner product without float64 (see module docstring)."""
TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)
"""What a product that cannot be traced raises (it reads values on the host): step eagerly."""


class Program:
    """A traced product ``X -> A @ X``; equal for equal jaxprs (compiled once per text)."""

    def __init__(self, closed: Any) -> None:
        self.jaxpr = closed.jaxpr
        self._key = str(closed.jaxpr)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Program) and self._key == other._key

    def __call__(self, consts: list, X: jax.Array) -> jax.Array:
        return jax.core.eval_jaxpr(self.jaxpr, consts, X)[0]


def trace_product(matmat: Any, n: int, columns: int, dtype: Any) -> tuple[Program, list]:
    """The product ``matmat`` on ``(n, columns)`` arrays as a :class:`Program` and its arrays.

    Raises one of :data:`TRACE_ERRORS` when the product reads values on the host.
    """
    closed = jax.make_jaxpr(matmat)(jax.ShapeDtypeStruct((n, columns), dtype))
    return Program(closed), list(closed.consts)


LOOP_SLOW_PRIMITIVES = frozenset({"conv_general_dilated"})
"""Primitives that XLA's CPU backend runs several times slower inside a loop.

A convolutional ResNet's Hessian product (1,480 parameters, 1,297 digits, 4
columns, one thread) took 4.6 s per step in ``lax.fori_loop`` against 0.88 s
called from the host (and 0.70 s unrolled): XLA's CPU convolutions lose
their fast path in a while loop's body (XNNPACK and oneDNN flags did not help)."""


def slow_in_loops(program: Program, platform: str) -> bool:
    """Whether ``program`` would run slower in a compiled loop on ``platform`` than stepped.

    On the CPU, a product with convolutions (:data:`LOOP_SLOW_PRIMITIVES`) is
    called from the host each step instead (an eager loop around the compiled
    product); other products and other platforms keep the compiled loop.
    """
    return platform == "cpu" and _uses(program.jaxpr, LOOP_SLOW_PRIMITIVES)


def _uses(jaxpr: Any, names: frozenset) -> bool:
    """Whether ``jaxpr`` or a jaxpr nested in it (calls, loops, branches) applies ``names``."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            return True
        for value in eqn.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's jaxpr
                if hasattr(inner, "eqns") and _uses(inner, names):
                    return True
    return False


# --- accurate inner products on block-major arrays ----------------------------------------------
# A vector of n entries is kept as (num_blocks, BLOCK) (zero-padded), a set of vectors as
# (num_blocks, ..., rows, BLOCK): every inner product is then a batched matrix product over the
# blocks (as fast as one BLAS call; a reduction over a reshaped (rows, n) array took 5-15x as
# long on the CPU), whose per-block partial sums are added accurately (_sum_blocks).
def _layout(n: int) -> tuple[int, int]:
    """Block length and number of blocks of vectors of ``n`` entries."""
    block = min(BLOCK, n)
    return block, -(-n // block)


def _blocked(x: jax.Array, block: int, num_blocks: int) -> jax.Array:
    """``(n, ...)`` -> ``(num_blocks, ..., block)``, zero-padded."""
    n = x.shape[0]
    x = jnp.pad(x, [(0, num_blocks * block - n)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape(num_blocks, block, *x.shape[1:])
    return jnp.moveaxis(x, 1, -1)


def _unblocked(x: jax.Array, n: int) -> jax.Array:
    """``(num_blocks, ..., block)`` -> ``(n, ...)``."""
    x = jnp.moveaxis(x, -1, 1)
    return x.reshape(-1, *x.shape[2:])[:n]


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a + b`` and its rounding error, exactly (Knuth)."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _compensated_sum(partials: jax.Array) -> jax.Array:
    """Sum over the last axis, pairwise, carrying each addition's rounding error."""
    hi, lo = partials, jnp.zeros_like(partials)
    while hi.shape[-1] > 1:
        if hi.shape[-1] % 2:
            pad = [(0, 0)] * (hi.ndim - 1) + [(0, 1)]
            hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
        s, e = _two_sum(hi[..., 0::2], hi[..., 1::2])
        hi, lo = s, lo[..., 0::2] + lo[..., 1::2] + e
    return (hi + lo)[..., 0]


def _sum_blocks(partials: jax.Array) -> jax.Array:
    """Sum over the leading (block) axis: in float64 with x64, else compensated."""
    dtype = partials.dtype
    if dtype == jnp.float64:
        return jnp.sum(partials, axis=0)
    if x64_enabled():
        return jnp.sum(partials.astype(jnp.float64), axis=0).astype(dtype)
    return _compensated_sum(jnp.moveaxis(partials, 0, -1)).astype(dtype)


def _batch(ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim))


def _dots(V: jax.Array, w: jax.Array) -> jax.Array:
    """``V (nb, *D, r, B)``, ``w (nb, *D, B)`` -> ``(*D, r)``: each row of ``V`` times ``w``."""
    batch = _batch(w.ndim - 1)
    numbers = (((V.ndim - 1,), (w.ndim - 1,)), (batch, batch))
    return _sum_blocks(jax.lax.dot_general(V, w, numbers))


def _combine(V: jax.Array, h: jax.Array) -> jax.Array:
    """``V (nb, *D, r, B)``, ``h (*D, r)`` -> ``(nb, *D, B)``: the rows weighted by ``h``."""
    lhs = jnp.broadcast_to(h[..., None, :], (V.shape[0], *h.shape[:-1], 1, h.shape[-1]))
    batch = _batch(V.ndim - 2)
    numbers = (((lhs.ndim - 1,), (V.ndim - 2,)), (batch, batch))
    return jax.lax.dot_general(lhs, V, numbers)[..., 0, :]


def _norms(w: jax.Array) -> jax.Array:
    """``w (nb, *D, B)`` -> ``(*D,)``: the norms of the blocked vectors."""
    return jnp.sqrt(_dots(w[..., None, :], w)[..., 0])


def accurate_dot(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x . y`` for vectors ``(n,)``, summed as the Krylov loops sum (see module docstring)."""
    block, num_blocks = _layout(x.shape[0])
    return _dots(_blocked(x[:, None], block, num_blocks), _blocked(y, block, num_blocks))[0]


# --- thick-restart Lanczos --------------------------------------------------------------------
class _State(NamedTuple):
    V: jax.Array  # (nb, ncv, B) basis rows, block-major
    H: jax.Array  # (ncv, ncv) projection, column j filled at step j
    next: jax.Array  # (nb, B) the next basis vector (unit)
    size: jax.Array  # rows of V in use
    resid: jax.Array  # norm of the residual vector before scaling
    anorm: jax.Array  # largest norm of a product seen
    restarts: jax.Array
    products: jax.Array
    breakdowns: jax.Array
    status: jax.Array  # RUNNING, CONVERGED, STOPPED (maxiter or basis spans all), NONFINITE
    theta: jax.Array  # Ritz values of the last test (padded where the basis was not full)
    S: jax.Array  # their vectors in the basis
    residuals: jax.Array  # their residual estimates
    order: jax.Array  # the Ritz values' order, most wanted first (padding last)
    scale: jax.Array  # what tol is relative to: the largest |Ritz value|


RUNNING, CONVERGED, STOPPED, NONFINITE = 0, 1, 2, 3


class Settings(NamedTuple):
    """What the compiled program is specialised on (hashable)."""

    program: Program
    n: int
    ncv: int
    k: int
    which: str
    seed: int


def thick_restart(
    program: Program,
    consts: list,
    start: jax.Array,
    first_product: jax.Array,
    *,
    ncv: int,
    k: int,
    which: str,
    maxiter: int,
    tol: float,
    seed: int,
    vectors: bool,
) -> dict[str, Any]:
    """Thick-restart Lanczos for ``k`` eigenpairs, compiled whole.

    ``first_product`` is ``A @ start`` (computed eagerly by the caller, so that an
    operator can keep its linearizations before the product is traced).
    Returns ``theta``, ``S``, the residual estimates, the order of the Ritz values
    (most wanted first), the counters and, if ``vectors``, the function that forms
    the Ritz vectors ``(n, j)`` for columns of ``S``.
    """
    n = int(start.shape[0])
    settings = Settings(program, n, ncv, k, which, seed)
    tol = jnp.asarray(tol, start.dtype)
    block, num_blocks = _layout(n)
    basis = jnp.zeros((num_blocks, ncv, block), start.dtype)  # donated: updated in place
    state = _run_thick_restart(settings, consts, start, first_product, maxiter, tol, basis)
    out = {name: getattr(state, name) for name in ("theta", "S", "residuals", "order", "scale",
                                                   "restarts", "products", "status")}  # fmt: skip
    if vectors:
        basis = state.V
        out["ritz_vectors"] = lambda columns: _ritz_vectors(basis, columns, n)
    return out


@functools.partial(jax.jit, static_argnums=(2,))
def _ritz_vectors(V: jax.Array, columns: jax.Array, n: int) -> jax.Array:
    Y = jax.lax.dot_general(V, columns, (((1,), (0,)), ((), ())))  # (nb, B, j)
    return Y.reshape(-1, columns.shape[1])[:n]


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(6,))
def _run_thick_restart(
    settings: Settings,
    consts: list,
    start: jax.Array,
    w0: jax.Array,
    maxiter: Any,
    tol: Any,
    basis: jax.Array,
) -> _State:
    n, ncv = settings.n, settings.ncv
    block, num_blocks = _layout(n)
    dtype = start.dtype
    zero = jnp.zeros((), dtype)
    state = _State(
        V=basis,
        H=jnp.zeros((ncv, ncv), dtype),
        next=_blocked(start, block, num_blocks),
        size=jnp.int32(0),
        resid=zero,
        anorm=zero,
        restarts=jnp.int32(0),
        products=jnp.int32(0),
        breakdowns=jnp.int32(0),
        status=jnp.int32(RUNNING),
        theta=jnp.zeros((ncv,), dtype),
        S=jnp.eye(ncv, dtype=dtype),
        residuals=jnp.zeros((ncv,), dtype),
        order=jnp.arange(ncv, dtype=jnp.int32),
        scale=zero,
    )
    state = _add_vector(settings, state, _blocked(w0, block, num_blocks))

    def step(state: _State) -> _State:
        w = settings.program(consts, _unblocked(state.next, n)[:, None])[:, 0]
        state = state._replace(products=state.products + 1)
        state = _add_vector(settings, state, _blocked(w, block, num_blocks))
        # tested while the basis fills too: stop at the step the pairs converge (not
        # where the basis is nearly invariant: the next directions find repeated values)
        invariant = state.resid <= math.sqrt(np.finfo(dtype).eps) * state.anorm
        early = (state.size > settings.k) & (state.size < ncv) & ~invariant
        early = early & (state.status == RUNNING)
        return _test_early(settings, state, early, tol)

    def fill_test_restart(state: _State) -> _State:
        # no lax.cond returns the basis: XLA copied it into each branch's result
        filling = lambda s: (s.size < ncv) & (s.status == RUNNING)  # noqa: E731
        state = jax.lax.while_loop(filling, step, state)
        return _test_and_restart(settings, state, maxiter, tol)

    return jax.lax.while_loop(lambda s: s.status == RUNNING, fill_test_restart, state)


def _add_vector(settings: Settings, s: _State, w: jax.Array) -> _State:
    """Put ``next`` into the basis; orthogonalise its product ``w`` (Gram-Schmidt, twice)."""
    V = s.V.at[:, s.size, :].set(s.next)
    norm_in = _norms(w)
    h = _dots(V, w)
    w = w - _combine(V, h)
    h2 = _dots(V, w)
    w, h = w - _combine(V, h2), h + h2
    H = s.H.at[:, s.size].set(h)
    norm_w = _norms(w)
    anorm = jnp.maximum(s.anorm, norm_in)
    size = s.size + 1
    finite = jnp.isfinite(norm_in) & jnp.isfinite(norm_w)
    n = settings.n
    fresh = (size < n) & (norm_w <= np.finfo(w.dtype).eps * math.sqrt(n) * anorm)
    unit = w / jnp.where(norm_w > 0, norm_w, jnp.ones_like(norm_w))
    nxt = jax.lax.cond(fresh, lambda: _fresh_direction(settings, V, s.breakdowns + 1), lambda: unit)
    resid = jnp.where(fresh | (size >= n), jnp.zeros_like(norm_w), norm_w)
    status = jnp.where(finite, s.status, NONFINITE)
    return s._replace(V=V, H=H, next=nxt, size=size, resid=resid, anorm=anorm,
                      breakdowns=s.breakdowns + fresh.astype(jnp.int32), status=status)  # fmt: skip


def _fresh_direction(settings: Settings, V: jax.Array, breakdowns: jax.Array) -> jax.Array:
    """A random unit vector orthogonal to the basis (an invariant subspace was found)."""
    num_blocks, _, block = V.shape
    key = jax.random.fold_in(jax.random.key(settings.seed), 7919 * breakdowns)
    w = jax.random.normal(key, (settings.n,), V.dtype)
    w = _blocked(w, block, num_blocks)
    for _ in range(2):
        w = w - _combine(V, _dots(V, w))
    return w / _norms(w)


class _Ritz(NamedTuple):
    theta: jax.Array
    S: jax.Array
    residuals: jax.Array
    order: jax.Array
    scale: jax.Array
    converged: jax.Array
    finite: jax.Array


def _ritz(settings: Settings, s: _State, tol: Any) -> _Ritz:
    """Ritz pairs of the filled ``size x size`` block of ``H``, and the convergence test.

    The shapes stay ``ncv``: the unfilled part is a diagonal beyond the block's
    spectrum (Gershgorin), its vectors are never wanted and their rows are zero.
    """
    ncv, k = settings.ncv, settings.k
    filled = jnp.arange(ncv) < s.size
    both = filled[:, None] & filled[None, :]
    T = jnp.where(both, jnp.triu(s.H) + jnp.triu(s.H, k=1).T, 0)
    pad = 2 * jnp.max(jnp.sum(jnp.abs(T), axis=1)) + 1
    theta, S = jnp.linalg.eigh(T + jnp.diag(jnp.where(filled, 0, pad)))
    S = S * filled[:, None]
    valid = jnp.sum(S * S, axis=0) > 0.5
    residuals = s.resid * jnp.abs(jnp.take(S, s.size - 1, axis=0))
    key = {"LA": -theta, "SA": theta, "LM": -jnp.abs(theta)}[settings.which]
    order = jnp.argsort(jnp.where(valid, key, jnp.inf), stable=True).astype(jnp.int32)
    wanted = order[:k]
    largest = jnp.max(jnp.where(valid, jnp.abs(theta), 0))
    scale = jnp.maximum(largest, np.finfo(theta.dtype).tiny)
    converged = jnp.all(residuals[wanted] <= tol * scale)
    finite = jnp.all(jnp.isfinite(jnp.where(valid, theta, 0)))
    return _Ritz(theta, S, residuals, order, scale, converged, finite)


def _test_early(settings: Settings, s: _State, early: jax.Array, tol: Any) -> _State:
    """While the basis fills: stop with the current pairs if they converged."""

    def test() -> tuple:  # small arrays only: the basis stays out of the branches
        ritz = _ritz(settings, s, tol)
        status = jnp.where(ritz.converged, CONVERGED, RUNNING)
        status = jnp.where(ritz.finite, status, NONFINITE)
        keep = status != RUNNING
        chosen = [jnp.where(keep, new, old) for new, old in
                  zip(ritz[:5], (s.theta, s.S, s.residuals, s.order, s.scale))]  # fmt: skip
        return (*chosen, status.astype(jnp.int32))

    def skip() -> tuple:
        return s.theta, s.S, s.residuals, s.order, s.scale, s.status

    theta, S, residuals, order, scale, status = jax.lax.cond(early, test, skip)
    return s._replace(theta=theta, S=S, residuals=residuals, order=order, scale=scale,
                      status=status)  # fmt: skip


def _test_and_restart(settings: Settings, s: _State, maxiter: Any, tol: Any) -> _State:
    """After the basis filled (or the loop stopped): the test, and a restart if needed."""
    ncv, k = settings.ncv, settings.k
    ritz = _ritz(settings, s, tol)
    spans_all = ncv == settings.n
    stopped = spans_all | (s.restarts >= maxiter)
    status = jnp.where(ritz.converged, CONVERGED, jnp.where(stopped, STOPPED, RUNNING))
    status = jnp.where(ritz.finite, status, NONFINITE)
    running = s.status == RUNNING  # not yet stopped by the test while filling
    tested = {name: getattr(ritz, name) for name in ("theta", "S", "residuals", "order", "scale")}
    tested["status"] = status.astype(jnp.int32)  # the basis stays out of the selection
    s = s._replace(**{name: jnp.where(running, new, getattr(s, name))
                      for name, new in tested.items()})  # fmt: skip
    keep = max(k, min(ncv - 1, k + (ncv - k) // 2))
    return _restart(s, s.order, keep, s.status == RUNNING)


def _restart(s: _State, order: jax.Array, keep: int, restart: jax.Array) -> _State:
    """If ``restart``: keep the Ritz vectors ``order[:keep]`` (``V <- S_keep^T V``, H diagonal)."""
    ncv = s.S.shape[0]
    mask = (jnp.arange(ncv) < keep).astype(s.S.dtype)
    R = (s.S[:, order] * mask[None, :]).T

    def rotate_block(b: Any, V: jax.Array) -> jax.Array:  # in place, block by block
        return jax.lax.dynamic_update_index_in_dim(V, R @ V[b], b, axis=0)

    blocks = jnp.where(restart, s.V.shape[0], 0)  # no blocks: the basis stays as it is
    V = jax.lax.fori_loop(0, blocks, rotate_block, s.V)
    return s._replace(
        V=V,
        H=jnp.where(restart, jnp.diag(s.theta[order] * mask), s.H),
        size=jnp.where(restart, jnp.int32(keep), s.size),
        restarts=s.restarts + restart.astype(jnp.int32),
    )


# --- Lanczos tridiagonalisation ---------------------------------------------------------------
def tridiagonalize(
    program: Program,
    consts: list,
    Q0: jax.Array,
    W0: jax.Array,
    num_steps: int,
    reorthogonalize: bool,
    keep_basis: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Batched Lanczos on the unit columns of ``Q0`` (``(n, m)``), ``W0 = A @ Q0``, compiled whole.

    Returns ``alphas (m, s)``, ``betas (m, s - 1)`` and the basis ``(m, s, n)`` or ``None``;
    columns that break down continue as zero vectors (as the eager path).
    """
    keep = reorthogonalize or keep_basis
    settings = (program, int(Q0.shape[0]), int(num_steps), bool(reorthogonalize), bool(keep))
    alphas, betas, basis = _run_tridiagonalize(settings, consts, Q0, W0)
    if not keep_basis:
        return alphas, betas, None
    return alphas, betas, _basis_rows(basis, int(Q0.shape[0]))


@functools.partial(jax.jit, static_argnums=(1,))
def _basis_rows(basis: jax.Array, n: int) -> jax.Array:
    """``(nb, m, s, B)`` -> ``(m, s, n)``."""
    return jnp.moveaxis(_unblocked(basis, n), 0, -1)


@functools.partial(jax.jit, static_argnums=(0,))
def _run_tridiagonalize(settings: tuple, consts: list, Q0: jax.Array, W0: jax.Array) -> tuple:
    program, n, steps, reorthogonalize, keep = settings
    block, num_blocks = _layout(n)
    Q, W = _blocked(Q0, block, num_blocks), _blocked(W0, block, num_blocks)  # (nb, m, B)
    m = Q.shape[1]
    dtype = Q.dtype
    tolerance = np.finfo(dtype).eps * math.sqrt(n)
    basis = jnp.zeros((num_blocks, m, steps if keep else 1, block), dtype)
    if keep:
        basis = basis.at[:, :, 0, :].set(Q)
    zeros = jnp.zeros((m,), dtype)
    carry = (Q, jnp.zeros_like(Q), W, zeros, zeros, basis, jnp.zeros((m, steps), dtype),
             jnp.zeros((m, max(steps - 1, 1)), dtype))  # fmt: skip

    def step(j: Any, carry: tuple) -> tuple:
        q, q_prev, w, beta, anorm, basis, alphas, betas = carry
        anorm = jnp.maximum(anorm, _norms(w))
        alpha = _dots(q[:, :, None, :], w)[:, 0]
        w = w - alpha[:, None] * q - beta[:, None] * q_prev
        if reorthogonalize:
            for _ in range(2):  # rows of the basis not yet filled are zero
                w = w - _combine(basis, _dots(basis, w))
        norm = _norms(w)
        ok = norm > tolerance * anorm
        q_next = jnp.where(ok[:, None], w / jnp.where(ok, norm, 1)[:, None], 0)
        beta_next = jnp.where(ok, norm, 0)
        if keep:
            basis = basis.at[:, :, j + 1, :].set(q_next)
        alphas = alphas.at[:, j].set(alpha)
        betas = betas.at[:, j].set(beta_next)
        w_next = _blocked(program(consts, _unblocked(q_next, n)), block, num_blocks)
        return q_next, q, w_next, beta_next, anorm, basis, alphas, betas

    carry = jax.lax.fori_loop(0, steps - 1, step, carry)
    q, _, w, _, _, basis, alphas, betas = carry
    alphas = alphas.at[:, steps - 1].set(_dots(q[:, :, None, :], w)[:, 0])
    return alphas, betas[:, : steps - 1], basis


# --- conjugate gradients -----------------------------------------------------------------------
class _CGState(NamedTuple):
    X: jax.Array
    R: jax.Array
    P: jax.Array
    rz: jax.Array
    live: jax.Array  # columns still iterating
    iterations: jax.Array
    residuals: jax.Array
    done: jax.Array
    indefinite: jax.Array
    nonfinite: jax.Array
    steps: jax.Array


def conjugate_gradients(
    program: Program,
    consts: list,
    state: tuple,
    thresholds: jax.Array,
    max_steps: int,
) -> dict[str, jax.Array]:
    """Batched CG (no preconditioner) continued from ``state = (X, R, P, rz, live)``, compiled.

    ``program`` multiplies by the damped operator. As the eager loop, a column
    stops when its residual norm is at most its threshold, when ``pᵀAp <= 0``
    (indefinite) or when its residual is not finite; a stopped column takes no
    more steps (its direction is zero). Returns the final state's arrays and,
    per column, the steps taken, the last residual norm and why it stopped.
    """
    out = _run_cg(program, consts, *state, thresholds, jnp.int32(max_steps))
    return out._asdict()


@functools.partial(jax.jit, static_argnums=(0,))
def _run_cg(program, consts, X, R, P, rz, live, thresholds, max_steps) -> _CGState:
    K = X.shape[1]
    no = jnp.zeros((K,), bool)
    state = _CGState(X, R, P, rz, live, jnp.zeros((K,), jnp.int32),
                     jnp.zeros((K,), X.dtype), no, no, no, jnp.int32(0))  # fmt: skip

    def step(s: _CGState) -> _CGState:
        AP = program(consts, s.P)
        pAp = jnp.sum(s.P * AP, axis=0)
        positive = pAp > 0
        alpha = jnp.where(positive, s.rz / jnp.where(positive, pAp, 1), 0)
        X, R = s.X + alpha * s.P, s.R - alpha * AP
        norms = jnp.linalg.vector_norm(R, axis=0)
        nonfinite = s.live & ~jnp.isfinite(norms)
        done = s.live & (norms <= thresholds)
        indefinite = s.live & ~done & ~nonfinite & ~positive
        live = s.live & ~(done | indefinite | nonfinite)
        Z = jnp.where(live, R, 0)
        rz_next = jnp.sum(R * Z, axis=0)
        beta = jnp.where(live, rz_next / jnp.where(live, s.rz, 1), 0)
        return _CGState(X, R, Z + beta * s.P, rz_next, live, s.iterations + s.live,
                        jnp.where(s.live, norms, s.residuals), s.done | done,
                        s.indefinite | indefinite, s.nonfinite | nonfinite,
                        s.steps + 1)  # fmt: skip

    return jax.lax.while_loop(lambda s: jnp.any(s.live) & (s.steps < max_steps), step, state)
