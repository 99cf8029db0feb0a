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


def test_hugging_face_gpt2_scores_match_the_dense_inverse() -> None:
    """A tiny GPT-2 (Conv1D layers, attention mixing the tokens): EK-FAC scores as
    the explicit inverse of the dense EK-FAC matrix gives them."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=7,
        n_positions=5,
        n_embd=4,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",  # vmap has no batching rule for CPU sdpa
    )
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(config).double().eval()

    class LanguageModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = gpt

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.gpt(input_ids=ids).logits

    model = LanguageModel()
    params = {n: p for n, p in model.named_parameters() if ".h.0.attn." in n or ".h.0.mlp." in n}
    ids = torch.randint(0, 7, (6, 5), generator=torch.Generator().manual_seed(1))
    X, y = ids[:, :-1], ids[:, 1:]
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    E = EKFACLinearOperator(model, loss, params, [(X, y)], fisher_type="empirical")
    assert len(E._mapping) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    scorer = InfluenceScorer(E, model, loss, params, damping="heuristic", curvature_scale=1 / 6)
    scores = scorer.pairwise_scores([(X[:2], y[:2])], [(X, y)]).detach().numpy()

    def sequence_loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(z[0], t, reduction="sum")

    grads = torch.func.vmap(torch.func.grad(sequence_loss), in_dims=(None, 0, 0))(params, X, y)
    G = torch.cat([g.detach().reshape(6, -1) for g in grads.values()], dim=1).T.numpy()
    dense = np.asarray(E @ np.eye(E.shape[0])) / 6
    damping = scorer._per_layer(scorer.damping_per_layer).numpy()
    expected = G[:, :2].T @ np.linalg.solve(dense + np.diag(damping), G)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    tokens = scorer.per_token_scores([(X[:2], y[:2])], [(X, y)]).detach().numpy()
    np.testing.assert_allclose(
        tokens.sum(-1), expected, rtol=0, atol=1e-10 * np.abs(expected).max()
    )
