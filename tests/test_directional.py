"""Rayleigh quotients and transformation tangents on the lecture's linear autoencoder.

Regularised linear autoencoder (D = 6 inputs, K = 3 latents), centred data
with covariance ``U diag(s²) Uᵀ``:

    J(W1, W2) = 1/(2N) Σ ||W2 W1 x - x||² + ½||Λ^½ W1||² + ½||W2 Λ^½||²,

whose optimum is W1* = (I - Λ S⁻²)^½ U_Kᵀ, W2* = U_K (I - Λ S⁻²)^½.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse
from helpers import assert_close, to_numpy
from scipy.sparse.linalg import aslinearoperator

from curvlinops import HessianLinearOperator
from curvlinops.directional import rayleigh_quotient, transformation_tangent
from curvlinops.losses import MSELoss

D, K, N = 6, 3, 40
VARIANCES = np.array([10.0, 6.0, 3.0, 1.0, 0.5, 0.2])
PENALTIES = np.array([0.1, 0.4, 0.9])  # Λ, increasing


@functools.cache
def autoencoder_problem():
    """Data, the analytic optimum, and the regulariser's (diagonal) Hessian, in numpy."""
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.standard_normal((D, D)))[0]
    Z = rng.standard_normal((N, D))
    Z = np.linalg.qr(Z - Z.mean(axis=0))[0] * np.sqrt(N)  # centred, ZᵀZ / N = I exactly
    X = Z @ np.diag(np.sqrt(VARIANCES)) @ U.T
    scale = np.sqrt(1.0 - PENALTIES / VARIANCES[:K])
    W1 = scale[:, None] * U[:, :K].T
    W2 = U[:, :K] * scale
    regulariser_diagonal = np.concatenate([np.repeat(PENALTIES, D), np.tile(PENALTIES, D)])
    return X, W1, W2, regulariser_diagonal


def objective(xp, W1, W2, X):
    """The lecture's objective, written once for torch and jax.numpy."""
    residual = X @ W1.T @ W2.T - X
    data_term = xp.sum(residual * residual) / (2 * N)
    penalties = xp.asarray(PENALTIES)
    regulariser = 0.5 * xp.sum(penalties[:, None] * W1 * W1) + 0.5 * xp.sum(W2 * W2 * penalties)
    return data_term + regulariser


def setup(backend_name: str):
    """Hessian operator (data term + regulariser), parameters, transformations, dense H."""
    X, W1, W2, reg = autoencoder_problem()
    if backend_name == "torch":
        import torch

        xp = torch
        params = [torch.from_numpy(W1), torch.from_numpy(W2)]
        data = [(torch.from_numpy(X), torch.from_numpy(X))]
        Xn = data[0][0]

        def dense_hessian():
            flat = torch.cat([p.reshape(-1) for p in params])

            def f(w):
                return objective(torch, w[: K * D].reshape(K, D), w[K * D :].reshape(D, K), Xn)

            return torch.func.hessian(f)(flat)

    else:
        import jax
        import jax.numpy as jnp

        xp = jnp
        params = [jnp.asarray(W1), jnp.asarray(W2)]
        data = [(X, X)]
        Xn = jnp.asarray(X)

        def dense_hessian():
            flat = jnp.concatenate([p.reshape(-1) for p in params])

            def f(w):
                return objective(jnp, w[: K * D].reshape(K, D), w[K * D :].reshape(D, K), Xn)

            return jax.hessian(f)(flat)

    def model(p, x):
        return x @ p[0].T @ p[1].T

    # MSELoss('mean') averages over N·D entries: the lecture's 1/(2N) is D/2 times it.
    H_data = HessianLinearOperator(model, MSELoss(), params, data)
    H = (D / 2) * H_data + aslinearoperator(scipy.sparse.diags(reg))

    def rescale(w, gamma):
        return [gamma * w[0], gamma * w[1]]

    def rotate(w, theta):
        """Givens rotation of the first two latent coordinates: (Q W1, W2 Qᵀ)."""
        dtype = w[0].dtype
        first_two = xp.asarray(np.diag([1.0, 1.0, 0.0]), dtype=dtype)
        Q = xp.eye(K, dtype=dtype) + (xp.cos(theta) - 1) * first_two
        Q = Q + xp.sin(theta) * xp.asarray(GENERATOR, dtype=dtype)
        return [Q @ w[0], w[1] @ Q.T]

    return H, params, rescale, rotate, to_numpy(dense_hessian())


GENERATOR = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # dQ/dθ at 0


def test_problem_is_at_the_optimum():
    """The analytic optimum has zero gradient (so the Hessian is the one the lecture uses)."""
    X, W1, W2, _ = autoencoder_problem()
    covariance = X.T @ X / N
    assert_close(covariance, covariance.T)
    residual = (W2 @ W1 - np.eye(D)) @ covariance
    grad_W1 = W2.T @ residual + PENALTIES[:, None] * W1
    grad_W2 = residual @ W1.T + W2 * PENALTIES
    assert np.max(np.abs(grad_W1)) < 1e-12 and np.max(np.abs(grad_W2)) < 1e-12


