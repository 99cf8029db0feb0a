"""Empirical Fisher and Monte-Carlo Fisher against dense per-term gradient references.

References are built from the case registry's dense Jacobian ``J`` (rows: the
outputs of all data, flattened) and the gradients of each loss *term* with
respect to the outputs, obtained by autodiff of loss formulas with
``reduction='none'`` written here (independent of ``curvlinops.losses``):
``∇θ ℓ_t = Jᵀ ∂ℓ_t/∂z``. The helpers are shared with test_diagonal.py and
test_gradient.py.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_compat
import numpy as np
import pytest
from cases import BY_NAME, CASE_IDS, CASES, build
from helpers import assert_close, to_numpy
from scipy.sparse.linalg import cg, eigsh

from curvlinops import GGNLinearOperator, IdentityLinearOperator, losses
from curvlinops.fisher import EFLinearOperator, FisherMCLinearOperator

# every case of the registry; for Monte-Carlo and diagonals, each loss with a
# distribution on an MLP, and the sequence models (several terms per example)
EF_CASES = list(CASE_IDS)
MC_CASES = [
    *{case.loss: case.name for case in reversed(CASES) if case.model == "mlp"}.values(),
    *[case.name for case in CASES if case.model == "seq_ct"],
]
MC_CASES = [name for name in MC_CASES if BY_NAME[name].loss != "quartic"]
CALLABLE_CASE = next(case.name for case in CASES if case.loss == "quartic")


# --- references ---------------------------------------------------------------------
def concat_data(problem: Any) -> tuple[Any, Any]:
    """All inputs and targets of a problem, concatenated, as native arrays."""
    batches = [(X, y) for X, y in problem.data]
    if problem.backend == "torch":
        import torch

        def cat(parts: list) -> Any:
            if isinstance(parts[0], dict):
                return {k: cat([p[k] for p in parts]) for k in parts[0]}
            return torch.cat([torch.as_tensor(p) for p in parts])

    else:
        import jax.numpy as jnp

        def cat(parts: list) -> Any:
            if isinstance(parts[0], dict):
                return {k: cat([p[k] for p in parts]) for k in parts[0]}
            return jnp.concatenate([jnp.asarray(p) for p in parts])

    return cat([X for X, _ in batches]), cat([y for _, y in batches])


def model_outputs(problem: Any, X: Any) -> Any:
    """The model's outputs on ``X`` (native), without gradient tracking."""
    if problem.backend == "torch":
        import torch

        with torch.no_grad():
            if isinstance(problem.model_func, torch.nn.Module):
                return problem.model_func(X)
            return problem.model_func(problem.params, X)
    import jax

    # one compiled call instead of one small compilation per eager operation
    return jax.jit(problem.model_func)(problem.params, X)


def _class_axis(problem: Any) -> int:
    return 1 if problem.case.model == "seq_ct" else -1


def term_losses(problem: Any, probabilities: bool) -> Any:
    """``(z, y) -> ℓ(z, y)``: the un-normalised loss terms, flat.

    Terms: rows of the last axis (MSE, BCE), positions (cross-entropy), and
    examples (callables, evaluated on batches of one). For cross-entropy,
    ``y`` holds class indices, or class probabilities (sampled one-hot
    targets) when ``probabilities``.
    """
    case, torch_backend = problem.case, problem.backend == "torch"
    if torch_backend:
        import torch
        import torch.nn.functional as F

        xp_sum = torch.sum
    else:
        import jax
        import jax.numpy as jnp

        xp_sum = jnp.sum

    if case.loss == "mse":

        def terms(z: Any, y: Any) -> Any:
            return xp_sum((z - y) ** 2, -1).reshape(-1)

    elif case.loss == "bce" and torch_backend:

        def terms(z: Any, y: Any) -> Any:
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
            return xp_sum(bce, -1).reshape(-1)

    elif case.loss == "bce":

        def terms(z: Any, y: Any) -> Any:
            bce = -(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z))
            return xp_sum(bce, -1).reshape(-1)

    elif case.loss == "ce" and torch_backend:
        axis = _class_axis(problem)

        def terms(z: Any, y: Any) -> Any:
            target = y.movedim(axis, 1) if probabilities else y
            return F.cross_entropy(z.movedim(axis, 1), target, reduction="none").reshape(-1)

    elif case.loss == "ce":
        axis = _class_axis(problem)

        def terms(z: Any, y: Any) -> Any:
            logp = jax.nn.log_softmax(z, axis=axis)
            if probabilities:
                return -jnp.sum(y * logp, axis=axis).reshape(-1)
            picked = jnp.take_along_axis(logp, jnp.expand_dims(y, axis), axis=axis)
            return -picked.reshape(-1)

    else:  # a callable: one term per example, the callable on a batch of one
        fn = problem.loss_func

        def terms(z: Any, y: Any) -> Any:
            rows = [fn(z[n : n + 1], y[n : n + 1]) for n in range(z.shape[0])]
            return torch.stack(rows) if torch_backend else jnp.stack(rows)

    return terms


