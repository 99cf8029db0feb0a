"""KFAC and EK-FAC for Hugging Face ``Conv1D`` and for linear layers on sequences.

``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``(d_in, d_out)``: its
KFAC must be that of the ``nn.Linear`` with weight ``W.T`` (tokens as extra
examples, "expand"), and exact where KFAC is exact. EK-FAC on sequence
outputs with sampled or empirical gradients corrects the eigenvalues with
each sequence's whole gradient: the reference forms those by ``torch.func``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvlinops import EKFACLinearOperator, GGNLinearOperator, KFACLinearOperator, losses

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

N, S, D_IN, D_HIDDEN, D_OUT = 3, 4, 3, 5, 4


def _conv1d_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        pytorch_utils.Conv1D(D_HIDDEN, D_IN), nn.Tanh(), pytorch_utils.Conv1D(D_OUT, D_HIDDEN)
    ).double()
    for module in model:  # Conv1D starts with zero biases and small weights
        if isinstance(module, pytorch_utils.Conv1D):
            nn.init.normal_(module.weight)
            nn.init.normal_(module.bias)
    return model


def _linear_twin(model: nn.Sequential) -> nn.Sequential:
    """The same function with ``nn.Linear`` layers (weights transposed)."""
    twin = nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, D_OUT)).double()
    with torch.no_grad():
        for source, target in ((model[0], twin[0]), (model[2], twin[2])):
            target.weight.copy_(source.weight.T)
            target.bias.copy_(source.bias)
    return twin


def _twin_order(model: nn.Sequential) -> np.ndarray:
    """Index ``i`` of the Linear twin's flat parameters holds the Conv1D model's entry ``[i]``."""
    order, start = [], 0
    for p in model.parameters():
        indices = np.arange(start, start + p.numel()).reshape(p.shape)
        order.append((indices.T if p.ndim == 2 else indices).ravel())
        start += p.numel()
    return np.concatenate(order)


def _data(sequence: bool = True) -> list:
    generator = torch.Generator().manual_seed(2)
    shape = (N, S) if sequence else (N,)
    X = torch.randn(*shape, D_IN, generator=generator, dtype=torch.float64)
    y = torch.randint(0, D_OUT, shape, generator=generator)
    return [(X[:2], y[:2]), (X[2:], y[2:])]


def _dense(operator: object) -> np.ndarray:
    return np.asarray(operator @ np.eye(operator.shape[0]))


@pytest.mark.parametrize("kind", ["kfac-type-2", "kfac-mc", "ekfac-empirical"])
def test_conv1d_equals_its_linear_twin_on_sequences(kind: str) -> None:
    model = _conv1d_model()
    twin = _linear_twin(model)
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    name, fisher_type = kind.split("-", 1)
    cls = KFACLinearOperator if name == "kfac" else EKFACLinearOperator
    ops = [
        cls(m, loss, list(m.parameters()), _data(), fisher_type=fisher_type) for m in (model, twin)
    ]
    assert ops[0]._mapping == ops[1]._mapping
    order = _twin_order(model)
    conv1d, linear = _dense(ops[0]), _dense(ops[1])
    np.testing.assert_allclose(conv1d[np.ix_(order, order)], linear, rtol=1e-12, atol=1e-12)


def test_conv1d_kfac_is_exact_for_one_example() -> None:
    """One Conv1D, one example, type-2, weight and bias in one block: KFAC is the GGN."""
    torch.manual_seed(0)
    layer = pytorch_utils.Conv1D(D_OUT, D_IN).double()
    nn.init.normal_(layer.bias)
    X, y = torch.randn(1, D_IN, dtype=torch.float64), torch.randn(1, D_OUT, dtype=torch.float64)
    args = (layer, nn.MSELoss(), list(layer.parameters()), [(X, y)])
    K = KFACLinearOperator(*args, fisher_type="type-2", separate_weight_and_bias=False)
    np.testing.assert_allclose(_dense(K), _dense(GGNLinearOperator(*args)), rtol=1e-12, atol=1e-13)


def _per_sequence_gradients(model: nn.Module, data: list) -> dict[str, torch.Tensor]:
    """``{parameter: (N, *shape)}``: each sequence's summed token loss, differentiated."""
    params = dict(model.named_parameters())

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, p, (x[None],))
        return nn.functional.cross_entropy(z[0], t, reduction="sum")

    X = torch.cat([x for x, _ in data])
    y = torch.cat([t for _, t in data])
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return {name: g.detach() for name, g in grads.items()}


def test_ekfac_on_sequences_corrects_with_whole_sequence_gradients() -> None:
    r"""Λ = Σ_n (Q_Gᵀ G_n Q_A)^∘2 with G_n the gradient of sequence n's summed loss."""
    model = _conv1d_model()
    twin = _linear_twin(model)  # the corrected eigenvalues are in (d_out, d_in) order
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    E = EKFACLinearOperator(twin, loss, list(twin.parameters()), _data(), fisher_type="empirical")
    E.compute_eigenvalue_correction()
    gradients = _per_sequence_gradients(twin, _data())
    for layer, parts in E._mapping.items():
        Q_A = E._input_covariances_eigenvectors[layer]
        Q_G = E._gradient_covariances_eigenvectors[layer]
        weight, bias = gradients[f"{layer}.weight"], gradients[f"{layer}.bias"]
        expected_weight = ((Q_G.T @ weight @ Q_A) ** 2).sum(0)
        expected_bias = ((bias @ Q_G) ** 2).sum(0)
        values = E._corrected_eigenvalues[layer]
        for actual, expected in (
            (values[parts["weight"]], expected_weight),
            (values[parts["bias"]], expected_bias),
        ):
            atol = 1e-12 * float(expected.max())  # some directions have no curvature
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=atol)


def test_ekfac_type_2_still_refuses_sequence_outputs() -> None:
    model = _conv1d_model()
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    with pytest.raises(ValueError, match=r"outputs of shape \(N, C\).*fisher_type='mc'"):
        EKFACLinearOperator(model, loss, list(model.parameters()), _data(), fisher_type="type-2")
