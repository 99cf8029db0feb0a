"""Linearizations kept for repeated products (``cache=``, curvlinops/_linearization.py).

Products from kept linearizations are checked against the dense references
of ``cases.py`` (float64, autodiff) and against the same operator with
``cache=False``, for every operator and both backends, with one and several
batches and columns; ``cache_info`` shows that the second product reused
what the first built. Then: parameters changed in place (PyTorch), the
memory budget, data loaders that need not be read again, the determinism
check, JAX tracing, and the options' errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cases import build
from helpers import assert_close, to_numpy

import curvlinops
from curvlinops.fisher import EFLinearOperator, FisherMCLinearOperator

RTOL = 1e-12  # float64: the same operations, reordered at most
KINDS = ("H", "G", "EF", "MC", "J", "JT")
# other models: convolutions and sequence outputs (JAX compiles take long: one case)
OTHER_MODELS = [
    ("torch", "H", "cnn-ce-mean"),
    ("torch", "G", "seq-ce-mean"),
    ("jax", "G", "cnn-ce-mean"),
]


def _make(problem, kind: str, data=None, **options):
    """Operator ``kind`` of ``problem`` (fresh: its cache starts empty)."""
    data = problem.data if data is None else data
    options = {**problem.options, **options}
    m, loss, params = problem.model_func, problem.loss_func, problem.params
    if kind == "H":
        return curvlinops.HessianLinearOperator(m, loss, params, data, **options)
    if kind == "G":
        return curvlinops.GGNLinearOperator(m, loss, params, data, **options)
    if kind == "EF":
        return EFLinearOperator(m, loss, params, data, **options)
    if kind == "MC":
        return FisherMCLinearOperator(m, loss, params, data, mc_samples=2, **options)
    if kind == "J":
        return curvlinops.JacobianLinearOperator(m, params, data, **options)
    return curvlinops.TransposedJacobianLinearOperator(m, params, data, **options)


def _dense(problem, kind: str) -> np.ndarray | None:
    dense = problem.dense
    return {"H": dense.get("H"), "G": dense.get("G"), "J": dense.get("J")}.get(
        kind, None if kind != "JT" else dense["J"].T
    )


def _probes(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(shape[1], 3))


@pytest.mark.parametrize("kind", KINDS)
def test_kept_products_equal_recomputed_and_dense(backend_name, kind):
    _check_kept_products(build("mlp-ce-mean", backend_name), kind)


@pytest.mark.parametrize(("backend", "kind", "case"), OTHER_MODELS)
def test_other_models(backend, kind, case):
    pytest.importorskip(backend)
    _check_kept_products(build(case, backend), kind)


def _check_kept_products(problem, kind: str) -> None:
    cached = _make(problem, kind)
    plain = _make(problem, kind, cache=False, check_deterministic=False)
    V = _probes(cached.shape)
    first, second = cached @ V, cached @ V  # the first builds, the second reuses
    vector = cached @ V[:, 0]
    info = cached.cache_info()
    assert info["batches"] == [0, 1] and info["builds"] == 2, info
    assert info["nbytes"] > 0
    expected = plain @ V
    for name, actual in (("build", first), ("reuse", second)):
        assert_close(actual, expected, rtol=RTOL, name=f"{kind} {name} vs cache=False")
    assert_close(vector, expected[:, 0], rtol=RTOL, name=f"{kind} vector")
    dense = _dense(problem, kind)
    if dense is not None:
        assert_close(second, dense @ V, name=f"{kind} reuse vs dense")
    if kind in ("J", "JT"):  # the adjoint goes through the same linearization
        U = _probes(cached.shape[::-1], seed=1)
        assert_close(cached.T @ U, plain.T @ U, rtol=RTOL, name=f"{kind}.T")
        assert cached.cache_info()["builds"] == 2


@pytest.mark.parametrize("kind", ["H", "G", "EF", "J"])
def test_one_batch(backend_name, kind):
    problem = build("mlp-ce-mean", backend_name)
    one_batch = problem.data[:1]
    cached = _make(problem, kind, data=one_batch)
    plain = _make(problem, kind, one_batch, cache=False, check_deterministic=False)
    V = _probes(cached.shape)
    cached @ V
    assert_close(cached @ V, plain @ V, rtol=RTOL, name=f"{kind} one batch")
    assert cached.cache_info()["batches"] == [0]


def test_float32_operators(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    if backend_name == "torch":
        model = copy.deepcopy(problem.model_func).float()
        params = list(model.parameters())
        data = [(X.float(), y) for X, y in problem.data]
    else:
        import jax
        import jax.numpy as jnp

        params = jax.tree.map(lambda a: a.astype(jnp.float32), problem.params)
        model = problem.model_func
        data = [(X.astype(jnp.float32), y) for X, y in problem.data]
    args = (model, problem.loss_func, params, data)
    G = curvlinops.GGNLinearOperator(*args)
    G_plain = curvlinops.GGNLinearOperator(*args, cache=False, check_deterministic=False)
    V = _probes(G.shape).astype(np.float32)
    G @ V
    reused = G @ V
    assert reused.dtype == np.float32 and G.cache_info()["builds"] == 2
    assert_close(reused, G_plain @ V, name="float32 reuse")
    assert_close(reused, problem.dense["G"] @ V, rtol=1e-4, name="float32 vs float64 dense")


# --- parameters changed in place (PyTorch) ------------------------------------------
def _torch_mlp():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, torch.nn.CrossEntropyLoss(), [(X[:6], y[:6]), (X[6:], y[6:])]


def _change_by_optimizer(model):
    import torch

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    X = torch.randn(5, 4, dtype=torch.float64)
    model(X).square().sum().backward()
    optimizer.step()


def _change_through_data(model):
    import torch

    for p in model.parameters():
        p.data.copy_(p.data + 0.1 * torch.randn_like(p))  # bypasses the version counter


def _change_by_state_dict(model):
    import torch

    other = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model.load_state_dict(other.double().state_dict())


def _change_one_entry(model):
    import torch

    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3


@pytest.mark.parametrize(
    "change", [_change_by_optimizer, _change_through_data, _change_by_state_dict, _change_one_entry]
)
@pytest.mark.parametrize("kind", ["H", "G", "J"])
def test_parameters_changed_in_place_are_seen(change, kind):
    model, loss, data = _torch_mlp()
    params = list(model.parameters())
    if kind == "H":
        op = curvlinops.HessianLinearOperator(model, loss, params, data)
    elif kind == "G":
        op = curvlinops.GGNLinearOperator(model, loss, params, data)
    else:
        op = curvlinops.JacobianLinearOperator(model, params, data)
    V = _probes(op.shape)
    before = op @ V
    assert op.cache_info()["batches"] == [0, 1]
    change(model)
    after = op @ V
    fresh = type(op)(*((model, loss) if kind != "J" else (model,)), params, data, cache=False)
    assert_close(after, fresh @ V, rtol=RTOL, name=f"{kind} after {change.__name__}")
    assert not np.allclose(after, before)  # the change matters, so a stale cache would fail
    info = op.cache_info()
    assert info["invalidations"] == 1 and info["builds"] == 4, info


def test_a_changed_buffer_is_seen():
    """Buffers the model reads (batch norm statistics in eval mode) count as its state."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh())
    model = model.double().eval()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    params = list(model.parameters())
    G = curvlinops.GGNLinearOperator(model, torch.nn.MSELoss(), params, [(X, y)])
    V = _probes(G.shape)
    G @ V
    with torch.no_grad():
        model[1].running_var.mul_(4.0)
    fresh = curvlinops.GGNLinearOperator(model, torch.nn.MSELoss(), params, [(X, y)], cache=False)
    assert_close(G @ V, fresh @ V, rtol=RTOL, name="after a buffer change")
    assert G.cache_info()["invalidations"] == 1


