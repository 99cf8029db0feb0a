r"""Stochastic estimators of the trace, the diagonal and the squared Frobenius norm.

Every estimator takes an operator of this library, a scipy ``LinearOperator``
or sparse matrix, or a dense 2-d array, and computes in that operand's array
library: operators with a backend get probes from ``A.backend`` and native
(PyTorch or JAX) products; framework-free operators, scipy operators and numpy
matrices get numpy; dense arrays of other libraries get numpy probes copied to
their device once per block. Probes go through ``matmat`` in blocks of at most
``block_size`` columns: by default 32, fewer where 32 probes with their
products and one temporary each would take more than a quarter of the memory
available (a probe of a 100 M-parameter model takes 400 MB in float32).

API shape: each estimator returns the estimate (a 0-d array, or a vector for
diagonals, in the operand's library; a numpy scalar for numpy) and, with
``return_stderr=True``, the pair ``(estimate, stderr)``, where ``stderr`` is the
estimated standard error (same shape as the estimate).

Probes are Rademacher (±1, the default) or standard normal vectors
(``distribution="normal"``), drawn in the operand's library from ``seed`` (in
chunks of 32 columns, fewer for vectors longer than 131,072 entries, chunk
``c`` of each probe stream from a seed derived from ``(seed, stream, c)``): the
same ``seed`` and ``distribution`` give the same probes whatever the
``block_size``, and the same estimate up to rounding.
The random generators differ between libraries, so the probes of a numpy,
a PyTorch and a JAX operand differ.
"""

from __future__ import annotations

import operator
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error
from curvlinops._memory import available_memory
from curvlinops._operand import as_operand

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "hutchinson_diag",
    "hutchinson_diagonal",
    "hutchinson_squared_fro",
    "hutchinson_squared_frobenius",
    "hutchinson_trace",
    "hutchpp_trace",
    "xdiag",
    "xtrace",
]

DEFAULT_BLOCK_SIZE = 32
"""Probes multiplied by the operand in one ``matmat`` call (at most, by default)."""
BLOCK_MEMORY_FRACTION = 0.25
"""Share of the available memory a default block of probes may take."""

DISTRIBUTIONS = ("rademacher", "normal")

# Probe streams: each role of random vectors draws from its own stream.
_HUTCHINSON, _SKETCH, _RESIDUAL, _EXCHANGE = 0, 1, 2, 3
_CHUNK = 32
"""Probes drawn per call of the random generator (independent of ``block_size``)."""
_CHUNK_ENTRIES = 1 << 22
"""At most this many entries per call (16 MB in float32): fewer probes for long vectors."""


# --- public estimators ----------------------------------------------------------
def hutchinson_trace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
) -> Any:
    r"""Hutchinson's estimate of the trace.

    .. math::
        \operatorname{tr}(A) \approx \frac{1}{m} \sum_{i=1}^{m} \omega_i^\top A \omega_i,
        \qquad \mathbb{E}[\omega \omega^\top] = I,

    with :math:`m` = ``num_matvecs`` probes. The standard error is the sample
    standard deviation of the :math:`m` terms divided by :math:`\sqrt{m}`; the
    error shrinks like :math:`1/\sqrt{m}`.

    Args:
        A: A square operator (this library's, scipy's), sparse or dense matrix.
        num_matvecs: Number of probes (= products with ``A``).
        distribution: ``"rademacher"`` or ``"normal"``.
        seed: Non-negative int that fixes the probes. ``None`` (default): fresh
            probes from the global generator of ``A``'s library: for PyTorch
            operands drawn vector by vector as curvlinops-for-pytorch 3.0.1 draws
            them (the same numbers after ``torch.manual_seed``), otherwise from a
            seed drawn from numpy's.
        block_size: Probes per ``matmat`` call (bounds memory). Default:
            :data:`DEFAULT_BLOCK_SIZE`, fewer when that many would take more than
            a quarter of the available memory (see the module docs).
        return_stderr: Also return the standard error (needs ``num_matvecs >= 2``).

    Returns:
        The estimate, or ``(estimate, stderr)``, as 0-d arrays of ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import hutchinson_trace
        >>> float(hutchinson_trace(np.diag([1.0, 2.0, 3.0]), 10))  # exact for diagonal A
        6.0
    """
    op = _Operand(A, block_size, square=True)
    m = _check_count(num_matvecs, "num_matvecs", 2 if return_stderr else 1)
    samples = op.xp.concat(
        [
            op.xp.sum(W * op.matmat(W), axis=0)
            for W in op.probe_blocks(m, distribution, seed, _HUTCHINSON)
        ]
    )
    return _finish(op.xp, samples, return_stderr, "hutchinson_trace")


