"""JAX operators inside JAX transformations: jit, jax.scipy's cg, lax loops, vmap, grad.

Given a JAX array (or tracer), ``H.matvec`` computes with JAX only: no
conversion, no host callback, no NaN check on tracers. The dense references
are ``jax.hessian`` / ``jax.jacrev`` of the same functions in float64.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_close

from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
    JacobianLinearOperator,
)
from curvlinops.losses import CrossEntropyLoss

DAMPING = 0.1


def _model(params, X):
    return jnp.tanh(X @ params["w1"] + params["b1"]) @ params["w2"]


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 5))),
        "b1": jnp.asarray(rng.normal(size=5)),
        "w2": jnp.asarray(rng.normal(size=(5, 3))),
    }
    data = [
        (jnp.asarray(rng.normal(size=(n, 3))), jnp.asarray(rng.integers(0, 3, size=n)))
        for n in (4, 3)
    ]
    loss = CrossEntropyLoss(reduction="sum")
    H = HessianLinearOperator(_model, loss, params, data)
    G = GGNLinearOperator(_model, loss, params, data)
    J = JacobianLinearOperator(_model, params, data)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    X = jnp.concatenate([x for x, _ in data])
    y = jnp.concatenate([t for _, t in data])

    def outputs(theta):
        return _model(unravel(theta), X)

    def total_loss(theta):
        z = outputs(theta)
        return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    def output_loss(z):
        return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])

    @jax.jit
    def references(theta):
        Jz = jax.jacrev(outputs)(theta).reshape(-1, theta.size)
        Hz = jax.hessian(output_loss)(outputs(theta)).reshape(Jz.shape[0], Jz.shape[0])
        return jax.hessian(total_loss)(theta), Jz.T @ Hz @ Jz, Jz

    H_dense, G_dense, J_dense = (np.asarray(m) for m in references(flat))
    return {
        "H": H,
        "G": G,
        "J": J,
        "H_dense": H_dense,
        "G_dense": G_dense,
        "J_dense": J_dense,
        "params": params,
        "unravel": unravel,
    }


def _vector(n: int, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=n))


@pytest.mark.parametrize("name", ["H", "G"])
def test_jit_matvec_and_matmat(setup, name):
    op, dense = setup[name], setup[f"{name}_dense"]
    v = _vector(op.shape[1])
    out = jax.jit(op.matvec)(v)
    assert isinstance(out, jax.Array)
    assert_close(out, dense @ np.asarray(v), name=f"jit {name}.matvec")
    V = jnp.asarray(np.random.default_rng(2).normal(size=(op.shape[1], 3)))
    assert_close(jax.jit(op.matmat)(V), dense @ np.asarray(V), name=f"jit {name}.matmat")
    assert_close(jax.jit(lambda x: op @ x)(V), dense @ np.asarray(V), name=f"jit {name} @")


def test_jit_jacobian_and_transpose(setup):
    J, dense = setup["J"], setup["J_dense"]
    v, u = _vector(J.shape[1]), _vector(J.shape[0], seed=3)
    assert_close(jax.jit(J.matvec)(v), dense @ np.asarray(v), name="J v")
    assert_close(jax.jit(J.rmatvec)(u), dense.T @ np.asarray(u), name="J^T u")
    assert_close(jax.jit(lambda u: J.T @ u)(u), dense.T @ np.asarray(u), name="J.T @ u")


def test_no_host_callback_in_the_trace(setup):
    jaxpr = str(jax.make_jaxpr(setup["G"].matvec)(_vector(setup["G"].shape[1])))
    assert "callback" not in jaxpr
    assert "float64" in jaxpr


def test_jax_scipy_cg(setup):
    G, dense = setup["G"], setup["G_dense"]
    A = G + DAMPING * IdentityLinearOperator(G)
    b = _vector(G.shape[0], seed=4)
    expected = np.linalg.solve(dense + DAMPING * np.eye(G.shape[0]), np.asarray(b))
    x, _ = jax.scipy.sparse.linalg.cg(A.matvec, b, tol=1e-12, maxiter=500)
    assert_close(x, expected, rtol=1e-8, name="cg")
    solve = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(A.matvec, b, tol=1e-12, maxiter=500)[0])
    assert_close(solve(b), expected, rtol=1e-8, name="jit(cg)")


def test_compiled_solver_makes_no_transfers(setup):
    """After compilation, a jitted cg moves nothing between host and device."""
    G = setup["G"]
    A = G + DAMPING * IdentityLinearOperator(G)
    solve = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(A.matvec, b, maxiter=20)[0])
    b = _vector(G.shape[0], seed=5)
    expected = solve(b)
    with jax.transfer_guard("disallow"):
        out = solve(b)
        out.block_until_ready()
    assert_close(out, expected, rtol=0.0)


def test_fori_loop_power_iteration(setup):
    H, dense = setup["H"], setup["H_dense"]
    v0 = _vector(H.shape[0], seed=6)

    def step(_, v):
        w = H.matvec(v)
        return w / jnp.linalg.norm(w)

    out = jax.jit(lambda v: jax.lax.fori_loop(0, 8, step, v))(v0)
    expected = np.asarray(v0)
    for _ in range(8):
        expected = dense @ expected
        expected /= np.linalg.norm(expected)
    assert_close(out, expected, name="power iteration")


def test_vmap_and_grad(setup):
    H, dense = setup["H"], setup["H_dense"]
    V = jnp.asarray(np.random.default_rng(7).normal(size=(4, H.shape[0])))
    assert_close(jax.jit(jax.vmap(H.matvec))(V), np.asarray(V) @ dense.T, name="vmap")
    v = V[0]
    grad = jax.jit(jax.grad(lambda v: v @ H.matvec(v)))(v)
    assert_close(grad, 2 * dense @ np.asarray(v), name="grad of v^T H v")


def test_parameter_pytree_under_jit(setup):
    H, dense, unravel = setup["H"], setup["H_dense"], setup["unravel"]
    v = _vector(H.shape[0], seed=8)
    out = jax.jit(H.matvec)(unravel(v))
    assert set(out) == {"w1", "b1", "w2"}
    flat, _ = jax.flatten_util.ravel_pytree(out)
    assert_close(flat, dense @ np.asarray(v), name="pytree H v")


def test_nan_check_skips_tracers_and_warns_eagerly(setup):
    data = [(jnp.ones((2, 3)), jnp.zeros(2, dtype=jnp.int32))]
    H = HessianLinearOperator(_model, CrossEntropyLoss(), setup["params"], data)
    v = jnp.full(H.shape[0], jnp.nan)
    out = jax.jit(H.matvec)(v)  # no warning while tracing (pytest turns warnings into errors)
    assert bool(jnp.isnan(out).all())
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        H.matvec(v)


def test_torch_operator_cannot_be_traced():
    model = torch.nn.Linear(2, 1).double()
    X = torch.ones(3, 2, dtype=torch.float64)
    H = HessianLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()), [(X, X[:, :1])])
    with pytest.raises(TypeError, match="x: expected a concrete array.*jax.jit"):
        jax.jit(H.matvec)(jnp.ones(3))
