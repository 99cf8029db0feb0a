"""A JAX CG solve compiles its programs once: later solves (new inverse operators too) reuse them.

Before, each solve compiled its step functions anew (0.6 s of a 0.01 s solve on a small MLP).
"""

import logging

import numpy as np
import pytest

from curvlinops import CGInverseLinearOperator, GGNLinearOperator
from curvlinops.losses import CrossEntropyLoss

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")


def _linear_model(params: list, X: "jax.Array") -> "jax.Array":
    return X @ params[0].T


def test_second_jax_cg_solve_compiles_nothing(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)]
    X = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8), jnp.int32)
    G = GGNLinearOperator(_linear_model, CrossEntropyLoss("mean"), params, [(X, y)])
    b = jnp.ones(12, jnp.float32)
    CGInverseLinearOperator(G, damping=0.5, tol=1e-6) @ b  # compiles
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        x = CGInverseLinearOperator(G, damping=0.5, tol=1e-6) @ b
    assert [r.getMessage()[:80] for r in caplog.records if "Compiling" in r.getMessage()] == []
    dense = np.asarray(G @ np.eye(12, dtype=np.float32), np.float64)
    expected = np.linalg.solve(dense + 0.5 * np.eye(12), np.ones(12))
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-4)