def hutchpp_trace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
) -> Any:
    r"""Hutch++ estimate of the trace (Meyer, Musco, Musco and Woodruff, 2021).

    A third of the products sketch the range of ``A``, :math:`Q = \operatorname{orth}(A S)`;
    the trace of the projected part is taken exactly and the rest by
    Hutchinson with probes projected away from :math:`Q`:

    .. math::
        \operatorname{tr}(A) \approx \operatorname{tr}(Q^\top A Q)
        + \frac{1}{r} \sum_{i=1}^{r} g_i^\top (I - QQ^\top) A (I - QQ^\top) g_i .

    With :math:`k = \lfloor m/3 \rfloor` sketch probes and :math:`r = m - 2k`
    residual probes, the error falls like :math:`1/m` (faster for decaying
    spectra). The standard error is that of the residual Hutchinson term
    given :math:`Q`.

    Args:
        A: A square operator, sparse or dense matrix.
        num_matvecs: Total number of products with ``A`` (at least 3).
        distribution, seed, block_size, return_stderr: As for :func:`hutchinson_trace`
            (a standard error needs ``num_matvecs >= 6``).

    Returns:
        The estimate, or ``(estimate, stderr)``, as 0-d arrays of ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import hutchpp_trace
        >>> A = np.diag(0.5 ** np.arange(40))
        >>> est, err = hutchpp_trace(A, 30, seed=0, return_stderr=True)
        >>> round(float(est), 2), bool(err < 1e-2)  # tr(A) = 2 - 2**-39
        (2.0, True)
    """
    op = _Operand(A, block_size, square=True)
    m = _check_count(num_matvecs, "num_matvecs", 6 if return_stderr else 3)
    k = m // 3
    _check_sketch(k, op.n, "num_matvecs", 3)
    xp = op.xp
    S = op.probes(0, k, distribution, seed, _SKETCH)
    Q, _ = xp.linalg.qr(op.matmat(S))
    exact_part = xp.sum(Q * op.matmat(Q))

    def residual_samples(G: Any) -> Any:
        G = G - Q @ (Q.T @ G)
        return xp.sum(G * op.matmat(G), axis=0)

    samples = xp.concat(
        [residual_samples(G) for G in op.probe_blocks(m - 2 * k, distribution, seed, _RESIDUAL)]
    )
    return _finish(xp, samples, return_stderr, "hutchpp_trace", offset=exact_part)


def xtrace(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
) -> Any:
    r"""XTrace, the exchangeable trace estimator (Epperly, Tropp and Webber, 2024).

    With :math:`k = \lfloor m/2 \rfloor` probes :math:`\Omega = [\omega_1, \dots, \omega_k]`,
    let :math:`P_i` project onto the range of :math:`A\Omega` without column
    :math:`i`. Each probe gives an unbiased estimate, and XTrace averages them:

    .. math::
        t_i = \operatorname{tr}(P_i A) + \omega_i^\top (I - P_i) A (I - P_i) \omega_i,
        \qquad \operatorname{tr}(A) \approx \frac{1}{k} \sum_{i=1}^{k} t_i .

    All :math:`P_i` come from one QR factorisation :math:`A\Omega = QR` (by
    downdating), so the cost is :math:`k` products for :math:`A\Omega` and
    :math:`k` for :math:`AQ`. The standard error is the sample standard
    deviation of the :math:`t_i` over :math:`\sqrt{k}`. When :math:`A\Omega`
    is rank-deficient, the range of ``A`` has been captured and
    :math:`\operatorname{tr}(Q^\top A Q)` is returned with standard error 0.

    Args:
        A: A square operator, sparse or dense matrix.
        num_matvecs: Total number of products with ``A`` (at least 2; at most
            twice the size of ``A``).
        distribution, seed, block_size, return_stderr: As for :func:`hutchinson_trace`
            (a standard error needs ``num_matvecs >= 4``).

    Returns:
        The estimate, or ``(estimate, stderr)``, as 0-d arrays of ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import xtrace
        >>> A = np.diag(0.5 ** np.arange(40))
        >>> est, err = xtrace(A, 30, seed=0, return_stderr=True)
        >>> round(float(est), 3), bool(err < 1e-3)  # tr(A) = 2 - 2**-39
        (2.0, True)
    """
    op = _Operand(A, block_size, square=True)
    m = _check_count(num_matvecs, "num_matvecs", 4 if return_stderr else 2)
    k = m // 2
    _check_sketch(k, op.n, "num_matvecs", 2)
    xp = op.xp
    sketch = _ExchangeableSketch(op, k, distribution, seed)
    Z = op.matmat(sketch.Q)
    H = sketch.Q.T @ Z
    trace_H = xp.sum(xp.linalg.diagonal(H))
    if sketch.rank_deficient:
        return _finish_exact(xp, trace_H, return_stderr)
    S, W, R, Y, Omega = sketch.S, sketch.W, sketch.R, sketch.Y, sketch.Omega
    # (I - P_i) ω_i = ω_i - Q b_i with b_i = w_i - (s_iᵀ w_i) s_i
    B = W - S * xp.sum(S * W, axis=0)
    T = Z.T @ Omega
    samples = (
        trace_H
        - xp.sum(S * (H @ S), axis=0)
        + xp.sum(Omega * Y, axis=0)
        - xp.sum(B * R, axis=0)
        - xp.sum(T * B, axis=0)
        + xp.sum(B * (H @ B), axis=0)
    )
    return _finish(xp, samples, return_stderr, "xtrace")


