"""Data that would give wrong numbers without a word are refused at construction.

Targets that do not suit the loss (out-of-range classes, class indices as
floats, probabilities that are not, shapes that would broadcast) and NaN or
inf in the inputs, targets, outputs or products raise an error that names the
batch and the culprit, for both backends, whether or not the determinism
check runs.
"""

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cases import BY_NAME, build, numpy_data

from curvlinops import (
    EFLinearOperator,
    FisherMCLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    losses,
)

CURVATURES = [HessianLinearOperator, GGNLinearOperator, EFLinearOperator, FisherMCLinearOperator]


def construct(backend_name, case, data, cls=HessianLinearOperator, **options):
    problem = build(case, backend_name)
    return cls(
        problem.model_func, problem.loss_func, problem.params, data, **problem.options, **options
    )


def with_targets(case, targets):
    """The case's data with the targets of the second batch replaced."""
    (X0, y0), (X1, _) = numpy_data(BY_NAME[case])
    return [(X0, y0), (X1, targets)]


N1 = 3  # size of the second batch (cases.BATCH_SIZES)


# --- cross-entropy ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CURVATURES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("check_deterministic", [True, False])
def test_class_indices_out_of_range(backend_name, cls, check_deterministic):
    data = with_targets("mlp-ce-mean", np.array([5, 6, 7]))
    with pytest.raises(
        ValueError,
        match=r"y of data batch 1: expected class indices in \[0, 3\) for outputs with 3 classes"
        r".*got values from 5 to 7\. Number the classes 0\.\.C-1",
    ):
        construct(backend_name, "mlp-ce-mean", data, cls, check_deterministic=check_deterministic)


def test_ignore_index_is_refused(backend_name):
    data = with_targets("mlp-ce-mean", np.array([0, -100, 2]))
    with pytest.raises(ValueError, match=r"got values from -100 to 2\..*ignore_index.*-100"):
        construct(backend_name, "mlp-ce-mean", data, GGNLinearOperator)


def test_class_indices_as_floats(backend_name):
    data = with_targets("mlp-ce-mean", np.array([0.0, 1.0, 2.0]))
    with pytest.raises(
        TypeError,
        match=r"y of data batch 1: expected integer class indices of shape \(3,\) "
        r"\(CrossEntropyLoss\), got .*float.*Cast them, e\.g\. y\.long\(\)",
    ):
        construct(backend_name, "mlp-ce-mean", data)


@pytest.mark.parametrize(
    "targets, error, pattern",
    [
        (np.array([[1.5, -0.5, 0.0]] * N1), ValueError, r"class probabilities in \[0, 1\]"),
        (np.eye(3, dtype=np.int64)[:N1], TypeError, r"floating-point class probabilities"),
        (np.full((N1, 2), 0.5), ValueError, r"class indices of shape \(3,\) or class prob"),
        (np.zeros((N1, 3, 1)), ValueError, r"got shape \(3, 3, 1\)"),
    ],
    ids=["negative", "one-hot-ints", "too-few-classes", "extra-axis"],
)
def test_bad_class_probabilities(backend_name, targets, error, pattern):
    data = with_targets("mlp-ce-mean", targets)
    with pytest.raises(error, match=r"y of data batch 1: expected .*" + pattern):
        construct(backend_name, "mlp-ce-mean", data, EFLinearOperator)


def test_class_axis_one(backend_name):
    """Outputs (N, C, T) with classes on axis 1: labels are (N, T), checked against C."""
    (X0, y0), (X1, y1) = numpy_data(BY_NAME["seq_ct-ce-sum"])
    bad = [(X0, y0), (X1, np.where(y1 == 0, 3, y1))]
    with pytest.raises(ValueError, match=r"in \[0, 3\) .*\(axis 1\), got values from 1 to 3"):
        construct(backend_name, "seq_ct-ce-sum", bad)
    swapped = [(X0, y0), (X1, np.zeros((N1, 3), dtype=np.int64))]  # (N, C): not (N, T)
    with pytest.raises(ValueError, match=r"class indices of shape \(3, 4\) or class prob"):
        construct(backend_name, "seq_ct-ce-sum", swapped)


