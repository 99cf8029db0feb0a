"""Memory-bounded Lanczos, eigsh and SLQ: budgets, estimates, refusals, accuracy."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_numpy

from curvlinops import _memory, eigen
from curvlinops._memory import MemoryBudgetError, available_memory, product_memory
from curvlinops.eigen import eigsh, lanczos, sharpness
from curvlinops.spectral import spectral_density

N = 300
ITEM = 8  # float64
VECTOR = N * ITEM


def symmetric_matrix(n: int = N, seed: int = 0) -> np.ndarray:
    """Separated extreme eigenvalues at both ends, a bulk in [-1, 1]."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    bulk = rng.uniform(-1.0, 1.0, n - 8)
    values = np.concatenate([[-9.0, -7.0, -6.0, -4.0], bulk, [3.0, 4.0, 5.5, 8.0]])
    return (Q * values) @ Q.T


def in_library(A: np.ndarray, library: str):
    if library == "torch":
        torch = pytest.importorskip("torch")
        return torch.as_tensor(A)
    if library == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(A)
    return A


def budget_for(ncv: int, k: int, library: str) -> int:
    """The bytes that fit a basis of ``ncv`` vectors (and not one more) with eigenvectors."""
    if library == "numpy":
        return (ncv + eigen.ARPACK_WORK_VECTORS + k) * VECTOR + VECTOR // 2
    if library == "jax":
        return (2 * ncv + eigen.IMMUTABLE_WORK_VECTORS) * VECTOR + VECTOR // 2
    return (ncv + max(eigen.NATIVE_WORK_VECTORS, k)) * VECTOR + VECTOR // 2


# --- eigsh ------------------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["torch", "jax", "numpy"])
def test_bounded_eigsh_matches_dense_and_unbounded(library):
    A = symmetric_matrix()
    M = in_library(A, library)
    k = 4
    budget = budget_for(9, k, library)
    values, vectors, info = eigsh(M, k=k, which="LM", memory_budget=budget, return_info=True)
    full_values = eigsh(M, k=k, which="LM", return_eigenvectors=False)
    exact = np.array([-9.0, -7.0, -6.0, 8.0])
    tol = 1e3 * np.finfo(np.float64).eps ** (2 / 3)  # eigenvalue error << residual tolerance
    np.testing.assert_allclose(np.sort(to_numpy(values)), exact, atol=tol * 9, rtol=0)
    np.testing.assert_allclose(to_numpy(values), to_numpy(full_values), atol=tol * 9, rtol=0)
    # the budget chose the basis, and what it reports fits
    assert info["ncv"] == 9 < eigen._default_ncv(N, k)
    assert info["estimated_bytes"] <= info["memory_budget"] == budget
    # the residual bounds hold, reported and recomputed
    values, vectors = to_numpy(values), to_numpy(vectors)
    true = np.linalg.norm(A @ vectors - vectors * values, axis=0) / np.abs(values)
    bound = info["tol"] if info["tol"] else 1e-10
    assert max(info["relative_residuals"]) <= max(bound, 1e-12) * 10
    assert true.max() <= 1e-6
    if library != "numpy":
        assert info["restarts"] > 0  # a small basis restarts: the in-place rotation ran


def test_bounded_eigsh_float32_torch_large_vector():
    """Long inner products (blocks summed in float64) keep the Ritz values in the spectrum."""
    torch = pytest.importorskip("torch")
    import curvlinops as cl

    n = 5 * eigen.ACCURATE_BLOCK + 7
    rng = np.random.default_rng(1)
    d = rng.uniform(0.0, 1.0, n).astype(np.float32)
    d[:4] = [10.0, 9.0, 8.0, 7.0]
    A = cl.DiagonalLinearOperator(torch.as_tensor(d))
    top, info = sharpness(A, return_info=True, memory_budget=(8 + 4) * n * 4)
    assert info["ncv"] <= 8
    assert abs(top - 10.0) <= 10.0 * 2 * np.finfo(np.float32).eps ** (2 / 3)


def test_inner_blocks_agree_with_float64(monkeypatch):
    """Single precision goes through the float64-summed blocks; double precision is one product."""
    monkeypatch.setattr(eigen, "ACCURATE_BLOCK", 16)
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((3, 2, 100)), rng.standard_normal((3, 100, 4))
    xp = eigen.array_api_compat.array_namespace(A)
    exact = A @ B
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    exact32 = A32.astype(np.float64) @ B32.astype(np.float64)
    blocked = eigen._inner(xp, A32, B32)
    assert blocked.dtype == np.float32
    # a float32 result of float64-summed products: off by its own rounding only
    np.testing.assert_allclose(blocked, exact32, rtol=4 * np.finfo(np.float32).eps, atol=1e-5)
    np.testing.assert_allclose(eigen._inner(xp, A, B), exact, rtol=1e-12, atol=1e-12)
    X, Y = rng.standard_normal((100, 3)), rng.standard_normal((100, 3))
    np.testing.assert_allclose(
        eigen._column_dots(xp, X, Y, True), np.sum(X * Y, axis=0), rtol=1e-12, atol=1e-12
    )


