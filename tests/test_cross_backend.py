"""PyTorch and JAX give the same numbers for the same model, weights and data.

Each case of ``cases.py`` is built for both backends from one set of float64
weights. The backends flatten parameters in different orders:

* PyTorch: the order of the ``params`` list (``model.parameters()`` order), or
  the insertion order of the ``params`` dict;
* JAX: ``jax.tree_util.tree_leaves`` order (dict keys sorted, lists and tuples
  in order).

``Problem.perm`` maps each backend's flat index to a canonical one, so that
products can be compared entry by entry.
"""

import numpy as np
import pytest
from cases import CASE_IDS, CASES, JACOBIAN_CASES, JACOBIAN_IDS, build
from helpers import assert_close

RTOL = 1e-10


def _pair(case):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    return build(case.name, "torch"), build(case.name, "jax")


@pytest.fixture(params=CASES, ids=CASE_IDS)
def pair(request):
    return _pair(request.param)


@pytest.fixture(params=JACOBIAN_CASES, ids=JACOBIAN_IDS)
def jac_pair(request):
    return _pair(request.param)


def _in_canonical_order(problem, kind, V):
    """``A @ V`` for a canonical-order ``V``, reordered back to the canonical order."""
    A = problem.operator(kind)
    return problem.to_canonical(A @ problem.from_canonical(V))


@pytest.mark.parametrize("kind", ["H", "G"])
def test_curvature_products_agree(pair, kind):
    torch_problem, jax_problem = pair
    rng = np.random.default_rng(10)
    P = torch_problem.num_params
    assert jax_problem.num_params == P
    for V in (rng.normal(size=P), rng.normal(size=(P, 3))):
        by_torch = _in_canonical_order(torch_problem, kind, V)
        by_jax = _in_canonical_order(jax_problem, kind, V)
        assert_close(by_torch, by_jax, rtol=RTOL, name=f"{kind} @ v: torch vs jax")


def test_jacobian_products_agree(jac_pair):
    torch_problem, jax_problem = jac_pair
    rng = np.random.default_rng(11)
    J_torch, J_jax = torch_problem.operator("J"), jax_problem.operator("J")
    assert J_torch.shape == J_jax.shape
    M, P = J_torch.shape
    v, u = rng.normal(size=P), rng.normal(size=M)
    # outputs are stacked in the same order (both models give the same layout)
    assert_close(
        J_torch @ torch_problem.from_canonical(v),
        J_jax @ jax_problem.from_canonical(v),
        rtol=RTOL,
        name="J @ v: torch vs jax",
    )
    assert_close(
        torch_problem.to_canonical(J_torch.rmatvec(u)),
        jax_problem.to_canonical(J_jax.rmatvec(u)),
        rtol=RTOL,
        name="Jᵀ @ u: torch vs jax",
    )


def test_references_agree(pair):
    """The two frameworks' dense references agree too (after reordering)."""
    torch_problem, jax_problem = pair
    for kind in ("H", "G"):
        by_torch, by_jax = torch_problem.dense[kind], jax_problem.dense[kind]
        t, j = torch_problem.perm, jax_problem.perm
        canonical_torch = np.empty_like(by_torch)
        canonical_torch[np.ix_(t, t)] = by_torch
        canonical_jax = np.empty_like(by_jax)
        canonical_jax[np.ix_(j, j)] = by_jax
        assert_close(canonical_torch, canonical_jax, rtol=RTOL, name=f"dense {kind}")


def test_flattening_orders_are_as_documented():
    """Dict parameters: PyTorch keeps insertion order, JAX sorts the keys."""
    torch_problem = build("mlp-ce-mean-dictparams", "torch")
    jax_problem = build("mlp-ce-mean-dictparams", "jax")
    # the PyTorch case lists the parameters last layer first
    assert list(torch_problem.params) == ["2.bias", "2.weight", "0.bias", "0.weight"]
    assert torch_problem.operator("H").backend.param_names == list(torch_problem.params)
    # the JAX case is a nested dict {"hidden": {"weight", "bias"}, "out": {...}}
    names = jax_problem.operator("H").backend.param_names
    assert names == [
        "['hidden']['bias']",
        "['hidden']['weight']",
        "['out']['bias']",
        "['out']['weight']",
    ]
    # neither is the canonical order, and the two differ from each other
    identity = np.arange(torch_problem.num_params)
    assert not np.array_equal(torch_problem.perm, identity)
    assert not np.array_equal(jax_problem.perm, identity)
    assert not np.array_equal(torch_problem.perm, jax_problem.perm)
    # list parameters: both in the canonical order
    assert np.array_equal(build("mlp-ce-mean", "torch").perm, identity)
    assert np.array_equal(build("mlp-ce-mean", "jax").perm, identity)
