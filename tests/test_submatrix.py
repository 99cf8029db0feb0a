"""Submatrices, parameter subsets and block diagonals against slices of dense matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cases import build
from helpers import assert_close, to_numpy
from scipy.sparse.linalg import aslinearoperator, eigsh
from test_fisher import FAST, dense, operator

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.diagonal import DiagonalLinearOperator, GGNDiagonalLinearOperator
from curvlinops.submatrix import (
    BlockDiagonalLinearOperator,
    SubmatrixLinearOperator,
    restrict_params,
)

RESTRICT_CASES = ["mlp-ce-mean", "mlp-ce-mean-dictparams", "dict-mse-mean"]


def offsets(problem: Any) -> list[np.ndarray]:
    """Flat indices of each parameter, in the operator's order."""
    sizes = [int(np.prod(s, dtype=int)) for s in problem.param_shapes]
    starts = np.cumsum([0, *sizes])
    return [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]


# --- SubmatrixLinearOperator ----------------------------------------------------------------
@pytest.mark.parametrize("operand", ["array", "scipy"])
def test_submatrix_of_a_matrix(operand: str) -> None:
    A = np.random.default_rng(0).normal(size=(6, 5))
    rows, cols = [4, 0, 2], [1, 3]
    S = SubmatrixLinearOperator(A if operand == "array" else aslinearoperator(A), rows, cols)
    expected = A[np.ix_(rows, cols)]
    assert S.shape == (3, 2) and not S.is_symmetric
    X = np.random.default_rng(1).normal(size=(2, 4))
    assert_close(S @ X, expected @ X, name="matmat")
    assert_close(S @ X[:, 0], expected @ X[:, 0], name="matvec")
    assert_close(S.rmatvec(np.ones(3)), expected.T @ np.ones(3), name="rmatvec")
    assert_close(S.T @ np.ones(3), expected.T @ np.ones(3), name="transpose")
    assert_close(S.todense(), expected, name="todense")


def test_submatrix_of_a_curvature_operator(backend_name: str) -> None:
    problem = build("mlp-bce-mean", backend_name)
    G = operator(GGNLinearOperator, problem)
    full = problem.dense["G"]
    rows, cols = [30, 2, 7, 11], [5, 30, 0]
    S = SubmatrixLinearOperator(G, rows, cols)
    assert S.backend is G.backend
    V = np.random.default_rng(0).normal(size=(3, 2))
    assert_close(S @ problem.native(V), full[np.ix_(rows, cols)] @ V, name="matmat (native)")
    assert_close(S.rmatmat(np.ones((4, 2))), full[np.ix_(rows, cols)].T @ np.ones((4, 2)))
    assert_close(to_numpy(S.todense()), full[np.ix_(rows, cols)], name="todense")
    # a principal submatrix is symmetric: scipy's eigsh runs on it
    idx = np.arange(0, G.shape[0], 2)
    principal = SubmatrixLinearOperator(G, idx, idx)
    assert principal.is_symmetric
    values = eigsh(principal, k=2, which="LA", return_eigenvectors=False)
    top = np.linalg.eigvalsh(full[np.ix_(idx, idx)])[-2:]
    assert_close(np.sort(values), top, rtol=1e-8, name="eigsh")


def test_submatrix_diagonal(backend_name: str) -> None:
    d = np.arange(1.0, 8.0)
    D = DiagonalLinearOperator(build("mlp-ce-sum", backend_name).native(d))
    assert_close(to_numpy(SubmatrixLinearOperator(D, [6, 1], [6, 1]).diagonal()), d[[6, 1]])
    with pytest.raises(ValueError, match="needs row_idxs == col_idxs"):
        SubmatrixLinearOperator(D, [1, 2], [2, 1]).diagonal()


def test_submatrix_bad_indices() -> None:
    A = np.eye(4)
    with pytest.raises(ValueError, match=r"row_idxs: expected indices in \[0, 4\), got \[4\]"):
        SubmatrixLinearOperator(A, [0, 4], [0])
    with pytest.raises(ValueError, match=r"col_idxs: expected indices in \[0, 4\), got \[-1\]"):
        SubmatrixLinearOperator(A, [0], [-1])
    with pytest.raises(ValueError, match="col_idxs: expected distinct indices"):
        SubmatrixLinearOperator(A, [0], [1, 1])
    with pytest.raises(TypeError, match="row_idxs: expected int indices"):
        SubmatrixLinearOperator(A, [0.5], [1])
    with pytest.raises(ValueError, match="row_idxs: expected a 1-d sequence of indices"):
        SubmatrixLinearOperator(A, [[0, 1]], [1])
    with pytest.raises(TypeError, match="A: expected a linear operator or a matrix"):
        SubmatrixLinearOperator("A", [0], [1])


