"""PyTorch Hessian products under the grad modes and transforms a user may call them in.

One vector takes plain autograd's double backward (faster), which cannot run
in inference mode or under torch.func transforms: those take the torch.func
path. Every result is checked against ``torch.func.hessian`` in float64.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_close

from curvlinops import HessianLinearOperator


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(theta):
        pieces, start = {}, 0
        for name, p in zip(names, params):
            pieces[name] = theta[start : start + p.numel()].reshape(p.shape)
            start += p.numel()
        z = torch.func.functional_call(model, pieces, (X,))
        return torch.nn.functional.cross_entropy(z, y)

    dense = torch.func.hessian(loss)(flat)
    return model, params, X, y, dense


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_matvec_in_grad_modes(problem, mode):
    model, params, X, y, dense = problem
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)])
    v = torch.randn(H.shape[1], dtype=torch.float64)
    context = {
        "grad": contextlib.nullcontext(),
        "no_grad": torch.no_grad(),
        "inference_mode": torch.inference_mode(),
    }[mode]
    with context:
        Hv = H @ v
    assert_close(Hv, dense @ v)


def test_data_made_in_inference_mode(problem):
    model, params, X, y, dense = problem
    with torch.inference_mode():
        X_inf, y_inf = X.clone(), y.clone()
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(X_inf, y_inf)])
    v = torch.randn(H.shape[1], dtype=torch.float64)
    assert_close(H @ v, dense @ v)


def test_matvec_under_torch_func_vmap(problem):
    model, params, X, y, dense = problem
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)])
    V = torch.randn(3, H.shape[1], dtype=torch.float64)
    assert_close(torch.func.vmap(lambda v: H @ v)(V), V @ dense.T)


def test_one_column_and_many_columns_agree(problem):
    model, params, X, y, dense = problem
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, [(X, y)])
    V = torch.randn(H.shape[1], 5, dtype=torch.float64)
    columns = torch.stack([H @ V[:, j] for j in range(5)], dim=1)  # the autograd path
    assert_close(H @ V, dense @ V)  # the vmapped torch.func path
    assert_close(columns, dense @ V)
    assert_close(H @ V[:, :1], dense @ V[:, :1])  # a (P, 1) matrix: one column
