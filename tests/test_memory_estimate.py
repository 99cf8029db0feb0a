"""``A.memory_estimate``: parts of a product, measured activations, caches, refusals.

The activation part is an estimate: PyTorch scales the bytes one forward pass
saves by a factor per operator kind, measured on the benchmark problems (see
the operators' ``_activation_factors``). It is checked against the memory a
product demonstrably holds: the saved tensors of the kept linearization of the
same batch (``graph_bytes``, what the autograd graphs of one product keep) for
PyTorch, XLA's memory analysis of the whole jitted product for JAX. The window
0.3x..3x is the spread of the measured factors (the graph holds 1.6-2.3 forward
passes; a product's peak 0.7-3 forward passes for one column): an estimate
outside it would refuse calls that fit, or let through ones that do not.
"""

from __future__ import annotations

import numpy as np
import pytest

import curvlinops as cl
from curvlinops import _curvature, _memory, eigen
from curvlinops._memory import MemoryBudgetError, product_memory

LOW, HIGH = 0.3, 3.0  # see the module docstring
P_TORCH = 10 * 32 + 32 + 32 * 3 + 3
SHAPES = {"w1": (10, 32), "w2": (32, 3)}  # the JAX model's weights


def activations(estimate: cl.MemoryEstimate) -> int:
    (value,) = [b for name, b in estimate.parts.items() if name.startswith("activations")]
    return value


# --- problems -----------------------------------------------------------------------------------
def torch_problem(sizes=(64, 32)):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
    ).double()
    data = [(torch.randn(n, 10, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in sizes]
    return model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data


def torch_operator(cls, **options):
    model, loss, params, data = torch_problem()
    if cls is cl.JacobianLinearOperator:
        return cls(model, params, data, check_deterministic=False, **options)
    return cls(model, loss, params, data, check_deterministic=False, **options)


def jax_operator(**options):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(rng.standard_normal(shape)) for name, shape in SHAPES.items()}

    def model(p, X):
        return jnp.tanh(X @ p["w1"]) @ p["w2"]

    data = [(rng.standard_normal((n, 10)), rng.integers(0, 3, n)) for n in (64, 32)]
    loss = cl.losses.CrossEntropyLoss("mean")
    return cl.GGNLinearOperator(model, loss, params, data, check_deterministic=False, **options)


# --- parts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls",
    [
        cl.HessianLinearOperator,
        cl.GGNLinearOperator,
        cl.EFLinearOperator,
        cl.FisherMCLinearOperator,
        cl.JacobianLinearOperator,
    ],
)
def test_torch_activations_against_the_kept_graph(cls):
    op = torch_operator(cls, cache=True)
    op @ np.ones(op.shape[1])
    assert op not in _curvature._MEASURED  # nothing measured at construction or in products
    op.clear_cache()
    estimate = op.memory_estimate(2)
    assert estimate.what == f"{cls.__name__} product"
    assert estimate.parts["parameters"] == P_TORCH * 8
    rows, columns = op.shape
    assert estimate.parts["product input and output"] == (rows + columns) * 2 * 8
    assert "batch of 64" in next(n for n in estimate.parts if n.startswith("activations"))
    # the kept linearization of the largest batch: what the product's graphs hold
    op @ np.ones((columns, 1))
    graph = op.cache_info()["nbytes_per_batch"][0]
    assert LOW <= op.memory_estimate(1).parts[_first_activation(op)] / graph <= HIGH
    # wider passes hold more, up to columns_per_pass
    assert activations(op.memory_estimate(2)) > activations(op.memory_estimate(1))
    wide, widest = op.memory_estimate(op.columns_per_pass), op.memory_estimate(100)
    assert activations(wide) == activations(widest)


def _first_activation(op) -> str:
    return next(n for n in op.memory_estimate(1).parts if n.startswith("activations"))


def test_torch_forward_measurement_is_the_saved_tensors():
    """The hook's count equals a walk over the forward graph's saved tensors."""
    torch = pytest.importorskip("torch")
    from curvlinops.backends._linearize_torch import graph_bytes

    op = torch_operator(cl.GGNLinearOperator)
    forward, size, batches = op._forward_saved_bytes()
    assert (size, batches) == (64, 2)
    model, loss, params, data = torch_problem()
    leaves = [p.detach().requires_grad_(True) for p in params]
    names = [name for name, _ in model.named_parameters()]
    outputs = torch.func.functional_call(model, dict(zip(names, leaves)), data[0][0])
    out = loss(outputs, data[0][1])
    walked = graph_bytes([out], {p.untyped_storage().data_ptr() for p in leaves})
    assert LOW <= forward / walked <= HIGH and forward > 0


