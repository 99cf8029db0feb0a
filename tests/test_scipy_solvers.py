"""scipy's eigsh, cg, minres, lsmr and lobpcg run unchanged on the operators.

Results are compared with numpy.linalg on the dense references, on both backends.
"""

import numpy as np
import pytest
from cases import build
from helpers import assert_close
from scipy.sparse.linalg import cg, eigsh, lobpcg, lsmr, minres

from curvlinops import IdentityLinearOperator


@pytest.fixture
def problem(backend_name):
    return build("mlp-ce-mean", backend_name)


def test_eigsh_hessian(problem):
    H, D = problem.operator("H"), problem.dense["H"]
    evals, evecs = eigsh(H, k=3, which="LM", tol=1e-12)
    dense = np.linalg.eigvalsh(D)
    expected = dense[np.argsort(-np.abs(dense))[:3]]
    assert_close(np.sort(evals), np.sort(expected), rtol=1e-8, name="eigsh eigenvalues")
    # each returned pair is an eigenpair of the dense matrix
    assert_close(D @ evecs, evecs * evals, rtol=1e-7, name="H v = λ v")


def test_cg_on_damped_ggn(problem):
    G, D = problem.operator("G"), problem.dense["G"]
    lam = 1e-2
    A = G + lam * IdentityLinearOperator(G)
    b = np.random.default_rng(0).normal(size=G.shape[0])
    x, info = cg(A, b, rtol=1e-12, atol=0.0, maxiter=2000)
    assert info == 0
    expected = np.linalg.solve(D + lam * np.eye(len(b)), b)
    assert_close(x, expected, rtol=1e-7, name="cg solution")


def test_minres_on_indefinite_hessian(problem):
    H, D = problem.operator("H"), problem.dense["H"]
    assert np.linalg.eigvalsh(D).min() < 0 < np.linalg.eigvalsh(D).max()  # indefinite
    shift = 0.5
    A = H + shift * IdentityLinearOperator(H)
    b = np.random.default_rng(1).normal(size=H.shape[0])
    x, info = minres(A, b, rtol=1e-12, maxiter=2000)
    assert info == 0
    expected = np.linalg.solve(D + shift * np.eye(len(b)), b)
    assert_close(x, expected, rtol=1e-6, name="minres solution")


def test_lsmr_on_jacobian(problem):
    """J is wide (N C < P): lsmr from zero gives the minimum-norm solution."""
    J, D = problem.operator("J"), problem.dense["J"]
    assert D.shape[0] < D.shape[1]
    u = np.random.default_rng(2).normal(size=D.shape[0])
    # stopping tolerances well above float64 roundoff (J's condition number is about 14):
    # 1e-14 sat within a factor 3 of what rounding lets lsmr reach, so it hinged on the BLAS
    x, istop, *_ = lsmr(J, u, atol=1e-12, btol=1e-12, maxiter=2000)
    assert istop in (1, 2)
    expected = np.linalg.lstsq(D, u, rcond=None)[0]
    assert_close(x, expected, rtol=1e-6, name="lsmr solution")
    # and the transposed problem: least squares with the tall Jᵀ
    v = np.random.default_rng(3).normal(size=D.shape[1])
    y, istop, *_ = lsmr(J.T, v, atol=1e-12, btol=1e-12, maxiter=2000)
    assert istop in (1, 2)
    assert_close(y, np.linalg.lstsq(D.T, v, rcond=None)[0], rtol=1e-6, name="lsmr on Jᵀ")


def test_lobpcg_top_ggn_eigenvalues(problem):
    G, D = problem.operator("G"), problem.dense["G"]
    X0 = np.random.default_rng(4).normal(size=(G.shape[0], 2))
    evals, evecs = lobpcg(G, X0, largest=True, tol=1e-10, maxiter=500)
    expected = np.linalg.eigvalsh(D)[-2:]
    assert_close(np.sort(evals), expected, rtol=1e-8, name="lobpcg eigenvalues")
