"""Lanczos, eigsh, sharpness and the stability bound against dense linear algebra."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
from cases import build
from helpers import to_numpy

from curvlinops.eigen import (
    ConvergenceError,
    ConvergenceWarning,
    eigsh,
    lanczos,
    max_stable_learning_rate,
    sharpness,
)

WHICH = ["LA", "SA", "LM"]


def operator(problem, kind: str):
    """The problem's operator, with all columns of a product in one vmap pass."""
    return problem.operator(kind, columns_per_pass=64)


def symmetric_matrix(n: int = 40, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with a few separated eigenvalues at both ends."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    bulk = rng.uniform(-1.0, 1.0, n - 6)
    eigenvalues = np.concatenate([[-9.0, -6.0, -4.0], bulk, [3.0, 5.0, 8.0]])
    return (Q * eigenvalues) @ Q.T


def native_matrix(A: np.ndarray, library: str):
    if library == "torch":
        import torch

        return torch.as_tensor(A)
    if library == "jax":
        import jax.numpy as jnp

        return jnp.asarray(A)
    return A


def reference(A: np.ndarray, k: int, which: str) -> np.ndarray:
    values = np.linalg.eigvalsh(A)
    if which == "LA":
        return values[-k:]
    if which == "SA":
        return values[:k]
    return np.sort(values[np.argsort(-np.abs(values))[:k]])


def assert_eigenpairs(A: np.ndarray, values, vectors, expected: np.ndarray, tol: float) -> None:
    values, vectors = to_numpy(values), to_numpy(vectors)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(values, expected, atol=tol * scale, rtol=0)
    residuals = np.linalg.norm(A @ vectors - vectors * values, axis=0)
    assert residuals.max() <= 1e3 * tol**0.5 * scale
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=1e-10)


# --- lanczos -----------------------------------------------------------------------------------
def test_lanczos_tridiagonalises_numpy():
    A = symmetric_matrix()
    result = lanczos(A, 25, seed=3)
    Q, T = result.basis, result.tridiagonal()
    assert Q.shape == (40, 25) and T.shape == (25, 25)
    np.testing.assert_allclose(Q.T @ Q, np.eye(25), atol=1e-12)
    np.testing.assert_allclose(Q.T @ A @ Q, T, atol=1e-11)
    np.testing.assert_allclose(np.diag(T), result.alphas)
    np.testing.assert_allclose(np.diag(T, 1), result.betas)
    # the extreme Ritz values converge first
    ritz = np.linalg.eigvalsh(T)
    exact = np.linalg.eigvalsh(A)
    np.testing.assert_allclose(ritz[[0, -1]], exact[[0, -1]], atol=1e-8)


