"""Bad input gets a clear error: the argument, what was expected, what came, a fix.

TypeError for the wrong kind of object, ValueError for the wrong shape or value.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from cases import build

import curvlinops
from curvlinops import (
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
    JacobianLinearOperator,
)

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy


# --- products ---------------------------------------------------------------------
@pytest.fixture
def ops(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    return problem, problem.operator("H"), problem.operator("J")


def test_wrong_vector_length(ops):
    _, H, J = ops
    P, M = H.shape[0], J.shape[0]
    with pytest.raises(ValueError, match=rf"x: expected {P} rows .*got shape \({P + 1},\)"):
        H @ np.ones(P + 1)
    with pytest.raises(ValueError, match=rf"X: expected {P} rows .*\({P}, K\).*got shape \(3, 2\)"):
        H.matmat(np.ones((3, 2)))
    with pytest.raises(ValueError, match=rf"x: expected {M} rows .*got shape \({P},\)"):
        J.rmatvec(np.ones(P))
    with pytest.raises(ValueError, match=rf"x: expected {P} rows .*got shape \({M},\)"):
        J.T.rmatvec(np.ones(M))


def test_wrong_number_of_dims(ops):
    _, H, _ = ops
    P = H.shape[0]
    with pytest.raises(ValueError, match=rf"x: expected a 1-d or 2-d array with {P} rows, got"):
        H @ np.ones((P, 1, 1))
    with pytest.raises(ValueError, match=rf"X: expected a 2-d array with {P} rows, got shape"):
        H.matmat(np.ones(P))
    with pytest.raises(ValueError, match=rf"x: expected a vector of shape \({P},\) or \({P}, 1\)"):
        H.matvec(np.ones((P, 2)))
    with pytest.raises(ValueError, match="Scalar operands are not allowed with '@'"):
        H @ 2.0


def test_wrong_kind_of_vector(ops):
    problem, H, J = ops
    P = H.shape[0]
    with pytest.raises(TypeError, match=r"x: expected an array \(numpy, torch, jax.*got str"):
        H @ "abc"
    with pytest.raises(TypeError, match=r"x: expected a real .*array.*complex128"):
        H @ (np.ones(P) + 1j)
    with pytest.raises(TypeError, match="x: expected a real numeric array, got .*object"):
        H @ np.array([None] * P)


def test_array_on_another_device(ops):
    """A tensor on another device is refused, naming both devices (CPU-only here: 'meta')."""
    _, H, _ = ops
    x = torch.ones(H.shape[0], dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=r"x: expected an array on the parameters' device.*meta"):
        H @ x


def test_wrong_parameter_structures(ops):
    problem, H, J = ops
    P = H.shape[0]
    with pytest.raises(ValueError, match=r"x: expected 4 parameter-shaped arrays, got 1 arrays"):
        H @ [np.ones(3)]
    wrong = [np.ones(s) for s in problem.param_shapes]
    wrong[-1] = np.ones(7)
    with pytest.raises(ValueError, match=r"x\[3\]: expected shape \(3,\) or \(3, 'K'\)"):
        H @ wrong
    mixed = [np.ones((*s, 2)) for s in problem.param_shapes]
    mixed[0] = np.ones(problem.param_shapes[0])
    with pytest.raises(ValueError, match="x: expected the same number of columns in every array"):
        H @ mixed
    with pytest.raises(ValueError, match=r"x: expected parameter-shaped arrays \(one vector\)"):
        H.matvec(problem.param_structure(np.ones((P, 2))))
    with pytest.raises(ValueError, match=r"X: expected parameter-shaped arrays with a trailing"):
        H.matmat(problem.param_structure(np.ones(P)))
    with pytest.raises(TypeError, match="Parameter lists are taken only where the input space"):
        J.rmatvec(problem.param_structure(np.ones(P)))


def test_bad_composites(ops):
    _, H, J = ops
    with pytest.raises(ValueError, match=r"operand: expected an operator of shape \(51, 51\)"):
        H + J
    with pytest.raises(ValueError, match=r"operand: expected an operator with 51 rows"):
        H @ J
    with pytest.raises(TypeError, match="divisor: expected a scalar"):
        H / H
    with pytest.raises(TypeError, match="power: expected a non-negative integer, got int -1"):
        H**-1
    with pytest.raises(TypeError, match="shape_or_like: expected an int n, a shape"):
        IdentityLinearOperator("P")
    with pytest.raises(ValueError, match=r"shape_or_like: expected a square.*\(2, 3\)"):
        IdentityLinearOperator((2, 3))


# --- construction: PyTorch ------------------------------------------------------------
def torch_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    return model, torch.nn.MSELoss(), list(model.parameters()), [(X, y)]


def test_params_not_the_models():
    model, loss, _, data = torch_problem()
    other = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match=r"params: expected parameters of model_func.*params\[0\]"):
        HessianLinearOperator(model, loss, list(other.parameters()), data)
    with pytest.raises(ValueError, match=r"params: expected names of model_func's .*\['foo'\]"):
        HessianLinearOperator(model, loss, {"foo": model.weight}, data)
    with pytest.raises(ValueError, match="params: expected each parameter once"):
        HessianLinearOperator(model, loss, [model.weight, model.weight], data)


def test_bad_params_torch():
    model, loss, params, data = torch_problem()
    with pytest.raises(TypeError, match="params: expected a list of the model's parameters or a"):
        HessianLinearOperator(model, loss, 3, data)
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        HessianLinearOperator(model, loss, [], data)
    with pytest.raises(ValueError, match=r"params: expected one dtype for all parameters"):
        HessianLinearOperator(
            model, loss, {"weight": model.weight, "bias": model.bias.float()}, data
        )
    with pytest.raises(TypeError, match=r"params\['param_0'\]: expected a floating-point tensor"):
        HessianLinearOperator(lambda p, X: X, loss, [torch.ones(3, dtype=torch.int64)], data)
    with pytest.raises(TypeError, match="model_func: expected a torch.nn.Module or a callable"):
        HessianLinearOperator(3, loss, params, data)


def test_mixed_frameworks():
    model, loss, params, data = torch_problem()
    with pytest.raises(TypeError, match=r"params/model_func: expected objects of one framework, "):
        HessianLinearOperator(model, loss, [model.weight, jnp.ones(2)], data)
    # JAX parameters with a PyTorch module
    with pytest.raises(TypeError, match=r"got both jax and torch .*torch.nn.Module"):
        HessianLinearOperator(model, loss, {"weight": jnp.ones((2, 3))}, data)
    # a PyTorch loss module with JAX parameters
    with pytest.raises(TypeError, match=r"loss_func: expected a loss for JAX.*losses.MSELoss"):
        HessianLinearOperator(
            lambda p, X: X @ p["w"], loss, {"w": jnp.ones((3, 2))}, [(np.ones((4, 3)), None)]
        )
    # operators of two frameworks in one composite
    H_torch = build("mlp-ce-mean", "torch").operator("H")
    H_jax = build("mlp-ce-mean", "jax").operator("H")
    with pytest.raises(TypeError, match="operands: expected operators of one framework"):
        H_torch + H_jax


def test_unknown_reduction():
    model, _, params, data = torch_problem()
    with pytest.raises(
        ValueError, match=r"loss_func.reduction: expected 'mean' or 'sum', got 'none'"
    ):
        HessianLinearOperator(model, torch.nn.MSELoss(reduction="none"), params, data)
    with pytest.raises(ValueError, match="got 'none'. Curvature operators need a scalar loss"):
        GGNLinearOperator(model, torch.nn.CrossEntropyLoss(reduction="none"), params, data)
    for descriptor in (
        curvlinops.losses.MSELoss,
        curvlinops.losses.CrossEntropyLoss,
        curvlinops.losses.BCEWithLogitsLoss,
    ):
        with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum', got 'none'"):
            descriptor(reduction="none")
    with pytest.raises(TypeError, match="reduction: expected 'mean' or 'sum', got NoneType"):
        curvlinops.losses.MSELoss(reduction=None)


def test_loss_without_reduction():
    model, _, params, data = torch_problem()

    def loss(outputs, targets):
        return ((outputs - targets) ** 2).sum()

    with pytest.raises(ValueError, match=r"loss_func: expected a loss whose reduction is known.*"):
        HessianLinearOperator(model, loss, params, data)
    with pytest.raises(ValueError, match=r"CallableLoss\(fn, reduction='mean'\)"):
        GGNLinearOperator(model, loss, params, data)
    # stating it works
    stated = curvlinops.losses.CallableLoss(loss, reduction="sum")
    H = HessianLinearOperator(model, stated, params, data)
    assert H.shape == (8, 8)
    with pytest.raises(TypeError, match="loss_func: expected a loss .*got NoneType"):
        HessianLinearOperator(model, None, params, data)
    with pytest.raises(TypeError, match="loss_func: expected a callable .*got int 3"):
        HessianLinearOperator(model, 3, params, data)


def test_bad_data():
    model, loss, params, data = torch_problem()
    X, y = data[0]
    with pytest.raises(
        ValueError, match=r"data: expected at least one batch \(X, y\), got an empty"
    ):
        HessianLinearOperator(model, loss, params, [])
    with pytest.raises(TypeError, match="data: expected a re-iterable .*got generator.*list"):
        HessianLinearOperator(model, loss, params, (batch for batch in data))
    with pytest.raises(TypeError, match="data: expected a re-iterable .*got list_iterator"):
        HessianLinearOperator(model, loss, params, iter(data))
    with pytest.raises(TypeError, match="data: expected a re-iterable .*got NoneType"):
        HessianLinearOperator(model, loss, params, None)
    with pytest.raises(TypeError, match=r"data batch 0: expected a pair \(X, y\), got tuple"):
        HessianLinearOperator(model, loss, params, [(X,)])
    with pytest.raises(TypeError, match=r"data batch 1: expected a pair \(X, y\), got Tensor"):
        HessianLinearOperator(model, loss, params, [(X, y), X])
    with pytest.raises(TypeError, match=r"data batch 0: expected arrays .*got str 'abc'"):
        HessianLinearOperator(model, loss, params, [("abc", y)])


def test_dict_inputs_need_batch_size_fn():
    model, loss, _, data = torch_problem()
    X, y = data[0]
    params = dict(model.named_parameters())

    def model_func(p, inputs):
        return torch.func.functional_call(model, p, (inputs["a"],))

    with pytest.raises(
        ValueError, match=r"batch_size_fn: expected a function X -> batch size .*dict"
    ):
        HessianLinearOperator(model_func, loss, params, [({"a": X}, y)])
    H = HessianLinearOperator(
        model_func, loss, params, [({"a": X}, y)], batch_size_fn=lambda inputs: len(inputs["a"])
    )
    assert H.num_data == 4
    with pytest.raises(TypeError, match="batch_size_fn: expected a callable or None, got int 3"):
        HessianLinearOperator(model, loss, list(params.values()), data, batch_size_fn=3)


def test_num_data_mismatch():
    model, loss, params, data = torch_problem()
    with pytest.raises(
        ValueError, match=r"num_data: expected the number of data points in data \(4\)"
    ):
        HessianLinearOperator(model, loss, params, data, num_data=5)
    with pytest.raises(ValueError, match="num_data: expected a positive int, got 0"):
        HessianLinearOperator(model, loss, params, data, num_data=0)
    with pytest.raises(TypeError, match="num_data: expected a positive int, got float 4.0"):
        HessianLinearOperator(model, loss, params, data, num_data=4.0)
    assert HessianLinearOperator(model, loss, params, data, num_data=4).num_data == 4


def test_bad_options():
    model, loss, params, data = torch_problem()
    with pytest.raises(
        ValueError, match=r"backend: expected 'torch', 'jax'(, '\w+')* or None, got 'numpy'"
    ):
        HessianLinearOperator(model, loss, params, data, backend="numpy")
    with pytest.raises(ValueError, match="columns_per_pass: expected a positive int, got 0"):
        HessianLinearOperator(model, loss, params, data, columns_per_pass=0)
    with pytest.raises(TypeError, match="columns_per_pass: expected a positive int, got bool"):
        JacobianLinearOperator(model, params, data, columns_per_pass=True)


# --- construction: JAX ------------------------------------------------------------------
def jax_problem():
    def model(p, X):
        return X @ p["w"]

    return model, curvlinops.losses.MSELoss(), {"w": jnp.ones((3, 2))}, [(np.ones((4, 3)), None)]


def test_bad_params_jax():
    model, loss, params, data = jax_problem()
    data = [(np.ones((4, 3)), np.ones((4, 2)))]
    with pytest.raises(TypeError, match="model_func: expected a callable"):
        HessianLinearOperator(3, loss, params, data)
    with pytest.raises(TypeError, match=r"params\[\['w'\]\]: expected a floating-point array"):
        HessianLinearOperator(model, loss, {"w": jnp.ones((3, 2), dtype=jnp.int32)}, data)
    with pytest.raises(ValueError, match=r"params: expected one dtype for all parameters"):
        HessianLinearOperator(
            lambda p, X: X @ p["w"] + p["b"],
            loss,
            {"w": jnp.ones((3, 2)), "b": jnp.ones(2, dtype=jnp.float32)},
            data,
        )
    with pytest.raises(TypeError, match="params: expected PyTorch tensors .* or a JAX pytree"):
        HessianLinearOperator(model, loss, {"w": "abc"}, data)


def test_float64_numpy_params_with_x64_off():
    """JAX without x64 would silently truncate float64 parameters: refused.

    Runs in a subprocess: the test session has x64 enabled (conftest.py).
    """
    code = textwrap.dedent(
        """
        import numpy as np
        import jax
        import curvlinops as cl

        def model(p, X):
            return X @ p["w"]

        data = [(np.ones((2, 3), np.float32), np.ones((2, 1), np.float32))]
        loss = cl.losses.MSELoss()
        try:
            cl.HessianLinearOperator(model, loss, {"w": np.zeros((3, 1))}, data)
            print("built float64 with x64 off")
        except ValueError as error:
            print("ValueError:", error)
        H = cl.HessianLinearOperator(model, loss, {"w": np.zeros((3, 1), np.float32)}, data)
        print("float32:", H.dtype, (H @ np.ones(3)).tolist())
        jax.config.update("jax_enable_x64", True)
        H = cl.HessianLinearOperator(model, loss, {"w": np.zeros((3, 1))}, data)
        jax.config.update("jax_enable_x64", False)
        try:
            H @ np.ones(3)
            print("product with x64 switched off")
        except ValueError as error:
            print("ValueError:", error)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.splitlines()
    assert len(out) == 3, out
    assert out[0].startswith("ValueError: params[['w']]: expected float32 arrays while JAX's")
    assert "jax.config.update('jax_enable_x64', True)" in out[0]
    assert out[1] == "float32: float32 [6.0, 6.0, 6.0]"
    assert out[2].startswith("ValueError: jax_enable_x64: expected True for an operator of float64")