def test_cache_part_reports_cache_info(backend_name):
    op = torch_operator(cl.HessianLinearOperator) if backend_name == "torch" else jax_operator()
    before = op.memory_estimate()
    assert before.parts["kept linearizations (held)"] == 0
    assert before.parts["kept linearizations (may still keep)"] > 0
    op @ np.ones(op.shape[1])
    info = op.cache_info()
    after = op.memory_estimate()
    assert info["nbytes"] > 0 and after.parts["kept linearizations (held)"] == info["nbytes"]
    assert after.parts["kept linearizations (may still keep)"] == 0  # every batch kept
    assert after.held == ("parameters", "kept linearizations (held)")
    assert after.needed == after.total - info["nbytes"] - after.parts["parameters"]
    if backend_name == "torch":
        off = torch_operator(cl.HessianLinearOperator, cache=False)
    else:
        off = jax_operator(cache=False)
    parts = off.memory_estimate().parts
    assert parts["kept linearizations (held)"] == parts["kept linearizations (may still keep)"] == 0


def test_cache_budget_bounds_what_may_still_be_kept():
    op = torch_operator(cl.GGNLinearOperator, cache_memory=1000)
    assert op.memory_estimate().parts["kept linearizations (may still keep)"] == 1000


def test_jax_activations_against_memory_analysis():
    import jax

    op = jax_operator()
    calls = []
    measure = op.backend.compiled_memory
    op.backend.compiled_memory = lambda *a: calls.append(1) or measure(*a)
    estimate = op.memory_estimate(3)
    op.memory_estimate(3)
    op @ np.ones((op.shape[1], 3))
    assert len(calls) == 1  # one compilation, on request, remembered
    assert "product intermediates" not in estimate.parts  # XLA's temporaries hold them
    # the whole product, jitted through the public interface (one batch of 64 and one of 32)
    V = jax.numpy.ones((op.shape[1], 3))
    whole = jax.jit(lambda V: op @ V).lower(V).compile().memory_analysis().temp_size_in_bytes
    assert LOW <= activations(estimate) / whole <= HIGH


# --- the Krylov methods count them ---------------------------------------------------------------
def test_product_memory_uses_the_estimate():
    op = torch_operator(cl.GGNLinearOperator)
    parts = product_memory(op, 3)
    estimate = op.memory_estimate(3)
    assert parts == {n: b for n, b in estimate.parts.items() if n not in estimate.held}
    assert any(n.startswith("activations") for n in parts)
    model, _, params, data = torch_problem()
    transposed = cl.TransposedJacobianLinearOperator(model, params, data, check_deterministic=False)
    parts = product_memory(transposed, 2)
    assert parts["product input and output"] == sum(transposed.shape) * 2 * 8
    assert any(n.startswith("activations") for n in parts)


class _Seen(Exception):
    """Stops a call at its memory check (no products run)."""


def planned_estimate(monkeypatch, call):
    """The :class:`MemoryEstimate` a call checks before it starts."""
    seen = []

    def record(self):
        seen.append(self)
        raise _Seen

    with monkeypatch.context() as patch:
        patch.setattr(_memory.MemoryEstimate, "check", record)
        with pytest.raises(_Seen):
            call()
    return seen[0]


def test_eigsh_refuses_when_the_activations_do_not_fit(monkeypatch):
    op = torch_operator(cl.HessianLinearOperator, cache=False)
    call = lambda **options: cl.eigsh(op, k=2, memory_budget=1e9, **options)  # noqa: E731
    planned = planned_estimate(monkeypatch, lambda: call(ncv=10))
    products = planned.outside_budget
    active = next(b for n, b in products.items() if n.startswith("activations"))
    assert "product intermediates" in products and "parameters" not in products
    # room for the solver and the product's columns, not for the activations
    planned.available = planned.needed + sum(products.values())
    assert planned.fits()
    planned.available -= active // 2
    assert not planned.fits()
    monkeypatch.setattr(_memory, "available_memory", lambda *args: planned.available)
    # a given basis is kept, and refused
    with pytest.raises(
        MemoryBudgetError, match=r"eigsh: needs .* plus .*activations \(batch of 64"
    ):
        call(ncv=10)
    with pytest.raises(MemoryBudgetError, match=r"Smaller data batches lower the activations"):
        call(ncv=10)
    # the default basis shrinks until the products fit beside it
    vector = op.shape[0] * op.dtype.itemsize
    room = planned.needed + sum(products.values()) - 3 * vector  # ncv = 7 at most
    monkeypatch.setattr(_memory, "available_memory", lambda *args: room)
    _, _, info = call(return_info=True)
    assert 2 + eigen.MIN_EXTRA_VECTORS <= info["ncv"] <= 7


@pytest.mark.parametrize(
    ("num_columns", "error", "match"),
    [
        (1.5, TypeError, r"num_columns: expected a positive int"),
        ("2", TypeError, r"num_columns: expected a positive int"),
        (True, TypeError, r"num_columns: expected a positive int"),
        (0, ValueError, r"num_columns: expected a positive int, got 0"),
        (-3, ValueError, r"num_columns: expected a positive int, got -3"),
    ],
)
def test_num_columns_errors(num_columns, error, match):
    op = torch_operator(cl.GGNLinearOperator)
    with pytest.raises(error, match=match):
        op.memory_estimate(num_columns)
