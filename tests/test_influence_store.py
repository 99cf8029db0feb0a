"""Influence scores in partitions (queries by memory budget, layers), resumed from disk; saved
factors and scores (curvlinops.influence_store)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from curvlinops import EKFACLinearOperator, KFACLinearOperator
from curvlinops.eigen import MemoryBudgetError
from curvlinops.influence_scores import InfluenceScorer
from curvlinops.influence_store import load_factors, load_scores, save_factors, save_scores

N_TRAIN, N_QUERY = 10, 3


def _problem() -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN + N_QUERY, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_QUERY,), generator=generator)
    train = [(X[:4], y[:4]), (X[4:N_TRAIN], y[4:N_TRAIN])]
    query = [(X[N_TRAIN:], y[N_TRAIN:])]
    return model, train, query


def _ekfac(model: torch.nn.Module, train: list, **options: object) -> EKFACLinearOperator:
    loss = torch.nn.CrossEntropyLoss()
    return EKFACLinearOperator(
        model, loss, list(model.parameters()), train, fisher_type="empirical", **options
    )


def _scorer(model: torch.nn.Module, curvature: object, **options: object) -> InfluenceScorer:
    loss, damping = torch.nn.CrossEntropyLoss(), options.pop("damping", "heuristic")
    return InfluenceScorer(
        curvature, model, loss, list(model.parameters()), damping=damping, **options
    )


def test_query_partitions_by_memory_budget_and_layer_partitions() -> None:
    model, train, query = _problem()
    scorer = _scorer(model, _ekfac(model, train), examples_per_pass=1)
    whole = scorer.pairwise_scores(query, train, per_layer=True)
    P, itemsize = 43, 8
    budget = 3 * P * itemsize + 2 * P * itemsize  # room for two query gradients at a time
    partitioned = scorer.pairwise_scores(query, train, per_layer=True, memory_budget=budget)
    for layer in scorer.layer_names:
        torch.testing.assert_close(partitioned[layer], whole[layer], rtol=1e-13, atol=0)
        alone = scorer.pairwise_scores(query, train, layers=[layer])  # EK-FAC: block-diagonal
        torch.testing.assert_close(alone, whole[layer], rtol=1e-13, atol=1e-15)
        self_alone = scorer.self_scores(train, layers=[layer])
        torch.testing.assert_close(
            self_alone, scorer.self_scores(train, per_layer=True)[layer], rtol=1e-13, atol=0
        )
    with pytest.raises(MemoryBudgetError, match="pairwise_scores"):
        scorer.pairwise_scores(query, train, memory_budget=P * itemsize)
    with pytest.raises(ValueError, match=r"layers.*\['0', '2'\].*'1'"):
        scorer.pairwise_scores(query, train, layers=["1"])


def test_an_interrupted_run_resumes_from_its_blocks(tmp_path: object) -> None:
    model, train, query = _problem()
    scorer = _scorer(model, _ekfac(model, train), examples_per_pass=2)
    expected = scorer.pairwise_scores(query, train)
    first = scorer.pairwise_scores(query, train, output_dir=tmp_path, memory_budget=1e9)
    torch.testing.assert_close(first, expected, rtol=1e-13, atol=0)
    blocks = sorted(path.name for path in tmp_path.glob("pairwise_query*_batch*"))
    assert blocks == [
        "pairwise_query0_batch0.safetensors",
        "pairwise_query0_batch1.safetensors",
    ]
    (tmp_path / blocks[1]).unlink()  # as if interrupted during the second batch
    computed = []
    gradients = scorer.gradients
    scorer.gradients = lambda X, y: computed.append(len(X)) or gradients(X, y)
    resumed = scorer.pairwise_scores(query, train, output_dir=tmp_path, memory_budget=1e9)
    torch.testing.assert_close(resumed, expected, rtol=1e-13, atol=0)
    assert sum(computed) == N_QUERY + (N_TRAIN - 4)  # the queries and the missing batch only
    other = _scorer(model, _ekfac(model, train), examples_per_pass=2, damping=0.5)
    with pytest.raises(ValueError, match="output_dir.*damping_per_layer"):
        other.pairwise_scores(query, train, output_dir=tmp_path, memory_budget=1e9)


@pytest.mark.parametrize("name", ["factors.safetensors", "factors.npz"])
@pytest.mark.parametrize("cls", [KFACLinearOperator, EKFACLinearOperator])
def test_saved_factors_load_without_recomputing(cls: type, name: str, tmp_path: object) -> None:
    model, train, _ = _problem()
    loss, params = torch.nn.CrossEntropyLoss(), list(model.parameters())
    K = cls(model, loss, params, train, fisher_type="empirical")
    path = tmp_path / name
    save_factors(K, path)
    assert (path.read_bytes()[:2] == b"PK") == name.endswith(".npz")
    fresh = cls(model, loss, params, train, fisher_type="empirical", check_deterministic=False)

    def refuse() -> None:
        raise AssertionError("recomputed")

    fresh.compute_kronecker_factors = fresh.compute_eigenvalue_correction = refuse
    load_factors(fresh, path)
    eye = np.eye(K.shape[0])
    np.testing.assert_allclose(fresh @ eye, K @ eye, rtol=1e-15, atol=0)
    other = cls(model, loss, params, train, fisher_type="mc", check_deterministic=False)
    with pytest.raises(ValueError, match="path.*fisher_type: 'empirical' there, 'mc' here"):
        load_factors(other, path)
    with pytest.raises(TypeError, match="curvature.*KFACLinearOperator"):
        save_factors(np.eye(3), tmp_path / "no.npz")


def test_saved_scores_keep_their_settings(tmp_path: object) -> None:
    model, train, query = _problem()
    scorer = _scorer(model, _ekfac(model, train))
    scores = scorer.pairwise_scores(query, train, per_layer=True)
    for name in ("scores.safetensors", "scores.npz"):  # .npz: files of earlier versions
        save_scores(tmp_path / name, scores, scorer.settings())
        loaded, settings = load_scores(tmp_path / name)
        assert settings == scorer.settings()
        assert list(loaded) == scorer.layer_names
        for layer, value in loaded.items():
            np.testing.assert_array_equal(value, scores[layer].numpy())
    with pytest.raises(ValueError, match="path.*existing .safetensors or .npz file"):
        load_scores(tmp_path / "missing.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="path.*a .safetensors or .npz file.*unreadable"):
        load_scores(tmp_path / "other.safetensors")


def test_jax_factors_and_scores_round_trip(tmp_path: object) -> None:
    """safetensors in JAX: factors load into a fresh operator, scores keep their values."""
    jax = pytest.importorskip("jax")
    from test_influence_scores import jax_twin

    from curvlinops import losses

    model, train, _ = _problem()
    model_func, params = jax_twin(model)
    data = [tuple(torch.cat(arrays).numpy() for arrays in zip(*train))]  # one shape to compile
    loss = losses.CrossEntropyLoss()
    options = {"fisher_type": "empirical", "check_deterministic": False}
    E = EKFACLinearOperator(model_func, loss, params, data, **options)
    save_factors(E, tmp_path / "factors.safetensors")
    fresh = EKFACLinearOperator(model_func, loss, params, data, **options)
    load_factors(fresh, tmp_path / "factors.safetensors")
    for key in ("input_covariances", "gradient_covariances", "corrected_eigenvalues"):
        saved, loaded = (jax.tree_util.tree_flatten(K.state_dict()[key]) for K in (E, fresh))
        assert loaded[1] == saved[1]  # the same layers and blocks
        for value, back in zip(saved[0], loaded[0]):  # the same arrays back
            np.testing.assert_array_equal(np.asarray(back), np.asarray(value))
    scores = {"['0']": jax.numpy.arange(6.0).reshape(2, 3), "['2']": jax.numpy.ones((2, 3))}
    save_scores(tmp_path / "scores.safetensors", scores, {"backend": "jax"})
    loaded, settings = load_scores(tmp_path / "scores.safetensors")
    assert list(loaded) == list(scores) and settings == {"backend": "jax"}
    for layer, value in scores.items():
        np.testing.assert_array_equal(loaded[layer], np.asarray(value))


def test_low_rank_queries_hold_their_factors_only() -> None:
    """Rank 1: a ``(d_out, d_in)`` block of a query is held as ``d_out + d_in`` numbers."""
    from curvlinops._influence_low_rank import LowRankQueries, held_bytes_per_query

    model, train, query = _problem()
    scorer = _scorer(model, _ekfac(model, train), examples_per_pass=1)
    per_layer = scorer.pairwise_scores(query, train, per_layer=True, query_rank=1)
    total = scorer.pairwise_scores(query, train, query_rank=1)
    torch.testing.assert_close(sum(per_layer.values()), total, rtol=1e-13, atol=1e-15)
    for layer in scorer.layer_names:
        alone = scorer.pairwise_scores(query, train, layers=[layer], query_rank=1)
        torch.testing.assert_close(alone, per_layer[layer], rtol=1e-13, atol=1e-15)
    held = LowRankQueries(scorer, scorer.preconditioned_gradients(query), 1).held
    shapes = [
        tuple(a.shape)
        for _, value in held
        for a in (value if isinstance(value, tuple) else [value])
    ]
    assert shapes == [(3, 5, 1), (3, 1, 4), (5, 1, 3), (3, 3, 1), (3, 1, 5), (3, 1, 3)]
    P, itemsize = 43, 8
    held_per_query = held_bytes_per_query(scorer, 1, scorer.layer_names, itemsize)
    assert held_per_query == (5 + 4 + 5 + 3 + 5 + 3) * itemsize < P * itemsize
    budget = 3 * P * itemsize + 2 * held_per_query  # two low-rank queries, one dense
    selection = scorer._selection(None)
    assert scorer._query_partition_size(selection, budget, 1) == 2
    assert scorer._query_partition_size(selection, budget) == 1
    partitioned = scorer.pairwise_scores(query, train, memory_budget=budget, query_rank=1)
    torch.testing.assert_close(partitioned, total, rtol=1e-13, atol=1e-15)


def test_without_safetensors_the_error_says_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'curvlinops\[influence\]'.*\.npz"):
        save_scores(tmp_path / "scores.safetensors", np.ones(3))
    save_scores(tmp_path / "scores.npz", np.ones(3))  # .npz needs no safetensors
    np.testing.assert_array_equal(load_scores(tmp_path / "scores.npz")[0], np.ones(3))