def test_rotate_in_place_matches_product():
    rng = np.random.default_rng(0)
    V, R = rng.standard_normal((5, 23)), rng.standard_normal((5, 5))
    expected = R @ V
    eigen._rotate_in_place(V, R)
    np.testing.assert_allclose(V, expected, rtol=1e-12, atol=1e-12)


def test_jax_rotate_rows_matches_product_and_jax_operators_keep_one_basis():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from curvlinops import HessianLinearOperator
    from curvlinops.backends import make_backend
    from curvlinops.losses import MSELoss

    rng = np.random.default_rng(0)
    R = rng.standard_normal((5, 5))
    rotate_rows = make_backend(lambda p, X: X, {"w": jnp.zeros(2)}).rotate_rows
    for n in (23, 25, 3):  # blocks of 5 columns and a rest; exact blocks; narrower than m
        V = rng.standard_normal((5, n))
        rotated = rotate_rows(jnp.asarray(V), jnp.asarray(R))
        np.testing.assert_allclose(np.asarray(rotated), R @ V, rtol=1e-12, atol=1e-12)
    # an operator of a (compiling) JAX backend: the basis is donated, one copy is counted
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)))}
    data = [(jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal((8, 2))))]
    H = HessianLinearOperator(lambda p, X: X @ p["w"], MSELoss(), params, data)
    _, _, info = eigsh(H, k=2, which="LA", ncv=5, return_info=True)
    assert info["basis_bytes"] == 5 * 6 * 8
    assert not any("x2" in part for part in info["parts"])


def test_sharpness_info_and_default_budget():
    A = symmetric_matrix()
    top, info = sharpness(in_library(A, "torch"), return_info=True)
    assert abs(top - 8.0) <= 1e-8
    assert info["memory_budget"] == pytest.approx(
        _memory.DEFAULT_BUDGET_FRACTION * info["available"], rel=0.2
    )
    assert info["ncv"] == eigen._default_ncv(N, 1)  # small problems keep today's basis
    assert info["basis_bytes"] == info["ncv"] * VECTOR


# --- refusals ---------------------------------------------------------------------------------
def test_eigsh_refuses_a_basis_that_does_not_fit():
    M = in_library(symmetric_matrix(), "torch")
    with pytest.raises(MemoryBudgetError, match=r"memory_budget = .*smallest.*raise memory_budget"):
        eigsh(M, k=4, memory_budget=5 * VECTOR)
    with pytest.raises(MemoryBudgetError, match=r"Lower ncv"):
        eigsh(M, k=4, ncv=30, memory_budget=budget_for(9, 4, "torch"))


def test_eigsh_memory_says_what_eigsh_would_take_without_running():
    torch = pytest.importorskip("torch")
    from curvlinops import HessianLinearOperator, eigsh_memory

    M = in_library(symmetric_matrix(), "torch")
    budget = budget_for(9, 4, "torch")
    estimate = eigsh_memory(M, k=4, which="LM", memory_budget=budget)
    _, _, info = eigsh(M, k=4, which="LM", memory_budget=budget, return_info=True)
    assert estimate.fits() and estimate.parts == info["parts"]
    assert f"basis ({info['ncv']} vectors)" in estimate.parts
    small = eigsh_memory(M, k=4, memory_budget=5 * VECTOR)
    assert not small.fits() and "raise memory_budget" in small.fixes[0]
    with pytest.raises(MemoryBudgetError) as refused:
        eigsh(M, k=4, memory_budget=5 * VECTOR)
    assert refused.value.estimate.parts == small.parts
    # a curvature operator: the product's activations count against what is available
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data)
    estimate = eigsh_memory(H, k=2)
    assert any(name.startswith("activations") for name in estimate.outside_budget)
    assert H.cache_info()["builds"] == 0  # no product ran