def hutchinson_diagonal(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
) -> Any:
    r"""Hutchinson's estimate of the diagonal (Bekas, Kokiopoulou and Saad, 2007).

    .. math::
        \operatorname{diag}(A) \approx \frac{1}{m} \sum_{i=1}^{m} \omega_i \odot A \omega_i .

    The standard error of each entry is the sample standard deviation of its
    :math:`m` terms over :math:`\sqrt{m}`. Memory stays at one block of probes
    (the moments are merged block by block).

    Args:
        A: A square operator, sparse or dense matrix.
        num_matvecs: Number of probes.
        distribution, seed, block_size, return_stderr: As for :func:`hutchinson_trace`.

    Returns:
        The estimate, or ``(estimate, stderr)``, as vectors of length ``n`` in
        ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import hutchinson_diagonal
        >>> hutchinson_diagonal(np.diag([1.0, 2.0, 3.0]), 4)  # exact for diagonal A
        array([1., 2., 3.])
    """
    op = _Operand(A, block_size, square=True)
    m = _check_count(num_matvecs, "num_matvecs", 2 if return_stderr else 1)
    xp = op.xp
    moments = _RunningMoments(xp)
    for W in op.probe_blocks(m, distribution, seed, _HUTCHINSON):
        moments.add(W * op.matmat(W))
    mean, stderr = moments.mean, moments.stderr()
    _warn_if_not_finite(xp, mean, "hutchinson_diagonal")
    return (mean, stderr) if return_stderr else mean


def xdiag(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
    symmetric: bool | None = None,
) -> Any:
    r"""XDiag, the exchangeable diagonal estimator (Epperly, Tropp and Webber, 2024).

    With :math:`P_i` as in :func:`xtrace`, each probe gives an unbiased estimate

    .. math::
        d_i = \operatorname{diag}(P_i A) + \omega_i \odot (I - P_i) A \omega_i,
        \qquad \operatorname{diag}(A) \approx \frac{1}{k} \sum_{i=1}^{k} d_i,

    computed from one QR factorisation of :math:`A\Omega` and the products
    :math:`A^\top Q`. The cost is :math:`k = \lfloor m/2 \rfloor` products with
    ``A`` and :math:`k` with :math:`A^\top` (the same as ``A`` when symmetric).

    Args:
        A: A square operator, sparse or dense matrix.
        num_matvecs: Total number of products (at least 2; at most twice the size of ``A``).
        distribution, seed, block_size, return_stderr: As for :func:`hutchinson_trace`
            (a standard error needs ``num_matvecs >= 4``).
        symmetric: Whether ``A`` is symmetric; ``None`` reads ``A.is_symmetric``
            for this library's operators and takes products with ``Aᵀ`` otherwise.

    Returns:
        The estimate, or ``(estimate, stderr)``, as vectors of length ``n`` in
        ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import xdiag
        >>> rng = np.random.default_rng(0)
        >>> U = np.linalg.qr(rng.standard_normal((40, 40)))[0]
        >>> A = (U * 0.5 ** np.arange(40)) @ U.T
        >>> d = xdiag(A, 40, symmetric=True, seed=0)
        >>> bool(np.max(np.abs(d - np.diag(A))) < 1e-4)
        True
    """
    op = _Operand(A, block_size, square=True)
    m = _check_count(num_matvecs, "num_matvecs", 4 if return_stderr else 2)
    k = m // 2
    _check_sketch(k, op.n, "num_matvecs", 2)
    if symmetric is None:
        symmetric = bool(getattr(A, "is_symmetric", False))
    elif not isinstance(symmetric, bool):
        raise type_error("symmetric", "True, False or None", symmetric)
    xp = op.xp
    sketch = _ExchangeableSketch(op, k, distribution, seed)
    Q = sketch.Q
    Z = op.matmat(Q) if symmetric else op.rmatmat(Q)  # Z = Aᵀ Q, so diag(Q Qᵀ A) = Σ_j Q ⊙ Z
    exact_part = xp.sum(Q * Z, axis=1)
    if sketch.rank_deficient:
        _warn_if_not_finite(xp, exact_part, "xdiag")
        return (exact_part, xp.zeros_like(exact_part)) if return_stderr else exact_part
    QS, ZS = Q @ sketch.S, Z @ sketch.S
    # (I - P_i) A ω_i = Q s_i / ‖R⁻ᵀ e_i‖
    deviations = sketch.Omega * QS * sketch.inverse_row_norms - QS * ZS
    estimate = exact_part + xp.mean(deviations, axis=1)
    _warn_if_not_finite(xp, estimate, "xdiag")
    if not return_stderr:
        return estimate
    return estimate, xp.std(deviations, axis=1, correction=1) / np.sqrt(k)


