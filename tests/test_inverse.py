"""CG and Neumann inverses against numpy.linalg.solve."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg
from cases import build
from helpers import to_numpy

from curvlinops import IdentityLinearOperator
from curvlinops.inverse import (
    CGInverseLinearOperator,
    ConvergenceError,
    ConvergenceWarning,
    NeumannInverseLinearOperator,
)


def operator(problem, kind: str):
    """The problem's operator, with all columns of a product in one vmap pass."""
    return problem.operator(kind, columns_per_pass=64)


def spd_matrix(n: int = 30, seed: int = 0, shift: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((n, n))
    return M @ M.T / n + shift * np.eye(n)


def rhs(n: int, k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k))


def test_cg_solves_numpy_systems_column_by_column():
    A, B = spd_matrix(), rhs(30, 4)
    inverse = CGInverseLinearOperator(A, damping=0.1, tol=1e-12)
    X = inverse @ B
    assert isinstance(X, np.ndarray) and X.shape == (30, 4)
    np.testing.assert_allclose(X, np.linalg.solve(A + 0.1 * np.eye(30), B), atol=1e-10)
    info = inverse.info
    assert info.converged.all() and (info.iterations > 0).all()
    assert (info.relative_residuals <= 1e-12).all()
    assert "4/4 columns converged" in str(info)
    x = inverse @ B[:, 0]
    assert x.shape == (30,)
    np.testing.assert_allclose(x, X[:, 0], atol=1e-10)


def test_cg_columns_advance_together_and_stop_on_their_own():
    A = np.diag(np.linspace(1.0, 10.0, 30))
    B = np.zeros((30, 3))
    B[0, 0] = 1.0  # an eigenvector: converges in one iteration
    B[:, 1] = 1.0  # a generic right-hand side: 30 distinct eigenvalues to resolve
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A @ X

    op = scipy.sparse.linalg.LinearOperator(A.shape, matvec=lambda x: A @ x, matmat=matmat)
    inverse = CGInverseLinearOperator(op, tol=1e-10)
    X = inverse @ B
    np.testing.assert_allclose(X, np.linalg.solve(A, B), atol=1e-9)
    info = inverse.info
    assert info.iterations[0] == 1 and info.iterations[2] == 0 and info.iterations[1] > 10
    assert info.converged.all()
    # one matmat per iteration of the slowest column; finished columns leave the batch
    # once half of them are done (the zero column is frozen at first, then dropped)
    assert len(calls) == info.num_products == info.iterations.max()
    assert calls[0] == 3 and set(calls[1:]) == {1}