def term_factor(problem: Any, y: Any, probabilities: bool) -> float:
    """The factor of the terms in the loss: 1 for "sum", 1 / (number of terms) for "mean"."""
    case = problem.case
    if case.loss in ("mse", "bce"):
        count = int(np.prod(y.shape))  # "mean" divides by all entries
    elif case.loss == "ce":
        count = int(np.prod(y.shape)) // (y.shape[_class_axis(problem)] if probabilities else 1)
    else:
        count = int(y.shape[0])
    return 1.0 / count if case.reduction == "mean" else 1.0


@functools.cache
def _term_jacobian(name: str, backend: str, probabilities: bool) -> Any:
    """``(z, y) -> ∂ℓ/∂z``, compiled once per case for JAX."""
    terms = term_losses(build(name, backend), probabilities)
    if backend == "torch":
        from torch.func import jacrev

        return jacrev(terms)
    import jax

    return jax.jit(jax.jacrev(terms))


def term_output_gradients(problem: Any, z: Any, y: Any) -> tuple[np.ndarray, float]:
    """``D`` with rows ``∂ℓ_t/∂z`` (flattened outputs), and the normalisation factor."""
    probabilities = problem.case.loss == "ce" and y.ndim == z.ndim
    D = to_numpy(_term_jacobian(problem.case.name, problem.backend, probabilities)(z, y))
    return D.reshape(D.shape[0], -1), term_factor(problem, y, probabilities)


def gradient_moment(problem: Any, targets: list[Any] | None = None) -> np.ndarray:
    """``c Σ_t ∇ℓ_t ∇ℓ_tᵀ`` (operator order), averaged over the sets of ``targets``."""
    X, y = concat_data(problem)
    z = model_outputs(problem, X)
    J = problem.dense["J"]
    result = 0.0
    for y_s in [y] if targets is None else targets:
        D, factor = term_output_gradients(problem, z, y_s)
        grads = D @ J
        result = result + factor * grads.T @ grads
    return result / (1 if targets is None else len(targets))


@functools.cache
def ef_reference(name: str, backend: str) -> np.ndarray:
    return gradient_moment(build(name, backend))


# One column block for the registry's small models (JAX compiles once per operator
# and batch size); the determinism check is tested once, in test_ef_products...
FAST = {"columns_per_pass": 64, "check_deterministic": False}


def operator(cls: Any, problem: Any, **options: Any) -> Any:
    return cls(
        problem.model_func,
        problem.loss_func,
        problem.params,
        problem.data,
        **{**problem.options, **FAST, **options},
    )


@functools.cache
def ef_dense(name: str, backend: str) -> np.ndarray:
    return to_numpy(operator(EFLinearOperator, build(name, backend)).todense())


def dense(op: Any) -> np.ndarray:
    return to_numpy(op @ np.eye(op.shape[1]))


# --- empirical Fisher -----------------------------------------------------------------
@pytest.mark.parametrize("name", EF_CASES)
def test_ef_matches_per_term_gradients(name: str, backend_name: str) -> None:
    expected = ef_reference(name, backend_name)
    assert_close(ef_dense(name, backend_name), expected, name="EF.todense()")
    if name in ("mlp-ce-mean", "seq_ct-ce-sum"):
        F = operator(EFLinearOperator, build(name, backend_name))
        assert_close(to_numpy(F.diagonal()), np.diag(expected), name="EF.diagonal()")