def hutchinson_squared_frobenius(
    A: Any,
    num_matvecs: int,
    distribution: str = "rademacher",
    *,
    seed: int | None = None,
    block_size: int | None = None,
    return_stderr: bool = False,
) -> Any:
    r"""Estimate of the squared Frobenius norm from products with ``A``.

    .. math::
        \|A\|_F^2 = \operatorname{tr}(A^\top A)
        \approx \frac{1}{m} \sum_{i=1}^{m} \|A \omega_i\|_2^2 .

    ``A`` may be rectangular. The standard error is the sample standard
    deviation of the terms over :math:`\sqrt{m}`.

    Args:
        A: An operator, sparse or dense matrix.
        num_matvecs: Number of probes.
        distribution, seed, block_size, return_stderr: As for :func:`hutchinson_trace`.

    Returns:
        The estimate, or ``(estimate, stderr)``, as 0-d arrays of ``A``'s library.

    Example:
        >>> import numpy as np
        >>> from curvlinops.estimators import hutchinson_squared_frobenius
        >>> float(hutchinson_squared_frobenius(np.diag([1.0, 2.0]), 5))  # 1 + 4
        5.0
    """
    op = _Operand(A, block_size, square=False)
    m = _check_count(num_matvecs, "num_matvecs", 2 if return_stderr else 1)
    xp = op.xp

    def squared_norms(W: Any) -> Any:
        AW = op.matmat(W)
        return xp.sum(AW * AW, axis=0)

    samples = xp.concat(
        [squared_norms(W) for W in op.probe_blocks(m, distribution, seed, _HUTCHINSON)]
    )
    return _finish(xp, samples, return_stderr, "hutchinson_squared_frobenius")


