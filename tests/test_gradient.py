"""gradient_and_loss against autodiff of the loss over the concatenated data."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
from cases import CASE_IDS, _jax_reference_loss, _torch_reference_loss, build
from helpers import assert_close, to_numpy
from test_fisher import concat_data, model_outputs

from curvlinops.backends._arrays import library_of
from curvlinops.gradient import gradient_and_loss


@functools.cache
def reference(name: str, backend: str) -> tuple[np.ndarray, float]:
    """Flat gradient ``Jᵀ ∂L/∂z`` (operator order) and loss ``L`` over all data."""
    problem = build(name, backend)
    X, y = concat_data(problem)
    z = model_outputs(problem, X)
    if backend == "torch":
        from torch.func import grad

        loss = _torch_reference_loss(problem.case)
    else:
        import jax

        loss = _jax_reference_loss(problem.case)

        def grad(f: Any) -> Any:  # one compiled call, not one compilation per operation
            return jax.jit(jax.grad(f))

    if problem.case.loss == "quartic":
        loss = problem.loss_func
    dz = to_numpy(grad(lambda out: loss(out, y))(z)).reshape(-1)
    return problem.dense["J"].T @ dz, float(to_numpy(loss(z, y)))


def compute(problem: Any, **options: Any) -> tuple[Any, Any]:
    options = {k: v for k, v in problem.options.items() if k == "batch_size_fn"} | options
    return gradient_and_loss(
        problem.model_func, problem.loss_func, problem.params, problem.data, **options
    )


@pytest.mark.parametrize("name", CASE_IDS)
def test_gradient_and_loss(name: str, backend_name: str) -> None:
    problem = build(name, backend_name)
    expected_gradient, expected_loss = reference(name, backend_name)
    gradient, loss = compute(problem)
    assert_close(problem.flatten_structure(gradient), expected_gradient, name="gradient")
    assert_close(loss, expected_loss, name="loss")
    assert tuple(np.shape(to_numpy(loss))) == ()
    # the gradient comes in params' structure, as arrays of the backend
    leaves = problem.flatten_structure(problem.params)
    assert leaves.shape == expected_gradient.shape
    assert type(gradient) is type(problem.params)
    if isinstance(problem.params, dict):
        assert list(gradient) == list(problem.params)


def test_flat_gradient_and_determinism_check(backend_name: str) -> None:
    problem = build("mlp-ce-mean-dictparams", backend_name)
    expected_gradient, expected_loss = reference("mlp-ce-mean-dictparams", backend_name)
    gradient, loss = compute(problem, flat=True, check_deterministic=True)
    assert library_of(gradient) == library_of(loss) == backend_name
    assert gradient.shape == expected_gradient.shape
    assert_close(gradient, expected_gradient, name="flat gradient")
    assert_close(loss, expected_loss, name="loss")


def test_same_numbers_on_both_backends() -> None:
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    results = []
    for backend in ("torch", "jax"):
        problem = build("mlp-bce-mean", backend)
        gradient, loss = compute(problem, flat=True)
        results.append((problem.to_canonical(to_numpy(gradient)), float(to_numpy(loss))))
    assert_close(results[0][0], results[1][0], name="gradient torch vs jax")
    assert_close(results[0][1], results[1][1], name="loss torch vs jax")


def test_bad_input(backend_name: str) -> None:
    problem = build("mlp-mse-sum", backend_name)
    args = (problem.model_func, problem.loss_func, problem.params)
    with pytest.raises(ValueError, match="data: expected at least one batch"):
        gradient_and_loss(*args, [])
    with pytest.raises(TypeError, match="data: expected a re-iterable"):
        gradient_and_loss(*args, iter(problem.data))
    with pytest.raises(ValueError, match="num_data: expected the number of data points in data"):
        gradient_and_loss(*args, problem.data, num_data=3)
    with pytest.raises(ValueError, match=r"backend: expected 'torch', 'jax'(, '\w+')* or None"):
        gradient_and_loss(*args, problem.data, backend="numpy")