# --- BCE and MSE --------------------------------------------------------------------------
@pytest.mark.parametrize("low, high", [(-0.5, 0.5), (0.5, 2.0)])
def test_bce_targets_outside_zero_one(backend_name, low, high):
    data = with_targets("mlp-bce-mean", np.linspace(low, high, 3 * N1).reshape(N1, 3))
    with pytest.raises(
        ValueError,
        match=rf"y of data batch 1: expected probabilities in \[0, 1\] \(BCEWithLogitsLoss\), "
        rf"got values from {low:g} to {high:g}",
    ):
        construct(backend_name, "mlp-bce-mean", data, GGNLinearOperator)


@pytest.mark.parametrize("case", ["mlp-mse-mean", "mlp-bce-sum"])
@pytest.mark.parametrize("shape", [(N1,), (N1, 1), (1, 3), (N1, 3, 1)])
def test_targets_that_would_broadcast(backend_name, case, shape):
    data = with_targets(case, np.full(shape, 0.5))
    loss = "MSELoss" if "mse" in case else "BCEWithLogitsLoss"
    with pytest.raises(
        ValueError,
        match=rf"y of data batch 1: expected targets of the outputs' shape \(3, 3\) \({loss}\), "
        rf"got shape \({', '.join(map(str, shape))},?\)\. Reshape them",
    ):
        construct(backend_name, case, data)


# --- NaN and inf ----------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("check_deterministic", [True, False])
def test_non_finite_inputs(backend_name, value, check_deterministic):
    problem = build("mlp-mse-mean", backend_name)
    (X0, y0), (X1, y1) = numpy_data(problem.case)
    X1 = X1.copy()
    X1[1, 2] = value
    data = [(X0, y0), (X1, y1)]
    options = {**problem.options, "check_deterministic": check_deterministic}
    pattern = r"X of data batch 1: expected finite inputs, got NaN or inf values\. Remove"
    with pytest.raises(ValueError, match=pattern):
        HessianLinearOperator(
            problem.model_func, problem.loss_func, problem.params, data, **options
        )
    with pytest.raises(ValueError, match=pattern):
        JacobianLinearOperator(problem.model_func, problem.params, data, **options)


@pytest.mark.parametrize("case", ["mlp-mse-sum", "mlp-bce-mean", "mlp-ce-mean-probs"])
def test_non_finite_targets(backend_name, case):
    (_, y0), (_, y1) = numpy_data(BY_NAME[case])
    y1 = y1.copy()
    y1[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"y of data batch 1: expected finite targets, got NaN"):
        construct(backend_name, case, with_targets(case, y1))


def test_non_finite_targets_of_a_callable_loss(backend_name):
    case = "mlp-quartic-sum-dictparams"
    (_, y0), (_, y1) = numpy_data(BY_NAME[case])
    y1 = y1.copy()
    y1[2, 0] = -np.inf
    with pytest.raises(ValueError, match=r"y of data batch 1: expected finite targets, got NaN"):
        construct(backend_name, case, with_targets(case, y1), GGNLinearOperator)


def test_targets_that_are_not_arrays(backend_name):
    data = with_targets("mlp-mse-mean", {"t": np.zeros((N1, 3))})
    with pytest.raises(
        TypeError, match=r"y of data batch 1: expected an array of targets \(MSELoss\), got dict"
    ):
        construct(backend_name, "mlp-mse-mean", data)


def test_structured_targets_of_a_callable_loss(backend_name):
    """A custom loss may take any structure of targets; NaN anywhere in it is found."""
    problem = build("mlp-mse-mean", backend_name)
    xp = _namespace(backend_name)
    loss = losses.CallableLoss(lambda z, y: xp.sum(y["w"] * (z - y["t"]) ** 2), reduction="sum")
    (X0, y0), (X1, y1) = numpy_data(problem.case)
    data = [(X, {"t": y, "w": np.ones_like(y)}) for X, y in [(X0, y0), (X1, y1)]]
    G = GGNLinearOperator(problem.model_func, loss, problem.params, data, **problem.options)
    mse = GGNLinearOperator(
        problem.model_func, losses.MSELoss("sum"), problem.params, data=[(X0, y0), (X1, y1)]
    )
    v = np.random.default_rng(0).normal(size=G.shape[1])
    np.testing.assert_allclose(_numpy(G @ v), _numpy(mse @ v), rtol=1e-12)
    data[1][1]["w"][2, 1] = np.inf
    with pytest.raises(ValueError, match=r"y of data batch 1: expected finite targets, got NaN"):
        GGNLinearOperator(problem.model_func, loss, problem.params, data, **problem.options)