def test_lecture_experiment(backend_name):
    """Tangents match the analytic derivatives; quotients match the dense Hessian."""
    H, params, rescale, rotate, dense = setup(backend_name)
    _, W1, W2, _ = autoencoder_problem()
    assert_close(H @ np.eye(2 * K * D), dense, name="operator vs dense Hessian")

    v_scale = transformation_tangent(rescale, params, at=1.0)
    v_rot = transformation_tangent(rotate, params, at=0.0)
    assert_close(v_scale, [W1, W2], name="scaling tangent")
    assert_close(v_rot, [GENERATOR @ W1, W2 @ GENERATOR.T], name="rotation tangent")
    assert type(v_rot[0]) is type(params[0])

    curvatures = {}
    for name, v in (("scale", v_scale), ("rotation", v_rot)):
        flat = np.concatenate([to_numpy(t).ravel() for t in v])
        expected = flat @ dense @ flat / (flat @ flat)
        quotient = rayleigh_quotient(H, v)
        assert type(quotient) is type(params[0])
        assert_close(quotient, expected, name=f"{name} Rayleigh quotient")
        assert_close(rayleigh_quotient(H, flat), expected)
        curvatures[name] = float(expected)
    # the lecture's observation: latent rotations are a direction of much lower curvature
    # (here 0.0088 vs 12.6; the lecture's data gave a ratio of about 3000)
    assert curvatures["rotation"] < 0.01 * curvatures["scale"]


def test_flat_tangent_matches_the_structure(backend_name):
    H, params, _, rotate, _ = setup(backend_name)
    v = transformation_tangent(rotate, params, at=0.0)
    flat = transformation_tangent(rotate, params, at=0.0, flat=True)
    assert tuple(flat.shape) == (2 * K * D,)
    assert_close(flat, np.concatenate([to_numpy(t).ravel() for t in v]))
    assert_close(rayleigh_quotient(H, flat), rayleigh_quotient(H, v))


def test_dict_parameters_keep_their_structure():
    torch = pytest.importorskip("torch")
    params = {"a": torch.ones(2, 2, dtype=torch.float64), "b": torch.arange(3.0).double()}
    v = transformation_tangent(lambda w, g: {k: g * t for k, t in w.items()}, params, at=1.0)
    assert list(v) == ["a", "b"]
    assert_close(v, params)


def test_rayleigh_quotient_against_dense_matrices():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((5, 5))
    A = B + B.T
    V = rng.standard_normal((5, 3))
    expected = np.einsum("ik,ij,jk->k", V, A, V) / np.sum(V * V, axis=0)
    assert_close(rayleigh_quotient(A, V), expected)
    assert_close(rayleigh_quotient(aslinearoperator(A), V), expected)
    assert_close(rayleigh_quotient(A, V[:, 1]), expected[1])
    assert np.ndim(rayleigh_quotient(A, V[:, 1])) == 0


def test_rayleigh_quotient_of_several_directions_and_libraries(backend_name):
    H, params, _, _, dense = setup(backend_name)
    V = np.random.default_rng(1).standard_normal((2 * K * D, 4))
    expected = np.einsum("ik,ij,jk->k", V, dense, V) / np.sum(V * V, axis=0)
    result = rayleigh_quotient(H, V)
    assert isinstance(result, np.ndarray) and result.shape == (4,)
    assert_close(result, expected)
    # parameter-shaped directions with a trailing column axis
    columns = [V[: K * D].reshape(K, D, 4), V[K * D :].reshape(D, K, 4)]
    assert_close(rayleigh_quotient(H, columns), expected)


def test_rayleigh_quotient_errors():
    A = np.eye(3)
    with pytest.raises(ValueError, match=r"A: expected a square operator \(n, n\), got shape"):
        rayleigh_quotient(np.ones((2, 3)), np.ones(3))
    with pytest.raises(TypeError, match="A: expected a linear operator or a 2-d array"):
        rayleigh_quotient(lambda x: x, np.ones(3))
    with pytest.raises(ValueError, match="v: expected nonzero direction"):
        rayleigh_quotient(A, np.zeros(3))
    with pytest.raises(ValueError, match=r"v: expected a vector \(3,\) or directions \(3, K\)"):
        rayleigh_quotient(A, np.ones(4))
    with pytest.raises(TypeError, match="v: expected an array with 3 rows, got list"):
        rayleigh_quotient(A, [np.ones(3)])
    with pytest.raises(TypeError, match="v: expected an array or a list"):
        rayleigh_quotient(A, "v")


def test_transformation_tangent_errors(backend_name):
    _, params, rescale, _, _ = setup(backend_name)
    with pytest.raises(TypeError, match="transform: expected a callable"):
        transformation_tangent(None, params)
    with pytest.raises(TypeError, match="at: expected a real number"):
        transformation_tangent(rescale, params, at="one")
    with pytest.raises(ValueError, match=r"at: expected the value where transform\(params, at\)"):
        transformation_tangent(rescale, params, at=0.0)
    with pytest.raises(ValueError, match=r"transform\(params, t\): expected the structure"):
        transformation_tangent(lambda w, g: [g * w[0]], params, at=1.0)
