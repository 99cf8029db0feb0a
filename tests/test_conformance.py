"""The conformance kit (curvlinops.testing) on every installed backend, and backend registration.

PyTorch and JAX are checked by the kit like any backend a user adds; MLX
comes from its own package (plugins/curvlinops-mlx), registered by entry point.
The same weights give the same numbers on every backend (test_same_numbers_everywhere).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import numpy as np
import pytest
from helpers import assert_close

from curvlinops import GGNLinearOperator, HessianLinearOperator, losses
from curvlinops.backends import (
    BackendDefaults,
    BackendSpec,
    detect_backend,
    make_backend,
    register,
    registered,
    unregister,
)
from curvlinops.testing import (
    CHECKS,
    ConformanceProblem,
    _operator,
    float64_precision,
    run_conformance,
)

HAS = {name: importlib.util.find_spec(name) is not None for name in ("torch", "jax", "mlx")}
HAS["mlx"] = HAS["mlx"] and importlib.util.find_spec("curvlinops_mlx") is not None
SIZES, BATCHES = (3, 4, 3), (4, 3)


def weights_and_data(real_targets: bool = False) -> tuple[list, list]:
    """A 3-4-3 tanh MLP's weights (``(out, in)`` layout) and two batches.

    Targets are class labels, or real ``(n, 3)`` arrays with ``real_targets``.
    """
    rng = np.random.default_rng(0)
    weights = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        weights += [rng.normal(size=(fan_out, fan_in)) / np.sqrt(fan_in), rng.normal(size=fan_out)]
    data = []
    for n in BATCHES:
        X = rng.normal(size=(n, SIZES[0]))
        y = rng.normal(size=(n, SIZES[-1])) if real_targets else rng.integers(0, SIZES[-1], n)
        data.append((X, y))
    return weights, data


def build_torch(dtype: str) -> tuple:
    import torch

    weights, data = weights_and_data()
    layers = [torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(), torch.nn.Linear(*SIZES[1:])]
    model = torch.nn.Sequential(*layers).to(getattr(torch, dtype))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.as_tensor(w))
    kind = getattr(torch, dtype)
    return (
        model,
        list(model.parameters()),
        [(torch.as_tensor(X, dtype=kind), torch.as_tensor(y)) for X, y in data],
    )


def mlp(xp: Any) -> Any:
    """The MLP as a function of a parameter dict, in the namespace ``xp``."""

    def forward(params: dict, X: Any) -> Any:
        hidden = xp.tanh(X @ params["w1"].T + params["b1"])
        return hidden @ params["w2"].T + params["b2"]

    return forward


def build_jax(dtype: str) -> tuple:
    import jax.numpy as jnp

    weights, data = weights_and_data()
    params = {n: jnp.asarray(w, dtype=dtype) for n, w in zip(("w1", "b1", "w2", "b2"), weights)}
    return mlp(jnp), params, [(jnp.asarray(X, dtype=dtype), jnp.asarray(y)) for X, y in data]


def build_mlx(dtype: str) -> tuple:
    import mlx.core as mx

    weights, data = weights_and_data()
    kind = getattr(mx, dtype)
    params = {n: mx.array(w, dtype=kind) for n, w in zip(("w1", "b1", "w2", "b2"), weights)}
    return mlp(mx), params, [(mx.array(X, dtype=kind), mx.array(y)) for X, y in data]


def build_mlx_module(dtype: str) -> tuple:
    """An ``mlx.nn.Module`` with the same weights; real targets, numpy (the backend converts)."""
    import mlx.core as mx
    import mlx.nn as nn

    weights, data = weights_and_data(real_targets=True)
    kind = getattr(mx, dtype)
    model = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.Tanh(), nn.Linear(*SIZES[1:]))
    names = ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    model.load_weights([(n, mx.array(w, dtype=kind)) for n, w in zip(names, weights)])
    return model, model.trainable_parameters(), [(mx.array(X, dtype=kind), y) for X, y in data]


def _torch_loss() -> Any:
    import torch

    return torch.nn.CrossEntropyLoss()  # read by the backend as a closed form


PROBLEMS = {
    "torch": ("torch", build_torch, _torch_loss),
    "jax": ("jax", build_jax, losses.CrossEntropyLoss),
    "mlx": ("mlx", build_mlx, losses.CrossEntropyLoss),
    "mlx-module-mse": ("mlx", build_mlx_module, lambda: losses.MSELoss(reduction="sum")),
}


@functools.cache
def conformance_problem(key: str) -> ConformanceProblem:
    """One problem object per key: the kit computes its references once."""
    backend, build, loss = PROBLEMS[key]
    return ConformanceProblem(backend, build=build, loss_func=loss())


def _keys() -> list:
    return [
        pytest.param(key, marks=pytest.mark.skipif(not HAS[b], reason=f"{b} not installed"))
        for key, (b, _, _) in PROBLEMS.items()
    ]


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("key", _keys())
def test_conformance(key: str, check: str) -> None:
    CHECKS[check](conformance_problem(key))


# --- the same weights, the same numbers --------------------------------------------------------
CANONICAL = ("w1", "b1", "w2", "b2")
TORCH_NAMES = {"0.weight": "w1", "0.bias": "b1", "2.weight": "w2", "2.bias": "b2"}


def canonical_order(backend: Any) -> np.ndarray:
    """Index of each canonical flat entry (w1, b1, w2, b2) in the operator's flat order."""
    names = [TORCH_NAMES.get(n, n.strip("[]'\"")) for n in backend.param_names]
    sizes = [int(np.prod(s)) for s in backend.param_shapes]
    starts = dict(zip(names, np.cumsum([0, *sizes[:-1]])))
    sizes = dict(zip(names, sizes))
    return np.concatenate([starts[n] + np.arange(sizes[n]) for n in CANONICAL])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_same_numbers_everywhere(dtype: str) -> None:
    """H and G of the same weights and data agree across the installed backends.

    (Each backend's Jacobian is checked against central differences by the kit.)
    """
    installed = [key for key in ("torch", "jax", "mlx") if HAS[key]]
    if len(installed) < 2:
        pytest.skip("needs two backends")
    results, precisions = {}, []
    for key in installed:
        problem = conformance_problem(key)
        # the kit's operators (the same arguments and options: JAX compiles nothing anew)
        H = _operator(HessianLinearOperator, problem, dtype)
        G = _operator(GGNLinearOperator, problem, dtype)
        order = canonical_order(H.backend)
        eye = np.eye(H.shape[0], dtype=dtype)
        results[key] = [(H @ eye)[np.ix_(order, order)], (G @ eye)[np.ix_(order, order)]]
        precisions.append(float64_precision(H.backend))
    eps = np.finfo(dtype).eps if dtype == "float32" else max(precisions)
    reference = results[installed[0]]
    for key in installed[1:]:
        for name, ours, theirs in zip("HG", results[key], reference):
            assert_close(ours, theirs, rtol=100 * eps, name=f"{name}: {key} vs {installed[0]}")


