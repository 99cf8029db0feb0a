"""Hessian, GGN and Jacobian operators against dense references, in float64.

The references (``cases.py``) are ``torch.func.hessian`` / ``jacrev`` and
``jax.hessian`` / ``jacrev`` of the loss on the concatenated data, with loss
formulas written independently of ``curvlinops.losses``; the GGN reference
is ``Jᵀ H_z J`` built densely. Every case runs on both backends.
"""

import numpy as np
import pytest
from cases import CASE_IDS, CASES, COLUMNS_PER_PASS, JACOBIAN_CASES, JACOBIAN_IDS, build
from helpers import assert_close

import curvlinops

K = 5  # matmat columns: several blocks of COLUMNS_PER_PASS


@pytest.fixture(params=CASES, ids=CASE_IDS)
def problem(request, backend_name):
    return build(request.param.name, backend_name)


@pytest.fixture(params=JACOBIAN_CASES, ids=JACOBIAN_IDS)
def jac_problem(request, backend_name):
    return build(request.param.name, backend_name)


def native_type(backend):
    if backend == "torch":
        import torch

        return torch.Tensor
    import jax

    return jax.Array


@pytest.mark.parametrize("kind", ["H", "G"])
def test_todense(problem, kind):
    A = problem.operator(kind)
    dense = A.todense()
    assert isinstance(dense, native_type(problem.backend))
    assert_close(dense, problem.dense[kind], name=f"{kind}.todense()")


@pytest.mark.parametrize("kind", ["H", "G"])
def test_products(problem, kind):
    """matvec, matmat over several column blocks, rmatvec, rmatmat, dot and @."""
    A, D = problem.operator(kind), problem.dense[kind]
    P = problem.num_params
    assert A.columns_per_pass == COLUMNS_PER_PASS[problem.backend] < K
    rng = np.random.default_rng(0)
    v, V = rng.normal(size=P), rng.normal(size=(P, K))
    assert_close(A @ v, D @ v, name="A @ v")
    assert_close(A.matvec(v[:, None]), D @ v[:, None], name="matvec (P, 1)")
    assert_close(A.matmat(V), D @ V, name="matmat")
    assert_close(A @ V, D @ V, name="A @ V")
    assert_close(A.dot(V), D @ V, name="dot")
    assert_close(A.rmatvec(v), D.T @ v, name="rmatvec")
    assert_close(A.rmatmat(V), D.T @ V, name="rmatmat")
    assert_close(A.T @ V, D.T @ V, name="A.T @ V")


@pytest.mark.parametrize("kind", ["H", "G"])
def test_parameter_structures(problem, kind):
    """Inputs shaped like ``params`` give outputs shaped like ``params``."""
    A, D = problem.operator(kind), problem.dense[kind]
    rng = np.random.default_rng(1)
    v, V = rng.normal(size=problem.num_params), rng.normal(size=(problem.num_params, K))

    out = A @ problem.param_structure(v)
    assert type(out) is type(problem.params)
    assert_close(out, problem.param_structure(D @ v), name="A @ params-shaped")

    out = A.matmat(problem.param_structure(V))
    assert_close(out, problem.param_structure(D @ V), name="A.matmat(params-shaped (*s, K))")


def test_symmetric_and_psd(problem):
    """H and G are symmetric; G is positive semi-definite for these convex losses."""
    H, G = problem.dense["H"], problem.dense["G"]
    assert_close(H, H.T, name="H symmetric")
    assert_close(G, G.T, name="G symmetric")
    eigs = np.linalg.eigvalsh(G)
    assert eigs.min() >= -1e-10 * max(1.0, eigs.max())
    # the GGN drops the second-order model term: H and G differ (the test can fail)
    assert np.abs(H - G).max() > 1e-6 * np.abs(H).max()


def test_jacobian(jac_problem):
    problem = jac_problem
    J, D = problem.operator("J"), problem.dense["J"]
    M, P = D.shape
    assert J.shape == (M, P)
    rng = np.random.default_rng(2)
    v, V = rng.normal(size=P), rng.normal(size=(P, K))
    u, U = rng.normal(size=M), rng.normal(size=(M, K))

    dense = J.todense()
    assert isinstance(dense, native_type(problem.backend))
    assert_close(dense, D, name="J.todense()")
    assert_close(J @ v, D @ v, name="J @ v")
    assert_close(J.matmat(V), D @ V, name="J.matmat")
    assert_close(J.rmatvec(u), D.T @ u, name="J.rmatvec")
    assert_close(J.rmatmat(U), D.T @ U, name="J.rmatmat")
    for name, JT in [("J.T", J.T), ("J.H", J.H), ("J.adjoint()", J.adjoint())]:
        assert JT.shape == (P, M)
        assert_close(JT @ u, D.T @ u, name=f"{name} @ u")
        assert_close(JT @ U, D.T @ U, name=f"{name} @ U")
        assert_close(JT.rmatvec(v), D @ v, name=f"{name}.rmatvec")
    # the adjoint identity <u, J v> = <Jᵀ u, v>
    assert np.isclose(u @ (J @ v), (J.rmatvec(u)) @ v, rtol=1e-10, atol=0)
    # parameter-shaped input: a list of one array of the stacked outputs' shape (as 3.0.1)
    (Jv,) = J @ problem.param_structure(v)
    assert tuple(Jv.shape) == tuple(J._out_shape[0])
    assert_close(Jv.reshape(-1), D @ v, name="J @ params-shaped")


@pytest.mark.parametrize("name", ["mlp-ce-mean-dictparams", "seq_ct-ce-sum"])
def test_transposed_jacobian(name, backend_name):
    problem = build(name, backend_name)
    JT, D = problem.operator("JT"), problem.dense["J"].T
    assert isinstance(JT, curvlinops.TransposedJacobianLinearOperator)
    P, M = D.shape
    assert JT.shape == (P, M)
    rng = np.random.default_rng(3)
    u, U, v = rng.normal(size=M), rng.normal(size=(M, K)), rng.normal(size=P)
    assert_close(JT.todense(), D, name="Jᵀ.todense()")
    assert_close(JT @ u, D @ u, name="Jᵀ @ u")
    assert_close(JT.matmat(U), D @ U, name="Jᵀ.matmat")
    assert_close(JT.rmatvec(v), D.T @ v, name="Jᵀ.rmatvec")
    assert_close(JT.T @ v, D.T @ v, name="(Jᵀ).T @ v")
    (JTv,) = JT.rmatvec(problem.param_structure(v))
    assert_close(JTv.reshape(-1), D.T @ v, name="Jᵀ.rmatvec(params)")


def test_wide_column_blocks():
    """JAX: several columns in one vmapped pass, over two passes.

    (The other JAX tests evaluate one column per pass, to compile less; PyTorch
    cases run with four columns per pass and a remainder block throughout.)
    """
    problem = build("seq-ce-mean", "jax")
    rng = np.random.default_rng(4)
    V = rng.normal(size=(problem.num_params, 4))
    for kind in ["H", "G", "J"]:
        A = problem.operator(kind, columns_per_pass=2, check_deterministic=False)
        assert_close(A @ V, problem.dense[kind] @ V, name=f"{kind} @ V in blocks of 2")
    J = problem.operator("J", columns_per_pass=2, check_deterministic=False)
    U = rng.normal(size=(J.shape[0], 4))
    assert_close(J.rmatmat(U), problem.dense["J"].T @ U, name="Jᵀ @ U in blocks of 2")