def test_native_eigsh_reports_computed_residuals(monkeypatch):
    from curvlinops import ConvergenceError, ConvergenceWarning

    A = symmetric_matrix()
    M = in_library(A, "torch")
    values, vectors, info = eigsh(M, k=3, which="LA", tol=1e-8, return_info=True)
    Y, theta = to_numpy(vectors), to_numpy(values)
    expected = np.linalg.norm(A @ Y - Y * theta, axis=0)
    # two float64 products of a 300 x 300 matrix (norm 9) in other summation orders
    rounding = 10 * N * np.finfo(np.float64).eps * np.linalg.norm(A, 2)
    np.testing.assert_allclose(info["residuals"], expected, rtol=1e-6, atol=rounding)
    assert len(info["estimated_residuals"]) == 3 and info["converged"]
    # a computed residual over tol (the estimate said converged): reported, not hidden
    computed = eigen._computed_residuals

    def worse(op, values, vectors):
        found = computed(op, values, vectors)
        return {key: [1e3 * r for r in found[key]] for key in found}

    monkeypatch.setattr(eigen, "_computed_residuals", worse)
    with pytest.warns(ConvergenceWarning, match="computed residual.*exceed tol"):
        _, _, info = eigsh(M, k=3, which="LA", tol=1e-8, return_info=True)
    assert not info["converged"]
    with pytest.raises(ConvergenceError, match="Compute in float64, or loosen tol"):
        eigsh(M, k=3, which="LA", tol=1e-8, return_info=True, on_failure="raise")


def test_refusal_when_less_is_available(monkeypatch):
    monkeypatch.setattr(_memory, "_host_available", lambda: 10 * VECTOR)
    M = in_library(symmetric_matrix(), "torch")
    with pytest.raises(MemoryBudgetError, match=r"of host memory available now"):
        eigsh(M, k=4, memory_budget=1e9)


@pytest.mark.parametrize(
    ("budget", "error", "match"),
    [("4GB", TypeError, "memory_budget: expected a number"), (-1, ValueError, "positive")],
)
def test_memory_budget_argument_errors(budget, error, match):
    with pytest.raises(error, match=match):
        eigsh(symmetric_matrix(), k=2, memory_budget=budget)


def test_lanczos_budget():
    A = symmetric_matrix()
    result = lanczos(A, 30, memory_budget=(30 + 8) * VECTOR)
    reference = lanczos(A, 30)
    np.testing.assert_allclose(result.alphas, reference.alphas)
    with pytest.raises(MemoryBudgetError, match=r"lanczos: needs .*keep_basis=False"):
        lanczos(A, 30, memory_budget=20 * VECTOR)
    # without a basis, a few work vectors suffice
    lanczos(A, 30, keep_basis=False, reorthogonalize=False, memory_budget=9 * VECTOR)


# --- SLQ --------------------------------------------------------------------------------------
def test_slq_fits_probes_per_pass_and_reorthogonalisation():
    A = in_library(symmetric_matrix(), "torch")
    steps, probes = 25, 6
    per_probe = (steps + eigen.LANCZOS_WORK_VECTORS) * VECTOR
    reference = spectral_density(A, num_probes=probes, num_steps=steps)
    assert reference.info["probes_per_pass"] == probes and reference.info["reorthogonalize"]
    bounded = spectral_density(A, num_probes=probes, num_steps=steps, memory_budget=2 * per_probe)
    assert bounded.info["probes_per_pass"] == 2 and bounded.info["passes"] == 3
    assert bounded.info["estimated_bytes"] <= 2 * per_probe
    np.testing.assert_allclose(bounded.density, reference.density, rtol=1e-8, atol=1e-10)
    # no room for one probe's basis: no reorthogonalisation, same quadrature within noise
    lean = spectral_density(
        A, num_probes=probes, num_steps=steps, grid=reference.grid, memory_budget=per_probe // 2
    )
    assert not lean.info["reorthogonalize"]
    np.testing.assert_allclose(
        np.trapezoid(lean.density * lean.grid, lean.grid),
        np.trapezoid(reference.density * reference.grid, reference.grid),
        atol=1e-6,
    )
    with pytest.raises(MemoryBudgetError, match=r"spectral_density: needs .*probes_per_pass"):
        spectral_density(A, num_probes=probes, num_steps=steps, reorthogonalize=True,
                         memory_budget=per_probe // 2)  # fmt: skip
    with pytest.raises(ValueError, match=r"reorthogonalize: expected 'auto'"):
        spectral_density(A, reorthogonalize="yes")


# --- estimates --------------------------------------------------------------------------------
def test_available_memory_and_product_estimate():
    free = available_memory()
    assert free is not None and free > 0
    parts = product_memory(symmetric_matrix(), 3)
    assert parts == {"product input and output": 2 * N * 3 * ITEM}
