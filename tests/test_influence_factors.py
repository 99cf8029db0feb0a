"""EK-FAC factors for influence (curvlinops.influence_factors.fit_ekfac): the numbers of
compute_eigenvalue_correction, with kept captures, in partitions resumed after an interruption."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_influence_store import _problem as store_problem

from curvlinops import EKFACLinearOperator, KFACLinearOperator, losses
from curvlinops.influence_factors import fit_ekfac

BATCHES = (4, 3, 3)  # three batches of sequences


def _problem() -> tuple:
    """The MLP of test_influence_store on sequences of 6 tokens, in three batches."""
    model, _, _ = store_problem()
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(sum(BATCHES), 6, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(BATCHES), 6), generator=generator)
    data = [(X[:4], y[:4]), (X[4:7], y[4:7]), (X[7:], y[7:])]
    return model, data


def _ekfac(model: object, data: list, **options: object) -> EKFACLinearOperator:
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else options.pop("p")
    options.setdefault("fisher_type", "empirical")
    return EKFACLinearOperator(model, loss, params, data, check_deterministic=False, **options)


def _dense(E: EKFACLinearOperator) -> np.ndarray:
    return np.asarray(E @ np.eye(E.shape[0]))


def _count_forwards(model: torch.nn.Module) -> list:
    calls: list = []
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


@pytest.mark.parametrize("separate", [True, False])
def test_same_factors_as_compute_eigenvalue_correction(separate: bool) -> None:
    model, data = _problem()
    reference = _ekfac(model, data, separate_weight_and_bias=separate)
    expected = _dense(reference)
    one_batch = 4 * 6 * (4 + 5 + 5 + 3) * 8  # the first batch's inputs and output gradients
    for cache_memory, forwards in ((0, 6), (1e9, 3), (one_batch, 5)):
        E = _ekfac(model, data, separate_weight_and_bias=separate)
        calls = _count_forwards(model)
        fit_ekfac(E, cache_memory=cache_memory)
        assert len(calls) == forwards  # each kept batch is not run again
        np.testing.assert_allclose(_dense(E), expected, rtol=1e-13, atol=1e-15 * expected.max())
        model._forward_pre_hooks.clear()


def test_jax_same_factors_as_compute_eigenvalue_correction(tmp_path: object) -> None:
    pytest.importorskip("jax")
    from test_influence_scores import jax_twin

    model, data = _problem()
    model_func, params = jax_twin(model)
    X, y = (torch.cat(arrays) for arrays in zip(*data))
    data = [(X[:5], y[:5]), (X[5:], y[5:])]  # batches of one shape: one compilation
    jax_data = [(X.numpy(), y.numpy()) for X, y in data]
    reference = _ekfac(model_func, jax_data, p=params)
    reference.compute_eigenvalue_correction()
    expected = _eigenvalues(reference)
    E = _ekfac(model_func, jax_data, p=params)
    fit_ekfac(E, cache_memory=1e9, output_dir=tmp_path)
    np.testing.assert_allclose(_eigenvalues(E), expected, rtol=0, atol=1e-14 * expected.max())
    resumed = _ekfac(model_func, jax_data, p=params)
    fit_ekfac(resumed, output_dir=tmp_path)  # every partition read back from its file
    np.testing.assert_array_equal(_eigenvalues(resumed), _eigenvalues(E))
    for name, A in reference._input_covariances.items():  # the factors behind the eigenbases
        np.testing.assert_allclose(E._input_covariances[name], A, rtol=1e-14, atol=0)
        G = reference._gradient_covariances[name]
        np.testing.assert_allclose(E._gradient_covariances[name], G, rtol=1e-14, atol=0)
    torch_E = _ekfac(model, data)
    fit_ekfac(torch_E)  # the same weights in PyTorch: the same eigenvalues (in another order)
    np.testing.assert_allclose(
        np.sort(_eigenvalues(torch_E)), np.sort(expected), rtol=0, atol=1e-12 * expected.max()
    )


def _eigenvalues(E: EKFACLinearOperator) -> np.ndarray:
    """The corrected eigenvalues, layer by layer (no product compiled)."""
    return np.concatenate([np.ravel(np.asarray(v)) for v in E._all_eigenvalues()])


def test_an_interrupted_fit_resumes_from_its_partitions(tmp_path: object) -> None:
    model, data = _problem()
    expected = _dense(_ekfac(model, data))
    E = _ekfac(model, data)
    correct = E._run("captured_correction")
    done: list = []

    def interrupted(*args: object) -> object:
        if len(done) == 1:  # stopped during the second batch of the correction pass
            raise KeyboardInterrupt
        done.append(1)
        return correct(*args)

    E._programs["captured_correction"] = interrupted
    with pytest.raises(KeyboardInterrupt):
        fit_ekfac(E, output_dir=tmp_path, batches_per_partition=1)
    saved = sorted(path.name for path in tmp_path.iterdir())
    assert saved == [
        *(f"ekfac_corrections_partition{p}.safetensors" for p in [0]),
        *(f"ekfac_covariances_partition{p}.safetensors" for p in [0, 1, 2]),
    ]
    resumed = _ekfac(model, data)
    calls = _count_forwards(model)
    fit_ekfac(resumed, output_dir=tmp_path, batches_per_partition=1)
    assert calls == [3, 3]  # the second and third batches' corrections only
    np.testing.assert_allclose(_dense(resumed), expected, rtol=1e-13, atol=1e-15 * expected.max())
    model._forward_pre_hooks.clear()
    with pytest.raises(ValueError, match="output_dir.*fisher_type: 'empirical' there, 'mc' here"):
        fit_ekfac(_ekfac(model, data, fisher_type="mc"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="output_dir.*batches_per_partition: 1 there, 2 here"):
        fit_ekfac(_ekfac(model, data), output_dir=tmp_path, batches_per_partition=2)
    (tmp_path / "ekfac_covariances_partition1.safetensors").unlink()
    other = [(X + 0.5, y) for X, y in data]  # recomputed on other data: other covariances
    with pytest.raises(ValueError, match="output_dir.*covariance_total"):
        fit_ekfac(_ekfac(model, other), output_dir=tmp_path, batches_per_partition=1)


def test_bad_arguments_are_refused() -> None:
    model, data = _problem()
    loss, params = losses.CrossEntropyLoss(reduction="sum", class_axis=-1), list(model.parameters())
    with pytest.raises(TypeError, match="curvature.*EKFACLinearOperator"):
        fit_ekfac(KFACLinearOperator(model, loss, params, data, fisher_type="empirical"))
    E = _ekfac(model, data)
    with pytest.raises(TypeError, match="cache_memory.*number of bytes"):
        fit_ekfac(E, cache_memory="1 GB")
    with pytest.raises(ValueError, match="cache_memory.*>= 0.*-1"):
        fit_ekfac(E, cache_memory=-1)
    with pytest.raises(ValueError, match="batches_per_partition"):
        fit_ekfac(E, batches_per_partition=0)
    with pytest.raises(TypeError, match="output_dir.*folder path"):
        fit_ekfac(E, output_dir=3)


def test_kept_captures_give_the_training_gradients_of_the_scores() -> None:
    from curvlinops.influence_scores import InfluenceScorer

    model, data = _problem()
    query = [(data[1][0][:2], data[1][1][:2])]
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    E = _ekfac(model, data)
    kept = fit_ekfac(E, cache_memory=1e9, keep_captures=True)
    scorer = InfluenceScorer(E, model, loss, list(model.parameters()), damping="heuristic")
    expected = scorer.pairwise_scores(query, data, per_layer=True)
    calls = _count_forwards(model)
    scores = scorer.pairwise_scores(query, data, per_layer=True, train_captures=kept)
    assert calls == [2]  # the queries only: no pass over the training data
    model._forward_pre_hooks.clear()
    for layer, value in expected.items():
        torch.testing.assert_close(scores[layer], value, rtol=1e-13, atol=1e-15)
    calls = _count_forwards(model)
    self_scores = scorer.self_scores(data, train_captures=kept)
    assert calls == []
    model._forward_pre_hooks.clear()
    torch.testing.assert_close(self_scores, scorer.self_scores(data), rtol=1e-13, atol=1e-15)
    in_pieces = InfluenceScorer(  # blocks of two examples: rows of the kept batches
        E, model, loss, list(model.parameters()), damping="heuristic", examples_per_pass=2
    )
    pieces = in_pieces.pairwise_scores(query, data, train_captures=kept)
    torch.testing.assert_close(pieces, sum(expected.values()), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="train_captures.*captures of other inputs or targets"):
        scorer.pairwise_scores(query, [data[1], data[0], data[2]], train_captures=kept)
    mean_scorer = InfluenceScorer(E, model, losses.CrossEntropyLoss(), list(model.parameters()))
    with pytest.raises(ValueError, match="train_captures.*scorer's own EK-FAC"):
        mean_scorer.pairwise_scores(query, data, train_captures=kept)
    with pytest.raises(TypeError, match="train_captures.*KeptCaptures"):
        scorer.self_scores(data, train_captures={})
    with pytest.raises(ValueError, match="keep_captures.*fisher_type='mc'"):
        fit_ekfac(_ekfac(model, data, fisher_type="mc"), keep_captures=True)


@pytest.mark.parametrize("damping", ["heuristic", 1e-3])
def test_module_partitions_add_up_to_the_whole(damping: object, tmp_path: object) -> None:
    """Factors per module partition (an EK-FAC over that partition's parameters, each
    resumable in a folder of its own): the partitions' scores add up to the whole's.

    EK-FAC is block-diagonal over layers, and a layer's factors and corrections do not
    depend on which other layers are measured: so kronfluence's module partitions.
    """
    from curvlinops.influence_scores import InfluenceScorer

    model, data = _problem()
    query = [(data[1][0][:2], data[1][1][:2])]
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    params = list(model.parameters())
    whole = _ekfac(model, data)
    fit_ekfac(whole)
    scorer = InfluenceScorer(whole, model, loss, params, damping=damping)
    expected_pairwise = scorer.pairwise_scores(query, data)
    expected_self = scorer.self_scores(data)
    pairwise, self_scores, layers = 0, 0, []
    for index, partition in enumerate((params[:2], params[2:])):  # a layer each
        E = EKFACLinearOperator(
            model, loss, partition, data, fisher_type="empirical", check_deterministic=False
        )
        fit_ekfac(E, output_dir=tmp_path / f"partition-{index}")
        part = InfluenceScorer(E, model, loss, partition, damping=damping)
        layers += part.layer_names
        pairwise = pairwise + part.pairwise_scores(query, data)
        self_scores = self_scores + part.self_scores(data)
    assert layers == scorer.layer_names
    torch.testing.assert_close(pairwise, expected_pairwise, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(self_scores, expected_self, rtol=1e-12, atol=1e-14)