# --- memory budget ----------------------------------------------------------------------
def test_budget_is_respected_and_the_rest_recomputed(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    full = _make(problem, "G")
    V = _probes(full.shape)
    full @ V
    budget = full.cache_info()["nbytes_per_batch"][0]  # room for the first batch only
    G = _make(problem, "G", cache_memory=budget)
    for _ in range(3):
        result = G @ V
    info = G.cache_info()
    assert info["budget"] == budget and info["nbytes"] <= budget, info
    assert info["batches"] == [0] and info["recomputed"] == [1], info
    assert info["builds"] == 2, info  # the second batch is not built again and again
    assert_close(result, problem.dense["G"] @ V, name="half kept, half recomputed")
    nothing = _make(problem, "G", cache_memory=0)
    assert_close(nothing @ V, result, rtol=RTOL, name="cache_memory=0")
    assert nothing.cache_info()["batches"] == [] and nothing.cache_info()["nbytes"] == 0


def test_cache_false_and_clear(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    off = _make(problem, "H", cache=False)
    off @ _probes(off.shape)
    assert off.cache_info()["batches"] == [] and off.cache_info()["budget"] == 0
    H = _make(problem, "H", cache=True)
    H @ _probes(H.shape)
    assert H.cache_info()["budget"] is None and H.cache_info()["batches"] == [0, 1]
    H.clear_cache()
    assert H.cache_info()["batches"] == [] and H.cache_info()["nbytes"] == 0


# --- data: read again only when needed -------------------------------------------------
class CountingData:
    """A re-iterable of batches (like a DataLoader) that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = list(batches), 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_a_loader_is_not_read_when_everything_is_kept(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    data = CountingData(problem.data)
    H = _make(problem, "H", data=data)
    V = _probes(H.shape)
    H @ V
    passes = data.passes
    reused = H @ V
    assert data.passes == passes  # all batches kept: the data is not read
    assert_close(reused, problem.dense["H"] @ V, name="loader, kept")
    partial = _make(problem, "H", data=data, cache_memory=1)
    partial @ V[:, 0]
    passes = data.passes
    partial @ V[:, 0]
    assert data.passes == passes + 1  # batches past the budget need the data


def test_determinism_check_recomputes():
    """A random loss is caught at construction: the check's two products build nothing."""
    import torch

    model, _, data = _torch_mlp()

    class NoisyLoss(torch.nn.Module):
        reduction = "mean"

        def forward(self, z, y):
            noise = 1 + 0.1 * torch.rand(())
            return noise * torch.nn.functional.cross_entropy(z, y)

    with pytest.raises(RuntimeError, match="two products with the same vector differ"):
        curvlinops.HessianLinearOperator(model, NoisyLoss(), list(model.parameters()), data)
    H = curvlinops.HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data
    )
    assert H.cache_info()["builds"] == 0  # the check kept nothing


# --- how wide a kept linearization is applied ------------------------------------------------
def test_default_pass_width_of_the_replay(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    G = _make(problem, "G")
    G @ _probes(G.shape)
    kept = G.cache_info()["nbytes_per_batch"][0]
    assert G._cache.nbytes_of(0) == kept > 0
    widths = [G.backend.linearized_columns_per_pass(n) for n in (kept, 1 << 30)]
    # on the CPU large linearizations are applied a column at a time, small ones (this
    # one) under vmap
    assert widths == [None, 1]


@pytest.mark.parametrize(
    ("backend", "kind", "width"),
    [("torch", "G", None), ("torch", "G", 2), ("torch", "J", None), ("torch", "J", 2),
     ("jax", "J", 2)],
)  # fmt: skip
def test_replay_in_passes_of_any_width(backend, kind, width, monkeypatch):
    """Any pass width (all 5 columns in one vmap; passes of 2, 2 and 1) gives the dense
    product, for the operator and its adjoint (JAX vmaps all columns in other tests)."""
    pytest.importorskip(backend)
    problem = build("mlp-ce-mean", backend)
    cached = _make(problem, kind, columns_per_pass=8)
    monkeypatch.setattr(
        type(cached.backend), "linearized_columns_per_pass", lambda self, nbytes: width
    )
    V = _probes(cached.shape)[:, [0, 1, 2, 0, 1]]
    cached @ V  # builds
    dense = _dense(problem, kind)
    assert_close(cached @ V, dense @ V, name=f"{kind} width {width}")
    if kind == "J":
        U = np.random.default_rng(1).normal(size=(cached.shape[0], 5))
        assert_close(cached.T @ U, dense.T @ U, name=f"{kind}.T width {width}")
    assert cached.cache_info()["builds"] == 2


# --- where nothing is kept -----------------------------------------------------------------
def test_jax_jit_keeps_nothing():
    pytest.importorskip("jax")
    import jax

    problem = build("mlp-ce-mean", "jax")
    H = _make(problem, "H")
    v = problem.native(_probes(H.shape)[:, 0])
    traced = jax.jit(H.matvec)(v)
    assert H.cache_info()["builds"] == 0
    H @ v  # fills the cache
    assert_close(jax.jit(H.matvec)(v), problem.dense["H"] @ to_numpy(v), name="jit")
    # the cache was neither written under tracing nor baked into the trace as constants
    jaxpr = jax.make_jaxpr(H.matvec)(v)
    assert H.cache_info()["builds"] == 2
    assert not any(np.size(c) > H.shape[0] for c in jaxpr.consts)
    assert_close(traced, problem.dense["H"] @ to_numpy(v), name="jit before")


def test_torch_inference_mode_and_blocks_recompute():
    torch = pytest.importorskip("torch")
    problem = build("mlp-ce-mean", "torch")
    H = _make(problem, "H")
    V = _probes(H.shape)
    with torch.inference_mode():
        result = H @ V
    assert H.cache_info()["builds"] == 0
    assert_close(result, problem.dense["H"] @ V, name="inference mode")
    blocks = _make(problem, "H", block_sizes=[2, 2])
    blocks @ V
    assert blocks.cache_info()["builds"] == 0


def test_solvers_reuse_without_options():
    pytest.importorskip("torch")
    problem = build("mlp-ce-mean", "torch")
    H = _make(problem, "H")
    values = curvlinops.eigsh(H, k=2, which="LA")[0]
    expected = np.linalg.eigvalsh(problem.dense["H"])[-2:]
    assert_close(np.sort(to_numpy(values)), expected, rtol=1e-8, name="eigsh")
    assert H.cache_info()["builds"] == 2  # built once for the many products of the solve


# --- options ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"cache": "always"}, ValueError, r"cache: expected \"auto\", True or False, got 'always'"),
        ({"cache": 1}, TypeError, r"cache: expected \"auto\", True or False"),
        ({"cache_memory": "1GB"}, TypeError, "cache_memory: expected a number of bytes"),
        ({"cache_memory": -1}, ValueError, "cache_memory: expected a non-negative number.*False"),
    ],
)
def test_option_errors(options, error, match):
    model, loss, data = _torch_mlp()
    with pytest.raises(error, match=match):
        curvlinops.HessianLinearOperator(model, loss, list(model.parameters()), data, **options)


# --- the scipy path -------------------------------------------------------------------------
def test_blas_guard_holds_through_a_slow_product(monkeypatch):
    """The guard's idle time starts when a product ends: slow products keep the limits."""
    import time

    from curvlinops import _blas_guard

    monkeypatch.setattr(_blas_guard, "IDLE_SECONDS", 0.05)
    _blas_guard.release()
    try:
        with _blas_guard.holding():
            if not _blas_guard.is_holding():
                pytest.skip("no multithreaded BLAS pool to limit here")
            time.sleep(0.4)  # eight idle periods: the old guard let go meanwhile
            assert _blas_guard.is_holding()
        deadline = time.monotonic() + 5
        while _blas_guard.is_holding() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _blas_guard.is_holding()  # and lets go once products stop
    finally:
        _blas_guard.release()