@pytest.mark.parametrize("name", ["mlp-ce-mean", "seq_ct-ce-sum"])
def test_ef_is_the_same_on_both_backends(name: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    results = []
    for backend in ("torch", "jax"):
        problem = build(name, backend)
        D = ef_dense(name, backend)
        # rows and columns in the canonical parameter order
        results.append(problem.to_canonical(problem.to_canonical(D).T).T)
    assert_close(results[0], results[1], name="EF torch vs jax")


def test_ef_products_in_every_format(backend_name: str) -> None:
    problem = build("mlp-bce-mean", backend_name)
    F = operator(EFLinearOperator, problem, columns_per_pass=2, check_deterministic=True)
    expected = ef_reference("mlp-bce-mean", backend_name)
    rng = np.random.default_rng(0)
    V = rng.normal(size=(F.shape[1], 5))
    assert_close(F @ V, expected @ V, name="matmat (numpy, 3 column blocks)")
    assert_close(F @ problem.native(V[:, 0]), expected @ V[:, 0], name="matvec (native)")
    assert_close(F.rmatmat(V), expected @ V, name="rmatmat")
    out = F @ problem.param_structure(V[:, :2])
    assert_close(problem.flatten_structure(out), expected @ V[:, :2], name="param structure")
    assert F.is_symmetric and F.adjoint() is F


def test_ef_through_scipy_solvers(backend_name: str) -> None:
    problem = build("mlp-ce-sum", backend_name)
    F = operator(EFLinearOperator, problem)
    expected = ef_reference("mlp-ce-sum", backend_name)
    values = eigsh(F, k=3, which="LA", return_eigenvectors=False)
    assert_close(np.sort(values), np.linalg.eigvalsh(expected)[-3:], rtol=1e-8, name="eigsh")
    damped = expected + np.eye(len(expected))
    b = np.random.default_rng(1).normal(size=len(expected))
    x, info = cg(F + IdentityLinearOperator(F), b, rtol=1e-12, atol=0)
    assert info == 0
    assert_close(x, np.linalg.solve(damped, b), rtol=1e-8, name="cg")


@pytest.mark.parametrize("name", ["mlp-mse-sum", "mlp-ce-mean"])
def test_ef_of_a_callable_is_the_standard_one(name: str, backend_name: str) -> None:
    """A callable's terms are its values on single examples; for (N, C) outputs, a 'sum'
    MSE and a 'mean' cross-entropy have one term per example, as the standard losses."""
    problem = build(name, backend_name)
    if problem.case.loss == "mse":

        def fn(z: Any, y: Any) -> Any:
            return ((z - y) ** 2).sum()

    else:
        xp = array_api_compat.array_namespace(problem.native(np.zeros(1)))

        def fn(z: Any, y: Any) -> Any:
            logp = z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))
            onehot = xp.astype(y[:, None] == xp.arange(z.shape[-1])[None, :], z.dtype)
            return -xp.mean(xp.sum(onehot * logp, axis=-1))

    loss = losses.CallableLoss(fn, reduction=problem.case.reduction)
    F_callable = EFLinearOperator(
        problem.model_func, loss, problem.params, problem.data, **{**problem.options, **FAST}
    )
    assert_close(dense(F_callable), ef_dense(name, backend_name), name="callable vs standard")


# --- Monte-Carlo Fisher -------------------------------------------------------------------
def sampled_target_sets(problem: Any, op: FisherMCLinearOperator) -> list[Any]:
    """The operator's draws as ``k`` target arrays over all data (native)."""
    per_batch = op.sampled_targets()
    k = op.mc_samples
    if problem.backend == "torch":
        import torch

        return [torch.cat([t[s] for t in per_batch]) for s in range(k)]
    import jax.numpy as jnp

    return [jnp.concatenate([t[s] for t in per_batch]) for s in range(k)]


@functools.cache
def mc_reference(name: str, backend: str) -> tuple[Any, list[Any], np.ndarray]:
    """A Monte-Carlo Fisher (3 samples, seed 7), its draws, and its reference at them."""
    problem = build(name, backend)
    F = operator(FisherMCLinearOperator, problem, mc_samples=3, seed=7)
    targets = sampled_target_sets(problem, F)
    return F, targets, gradient_moment(problem, targets)


