"""JAX's Krylov loops compiled whole (curvlinops/backends/_krylov_jax.py).

``eigsh`` and ``lanczos`` on a JAX operand trace its product once and run every
step, Gram-Schmidt pass, restart and convergence test in one compiled program;
these tests check that program against dense float64 references, against the
eager loop, and its accurate inner products.
"""

from __future__ import annotations

import numpy as np
import pytest
from cases import build
from helpers import to_numpy

from curvlinops import HessianLinearOperator
from curvlinops import eigen as eigen_module
from curvlinops.eigen import eigsh, lanczos

jax = pytest.importorskip("jax")
jnp = jax.numpy
krylov = pytest.importorskip("curvlinops.backends._krylov_jax")


@pytest.mark.parametrize("x64", [True, False], ids=["x64", "float32-only"])
def test_accurate_inner_products_keep_what_float32_accumulation_loses(x64):
    """Block partial sums 2^25, 1, -2^25, 1, ...: the exact sum counts the ones.

    Gram-Schmidt's inner products are such sums: a new Krylov vector is nearly
    orthogonal to the basis, so large terms cancel and the small remainder is
    the answer. Any float32 accumulation that adds a 1 to 2^25 before the large
    terms cancel loses it (2^25 + 1 rounds to 2^25 in float32): left to right
    gives 1 here, pairwise 0, against the exact 8. Float64 sums (x64) and the
    compensated sum of the blocks (float32 only) give 8.
    """
    blocks = 16
    pattern = np.tile([2.0**25, 1.0, -(2.0**25), 1.0], blocks // 4)
    x = np.zeros((blocks, krylov.BLOCK), np.float32)
    x[np.arange(blocks), np.arange(blocks) * 7 % krylov.BLOCK] = pattern
    x = x.reshape(-1)
    exact = float(np.sum(pattern.astype(np.float64)))
    assert exact == 8.0
    with jax.enable_x64(x64):
        ones = jnp.ones(x.shape, jnp.float32)
        result = jax.jit(krylov.accurate_dot)(jnp.asarray(x), ones)
    assert result.dtype == jnp.float32
    assert float(result) == exact


def _eager(monkeypatch):
    """The eager loop: no product is traced."""
    monkeypatch.setattr(eigen_module, "_traced_product", lambda op, columns: None)


def test_compiled_eigsh_matches_dense_reference_and_eager_loop(monkeypatch):
    which = "SA"
    problem = build("mlp-ce-mean", "jax")
    H, dense = problem.operator("H", columns_per_pass=64), problem.dense["H"]
    values, vectors, info = eigsh(H, k=3, which=which, tol=1e-10, return_info=True)
    assert info["solver"] == "thick-restart Lanczos (compiled loop)" and info["converged"]
    expected = np.linalg.eigvalsh(dense)
    expected = expected[:3]
    scale = np.abs(dense).max()
    np.testing.assert_allclose(to_numpy(values), expected, atol=1e-9 * scale, rtol=0)
    V = to_numpy(vectors)
    residuals = np.linalg.norm(dense @ V - V * to_numpy(values), axis=0)
    assert residuals.max() <= 1e-8 * scale
    assert info["products"] >= info["ncv"]  # the loop's products are counted
    _eager(monkeypatch)
    eager, eager_info = eigsh(H, k=3, which=which, tol=1e-10, return_eigenvectors=False,
                              return_info=True)  # fmt: skip
    assert eager_info["solver"] == "thick-restart Lanczos"
    np.testing.assert_allclose(to_numpy(values), to_numpy(eager), atol=1e-9 * scale, rtol=0)


def test_compiled_lanczos_reads_the_kept_linearizations():
    problem = build("mlp-ce-mean", "jax")
    H, dense = problem.operator("H", columns_per_pass=64), problem.dense["H"]
    V0 = np.random.default_rng(0).standard_normal((H.shape[0], 2))
    result = lanczos(H, 12, v0=V0)
    kept = {id(leaf) for leaf in jax.tree_util.tree_leaves(H._cache._entries)}
    assert H.cache_info()["batches"] == [0, 1] and kept
    _, arrays = eigen_module._traced_product(eigen_module.as_operand(H), 2)
    assert kept <= {id(a) for a in arrays}  # the program takes them, no recomputation
    for i in range(2):
        Q = to_numpy(result.basis[i])
        np.testing.assert_allclose(Q.T @ Q, np.eye(12), atol=1e-12)
        np.testing.assert_allclose(Q.T @ dense @ Q, to_numpy(result.tridiagonal()[i]), atol=1e-11)


class _Loader:
    """Data that is not a list: each pass reads it again (as a DataLoader)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_streamed_data_and_host_reads_step_eagerly():
    from curvlinops.losses import MSELoss

    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)))}
    X, y = jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal((8, 2)))
    H = HessianLinearOperator(lambda p, X: jnp.tanh(X @ p["w"]), MSELoss(), params,
                              _Loader([(X, y)]))  # fmt: skip
    *_, info = eigsh(H, k=2, which="LA", return_info=True)
    assert info["solver"] == "thick-restart Lanczos"  # the loader's batches stay out
    dense = to_numpy(H @ np.eye(6))
    np.testing.assert_allclose(to_numpy(_[0]), np.linalg.eigvalsh(dense)[-2:], atol=1e-10)


def test_compiled_eigsh_reports_nonfinite_products():
    A = np.diag(np.arange(1.0, 9.0))
    A[4, 4] = np.nan
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        eigsh(jnp.asarray(A), k=1, which="LA", ncv=4)


def test_compiled_cg_matches_dense_solve_and_reports_like_the_eager_loop(monkeypatch):
    from curvlinops import inverse

    problem = build("mlp-ce-mean", "jax")
    G, dense = problem.operator("G", columns_per_pass=64), problem.dense["G"]
    B = np.random.default_rng(2).standard_normal((G.shape[0], 2))
    damping = 1e-2 * np.abs(dense).max()
    solve = inverse.CGInverseLinearOperator(G, damping=damping, tol=1e-10)
    X = to_numpy(solve @ jnp.asarray(B))
    expected = np.linalg.solve(dense + damping * np.eye(G.shape[0]), B)
    np.testing.assert_allclose(X, expected, rtol=0, atol=1e-8 * np.abs(expected).max())
    assert solve.info.converged.all() and (solve.info.relative_residuals <= 1e-10).all()
    # an indefinite operand stops its columns as the eager loop does, with a warning
    indefinite = jnp.asarray(np.diag(np.linspace(-1.0, 1.0, 21)))
    with pytest.warns(inverse.ConvergenceWarning, match="not positive definite"):
        inverse.CGInverseLinearOperator(indefinite, tol=1e-12) @ jnp.ones(21)
    monkeypatch.setattr(inverse, "traced_product", lambda *args: None)
    eager = inverse.CGInverseLinearOperator(G, damping=damping, tol=1e-10)
    np.testing.assert_allclose(to_numpy(eager @ jnp.asarray(B)), X, rtol=0, atol=1e-9)


def test_convolutions_on_the_cpu_step_eagerly_and_agree_with_the_dense_reference():
    """XLA's CPU convolutions run several times slower in a loop: those products step."""
    from curvlinops.losses import MSELoss

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.standard_normal((2, 1, 3, 3)))}

    def model(p, X):  # a convolution inside a jitted call: found in the nested jaxpr
        conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"))
        return jnp.tanh(conv(X, p["w"])).reshape(X.shape[0], -1)

    X = jnp.asarray(rng.standard_normal((4, 1, 3, 3)))
    y = jnp.asarray(rng.standard_normal((4, 18)))
    H = HessianLinearOperator(model, MSELoss(), params, [(X, y)])
    program, _ = krylov.trace_product(H.matmat, H.shape[0], 1, np.float64)
    assert krylov.slow_in_loops(program, "cpu") and not krylov.slow_in_loops(program, "gpu")
    values, info = eigsh(H, k=2, which="LA", return_eigenvectors=False, return_info=True)
    assert info["solver"] == "thick-restart Lanczos" and info["converged"]
    dense = to_numpy(H @ np.eye(H.shape[0]))
    np.testing.assert_allclose(to_numpy(values), np.linalg.eigvalsh(dense)[-2:], rtol=1e-8)
    result = lanczos(H, 5, v0=rng.standard_normal((H.shape[0], 2)))  # stepped eagerly
    Q = to_numpy(result.basis[1])
    np.testing.assert_allclose(Q.T @ dense @ Q, to_numpy(result.tridiagonal()[1]), atol=1e-10)