# --- the operand ---------------------------------------------------------------------
class _Operand:
    """``A`` as the estimators see it: blocked native products and seeded probe blocks."""

    def __init__(self, A: Any, block_size: int | None, *, square: bool) -> None:
        if block_size is not None:
            block_size = _check_count(block_size, "block_size", 1)
        self.operand = as_operand(A, "A", square=square)
        self.xp = self.operand.xp
        self.n = self.operand.shape[1]
        self.block_size = self._default_block_size() if block_size is None else block_size

    def _default_block_size(self) -> int:
        """:data:`DEFAULT_BLOCK_SIZE`, or as many probes as fit a quarter of what is free.

        A probe in a block holds three vectors: itself, its product and a temporary
        (``W * AW``). The operator's own intermediates do not grow with the block
        (``columns_per_pass`` bounds them).
        """
        op = self.operand
        per_probe = 3 * max(op.shape) * op.dtype.itemsize
        free = available_memory(op.memory_device)
        if free is None or per_probe <= 0:
            return DEFAULT_BLOCK_SIZE
        return max(1, min(DEFAULT_BLOCK_SIZE, int(free * BLOCK_MEMORY_FRACTION) // per_probe))

    # --- probes ---------------------------------------------------------------
    def probes(self, start: int, stop: int, distribution: str, seed: int, stream: int) -> Any:
        """Columns ``start:stop`` of probe stream ``stream``, as an ``(n, stop - start)`` array.

        Probes are drawn in chunks of :meth:`chunk_columns` columns, chunk ``c``
        from a seed derived from ``(seed, stream, c)``, so column ``j`` of a stream
        is the same whatever the block size.
        """
        distribution = _check_distribution(distribution)
        if seed is None and self.operand.library == "torch":
            return self._torch_global_probes(stop - start, distribution)
        seed = self._resolved_seed(seed)
        width = self.chunk_columns()
        first, last = start // width, (stop - 1) // width
        chunks = []
        for chunk in range(first, last + 1):
            derived = int(np.random.SeedSequence([seed, stream, chunk]).generate_state(1)[0])
            chunks.append(self.operand.random((self.n, width), derived, distribution))
        drawn = chunks[0] if len(chunks) == 1 else self.xp.concat(chunks, axis=1)
        offset = first * width
        return drawn[:, start - offset : stop - offset]

    def _torch_global_probes(self, count: int, distribution: str) -> Any:
        """``count`` probes from PyTorch's global generator, vector by vector.

        As curvlinops-for-pytorch 3.0.1 draws them: the same numbers after ``torch.manual_seed``.
        """
        from curvlinops.backends._cfp_torch import random_columns  # a torch operand: loaded

        like = self.operand.from_host(np.zeros(1, dtype=self.operand.dtype))
        return random_columns(self.n, count, distribution, like)

    def _resolved_seed(self, seed: int | None) -> int:
        """``seed``, or for ``None`` one fresh seed for this call (its probes' every block)."""
        if seed is not None:
            return _check_seed(seed)
        if getattr(self, "_fresh_seed", None) is None:
            self._fresh_seed = _fresh_seed(self.operand.library)
        return self._fresh_seed

    def chunk_columns(self) -> int:
        """Columns drawn together: :data:`_CHUNK`, fewer for long vectors.

        A chunk holds at most :data:`_CHUNK_ENTRIES` entries (one column at
        least): with 32 columns, a block of one probe of a 100 M-parameter model
        drew 12.8 GB. It depends on ``n`` only, not on the block size.
        """
        return max(1, min(_CHUNK, _CHUNK_ENTRIES // max(1, self.n)))

    def probe_blocks(self, count: int, distribution: str, seed: int, stream: int) -> Iterator:
        """Columns ``0:count`` of a probe stream in blocks of at most ``block_size``."""
        for start in range(0, count, self.block_size):
            stop = min(start + self.block_size, count)
            yield self.probes(start, stop, distribution, seed, stream)

    # --- products --------------------------------------------------------------
    def matmat(self, X: Any) -> Any:
        return self._blocked(self.operand.matmat, X)

    def rmatmat(self, X: Any) -> Any:
        return self._blocked(self.operand.rmatmat, X)

    def _blocked(self, product: Any, X: Any) -> Any:
        K, size = X.shape[1], self.block_size
        if K <= size:
            return product(X)
        return self.xp.concat([product(X[:, s : s + size]) for s in range(0, K, size)], axis=1)


class _ExchangeableSketch:
    r"""The shared part of XTrace and XDiag.

    Probes :math:`\Omega` (``n × k``), :math:`Y = A\Omega = QR`, and for each
    :math:`i` the unit vector :math:`s_i \propto R^{-\top} e_i`, orthogonal to
    every column of :math:`R` but the :math:`i`-th: then
    :math:`P_i = Q (I - s_i s_i^\top) Q^\top` projects onto the range of
    :math:`Y` without column :math:`i`.
    """

    def __init__(self, op: _Operand, k: int, distribution: str, seed: int) -> None:
        xp = op.xp
        self.Omega = op.probes(0, k, distribution, seed, _EXCHANGE)
        self.Y = op.matmat(self.Omega)
        self.Q, self.R = xp.linalg.qr(self.Y)
        self.rank_deficient = _numerically_singular(xp, self.R)
        if self.rank_deficient:
            if _numerically_singular(xp, xp.linalg.qr(self.Omega)[1]):
                raise value_error(
                    "num_matvecs",
                    "linearly independent probes",
                    f"{k} dependent probes of length {op.n}",
                    "Use distribution='normal' or fewer matvecs for such a small operator.",
                )
            return
        R_inv = xp.linalg.inv(self.R)
        row_norms = xp.linalg.vector_norm(R_inv, axis=1)
        self.S = R_inv.T / row_norms  # column i: R⁻ᵀ e_i / ‖R⁻ᵀ e_i‖
        self.inverse_row_norms = 1.0 / row_norms
        self.W = self.Q.T @ self.Omega


def _numerically_singular(xp: Any, R: Any) -> bool:
    """Whether the triangular factor ``R`` of a QR factorisation is singular in its dtype."""
    diagonal = xp.abs(xp.linalg.diagonal(R))
    eps = float(np.finfo(np.dtype(str(R.dtype).rsplit(".", 1)[-1])).eps)
    threshold = max(R.shape) * eps * xp.max(diagonal)
    return bool(xp.min(diagonal) <= threshold)


class _RunningMoments:
    """Mean and sum of squared deviations of columns, merged block by block (Chan et al.)."""

    def __init__(self, xp: Any) -> None:
        self.xp, self.count, self.mean, self._m2 = xp, 0, None, None

    def add(self, block: Any) -> None:
        xp, n = self.xp, block.shape[1]
        mean = xp.mean(block, axis=1)
        m2 = xp.sum((block - mean[:, None]) ** 2, axis=1)
        if self.mean is None:
            self.count, self.mean, self._m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def stderr(self) -> Any:
        if self.count < 2:
            return self.xp.full_like(self.mean, float("nan"))
        return self.xp.sqrt(self._m2 / (self.count - 1) / self.count)


# --- results ---------------------------------------------------------------------------
def _finish(xp: Any, samples: Any, return_stderr: bool, name: str, offset: Any = 0.0) -> Any:
    estimate = offset + xp.mean(samples)
    _warn_if_not_finite(xp, estimate, name)
    if not return_stderr:
        return estimate
    return estimate, xp.std(samples, correction=1) / np.sqrt(samples.shape[0])


def _finish_exact(xp: Any, value: Any, return_stderr: bool) -> Any:
    return (value, xp.zeros_like(value)) if return_stderr else value


def _warn_if_not_finite(xp: Any, value: Any, name: str) -> None:
    if not bool(xp.all(xp.isfinite(value))):
        warnings.warn(
            f"{name}: the estimate contains NaN or inf. Check that products with A are "
            "finite (e.g. A @ x for a random x).",
            RuntimeWarning,
            stacklevel=3,
        )


# --- argument checks -------------------------------------------------------------------
def _check_count(value: Any, argument: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise type_error(argument, f"an int >= {minimum}", value)
    try:  # ints, and 0-d integer arrays (3.0.1's examples pass torch.arange entries)
        value = operator.index(value)
    except TypeError:
        raise type_error(argument, f"an int >= {minimum}", value) from None
    if value < minimum:
        fix = ""
        if argument == "num_matvecs":
            fix = "A standard error needs more products; raise num_matvecs."
        raise value_error(argument, f"an int >= {minimum}", str(value), fix)
    return int(value)


def _check_sketch(k: int, n: int, argument: str, factor: int) -> None:
    if k > n:
        raise value_error(
            argument,
            f"at most {factor * n} for an operator of size {n}",
            str(factor * k),
            "For such a small operator compute the trace/diagonal exactly instead.",
        )


def _check_distribution(distribution: Any) -> str:
    if not isinstance(distribution, str):
        raise type_error("distribution", f"one of {DISTRIBUTIONS}", distribution)
    if distribution not in DISTRIBUTIONS:
        raise value_error("distribution", f"one of {DISTRIBUTIONS}", repr(distribution))
    return distribution


def _fresh_seed(library: str) -> int:
    """A seed from the global generator of ``library`` (PyTorch's, else numpy's)."""
    torch = sys.modules.get("torch") if library == "torch" else None
    if torch is not None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return int(np.random.randint(0, 2**31 - 1))


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise type_error("seed", "a non-negative int", seed)
    if seed < 0:
        raise value_error("seed", "a non-negative int", str(seed))
    return int(seed)


# --- the names and signatures of curvlinops-for-pytorch 3.0.1 -----------------------------
def hutchinson_diag(A: Any, num_matvecs: int, distribution: str = "rademacher") -> Any:
    """:func:`hutchinson_diagonal` under curvlinops-for-pytorch 3.0.1's name and signature."""
    return hutchinson_diagonal(A, num_matvecs, distribution=distribution)


def hutchinson_squared_fro(A: Any, num_matvecs: int, distribution: str = "rademacher") -> Any:
    """:func:`hutchinson_squared_frobenius` under curvlinops-for-pytorch 3.0.1's name, signature."""
    return hutchinson_squared_frobenius(A, num_matvecs, distribution=distribution)
