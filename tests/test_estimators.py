"""Trace, diagonal and Frobenius estimators against dense linear algebra."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
from helpers import assert_close, to_numpy
from scipy.sparse.linalg import aslinearoperator
from threadpoolctl import threadpool_limits

from curvlinops import HessianLinearOperator, LinearOperator
from curvlinops.backends import make_backend
from curvlinops.estimators import (
    hutchinson_diagonal,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

TRACE_ESTIMATORS = [hutchinson_trace, hutchpp_trace, xtrace]
DIAGONAL_ESTIMATORS = [hutchinson_diagonal, xdiag]
ALL_ESTIMATORS = [*TRACE_ESTIMATORS, *DIAGONAL_ESTIMATORS, hutchinson_squared_frobenius]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Many small products: threads only add contention."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def decaying_matrix(n: int, power: float = 2.0, seed: int = 0, symmetric: bool = True):
    """``U diag(j^-power) Uᵀ`` for a random orthogonal ``U`` (or ``U diag V`` if not symmetric)."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    V = U if symmetric else np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * np.arange(1.0, n + 1.0) ** -power) @ V.T


def truth(estimator, A: np.ndarray):
    if estimator in DIAGONAL_ESTIMATORS:
        return np.diag(A)
    if estimator is hutchinson_squared_frobenius:
        return np.sum(A * A)
    return np.trace(A)


class Recorder(LinearOperator):
    """A dense matrix as an operator of a backend (or framework-free); records each input."""

    def __init__(self, dense: np.ndarray, backend=None, symmetric: bool = False) -> None:
        self.backend = backend
        self.is_symmetric = symmetric
        self.dense = dense if backend is None else backend.import_array(dense, "dense")[0]
        self.inputs: list[tuple[bool, np.ndarray]] = []
        super().__init__(np.float64, dense.shape)

    def _native(self, X, adjoint):
        self.inputs.append((adjoint, to_numpy(X)))
        return (self.dense.T if adjoint else self.dense) @ X

    def columns(self, count: int, adjoint: bool = False) -> np.ndarray:
        """The first ``count`` recorded input columns (of products with A or Aᵀ)."""
        blocks = [X for adj, X in self.inputs if adj == adjoint]
        return np.concatenate(blocks, axis=1)[:, :count]


def make_vector_backend(name: str, n: int):
    """A backend of the framework ``name`` (for probes and native arrays of length n)."""
    if name == "torch":
        import torch

        return make_backend(lambda p, x: x, [torch.zeros(n, dtype=torch.float64)])
    import jax.numpy as jnp

    return make_backend(lambda p, x: x, [jnp.zeros(n, dtype=jnp.float64)])


# --- exact algebra against brute force on the recorded probes ---------------------------
def exchangeable_reference(A: np.ndarray, Omega: np.ndarray, diagonal: bool):
    """XTrace / XDiag by definition: one QR of AΩ without column i per probe i."""
    n, k = Omega.shape
    Y, eye, terms = A @ Omega, np.eye(n), []
    for i in range(k):
        Qi = np.linalg.qr(np.delete(Y, i, axis=1))[0]
        P, w = Qi @ Qi.T, Omega[:, i]
        if diagonal:
            terms.append(np.diag(P @ A) + w * ((eye - P) @ A @ w))
        else:
            terms.append(np.trace(P @ A) + w @ (eye - P) @ A @ (eye - P) @ w)
    terms = np.array(terms)
    return terms.mean(axis=0), terms.std(axis=0, ddof=1) / np.sqrt(k)


def reference(estimator, A: np.ndarray, op: Recorder, m: int, symmetric: bool):
    """The estimate and standard error that the recorded probes must give."""
    if estimator in (hutchinson_trace, hutchinson_squared_frobenius, hutchinson_diagonal):
        Omega = op.columns(m)
        AO = A @ Omega
        terms = {
            hutchinson_trace: np.sum(Omega * AO, axis=0),
            hutchinson_squared_frobenius: np.sum(AO * AO, axis=0),
            hutchinson_diagonal: (Omega * AO).T,
        }[estimator]
        return terms.mean(axis=0), terms.std(axis=0, ddof=1) / np.sqrt(m)
    if estimator is hutchpp_trace:
        k = m // 3
        S = op.columns(k)
        Q = np.linalg.qr(A @ S)[0]
        G = op.columns(m)[:, 2 * k :]  # the projected residual probes
        assert np.max(np.abs(Q.T @ G)) < 1e-12 * np.max(np.abs(G)), "probes not projected"
        terms = np.sum(G * (A @ G), axis=0)
        return np.trace(Q.T @ A @ Q) + terms.mean(), terms.std(ddof=1) / np.sqrt(m - 2 * k)
    Omega = op.columns(m // 2)
    if estimator is xdiag and not symmetric:
        assert op.columns(m // 2, adjoint=True).shape == (A.shape[0], m // 2)
    return exchangeable_reference(A, Omega, diagonal=estimator is xdiag)


def check_algebra(estimator, backend, symmetric: bool) -> None:
    n, m = 24, 14
    A = decaying_matrix(n, power=1.0, seed=3, symmetric=symmetric)
    op = Recorder(A, backend, symmetric=symmetric)
    estimate, stderr = estimator(op, m, seed=5, block_size=4, return_stderr=True)
    expected, expected_stderr = reference(estimator, A, op, m, symmetric)
    assert_close(estimate, expected, rtol=1e-9, name=f"{estimator.__name__} estimate")
    assert_close(stderr, expected_stderr, rtol=1e-9, name=f"{estimator.__name__} stderr")
    widths = [X.shape[1] for _, X in op.inputs]
    assert max(widths) <= 4, "products must come in blocks of at most block_size columns"
    if backend is not None:
        assert type(estimate).__module__.split(".")[0] == type(op.dense).__module__.split(".")[0]


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda f: f.__name__)
def test_algebra_numpy(estimator, symmetric):
    check_algebra(estimator, None, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "general"])