# --- registration ------------------------------------------------------------------------------
requires_torch = pytest.mark.skipif(not HAS["torch"], reason="torch not installed")


class Incomplete:
    """A factory's result without most of the interface."""

    def __init__(self, model_func: Any, params: Any) -> None:
        self.name = "incomplete"


@requires_torch
def test_a_backend_registered_at_run_time_is_used_and_detected() -> None:
    """A second name for PyTorch's backend, registered without editing the library."""
    import torch

    from curvlinops.backends._torch import TorchBackend

    class Tagged(torch.Tensor):
        """A tensor type only the new backend claims."""

    class TaggedBackend(TorchBackend):
        name = "tagged"

    register(
        "tagged", TaggedBackend, detect=lambda obj: isinstance(obj, Tagged), modules=("torch",)
    )
    try:
        model, params, data = build_torch("float64")
        loss = losses.CrossEntropyLoss()
        H = HessianLinearOperator(model, loss, params, data, backend="tagged")
        assert H.backend.name == "tagged" and "tagged" in registered()
        reference = HessianLinearOperator(model, loss, params, data) @ np.eye(H.shape[0])
        assert_close(H @ np.eye(H.shape[0]), reference, name="tagged vs torch")
        # detection asks the registered backend: a Tagged leaf is claimed by two backends
        tagged = [p.detach().as_subclass(Tagged) for p in params]
        with pytest.raises(TypeError, match="expected objects of one framework, got both"):
            detect_backend(lambda p, X: X, tagged)
    finally:
        unregister("tagged")
    assert "tagged" not in registered()


def test_registration_errors() -> None:
    with pytest.raises(ValueError, match="name: expected a name not registered yet, got 'jax'"):
        register("jax", "some.module:Backend")
    with pytest.raises(ValueError, match="protocol: expected 1, the backend interface version"):
        register("future", "some.module:Backend", protocol=2)
    with pytest.raises(TypeError, match="factory: expected a callable"):
        register("broken", 42)
    with pytest.raises(TypeError, match="name: expected an identifier"):
        register("not a name", "some.module:Backend")
    with pytest.raises(ValueError, match="backend: expected 'torch', 'jax'.* or None, got 'nope'"):
        make_backend(lambda p, X: X, [np.zeros(2)], "nope")
    register("incomplete", Incomplete, modules=("numpy",))
    try:
        with pytest.raises(TypeError, match=r"backend 'incomplete'.*lacks the required xp, dtype"):
            make_backend(lambda p, X: X, [np.zeros(2)], "incomplete")
    finally:
        unregister("incomplete")
    register("missing", "no_such_framework.backend:Backend", modules=("no_such_framework",))
    try:
        with pytest.raises(ImportError, match="needs no_such_framework, which is not installed"):
            make_backend(lambda p, X: X, [np.zeros(2)], "missing")
    finally:
        unregister("missing")