@pytest.mark.parametrize("name", MC_CASES)
def test_mc_fisher_matches_the_gradients_at_its_samples(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    F, targets, expected = mc_reference(name, backend_name)
    assert_close(dense(F), expected, name="MC Fisher @ I")
    if BY_NAME[name].model == "seq_ct":  # (same code as GGNDiagonalLinearOperator's MC diagonal)
        assert_close(to_numpy(F.diagonal()), np.diag(expected), name="MC Fisher diagonal")
    # the draws are targets of the model's distribution
    for t in targets:
        t = to_numpy(t)
        if problem.case.loss == "ce":
            assert set(np.unique(t)) <= {0.0, 1.0}
            assert np.all(t.sum(axis=_class_axis(problem)) == 1)
        if problem.case.loss == "bce":
            assert set(np.unique(t)) <= {0.0, 1.0}


def test_mc_fisher_is_reproducible_and_the_ggn_with_mc_samples(backend_name: str) -> None:
    problem = build("mlp-ce-mean", backend_name)
    first = dense(operator(FisherMCLinearOperator, problem, mc_samples=2, seed=3))
    G_mc = operator(GGNLinearOperator, problem, mc_samples=2, seed=3, columns_per_pass=3)
    assert isinstance(G_mc, FisherMCLinearOperator)
    assert_close(dense(G_mc), first, name="same seed (GGN(mc_samples=2)), other column blocks")
    assert_close(dense(G_mc), first, name="second product")
    other = dense(operator(FisherMCLinearOperator, problem, mc_samples=2, seed=4))
    assert np.abs(other - first).max() > 1e-3 * np.abs(first).max()
    assert_close(first, first.T, name="symmetric")
    assert np.linalg.eigvalsh(first).min() > -1e-12 * np.abs(first).max()
    assert type(operator(GGNLinearOperator, problem, mc_samples=None)) is GGNLinearOperator


def test_mc_fisher_converges_to_the_ggn_like_one_over_sqrt_k(backend_name: str) -> None:
    """Fixed seeds: the relative error's RMS over seeds falls like k^(-1/2).

    128 data points (one batch, so that JAX compiles once per operator): the
    squared error is a sum over many terms and concentrates around its mean,
    which is exactly proportional to 1/k.
    """
    problem = build("mlp-ce-mean", backend_name)
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(128, 4)), rng.integers(0, 3, size=128)
    data = [(problem.native(X), problem.native(y))]
    args = (problem.model_func, problem.loss_func, problem.params, data)
    G = to_numpy(GGNLinearOperator(*args, **FAST).todense())
    ks, seeds = (4, 32, 256), range(3)
    rms = []
    for k in ks:
        errors = [
            np.linalg.norm(
                to_numpy(FisherMCLinearOperator(*args, mc_samples=k, seed=s, **FAST).todense()) - G
            )
            / np.linalg.norm(G)
            for s in seeds
        ]
        rms.append(np.sqrt(np.mean(np.square(errors))))
    slope = np.polyfit(np.log(ks), np.log(rms), 1)[0]
    assert -0.6 < slope < -0.4, (slope, rms)


@pytest.mark.parametrize("name", ["mlp-mse-sum", "mlp-bce-sum", "seq_ct-ce-sum"])
def test_mc_targets_follow_the_model_distribution(name: str, backend_name: str) -> None:
    """Many draws: their moments are those of N(z, I/2), softmax(z), Bernoulli(σ(z))."""
    problem = build(name, backend_name)
    k = 20000
    one_batch = [concat_data(problem)]  # one batch: one compilation
    F = FisherMCLinearOperator(
        problem.model_func, problem.loss_func, problem.params, one_batch, mc_samples=k, seed=5
    )
    targets = to_numpy(F.sampled_targets()[0])
    z = to_numpy(model_outputs(problem, one_batch[0][0]))
    assert targets.shape == (k, *z.shape)
    mean, tol = targets.mean(axis=0), 5 / np.sqrt(k)  # 5 standard errors (std <= 1)
    if problem.case.loss == "mse":
        np.testing.assert_allclose(mean, z, atol=tol)
        np.testing.assert_allclose(targets.var(axis=0), 0.5, atol=5 * np.sqrt(2 / k))
    elif problem.case.loss == "bce":
        np.testing.assert_allclose(mean, 1 / (1 + np.exp(-z)), atol=tol)
    else:
        axis = _class_axis(problem)
        probs = np.exp(z - z.max(axis=axis, keepdims=True))
        np.testing.assert_allclose(mean, probs / probs.sum(axis=axis, keepdims=True), atol=tol)


# --- bad input ------------------------------------------------------------------------------
def test_bad_arguments(backend_name: str) -> None:
    problem = build("mlp-ce-mean", backend_name)
    with pytest.raises(TypeError, match="mc_samples: expected a positive int"):
        operator(FisherMCLinearOperator, problem, mc_samples=1.5)
    with pytest.raises(ValueError, match="mc_samples: expected a positive int, got 0"):
        operator(FisherMCLinearOperator, problem, mc_samples=0)
    with pytest.raises(ValueError, match="mc_samples: expected a positive int, got -2"):
        operator(GGNLinearOperator, problem, mc_samples=-2)
    with pytest.raises(TypeError, match="seed: expected a non-negative int"):
        operator(FisherMCLinearOperator, problem, seed="1")
    with pytest.raises(ValueError, match="seed: expected a non-negative int, got -1"):
        operator(FisherMCLinearOperator, problem, seed=-1)
    with pytest.raises(ValueError, match="seed: expected no seed for the exact GGN"):
        operator(GGNLinearOperator, problem, seed=1)


@pytest.mark.parametrize("check_deterministic", [True, False])
def test_mc_fisher_needs_a_distribution(backend_name: str, check_deterministic: bool) -> None:
    problem = build(CALLABLE_CASE, backend_name)
    with pytest.raises(TypeError, match="loss_func: expected MSELoss, CrossEntropyLoss or BCE"):
        operator(FisherMCLinearOperator, problem, check_deterministic=check_deterministic)


def test_cases_used_here_exist() -> None:
    assert set(EF_CASES) | set(MC_CASES) <= set(BY_NAME)