# --- parameter subsets -----------------------------------------------------------------------
@pytest.mark.parametrize("name", RESTRICT_CASES)
def test_restricted_operators_are_blocks_of_the_full_ones(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    names = list(operator(GGNLinearOperator, problem).backend.param_names)
    keep = [names[0], names[3]]  # not contiguous
    sub_model, sub_params = restrict_params(problem.model_func, problem.params, keep)
    idx = np.concatenate([offsets(problem)[0], offsets(problem)[3]])
    for cls, key in ((GGNLinearOperator, "G"), (HessianLinearOperator, "H")):
        options = {**problem.options, **FAST}
        op = cls(sub_model, problem.loss_func, sub_params, problem.data, **options)
        assert_close(dense(op), problem.dense[key][np.ix_(idx, idx)], name=f"restricted {key}")


def test_torch_operators_accept_a_subset_of_the_module_parameters() -> None:
    pytest.importorskip("torch")
    problem = build("mlp-ce-mean", "torch")
    subset = [problem.params[1], problem.params[2]]
    G = GGNLinearOperator(problem.model_func, problem.loss_func, subset, problem.data, **FAST)
    idx = np.concatenate([offsets(problem)[1], offsets(problem)[2]])
    assert_close(dense(G), problem.dense["G"][np.ix_(idx, idx)], name="GGN of a subset")


def test_restrict_params_with_a_predicate_and_bad_names(backend_name: str) -> None:
    problem = build("mlp-ce-mean", backend_name)
    names = list(operator(GGNLinearOperator, problem).backend.param_names)
    _, sub = restrict_params(problem.model_func, problem.params, lambda n: n == names[2])
    assert len(sub) == 1 and tuple(sub[0].shape) == problem.param_shapes[2]
    with pytest.raises(ValueError, match="keep: expected parameter names among"):
        restrict_params(problem.model_func, problem.params, ["no such parameter"])
    with pytest.raises(ValueError, match="keep: expected at least one of the parameters"):
        restrict_params(problem.model_func, problem.params, lambda n: False)
    with pytest.raises(TypeError, match="keep: expected a list of parameter names or a predicate"):
        restrict_params(problem.model_func, problem.params, 3)


# --- BlockDiagonalLinearOperator ------------------------------------------------------------
def test_block_diagonal_of_matrices() -> None:
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(2, 2)), rng.normal(size=(3, 3))
    op = BlockDiagonalLinearOperator([A, aslinearoperator(B)])
    expected = np.block([[A, np.zeros((2, 3))], [np.zeros((3, 2)), B]])
    X = rng.normal(size=(5, 2))
    assert_close(op @ X, expected @ X, name="matmat")
    assert_close(op.rmatmat(X), expected.T @ X, name="rmatmat")
    assert not op.is_symmetric


@pytest.mark.parametrize("name", ["mlp-ce-mean", "mlp-ce-mean-dictparams"])
def test_block_diagonal_per_layer(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    names = list(operator(GGNLinearOperator, problem).backend.param_names)
    groups = [names[:2], names[2:]]
    B = BlockDiagonalLinearOperator.from_param_groups(
        GGNLinearOperator,
        problem.model_func,
        problem.loss_func,
        problem.params,
        problem.data,
        groups=groups,
        **{**problem.options, **FAST},
    )
    parts = offsets(problem)
    expected = np.zeros_like(problem.dense["G"])
    for group in ([0, 1], [2, 3]):
        idx = np.concatenate([parts[i] for i in group])
        expected[np.ix_(idx, idx)] = problem.dense["G"][np.ix_(idx, idx)]
    assert B.is_symmetric and len(B.blocks) == 2
    assert_close(dense(B), expected, name="block diagonal")
    v = np.random.default_rng(0).normal(size=B.shape[0])
    out = B @ problem.param_structure(v)
    assert_close(problem.flatten_structure(out), expected @ v, name="param structure")


def test_block_diagonal_diagonal_and_default_groups(backend_name: str) -> None:
    problem = build("mlp-mse-sum", backend_name)
    B = BlockDiagonalLinearOperator.from_param_groups(
        GGNDiagonalLinearOperator,
        problem.model_func,
        problem.loss_func,
        problem.params,
        problem.data,
        **FAST,
    )
    assert len(B.blocks) == len(problem.param_shapes)
    assert_close(to_numpy(B.diagonal()), np.diag(problem.dense["G"]), name="diagonal")


def test_block_diagonal_bad_input(backend_name: str) -> None:
    problem = build("mlp-mse-sum", backend_name)
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected a square operator"):
        BlockDiagonalLinearOperator([np.eye(2), np.ones((2, 3))])
    with pytest.raises(TypeError, match="blocks: expected a non-empty list of square operators"):
        BlockDiagonalLinearOperator([])
    with pytest.raises(TypeError, match=r"blocks\[0\]: expected a linear operator or a matrix"):
        BlockDiagonalLinearOperator(["A"])
    with pytest.raises(ValueError, match="blocks .* have no diagonal"):
        BlockDiagonalLinearOperator([np.eye(2)]).diagonal()
    args = (GGNLinearOperator, problem.model_func, problem.loss_func, problem.params)
    with pytest.raises(ValueError, match=r"groups\[0\]: expected parameter names among"):
        BlockDiagonalLinearOperator.from_param_groups(*args, problem.data, groups=[["nope"]])
    names = list(operator(GGNLinearOperator, problem).backend.param_names)
    with pytest.raises(ValueError, match="groups: expected each parameter in at most one group"):
        BlockDiagonalLinearOperator.from_param_groups(
            *args, problem.data, groups=[names[:2], names[1:2]]
        )
    # groups out of the parameter order: rows follow the groups, no parameter structures
    B = BlockDiagonalLinearOperator.from_param_groups(
        *args, problem.data, groups=[names[2:], names[:2]], **FAST
    )
    with pytest.raises(TypeError, match="Parameter lists are taken only where"):
        B @ problem.param_structure(np.ones(B.shape[0]))