@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda f: f.__name__)
def test_algebra_backend(estimator, symmetric, backend_name):
    check_algebra(estimator, make_vector_backend(backend_name, 24), symmetric)


# --- exact cases ----------------------------------------------------------------------------
def test_rademacher_is_exact_for_diagonal_matrices():
    D = np.diag(np.arange(1.0, 9.0))
    assert float(hutchinson_trace(D, 3)) == 36.0
    assert_close(hutchinson_diagonal(D, 3), np.arange(1.0, 9.0), rtol=1e-15)
    assert float(hutchinson_squared_frobenius(D, 3)) == float(np.sum(np.arange(1.0, 9.0) ** 2))


def test_low_rank_is_captured_exactly():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((40, 3))
    A = B @ B.T  # rank 3
    estimate, stderr = hutchpp_trace(A, 12, return_stderr=True, distribution="normal")
    assert_close(estimate, np.trace(A), rtol=1e-10)
    assert float(stderr) < 1e-10 * np.trace(A)
    for estimator in (xtrace, xdiag):  # AΩ rank-deficient: the range of A is in Q
        estimate, stderr = estimator(A, 12, return_stderr=True)
        assert_close(estimate, truth(estimator, A), rtol=1e-10)
        assert np.all(to_numpy(stderr) == 0.0)


# --- convergence and standard errors -----------------------------------------------------------
def rms_error(estimator, A, num_matvecs, seeds=12) -> float:
    target = truth(estimator, A)
    errors = [np.linalg.norm(estimator(A, num_matvecs, seed=s) - target) for s in range(seeds)]
    return float(np.sqrt(np.mean(np.square(errors))))


def convergence_slope(estimator, A, counts, seeds) -> float:
    errors = [rms_error(estimator, A, m, seeds) for m in counts]
    return float(np.polyfit(np.log(counts), np.log(errors), 1)[0])