def test_cg_on_ggn_matches_dense_solve(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    G, dense = operator(problem, "G"), problem.dense["G"]
    P = problem.num_params
    B = rhs(P, 3)
    expected = np.linalg.solve(dense + 0.1 * np.eye(P), B)
    inverse = CGInverseLinearOperator(G, damping=0.1, tol=1e-12)
    assert inverse.backend is G.backend
    X = inverse @ problem.native(B)
    assert type(X).__module__.split(".")[0] in (backend_name, "jaxlib")
    np.testing.assert_allclose(to_numpy(X), expected, atol=1e-9)
    np.testing.assert_allclose(inverse @ B[:, 1], expected[:, 1], atol=1e-9)  # numpy in/out
    # parameter-shaped in and out, like the operator itself
    structured = inverse @ problem.param_structure(B[:, 2])
    np.testing.assert_allclose(problem.flatten_structure(structured), expected[:, 2], atol=1e-9)


def test_cg_adjoint_of_bare_ggn(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    inverse = CGInverseLinearOperator(operator(problem, "G"), damping=0.5, tol=1e-12)
    v = rhs(problem.num_params, 1)[:, 0]
    forward = inverse @ v
    for adjoint in (inverse.H, inverse.T, inverse.adjoint()):
        np.testing.assert_allclose(adjoint @ v, forward, atol=1e-10)
    np.testing.assert_allclose(inverse.rmatvec(v), forward, atol=1e-10)


def test_cg_on_damped_hessian(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    H, dense = operator(problem, "H"), problem.dense["H"]
    damping = 2.0  # H has eigenvalues down to about -1.7
    P = problem.num_params
    B = rhs(P, 2)
    X = CGInverseLinearOperator(H, damping=damping, tol=1e-12) @ problem.native(B)
    np.testing.assert_allclose(
        to_numpy(X), np.linalg.solve(dense + damping * np.eye(P), B), atol=1e-9
    )


@pytest.mark.parametrize("library", ["torch", "jax"])
def test_cg_on_dense_framework_arrays(library):
    pytest.importorskip(library)
    A, B = spd_matrix(), rhs(30, 2)
    if library == "torch":
        import torch

        A_native, B_native = torch.as_tensor(A), torch.as_tensor(B)
    else:
        import jax.numpy as jnp

        A_native, B_native = jnp.asarray(A), jnp.asarray(B)
    inverse = CGInverseLinearOperator(A_native, tol=1e-12)
    X = inverse @ B_native
    assert type(X) is type(B_native)
    expected = np.linalg.solve(A, B)
    np.testing.assert_allclose(to_numpy(X), expected, atol=1e-9)
    np.testing.assert_allclose(inverse @ B, expected, atol=1e-9)  # numpy in, numpy out


def test_cg_inverse_composes_and_runs_in_scipy():
    A = spd_matrix(n=20)
    inverse = CGInverseLinearOperator(A, tol=1e-12)
    v = rhs(20, 1)[:, 0]
    # (A^-1 A) v = v, and A^-1 + I composes
    np.testing.assert_allclose(
        (inverse @ scipy.sparse.linalg.aslinearoperator(A)) @ v, v, atol=1e-9
    )
    np.testing.assert_allclose(
        (inverse + IdentityLinearOperator(20)) @ v, np.linalg.solve(A, v) + v, atol=1e-9
    )
    # scipy's eigsh on the inverse finds 1 / lambda_min(A)
    top = scipy.sparse.linalg.eigsh(inverse, k=1, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(top, 1.0 / np.linalg.eigvalsh(A)[0], rtol=1e-8)


def test_cg_todense_is_the_inverse(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    P = problem.num_params
    dense = to_numpy(
        CGInverseLinearOperator(operator(problem, "G"), damping=1.0, tol=1e-13).todense()
    )
    np.testing.assert_allclose(dense, np.linalg.inv(problem.dense["G"] + np.eye(P)), atol=1e-9)


def test_cg_preconditioner_reduces_iterations():
    rng = np.random.default_rng(3)
    scales = np.logspace(0, 4, 40)
    M = rng.standard_normal((40, 40)) * 0.01
    A = np.diag(scales) + M @ M.T
    B = rhs(40, 2)
    plain = CGInverseLinearOperator(A, tol=1e-10, maxiter=1000)
    X_plain = plain @ B
    jacobi = np.diag(1.0 / np.diag(A))
    for preconditioner in (jacobi, lambda R: R / np.diag(A)[:, None]):
        preconditioned = CGInverseLinearOperator(A, tol=1e-10, preconditioner=preconditioner)
        X = preconditioned @ B
        np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(X, X_plain, rtol=1e-6, atol=1e-12)
        assert preconditioned.info.iterations.max() < plain.info.iterations.max() / 2


def test_cg_zero_right_hand_side():
    inverse = CGInverseLinearOperator(spd_matrix(n=10))
    X = inverse @ np.zeros((10, 2))
    np.testing.assert_array_equal(X, 0.0)
    assert inverse.info.converged.all() and (inverse.info.iterations == 0).all()


def test_cg_non_convergence_warns_and_reports():
    A, B = spd_matrix(), rhs(30, 3)
    inverse = CGInverseLinearOperator(A, tol=1e-12, maxiter=3)
    with pytest.warns(ConvergenceWarning, match="3 of 3 columns did not converge"):
        inverse @ B
    assert not inverse.info.converged.any()
    assert (inverse.info.iterations == 3).all()
    assert (inverse.info.relative_residuals > 1e-12).all()


def test_cg_non_convergence_raises_when_asked():
    inverse = CGInverseLinearOperator(spd_matrix(), tol=1e-12, maxiter=3, on_failure="raise")
    with pytest.raises(ConvergenceError, match="Increase maxiter, increase damping"):
        inverse @ rhs(30, 1)


def test_cg_indefinite_matrix_is_reported():
    A = np.diag([1.0, -1.0, 2.0])
    inverse = CGInverseLinearOperator(A)
    with pytest.warns(ConvergenceWarning, match="not positive definite"):
        inverse @ np.array([1.0, 1.0, 0.0])
    assert inverse.info.indefinite.all()


def test_cg_nan_is_reported():
    A = spd_matrix(n=5)
    A[0, 1] = A[1, 0] = np.nan
    inverse = CGInverseLinearOperator(A)
    with pytest.warns(ConvergenceWarning, match="got NaN or infinite residuals"):
        inverse @ np.ones(5)
    assert inverse.info.nonfinite.all() and not inverse.info.converged.any()


def test_cg_errors():
    A = spd_matrix(n=5)
    with pytest.raises(ValueError, match="damping: expected a number >= 0.0, got -1.0"):
        CGInverseLinearOperator(A, damping=-1.0)
    with pytest.raises(TypeError, match="damping: expected a real number, got str"):
        CGInverseLinearOperator(A, damping="0.1")
    with pytest.raises(ValueError, match="tol: expected a number >= 0.0"):
        CGInverseLinearOperator(A, tol=-1e-3)
    with pytest.raises(ValueError, match="maxiter: expected an integer >= 1, got 0"):
        CGInverseLinearOperator(A, maxiter=0)
    with pytest.raises(ValueError, match="on_failure: expected 'warn' or 'raise', got 'ignore'"):
        CGInverseLinearOperator(A, on_failure="ignore")
    with pytest.raises(ValueError, match=r"A: expected a square operator, got shape \(5, 4\)"):
        CGInverseLinearOperator(np.ones((5, 4)))
    with pytest.raises(TypeError, match="A: expected a curvlinops operator"):
        CGInverseLinearOperator([[1.0]])
    with pytest.raises(ValueError, match=r"preconditioner: expected shape \(5, 5\), got shape"):
        CGInverseLinearOperator(A, preconditioner=np.eye(4))
    with pytest.raises(TypeError, match="preconditioner: expected an operator, a matrix"):
        CGInverseLinearOperator(A, preconditioner="jacobi")
    with pytest.raises(ValueError, match=r"x: expected 5 rows to match the operator"):
        CGInverseLinearOperator(A) @ np.ones(4)


# --- Neumann --------------------------------------------------------------------------------
def test_neumann_converges_to_the_inverse():
    A, B = spd_matrix(n=20, shift=0.5), rhs(20, 3)
    damping = 0.2
    exact = np.linalg.solve(A + damping * np.eye(20), B)
    scale = 1.0 / np.linalg.eigvalsh(A + damping * np.eye(20))[-1]
    errors = []
    for num_terms in (5, 20, 400):
        inverse = NeumannInverseLinearOperator(A, num_terms=num_terms, scale=scale, damping=damping)
        errors.append(np.abs(inverse @ B - exact).max())
        assert (inverse.info.last_term_ratios < 1).all()
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10


def test_neumann_matches_its_definition():
    A, b = spd_matrix(n=8), rhs(8, 1)[:, 0]
    scale, num_terms = 0.3, 4
    step = np.eye(8) - scale * A
    expected = scale * sum(np.linalg.matrix_power(step, k) for k in range(num_terms)) @ b
    inverse = NeumannInverseLinearOperator(A, num_terms=num_terms, scale=scale)
    np.testing.assert_allclose(inverse @ b, expected, atol=1e-13)


def test_neumann_on_ggn(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    P, damping = problem.num_params, 1.0
    dense = problem.dense["G"] + damping * np.eye(P)
    scale = 1.0 / np.linalg.eigvalsh(dense)[-1]
    inverse = NeumannInverseLinearOperator(
        operator(problem, "G"), num_terms=200, scale=scale, damping=damping
    )
    v = rhs(P, 1)[:, 0]
    result = inverse @ problem.native(v)
    assert type(result).__module__.split(".")[0] in (backend_name, "jaxlib")
    np.testing.assert_allclose(to_numpy(result), np.linalg.solve(dense, v), atol=1e-8)
    np.testing.assert_allclose(inverse.H @ v, to_numpy(result), atol=1e-12)


def test_neumann_divergence_warns_or_raises():
    A = spd_matrix(n=10)
    too_large = 3.0 / np.linalg.eigvalsh(A)[-1]
    inverse = NeumannInverseLinearOperator(A, num_terms=30, scale=too_large)
    with pytest.warns(ConvergenceWarning, match="the series diverges"):
        inverse @ np.ones(10)
    assert (inverse.info.last_term_ratios > 1).all()
    strict = NeumannInverseLinearOperator(A, num_terms=30, scale=too_large, on_failure="raise")
    with pytest.raises(ConvergenceError, match="max_stable_learning_rate"):
        strict @ np.ones(10)


def test_neumann_errors():
    A = spd_matrix(n=5)
    with pytest.raises(ValueError, match="scale: expected a number > 0.0, got 0.0"):
        NeumannInverseLinearOperator(A, num_terms=3, scale=0.0)
    with pytest.raises(ValueError, match="num_terms: expected an integer >= 1, got 0"):
        NeumannInverseLinearOperator(A, num_terms=0, scale=0.1)
    with pytest.raises(TypeError, match="num_terms: expected an integer >= 1, got float"):
        NeumannInverseLinearOperator(A, num_terms=2.0, scale=0.1)
