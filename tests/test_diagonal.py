"""Diagonal operators: DiagonalLinearOperator, GGNDiagonalLinearOperator, diagonal() methods."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cases import CASE_IDS, build
from helpers import assert_close, to_numpy
from scipy.sparse.linalg import cg
from test_fisher import (
    CALLABLE_CASE,
    MC_CASES,
    dense,
    mc_reference,
    operator,
)

from curvlinops import GGNLinearOperator, IdentityLinearOperator
from curvlinops.diagonal import DiagonalLinearOperator, GGNDiagonalLinearOperator

# the exact diagonal needs a closed-form output Hessian
EXACT_CASES = [name for name in CASE_IDS if name != CALLABLE_CASE and "quartic" not in name]


def native(backend: str, x: np.ndarray) -> Any:
    if backend == "torch":
        import torch

        return torch.as_tensor(x)
    import jax.numpy as jnp

    return jnp.asarray(x)


# --- GGN diagonal -----------------------------------------------------------------------
@pytest.mark.parametrize("name", EXACT_CASES)
def test_exact_ggn_diagonal(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    expected = np.diag(problem.dense["G"])
    D = operator(GGNDiagonalLinearOperator, problem)
    assert_close(to_numpy(D.diagonal()), expected, name="GGNDiagonal.diagonal()")
    assert_close(dense(D), np.diag(expected), name="GGNDiagonal @ I")
    if name in ("mlp-ce-mean", "seq_ct-ce-sum"):
        G = operator(GGNLinearOperator, problem)
        assert_close(to_numpy(G.diagonal()), expected, name="GGNLinearOperator.diagonal()")
        trace = G.trace()
        assert G.backend.owns(trace) and trace.shape == ()
        assert_close(to_numpy(trace), np.trace(problem.dense["G"]), name="GGN trace()")


def test_examples_per_pass_does_not_change_the_diagonal(backend_name: str) -> None:
    problem = build("seq_ct-ce-sum", backend_name)
    expected = np.diag(problem.dense["G"])
    # batches of 4 and 3: chunks of 3 and 1, and the whole batch
    D = operator(GGNDiagonalLinearOperator, problem, examples_per_pass=3)
    assert_close(to_numpy(D.diagonal()), expected, name="examples_per_pass=3")


@pytest.mark.parametrize("name", MC_CASES)
def test_mc_ggn_diagonal_is_the_mc_fisher_diagonal(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    # the same draws as the MC Fisher with this seed, whose reference test_fisher has
    D = operator(GGNDiagonalLinearOperator, problem, mc_samples=3, seed=7)
    expected = np.diag(mc_reference(name, backend_name)[2])
    assert_close(to_numpy(D.diagonal()), expected, name="MC GGN diagonal")


def test_ggn_diagonal_products_and_inverse(backend_name: str) -> None:
    problem = build("mlp-ce-mean", backend_name)
    D = operator(GGNDiagonalLinearOperator, problem, check_deterministic=True)
    d = np.diag(problem.dense["G"])
    assert D.is_symmetric and D.shape == (len(d), len(d))
    v = np.random.default_rng(0).normal(size=len(d))
    assert_close(D @ v, d * v, name="matvec (numpy)")
    assert_close(D @ native(backend_name, v), d * v, name="matvec (native)")
    out = D @ problem.param_structure(v)
    assert_close(problem.flatten_structure(out), d * v, name="param structure")
    inverse = D.inverse(damping=0.5)
    assert isinstance(inverse, DiagonalLinearOperator)
    assert_close(inverse @ v, v / (d + 0.5), name="inverse(0.5)")
    assert_close(to_numpy(inverse.diagonal()), 1 / (d + 0.5), name="inverse diagonal")
    x, info = cg(D + 0.5 * IdentityLinearOperator(D), v, rtol=1e-12, atol=0)
    assert info == 0
    assert_close(x, v / (d + 0.5), rtol=1e-8, name="cg")


def test_exact_ggn_diagonal_needs_a_standard_loss(backend_name: str) -> None:
    problem = build(CALLABLE_CASE, backend_name)
    with pytest.raises(TypeError, match="loss_func: expected MSELoss, CrossEntropyLoss or BCE"):
        operator(GGNDiagonalLinearOperator, problem)
    with pytest.raises(TypeError, match="loss_func: expected MSELoss, CrossEntropyLoss or BCE"):
        operator(GGNLinearOperator, problem).diagonal()
    with pytest.raises(TypeError, match="loss_func: expected MSELoss, CrossEntropyLoss or BCE"):
        operator(GGNLinearOperator, problem).trace()


def test_ggn_diagonal_bad_arguments(backend_name: str) -> None:
    problem = build("mlp-mse-mean", backend_name)
    with pytest.raises(ValueError, match="examples_per_pass: expected a positive int or None"):
        operator(GGNDiagonalLinearOperator, problem, examples_per_pass=0)
    with pytest.raises(TypeError, match="examples_per_pass: expected a positive int or None"):
        operator(GGNDiagonalLinearOperator, problem, examples_per_pass=2.0)
    with pytest.raises(ValueError, match="mc_samples: expected a positive int"):
        operator(GGNDiagonalLinearOperator, problem, mc_samples=0)
    with pytest.raises(ValueError, match="seed: expected a non-negative int"):
        operator(GGNDiagonalLinearOperator, problem, seed=-3)


# --- DiagonalLinearOperator ----------------------------------------------------------------
LIBRARIES = ["numpy", "torch", "jax"]


def _array(library: str, x: np.ndarray) -> Any:
    if library == "numpy":
        return x
    if library == "torch":
        torch = pytest.importorskip("torch")
        return torch.as_tensor(x)
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(x)


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("x_library", LIBRARIES)
def test_diagonal_operator_products(library: str, x_library: str) -> None:
    d = np.array([1.0, -2.0, 4.0, 0.5])
    D = DiagonalLinearOperator(_array(library, d))
    X = np.random.default_rng(0).normal(size=(4, 3))
    Y = D @ _array(x_library, X)
    assert type(Y).__module__.split(".")[0] == type(_array(x_library, X)).__module__.split(".")[0]
    assert_close(Y, d[:, None] * X, name="matmat")
    assert_close(D.rmatvec(_array(x_library, X[:, 0])), d * X[:, 0], name="rmatvec")
    assert_close(to_numpy(D.todense()), np.diag(d), name="todense")
    assert_close(to_numpy(D.diagonal()), d, name="diagonal")
    assert_close(D.inverse() @ X, X / d[:, None], name="inverse()")
    assert D.is_symmetric and D.adjoint() is D


def test_diagonal_operator_like_a_curvature_operator(backend_name: str) -> None:
    problem = build("mlp-ce-sum", backend_name)
    G = operator(GGNLinearOperator, problem)
    d = np.arange(1.0, G.shape[0] + 1.0)
    D = DiagonalLinearOperator(d, like=G)
    assert D.backend is G.backend
    v = np.ones(G.shape[0])
    out = D @ problem.param_structure(v)
    assert_close(problem.flatten_structure(out), d, name="param structure")
    assert_close((G + D) @ v, problem.dense["G"] @ v + d, name="G + D")


def test_diagonal_operator_through_cg() -> None:
    d = np.linspace(1.0, 10.0, 20)
    b = np.cos(np.arange(20.0))
    x, info = cg(DiagonalLinearOperator(d), b, rtol=1e-12, atol=0)
    assert info == 0
    assert_close(x, b / d, rtol=1e-8, name="cg")


def test_diagonal_operator_bad_input() -> None:
    with pytest.raises(TypeError, match="diagonal: expected a 1-d array"):
        DiagonalLinearOperator([1.0, 2.0])
    with pytest.raises(ValueError, match=r"diagonal: expected a 1-d array \(n,\), got shape"):
        DiagonalLinearOperator(np.eye(2))
    with pytest.raises(TypeError, match="diagonal: expected a real array"):
        DiagonalLinearOperator(np.array([1j, 2.0]))
    D = DiagonalLinearOperator(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="damping: expected a value that makes every diagonal"):
        D.inverse()
    with pytest.raises(ValueError, match="damping: expected a non-negative real number"):
        D.inverse(damping=-1.0)
    with pytest.raises(TypeError, match="damping: expected a non-negative real number"):
        D.inverse(damping="1")
    with pytest.raises(TypeError, match="like: expected a curvlinops LinearOperator"):
        DiagonalLinearOperator(np.ones(2), like=np.eye(2))
    with pytest.raises(ValueError, match=r"diagonal: expected 3 entries to match like's shape"):
        DiagonalLinearOperator(np.ones(2), like=DiagonalLinearOperator(np.ones(3)))
    with pytest.raises(ValueError, match=r"x: expected 2 rows to match the operator"):
        D @ np.ones((3, 1))


# --- flattened sequence outputs: (N, T) inputs, (N T, C) outputs (a language model) -------------
SEQ_VOCAB, SEQ_WIDTH, SEQ_CLASSES, SEQ_N, SEQ_T = 5, 3, 4, 3, 4


def _flat_seq_weights() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    shapes = [(SEQ_VOCAB, SEQ_WIDTH), (SEQ_CLASSES, SEQ_WIDTH), (SEQ_CLASSES,)]
    return [rng.normal(size=s) for s in shapes]


def _flat_seq_forward(xp: Any, params: list, X: Any) -> Any:
    """Embedding, causal running mean over positions (positions interact), tanh, linear head."""
    embedding, weight, bias = params
    running = xp.cumsum(embedding[X], axis=1) / xp.arange(1, X.shape[1] + 1)[:, None]
    return xp.reshape(xp.tanh(running) @ weight.T + bias, (-1, weight.shape[0]))


def _flat_seq_operator(cls: type, backend: str, drop: int = 0, **options: Any) -> Any:
    """The operator ``cls`` of the model; ``drop``: leave out the last output rows."""
    rng = np.random.default_rng(12)
    X = rng.integers(0, SEQ_VOCAB, (SEQ_N, SEQ_T))
    y = rng.integers(0, SEQ_CLASSES, SEQ_N * SEQ_T)[: SEQ_N * SEQ_T - drop]
    weights = _flat_seq_weights()
    if backend == "torch":
        import torch

        params = [torch.tensor(w, requires_grad=True) for w in weights]
        data = [(torch.as_tensor(X), torch.as_tensor(y))]
        model = lambda ps, X: _flat_seq_forward(torch, ps, X)[: len(y)]  # noqa: E731
        return cls(model, torch.nn.CrossEntropyLoss(), params, data, **options)
    import jax.numpy as jnp

    from curvlinops.losses import CrossEntropyLoss

    data = [(jnp.asarray(X), jnp.asarray(y))]
    model = lambda ps, X: _flat_seq_forward(jnp, ps, X)[: len(y)]  # noqa: E731
    params = [jnp.asarray(w) for w in weights]
    return cls(model, CrossEntropyLoss(), params, data, **options)


def _flat_seq_dense_ggn_diagonal() -> np.ndarray:
    """``diag(Jᵀ H J)`` in float64 from the full Jacobian (autodiff) of the outputs."""
    import torch

    rng = np.random.default_rng(12)
    X = torch.as_tensor(rng.integers(0, SEQ_VOCAB, (SEQ_N, SEQ_T)))
    weights = [torch.as_tensor(w) for w in _flat_seq_weights()]
    sizes = [w.numel() for w in weights]

    def outputs(flat: Any) -> Any:
        parts = [t.reshape(w.shape) for t, w in zip(torch.split(flat, sizes), weights)]
        return _flat_seq_forward(torch, parts, X)

    flat = torch.cat([w.reshape(-1) for w in weights])
    z = outputs(flat).detach()
    J = torch.func.jacrev(outputs)(flat)  # (N T, C, P)
    p = torch.softmax(z, dim=-1)
    H = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / z.shape[0]  # mean over rows
    return torch.einsum("ncp,ncd,ndp->p", J, H, J).numpy()


def test_ggn_diagonal_of_flattened_sequence_outputs(backend_name: str) -> None:
    """Outputs ``(N T, C)`` of ``(N, T)`` inputs: each row is a term (not the example's sum)."""
    expected = _flat_seq_dense_ggn_diagonal()
    D = _flat_seq_operator(GGNDiagonalLinearOperator, backend_name)
    assert_close(to_numpy(D.diagonal()), expected, name="GGN diagonal, (N T, C) outputs")
    G = _flat_seq_operator(GGNLinearOperator, backend_name)
    assert_close(to_numpy(G.diagonal()), expected, name="GGNLinearOperator.diagonal()")
    chunked = _flat_seq_operator(GGNDiagonalLinearOperator, backend_name, examples_per_pass=2)
    assert_close(to_numpy(chunked.diagonal()), expected, name="examples_per_pass=2")


@pytest.mark.parametrize("kind", ["ef", "mc"])
def test_fisher_diagonals_of_flattened_sequence_outputs(kind: str, backend_name: str) -> None:
    """The EF's and MC Fisher's diagonals on ``(N T, C)`` outputs: those of their matrices."""
    from curvlinops import EFLinearOperator, FisherMCLinearOperator

    cls, options = (
        (EFLinearOperator, {}) if kind == "ef" else (FisherMCLinearOperator, {"mc_samples": 2})
    )
    F = _flat_seq_operator(cls, backend_name, **options)
    expected = np.diag(to_numpy(F @ np.eye(F.shape[0])))
    assert_close(to_numpy(F.diagonal()), expected, name=f"{kind} diagonal, (N T, C) outputs")


def test_per_example_diagonal_needs_rows_per_example(backend_name: str) -> None:
    """Output rows that are not a multiple of the examples: a clear error."""
    with pytest.raises(ValueError, match="model_func: expected outputs whose leading axis"):
        _flat_seq_operator(GGNDiagonalLinearOperator, backend_name, drop=1)
