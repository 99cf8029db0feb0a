"""Per-token influence scores of a sequence model (InfluenceScorer.per_token_scores).

The model applies the same MLP to every token, so a token's gradient is that
of its own loss: its per-token score must equal the pairwise score of the
token taken as an example, and the tokens' scores must sum to the sequence's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_influence_scores import jax_twin

from curvlinops import EKFACLinearOperator, GGNLinearOperator, losses
from curvlinops.influence_scores import InfluenceScorer

N, S, D_IN, C = 6, 4, 3, 4


def _problem() -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, 5), torch.nn.Tanh(), torch.nn.Linear(5, C)
    ).double()
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(N, S, D_IN, generator=generator, dtype=torch.float64)
    y = torch.randint(0, C, (N, S), generator=generator)
    return model, X, y


@pytest.mark.parametrize("separate_weight_and_bias", [True, False])
def test_token_scores_are_the_scores_of_tokens_as_examples(separate_weight_and_bias: bool) -> None:
    model, X, y = _problem()
    loss, params = losses.CrossEntropyLoss(reduction="sum", class_axis=-1), list(model.parameters())
    E = EKFACLinearOperator(
        model,
        loss,
        params,
        [(X, y)],
        fisher_type="empirical",
        separate_weight_and_bias=separate_weight_and_bias,
    )
    scorer = InfluenceScorer(E, model, loss, params, damping="heuristic", examples_per_pass=4)
    query = [(X[:2], y[:2])]
    tokens = scorer.per_token_scores(query, [(X, y)])
    assert tokens.shape == (2, N, S)
    scale = float(tokens.abs().max())
    as_examples = scorer.pairwise_scores(query, [(X.reshape(-1, D_IN), y.reshape(-1))])
    torch.testing.assert_close(tokens, as_examples.reshape(2, N, S), rtol=0, atol=1e-13 * scale)
    pairwise = scorer.pairwise_scores(query, [(X, y)])
    torch.testing.assert_close(tokens.sum(-1), pairwise, rtol=0, atol=1e-13 * scale)


def test_per_token_scores_need_kfac() -> None:
    model, X, y = _problem()
    loss, params = losses.CrossEntropyLoss(reduction="sum", class_axis=-1), list(model.parameters())
    G = GGNLinearOperator(model, loss, params, [(X, y)])
    scorer = InfluenceScorer(G, model, loss, params, damping=1.0)
    with pytest.raises(TypeError, match="curvature.*KFACLinearOperator.*per-token"):
        scorer.per_token_scores([(X[:1], y[:1])], [(X, y)])


def test_jax_token_scores_equal_torch_token_scores() -> None:
    model, X, y = _problem()
    model_func, params = jax_twin(model)
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    data = [(X.numpy(), y.numpy())]
    E = EKFACLinearOperator(model_func, loss, params, data, fisher_type="empirical")
    ours = InfluenceScorer(E, model_func, loss, params, damping="heuristic")
    jax_tokens = np.asarray(ours.per_token_scores([(X[:2].numpy(), y[:2].numpy())], data))
    torch_params = list(model.parameters())
    E_torch = EKFACLinearOperator(model, loss, torch_params, [(X, y)], fisher_type="empirical")
    theirs = InfluenceScorer(E_torch, model, loss, torch_params, damping="heuristic")
    torch_tokens = theirs.per_token_scores([(X[:2], y[:2])], [(X, y)]).numpy()
    atol = 1e-12 * np.abs(torch_tokens).max()
    np.testing.assert_allclose(jax_tokens, torch_tokens, rtol=0, atol=atol)