def _numpy(x):
    return np.asarray(x.detach() if hasattr(x, "detach") else x)


def test_parameters_that_make_outputs_nan(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    if backend_name == "torch":
        import torch

        model_func = copy.deepcopy(problem.model_func)
        with torch.no_grad():
            model_func[2].bias[1] = float("nan")
        params, culprit = list(model_func.parameters()), "2.bias"
    else:
        model_func = problem.model_func
        (W0, b0), (W1, b1) = problem.params
        params, culprit = [(W0, b0), (W1, b1.at[1].set(np.nan))], r"\[1\]\[1\]"
    with pytest.raises(
        ValueError,
        match=r"model_func: expected finite outputs, got NaN or inf outputs on data batch 0, "
        rf"whose inputs are finite\. The parameters \['{culprit}'\] hold NaN or inf",
    ):
        GGNLinearOperator(model_func, problem.loss_func, params, numpy_data(problem.case))


def test_model_that_overflows(backend_name):
    """Finite inputs and parameters, outputs inf on the second batch only."""
    problem = build("mlp-mse-mean", backend_name)
    data = numpy_data(problem.case)
    data[1] = (data[1][0] * 1e3, data[1][1])
    xp, model = _namespace(backend_name), _functional(problem)

    def exploding(params, X):
        outputs = model(params, X)
        return xp.exp(outputs * 1e3) if xp.max(xp.abs(X)) > 100 else outputs

    with pytest.raises(
        ValueError,
        match=r"model_func: expected finite outputs, got NaN or inf outputs on data batch 1, "
        r"whose inputs are finite\. Look for an overflow",
    ):
        JacobianLinearOperator(exploding, problem.params, data, **problem.options)


def test_loss_whose_derivatives_are_nan(backend_name):
    """Finite data, outputs and loss, NaN curvature: the determinism probe says so."""
    problem = build("mlp-mse-mean", backend_name)
    xp = _namespace(backend_name)
    # √(z - z) is 0, its derivative ∞ · 0 = NaN
    loss = losses.CallableLoss(lambda z, y: xp.sum(xp.sqrt(z - z)), reduction="sum")
    with pytest.raises(
        ValueError,
        match=r"HessianLinearOperator of model_func and loss_func: expected finite products, "
        r"got NaN or inf in the product with a random vector",
    ):
        HessianLinearOperator(
            problem.model_func, loss, problem.params, numpy_data(problem.case), **problem.options
        )


def _functional(problem):
    """The problem's model as a function ``(params, X) -> outputs`` of its ``params``."""
    if problem.backend == "jax":
        return problem.model_func
    from torch.func import functional_call

    names = [name for name, _ in problem.model_func.named_parameters()]
    return lambda params, X: functional_call(problem.model_func, dict(zip(names, params)), (X,))


def _namespace(backend_name):
    if backend_name == "torch":
        import torch

        return torch
    import jax.numpy as jnp

    return jnp


# --- warnings ----------------------------------------------------------------------------------
def test_products_emit_no_warnings():
    """A fresh process, every warning an error: forward-mode AD (GGN, Fisher, Jacobian) is quiet.

    PyTorch warns while it loads its forward-mode decompositions, once per process,
    so this runs in a new one.
    """
    pytest.importorskip("torch")
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        import torch, curvlinops as cl
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        params = list(model.parameters())
        data = [(torch.randn(6, 4), torch.arange(6) % 3)]
        loss = torch.nn.CrossEntropyLoss()
        for op in (
            cl.GGNLinearOperator(model, loss, params, data),
            cl.FisherMCLinearOperator(model, loss, params, data),
            cl.JacobianLinearOperator(model, params, data),
        ):
            op @ torch.randn(op.shape[1])
            op @ torch.randn(op.shape[1], 3)
        try:  # the caller's filter is still in force
            warnings.warn("a warning of the caller's", UserWarning)
        except UserWarning:
            print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