def test_the_defaults_complete_a_backend() -> None:
    """Every optional member has a fallback; the required ones are the protocol's."""
    from curvlinops.backends import OPTIONAL, REQUIRED, Backend

    assert all(hasattr(BackendDefaults, name) for name in OPTIONAL)
    assert not set(OPTIONAL) & set(REQUIRED)
    assert {name for name in REQUIRED if not name.startswith("_")} <= set(dir(Backend)) | set(
        Backend.__annotations__
    )


def test_entry_points_register_installed_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point naming a BackendSpec is registered; a broken one warns and is skipped."""
    from curvlinops.backends import _registry

    class Entry:
        def __init__(self, name: str, value: Any) -> None:
            self.name, self.value, self._value = name, f"pkg:{name}", value

        def load(self) -> Any:
            if isinstance(self._value, Exception):
                raise self._value
            return self._value

    spec = BackendSpec("viaentry", "pkg.module:Backend", modules=("pkg",))
    entries = [Entry("viaentry", spec), Entry("broken", ImportError("no module named pkg"))]
    monkeypatch.setattr(_registry.importlib.metadata, "entry_points", lambda group: entries)
    monkeypatch.setattr(_registry, "_ENTRY_POINTS_READ", [])
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    with pytest.warns(RuntimeWarning, match="the backend 'broken' declared by 'pkg:broken'"):
        names = registered()
    assert "viaentry" in names and "broken" not in names


@pytest.mark.skipif(not HAS["mlx"], reason="mlx or curvlinops-mlx not installed")
def test_mlx_comes_from_its_entry_point() -> None:
    """The MLX backend lives outside curvlinops/ and is found through its installed entry point."""
    import importlib.metadata

    entries = importlib.metadata.entry_points(group="curvlinops.backends")
    assert [e.value for e in entries if e.name == "mlx"] == ["curvlinops_mlx:BACKEND"]
    factory = registered()["mlx"].factory
    assert isinstance(factory, str) and not factory.startswith("curvlinops.")


@pytest.mark.skipif(not HAS["mlx"], reason="mlx or curvlinops-mlx not installed")
def test_run_conformance_reports_every_failure() -> None:
    """run_conformance lists each failed check (here: one batch fewer than the references saw)."""

    def wrong_build(dtype: str) -> tuple:
        model_func, params, data = build_mlx(dtype)
        return model_func, params, data[:1]

    problem = ConformanceProblem("mlx", build=wrong_build, loss_func=losses.CrossEntropyLoss())
    problem._cache["references"] = conformance_problem("mlx")._cache.get("references") or (
        _references_of("mlx")
    )
    with pytest.raises(AssertionError, match=r"backend 'mlx' failed 2 checks:\nggn: .*\nhessian: "):
        run_conformance(problem, only=("ggn", "hessian", "registration"))


def _references_of(key: str) -> Any:
    from curvlinops.testing import _references

    return _references(conformance_problem(key))


@pytest.mark.skipif(not (HAS["mlx"] and HAS["torch"]), reason="needs mlx and torch")
def test_a_loss_module_of_another_framework_is_refused() -> None:
    """The default ``loss`` of BackendDefaults names the backend and the fix."""
    import torch

    model_func, params, data = build_mlx("float32")
    with pytest.raises(TypeError, match=r"loss_func: expected a loss for mlx .*losses.MSELoss"):
        HessianLinearOperator(model_func, torch.nn.MSELoss(), params, data)


@pytest.mark.parametrize("backend", [k for k in ("torch", "jax", "mlx") if HAS[k]])
def test_one_parameter_array(backend: str) -> None:
    """A single parameter array (one leaf): the least-squares Hessian ``(XᵀX / N) ⊗ I``."""
    rng = np.random.default_rng(3)
    W, X = rng.normal(size=(3, 2)), rng.normal(size=(5, 3))
    if backend == "torch":
        import torch

        params, native = [torch.as_tensor(W)], torch.as_tensor
    elif backend == "jax":
        import jax.numpy as jnp

        params, native = jnp.asarray(W), jnp.asarray
    else:
        import mlx.core as mx

        params, native = mx.array(W, dtype=mx.float64), lambda a: mx.array(a, dtype=mx.float64)

    def model(p: Any, X: Any) -> Any:
        return X @ (p[0] if isinstance(p, (list, tuple)) else p)

    data = [(native(X), native(np.zeros((5, 2))))]
    H = HessianLinearOperator(model, losses.MSELoss(), params, data, columns_per_pass=4)
    expected = np.kron(X.T @ X / 5, np.eye(2))
    assert_close(H @ np.eye(6), expected, rtol=1e-5, name=f"{backend}: one parameter array")