@pytest.mark.parametrize(
    "estimator, counts, slopes, seeds",
    [
        (hutchinson_trace, [8, 32, 128, 512], (-0.7, -0.35), 48),
        (hutchinson_diagonal, [8, 32, 128, 512], (-0.7, -0.35), 48),
        (hutchpp_trace, [12, 48, 192], (-3.0, -1.0), 12),
        (xtrace, [12, 48, 192], (-3.0, -1.0), 12),
        (xdiag, [12, 48, 192], (-3.0, -1.0), 12),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_error_shrinks_at_the_expected_rate(estimator, counts, slopes, seeds):
    """Hutchinson: error ~ m^-1/2; Hutch++/XTrace/XDiag much faster on a decaying spectrum."""
    A = decaying_matrix(120, power=2.0)
    slope = convergence_slope(estimator, A, counts, seeds)
    assert slopes[0] < slope < slopes[1], f"{estimator.__name__}: log-log slope {slope:.2f}"


def test_variance_reduction_beats_hutchinson():
    A = decaying_matrix(120, power=2.0)
    plain = rms_error(hutchinson_trace, A, 96)
    assert rms_error(hutchpp_trace, A, 96) < 0.1 * plain
    assert rms_error(xtrace, A, 96) < 0.1 * plain
    assert rms_error(xdiag, A, 96) < 0.1 * rms_error(hutchinson_diagonal, A, 96)


@pytest.mark.parametrize(
    "estimator, bounds",
    [
        (hutchinson_trace, (0.85, 0.99)),
        (hutchinson_squared_frobenius, (0.85, 0.99)),
        (hutchpp_trace, (0.8, 0.99)),
        (xtrace, (0.75, 0.99)),
        (hutchinson_diagonal, (0.88, 0.99)),
        (xdiag, (0.75, 0.99)),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_standard_errors_cover_the_truth(estimator, bounds):
    """|estimate - truth| <= 1.96 stderr about 95% of the time (over seeds and entries)."""
    A = decaying_matrix(60, power=1.0, seed=1)
    target = truth(estimator, A)
    hits = []
    for seed in range(150 if estimator not in DIAGONAL_ESTIMATORS else 30):
        estimate, stderr = estimator(A, 24, seed=seed, return_stderr=True)
        hits.append(np.abs(estimate - target) <= 1.96 * stderr)
    coverage = float(np.mean(hits))
    assert bounds[0] <= coverage <= bounds[1], f"{estimator.__name__}: coverage {coverage:.3f}"


# --- seeds, formats, backends ---------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda f: f.__name__)
def test_seeded_results_are_reproducible(estimator):
    A = decaying_matrix(30, power=1.0)
    first = estimator(A, 12, seed=7)
    assert np.array_equal(first, estimator(A, 12, seed=7))
    assert not np.array_equal(first, estimator(A, 12, seed=8))
    assert not np.array_equal(first, estimator(A, 12, seed=7, distribution="normal"))
    # the probes do not depend on the block size: the same estimate up to rounding
    for block_size in (1, 5, 40):
        assert_close(estimator(A, 12, seed=7, block_size=block_size), first, rtol=1e-12)


@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda f: f.__name__)
def test_numpy_scipy_and_sparse_operands_agree(estimator):
    A = decaying_matrix(30, power=1.0)
    dense = estimator(A, 12, seed=2, distribution="normal")
    for operand in (aslinearoperator(A), scipy.sparse.csr_array(A)):
        assert_close(estimator(operand, 12, seed=2, distribution="normal"), dense, rtol=1e-12)


@functools.cache
def small_hessian(backend_name: str):
    """Hessian of a tanh MLP 3-4-2 (P = 26) with MSE loss, float64, and its dense matrix."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
    weights = [rng.standard_normal(s) for s in [(4, 3), (4,), (2, 4), (2,)]]
    if backend_name == "torch":
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        model = model.double()
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(torch.from_numpy(w))
        data = [(torch.from_numpy(X), torch.from_numpy(y))]
        H = HessianLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()), data)
    else:
        import jax.numpy as jnp

        from curvlinops.losses import MSELoss

        def mlp(p, x):
            return jnp.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]

        params = [jnp.asarray(w) for w in weights]
        H = HessianLinearOperator(mlp, MSELoss(), params, [(X, y)])
    return H, to_numpy(H.todense())


@pytest.mark.parametrize("estimator", ALL_ESTIMATORS, ids=lambda f: f.__name__)
def test_curvature_operators_of_each_backend(estimator, backend_name):
    """Native results that are within a few standard errors of the exact values."""
    H, dense = small_hessian(backend_name)
    # blocks of 8 columns throughout: one compiled product for JAX
    estimate, stderr = estimator(H, 48, seed=1, block_size=8, return_stderr=True)
    native = type(H.backend.zeros((1,)))
    assert isinstance(estimate, native) and isinstance(stderr, native)
    assert estimate.dtype == stderr.dtype == H.backend.zeros((1,)).dtype
    error = np.abs(to_numpy(estimate) - truth(estimator, dense))
    if estimator in (xtrace, xdiag):
        # their terms are exchangeable, not independent: the standard error is a guide only
        assert np.all(to_numpy(stderr) > 0)
        assert np.max(error) <= 0.1 * np.max(np.abs(truth(estimator, dense))), estimator.__name__
    else:
        assert np.all(error <= 5 * to_numpy(stderr)), estimator.__name__
    assert np.array_equal(to_numpy(estimator(H, 48, seed=1, block_size=8)), to_numpy(estimate))


def test_block_size_bounds_the_columns_per_product():
    A = decaying_matrix(20, power=1.0)
    op = Recorder(A)
    hutchinson_trace(op, 50, block_size=8)
    assert [X.shape[1] for _, X in op.inputs] == [8] * 6 + [2]


def test_default_block_fits_a_quarter_of_the_available_memory(monkeypatch):
    import curvlinops.estimators as estimators

    A = np.diag(np.arange(1.0, 1001.0))
    exact = hutchinson_trace(A, 40, block_size=32, seed=0)
    # 10 probes of 1000 float64 entries, three vectors each, in a quarter of the memory
    monkeypatch.setattr(estimators, "available_memory", lambda device: 4 * 10 * 3 * 8000)
    op = Recorder(A)
    estimate = hutchinson_trace(op, 40, seed=0)
    assert [X.shape[1] for _, X in op.inputs] == [10] * 4
    assert np.allclose(estimate, exact, rtol=1e-13)
    monkeypatch.setattr(estimators, "available_memory", lambda device: 1)
    op = Recorder(A)
    hutchinson_trace(op, 3)
    assert [X.shape[1] for _, X in op.inputs] == [1] * 3  # one probe at least


def test_long_probes_are_drawn_a_few_columns_at_a_time(monkeypatch):
    """A block of one probe of a long vector drew 32 columns (12.8 GB at 100 M entries)."""
    import curvlinops.estimators as estimators
    from curvlinops._operand import Operand

    n = 300_000  # more than 2**22 / 32 entries: 13 columns per draw
    draws = []
    random = Operand.random

    def recorded(self, shape, seed, kind="normal"):
        draws.append(shape)
        return random(self, shape, seed, kind)

    monkeypatch.setattr(Operand, "random", recorded)
    d = np.random.default_rng(0).random(n)
    A = scipy.sparse.diags(d)
    one_by_one = hutchinson_trace(A, 4, block_size=1, distribution="normal", seed=0)
    assert all(np.prod(shape) <= estimators._CHUNK_ENTRIES for shape in draws)
    together = hutchinson_trace(A, 4, block_size=4, distribution="normal", seed=0)
    # the same probes either way; the sums over n entries run in other orders
    np.testing.assert_allclose(one_by_one, together, rtol=n * np.finfo(np.float64).eps)


# --- errors and warnings -------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", TRACE_ESTIMATORS + DIAGONAL_ESTIMATORS)
def test_non_square_operand_is_refused(estimator):
    with pytest.raises(ValueError, match=r"A: expected a square operator, got shape \(3, 4\)"):
        estimator(np.ones((3, 4)), 6)


def test_bad_arguments_are_refused():
    A = np.eye(10)
    with pytest.raises(TypeError, match="A: expected a curvlinops operator"):
        hutchinson_trace("not a matrix", 4)
    with pytest.raises(ValueError, match="distribution: expected one of"):
        hutchinson_trace(A, 4, distribution="uniform")
    with pytest.raises(ValueError, match="seed: expected a non-negative int, got -1"):
        hutchinson_trace(A, 4, seed=-1)
    with pytest.raises(TypeError, match="seed: expected a non-negative int, got float"):
        xtrace(A, 4, seed=1.5)
    with pytest.raises(TypeError, match="num_matvecs: expected an int >= 1, got float"):
        hutchinson_diagonal(A, 4.0)
    with pytest.raises(ValueError, match="num_matvecs: expected an int >= 2, got 1.*standard"):
        hutchinson_trace(A, 1, return_stderr=True)
    with pytest.raises(ValueError, match="num_matvecs: expected an int >= 6, got 5"):
        hutchpp_trace(A, 5, return_stderr=True)
    with pytest.raises(ValueError, match="num_matvecs: expected at most 20 for an operator"):
        xtrace(A, 22)
    with pytest.raises(ValueError, match="num_matvecs: expected at most 30 for an operator"):
        hutchpp_trace(A, 33)
    with pytest.raises(ValueError, match="block_size: expected an int >= 1, got 0"):
        hutchinson_squared_frobenius(A, 4, block_size=0)
    with pytest.raises(TypeError, match="symmetric: expected True, False or None"):
        xdiag(A, 4, symmetric="yes")


def test_dependent_probes_are_reported():
    # seed 3 draws two Rademacher probes of length 2 with Ω[:, 1] = ±Ω[:, 0]
    with pytest.raises(ValueError, match="num_matvecs: expected linearly independent probes"):
        xtrace(np.eye(2), 4, seed=3)


def test_nan_products_warn():
    A = np.full((5, 5), np.nan)
    with pytest.warns(RuntimeWarning, match="hutchinson_trace: the estimate contains NaN"):
        hutchinson_trace(A, 3)
    with pytest.warns(RuntimeWarning, match="hutchinson_diagonal: the estimate contains NaN"):
        hutchinson_diagonal(A, 3)


def test_names_of_curvlinops_for_pytorch():
    """``hutchinson_diag`` / ``hutchinson_squared_fro``: 3.0.1's names, distribution positional."""
    from curvlinops import hutchinson_diag, hutchinson_squared_fro

    A = np.random.default_rng(0).normal(size=(6, 6))
    for old, new in (
        (hutchinson_diag, hutchinson_diagonal),
        (hutchinson_squared_fro, hutchinson_squared_frobenius),
    ):
        for distribution in ("rademacher", "normal"):
            np.random.seed(1)  # seed=None: fresh probes from numpy's global generator
            expected = new(A, 40, distribution=distribution)
            np.random.seed(1)
            np.testing.assert_array_equal(old(A, 40, distribution), expected)
    # exact where the estimator is: Rademacher probes on a diagonal matrix
    D = np.diag(np.arange(1.0, 7.0))
    np.testing.assert_allclose(hutchinson_diag(D, 3), np.arange(1.0, 7.0))
