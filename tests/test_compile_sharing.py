"""JAX operators of equal configuration share one compilation (curvlinops/_tracing.py).

Every result is checked against ``jax.hessian`` / ``jax.grad`` in float64, so
a compilation shared where it must not be (another loss, another model state)
fails on the numbers; the trace counters check that sharing happens.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops._tracing import _TraceState, _Unshareable
from curvlinops.gradient import gradient_and_loss
from curvlinops.losses import CrossEntropyLoss, MSELoss

TRACES: dict[int, int] = {}
"""Traces per model object (kept outside it: its attributes are its configuration)."""


class CountingModel:
    """A two-layer model that counts how often JAX traces it."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    @property
    def traces(self) -> int:
        return TRACES.get(id(self), 0)

    def __call__(self, params, X):
        if isinstance(X, jax.core.Tracer):
            TRACES[id(self)] = self.traces + 1
        return self.scale * jnp.tanh(X @ params["w1"]) @ params["w2"]


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w1": jnp.asarray(rng.normal(size=(3, 4))), "w2": jnp.asarray(rng.normal(size=(4, 2)))}


def _data(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(6, 3)), rng.integers(0, 2, size=6)
    return [(jnp.asarray(X[:4]), jnp.asarray(y[:4])), (jnp.asarray(X[4:]), jnp.asarray(y[4:]))]


def _dense_hessian(model, loss, params, data) -> np.ndarray:
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    X = jnp.concatenate([x for x, _ in data])
    y = jnp.concatenate([t for _, t in data])

    def total(theta):
        z = model(unravel(theta), X)
        if isinstance(loss, MSELoss):
            onehot = jax.nn.one_hot(y, z.shape[1], dtype=z.dtype)
            return jnp.mean((z - onehot) ** 2)  # mean over all entries, like torch
        terms = -jax.nn.log_softmax(z)[jnp.arange(len(y)), y]
        return jnp.mean(terms) if loss.reduction == "mean" else jnp.sum(terms)

    return np.asarray(jax.hessian(total)(flat))


def _mse_data(data: list) -> list:
    return [(X, jax.nn.one_hot(y, 2, dtype=X.dtype)) for X, y in data]


def test_new_parameters_reuse_the_compilation():
    model, loss, data = CountingModel(), CrossEntropyLoss(), _data()
    v = jnp.asarray(np.random.default_rng(1).normal(size=20))
    for seed in range(3):
        params = _params(seed)
        H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
        assert_close(H @ v, _dense_hessian(model, loss, params, data) @ np.asarray(v))
        if seed == 0:
            traces = model.traces
    assert traces >= 1
    assert model.traces == traces, "a new operator for new parameters traced again"


def test_other_loss_or_model_state_compiles_anew():
    model, data, params = CountingModel(), _data(), _params(0)
    v = jnp.asarray(np.random.default_rng(2).normal(size=20))
    for loss in (CrossEntropyLoss("mean"), CrossEntropyLoss("sum")):
        H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
        assert_close(H @ v, _dense_hessian(model, loss, params, data) @ np.asarray(v))
    traces = model.traces
    model.scale = 2.0  # the model object's state is part of the configuration
    H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    assert_close(H @ v, _dense_hessian(model, loss, params, data) @ np.asarray(v))
    assert model.traces > traces


def test_ggn_and_hessian_do_not_share():
    model, loss, data, params = CountingModel(), MSELoss(), _mse_data(_data()), _params(3)
    H = HessianLinearOperator(model, loss, params, data, check_deterministic=False)
    G = GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    v = jnp.asarray(np.random.default_rng(3).normal(size=20))
    Hv, Gv = np.asarray(H @ v), np.asarray(G @ v)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    X = jnp.concatenate([x for x, _ in data])
    Y = jnp.concatenate([t for _, t in data])
    J = jax.jacobian(lambda t: model(unravel(t), X).ravel())(flat)
    G_dense = 2.0 / Y.size * np.asarray(J.T @ J)
    H_dense = np.asarray(jax.hessian(lambda t: jnp.mean((model(unravel(t), X) - Y) ** 2))(flat))
    assert_close(Gv, G_dense @ np.asarray(v))
    assert_close(Hv, H_dense @ np.asarray(v))
    assert not np.allclose(Hv, Gv)


def test_gradient_and_loss_in_a_loop_traces_once():
    model, loss, data = CountingModel(), CrossEntropyLoss(), _data()
    X = jnp.concatenate([x for x, _ in data])
    y = jnp.concatenate([t for _, t in data])
    for seed in range(3):
        params = _params(10 + seed)
        grad, value = gradient_and_loss(model, loss, params, data)

        def total(p):
            return -jnp.mean(jax.nn.log_softmax(model(p, X))[jnp.arange(len(y)), y])

        assert_close(value, total(params))
        assert_close(grad, jax.grad(total)(params))
        if seed == 0:
            traces = model.traces
    assert model.traces == traces


def test_an_operator_holding_an_array_is_not_shared():
    H = HessianLinearOperator(CountingModel(), CrossEntropyLoss(), _params(0), _data())
    H.extra = jnp.ones(3)  # an array among the attributes: compile per operator
    with pytest.raises(_Unshareable):
        _TraceState(H, "_batch_matmat")
    v = jnp.ones(20)
    assert_close(H @ v, _dense_hessian(H.backend.model_fn, H._loss, _params(0), _data()) @ v)


def test_trace_state_drops_data_and_parameters():
    data, params = _data(), _params(0)
    H = HessianLinearOperator(CountingModel(), CrossEntropyLoss(), params, data)
    state = _TraceState(H, "_batch_matmat")
    assert not hasattr(state.view, "_data") and not hasattr(state.view, "_converted")
    assert not hasattr(state.view.backend, "primals")
    assert H.backend.primals is not None and H._data is data  # the operator keeps them
    other = HessianLinearOperator(H.backend.model_fn, CrossEntropyLoss(), _params(1), data)
    assert _TraceState(other, "_batch_matmat") == state
    assert hash(_TraceState(other, "_batch_matmat")) == hash(state)