def test_lanczos_on_curvature_operator(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    H, dense = operator(problem, "H"), problem.dense["H"]
    result = lanczos(H, 20, seed=1)
    assert type(result.basis).__module__.split(".")[0] in (backend_name, "jaxlib")
    Q, T = to_numpy(result.basis), to_numpy(result.tridiagonal())
    np.testing.assert_allclose(Q.T @ Q, np.eye(20), atol=1e-12)
    np.testing.assert_allclose(Q.T @ dense @ Q, T, atol=1e-11)


def test_lanczos_batched_start_vectors_match_single_runs():
    A = symmetric_matrix()
    V0 = np.random.default_rng(5).standard_normal((40, 3))
    batched = lanczos(A, 12, v0=V0)
    assert batched.alphas.shape == (3, 12) and batched.betas.shape == (3, 11)
    assert batched.basis.shape == (3, 40, 12)
    for i in range(3):
        single = lanczos(A, 12, v0=V0[:, i])
        np.testing.assert_allclose(batched.alphas[i], single.alphas, atol=1e-12)
        np.testing.assert_allclose(batched.betas[i], single.betas, atol=1e-12)
        np.testing.assert_allclose(batched.basis[i], single.basis, atol=1e-12)
    T = batched.tridiagonal()
    assert T.shape == (3, 12, 12)
    np.testing.assert_allclose(T[1], lanczos(A, 12, v0=V0[:, 1]).tridiagonal(), atol=1e-12)


def test_lanczos_batched_uses_one_product_per_step():
    A = symmetric_matrix()
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A @ X

    op = scipy.sparse.linalg.LinearOperator(A.shape, matvec=lambda x: A @ x, matmat=matmat)
    lanczos(op, 7, v0=np.ones((40, 4)))
    assert calls == [4] * 7


def test_lanczos_without_reorthogonalisation_agrees_for_few_steps():
    A = symmetric_matrix()
    full = lanczos(A, 6, seed=2)
    plain = lanczos(A, 6, seed=2, reorthogonalize=False, keep_basis=False)
    assert plain.basis is None
    np.testing.assert_allclose(plain.alphas, full.alphas, atol=1e-10)
    np.testing.assert_allclose(plain.betas, full.betas, atol=1e-10)


def test_lanczos_breakdown_gives_zero_coupling():
    A = np.diag([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    # v0 sees two distinct eigenvalues: the Krylov space has dimension 2. Every number of
    # the recurrence is a short dyadic fraction, exact in any summation order, so the
    # residual of step 2 is exactly zero on any CPU and BLAS: the breakdown is certain.
    result = lanczos(A, 5, v0=np.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_array_equal(result.alphas, [1.5, 1.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(result.betas, [0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(result.basis[:, 2:], 0.0)
    ritz = np.linalg.eigvalsh(result.tridiagonal()[:2, :2])
    np.testing.assert_allclose(ritz, [1.0, 2.0], atol=1e-14)
    # three distinct eigenvalues and a generic vector: dimension 3. The residual of step 3
    # is rounding noise of a few eps ||A||, about as large as the breakdown threshold
    # eps sqrt(n) max||A q||; whether it falls below depends on the rounding of the BLAS.
    # Either way the coupling is numerically zero and T's leading block is exact.
    result = lanczos(A, 5, v0=np.arange(1.0, 7.0))
    eps = np.finfo(np.float64).eps
    assert abs(result.betas[2]) <= 10 * eps * np.sqrt(6) * 3.0
    assert np.all(np.isfinite(result.basis))
    Q = result.basis
    np.testing.assert_allclose(Q[:, :3].T @ Q[:, :3], np.eye(3), atol=1e-12)
    np.testing.assert_allclose(Q[:, :3].T @ Q[:, 3:], 0.0, atol=1e-12)  # zero or a new direction
    ritz = np.linalg.eigvalsh(result.tridiagonal()[:3, :3])
    np.testing.assert_allclose(ritz, [1.0, 2.0, 3.0], atol=1e-12)


def test_lanczos_is_seeded(backend_name):
    H = operator(build("mlp-ce-mean", backend_name), "H")
    a, b, c = (to_numpy(lanczos(H, 5, seed=s).alphas) for s in (4, 4, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_lanczos_errors():
    A = symmetric_matrix(n=10)
    with pytest.raises(ValueError, match="num_steps: expected at most the operator's size n = 10"):
        lanczos(A, 11)
    with pytest.raises(TypeError, match="num_steps: expected an integer >= 1"):
        lanczos(A, 2.5)
    with pytest.raises(ValueError, match=r"v0: expected shape \(10,\) or \(10, m\)"):
        lanczos(A, 3, v0=np.ones(9))
    with pytest.raises(ValueError, match="v0: expected start vectors of non-zero norm"):
        lanczos(A, 3, v0=np.zeros(10))
    with pytest.raises(ValueError, match="A: expected a square operator"):
        lanczos(np.ones((3, 4)), 2)
    with pytest.raises(TypeError, match="A: expected a curvlinops operator, a scipy"):
        lanczos("matrix", 2)


# --- eigsh -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", WHICH)
def test_eigsh_numpy_goes_through_scipy(which):
    A = symmetric_matrix()
    values, vectors = eigsh(A, k=4, which=which)
    assert isinstance(values, np.ndarray)
    assert_eigenpairs(A, values, vectors, reference(A, 4, which), 1e-12)
    only = eigsh(scipy.sparse.linalg.aslinearoperator(A), 4, which, return_eigenvectors=False)
    np.testing.assert_allclose(only, reference(A, 4, which), atol=1e-10)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("library", ["torch", "jax"])
def test_eigsh_native_dense_matches_scipy(library, which):
    pytest.importorskip(library)
    A = symmetric_matrix()
    values, vectors = eigsh(native_matrix(A, library), k=4, which=which)
    assert type(values).__module__.split(".")[0] in (library, "jaxlib")
    expected = scipy.sparse.linalg.eigsh(A, k=4, which=which, return_eigenvectors=False)
    assert_eigenpairs(A, values, vectors, np.sort(expected), 1e-10)


@pytest.mark.parametrize("which", WHICH)
def test_eigsh_native_on_hessian_matches_scipy(backend_name, which):
    problem = build("mlp-ce-mean", backend_name)
    H, dense = operator(problem, "H"), problem.dense["H"]
    values, vectors = eigsh(H, k=5, which=which, ncv=12)
    scipy_values, scipy_vectors = scipy.sparse.linalg.eigsh(H, k=5, which=which)
    assert_eigenpairs(dense, values, vectors, reference(dense, 5, which), 1e-10)
    np.testing.assert_allclose(to_numpy(values), scipy_values, atol=1e-9)
    overlaps = np.abs(np.sum(to_numpy(vectors) * scipy_vectors, axis=0))
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-6)


def test_jax_krylov_steps_compile_once_and_donate_their_basis():
    """The step's basis update runs in place (donated buffers) and is compiled once.

    Before, every call compiled its steps anew, and every step copied the whole
    basis (2.7 ms of a 5 ms product for 20 vectors of 270 k entries).
    """
    pytest.importorskip("jax")
    import warnings

    from helpers import jax_compilations

    problem = build("mlp-ce-mean", "jax")
    H, dense = operator(problem, "H"), problem.dense["H"]
    eigsh(H, k=3, which="LA", ncv=8)
    lanczos(H, 10, seed=1)
    before = jax_compilations()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*donated buffers")
        values, vectors = eigsh(H, k=3, which="LA", ncv=8)
        result = lanczos(H, 10, seed=1)
    assert jax_compilations() == before
    assert_eigenpairs(dense, values, vectors, reference(dense, 3, "LA"), 1e-10)
    Q = to_numpy(result.basis)
    np.testing.assert_allclose(Q.T @ Q, np.eye(10), atol=1e-12)
    np.testing.assert_allclose(Q.T @ dense @ Q, to_numpy(result.tridiagonal()), atol=1e-11)


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_eigsh_finds_repeated_eigenvalues(library):
    pytest.importorskip(library)
    # Krylov spaces see one direction per distinct eigenvalue; the solver goes on with
    # a fresh direction after the (near) breakdown and so finds the copies, rather
    # than stopping early on the invariant subspace's exact pairs.
    A = np.diag([9.0, 9.0, 9.0, *np.arange(1.0, 9.0)])
    values = eigsh(native_matrix(A, library), k=4, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(to_numpy(values), [8.0, 9.0, 9.0, 9.0], atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA"])
@pytest.mark.parametrize("library", ["torch", "jax"])
def test_eigsh_stops_at_the_step_its_pairs_converge(library, which):
    """Tested after every product, not only when the basis is full (``ncv`` = 20 here)."""
    pytest.importorskip(library)
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    ends = np.array([25.0, 50.0, 100.0]) * (1 if which == "LA" else -1)
    A = (Q * np.concatenate([ends, rng.uniform(-1.0, 1.0, 297)])) @ Q.T
    values, vectors, info = eigsh(native_matrix(A, library), k=3, which=which, return_info=True)
    # three eigenvalues 25x beyond the rest converge within a few steps of the third
    # (13 products here, in both frameworks): the property is stopping before the
    # basis fills, with a margin of 7 steps that no rounding difference closes
    assert info["restarts"] == 0 and info["products"] < info["ncv"] == 20
    assert info["converged"]
    assert_eigenpairs(A, values, vectors, reference(A, 3, which), 1e-9)


def test_eigsh_is_seeded(backend_name):
    G = operator(build("mlp-ce-mean", backend_name), "G")
    first = to_numpy(eigsh(G, k=2, which="LA", seed=1)[1])
    again = to_numpy(eigsh(G, k=2, which="LA", seed=1)[1])
    np.testing.assert_array_equal(first, again)


def test_eigsh_start_vector_of_another_library(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    v0 = np.ones(problem.num_params)
    values = eigsh(operator(problem, "G"), k=2, which="LA", v0=v0, return_eigenvectors=False)
    np.testing.assert_allclose(to_numpy(values), reference(problem.dense["G"], 2, "LA"), atol=1e-10)


def test_eigsh_non_convergence_warns_or_raises():
    torch = pytest.importorskip("torch")
    A = torch.as_tensor(symmetric_matrix(n=200, seed=1))
    with pytest.warns(ConvergenceWarning, match="did not converge after 1 restarts"):
        eigsh(A, k=3, which="SA", ncv=4, maxiter=1, tol=1e-14)
    with pytest.raises(ConvergenceError, match="Increase maxiter or ncv"):
        eigsh(A, k=3, which="SA", ncv=4, maxiter=1, tol=1e-14, on_failure="raise")


def test_nan_products_are_reported():
    torch = pytest.importorskip("torch")
    A = symmetric_matrix(n=10)
    A[3, 4] = A[4, 3] = np.nan
    with pytest.raises(FloatingPointError, match="eigsh: the products with A contain NaN"):
        eigsh(torch.as_tensor(A), k=2)
    with pytest.raises(FloatingPointError, match="lanczos: the products with A contain NaN"):
        lanczos(A, 3)


def test_eigsh_errors():
    A = symmetric_matrix(n=10)
    with pytest.raises(ValueError, match="k: expected k < n = 10, got 10. For all eigenvalues"):
        eigsh(A, k=10)
    with pytest.raises(ValueError, match="k: expected an integer >= 1, got 0"):
        eigsh(A, k=0)
    with pytest.raises(ValueError, match="which: expected 'LA' or 'SA' or 'LM', got 'BE'"):
        eigsh(A, k=2, which="BE")
    with pytest.raises(ValueError, match=r"ncv: expected k < ncv <= n \(k = 3, n = 10\), got 3"):
        eigsh(A, k=3, ncv=3)
    with pytest.raises(ValueError, match="on_failure: expected 'warn' or 'raise'"):
        eigsh(A, k=2, on_failure="ignore")
    with pytest.raises(ValueError, match="tol: expected a number >= 0"):
        eigsh(A, k=2, tol=-1.0)
    with pytest.raises(ValueError, match=r"v0: expected a vector of shape \(10,\), got shape"):
        eigsh(A, k=2, v0=np.ones((10, 2)))


@pytest.mark.gpu
def test_eigsh_cupy_dispatch():
    cupy = pytest.importorskip("cupy")
    A = symmetric_matrix()
    values = eigsh(cupy.asarray(A), k=3, which="LA", return_eigenvectors=False)
    assert type(values).__module__.startswith("cupy")
    np.testing.assert_allclose(cupy.asnumpy(values), reference(A, 3, "LA"), atol=1e-8)
    from cupyx.scipy.sparse import csr_matrix

    values = eigsh(csr_matrix(cupy.asarray(A)), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(cupy.asnumpy(values)), reference(A, 3, "LA"), atol=1e-8)


# --- sharpness and the stability bound ---------------------------------------------------------
def test_sharpness_and_stable_learning_rate(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    top = np.linalg.eigvalsh(problem.dense["H"])[-1]
    assert abs(sharpness(operator(problem, "H")) - top) <= 1e-10 * abs(top)
    rate = max_stable_learning_rate(operator(problem, "H"))
    assert abs(rate - 2.0 / top) <= 1e-9 * rate


def test_stable_learning_rate_separates_convergence_from_divergence():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((20, 20))
    A = M @ M.T / 20 + 0.1 * np.eye(20)
    bound = max_stable_learning_rate(A)

    def gradient_descent(rate: float) -> float:
        w = np.ones(20)
        for _ in range(3000):
            w = w - rate * (A @ w)  # gradient of w^T A w / 2, minimum at 0
        return float(np.linalg.norm(w))

    assert gradient_descent(0.99 * bound) < 1e-3
    assert gradient_descent(1.01 * bound) > 1e3


def test_stable_learning_rate_needs_positive_curvature():
    with pytest.raises(ValueError, match="A: expected an operator with a positive largest"):
        max_stable_learning_rate(-np.diag([1.0, 2.0, 3.0]))
