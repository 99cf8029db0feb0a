"""Bad input to KFAC state dicts, inverses, influence functions and weighted losses.

Each case gets a clear error of ours (argument, expected, got, fix), a warning
that names the numerical trouble, or a result checked against a dense
reference; on both backends where the feature exists.
"""

import copy
import warnings

import numpy as np
import pytest
from helpers import assert_close

import curvlinops as cl
from curvlinops import (
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    losses,
)
from curvlinops.influence import ResponseJacobianLinearOperator, influence_on_test_loss

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

N, D, H, C = 12, 4, 5, 3


def _torch_mlp(width: int = H) -> "torch.nn.Module":
    torch.manual_seed(0)
    layers = (torch.nn.Linear(D, width), torch.nn.Tanh(), torch.nn.Linear(width, C))
    return torch.nn.Sequential(*layers).double()


def _jax_mlp(p, x):
    return jnp.tanh(x @ p[0].T + p[1]) @ p[2].T + p[3]


def _problem(backend: str, width: int = H, seed: int = 0) -> dict:
    """A tanh MLP with cross-entropy, the same weights and data in both frameworks."""
    model = _torch_mlp(width)
    rng = np.random.default_rng(seed)
    X, y = rng.normal(size=(N, D)), rng.integers(0, C, size=N)
    if backend == "torch":
        data = [(torch.as_tensor(X), torch.as_tensor(y))]
        return dict(
            model=model,
            loss=torch.nn.CrossEntropyLoss(),
            params=list(model.parameters()),
            data=data,
            X=data[0][0],
            y=data[0][1],
            native=torch.as_tensor,
        )
    params = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]
    X, y = jnp.asarray(X), jnp.asarray(y)
    return dict(
        model=_jax_mlp,
        loss=losses.CrossEntropyLoss(),
        params=params,
        data=[(X, y)],
        X=X,
        y=y,
        native=jnp.asarray,
    )


def _kfac(p: dict, cls=KFACLinearOperator, **options) -> KFACLinearOperator:
    options.setdefault("fisher_type", "type-2")
    return cls(p["model"], p["loss"], p["params"], p["data"], **options)


# --- singular Kronecker factors -------------------------------------------------------
def test_undamped_inverse_of_cross_entropy_factor_warns(backend_name):
    """The softmax Hessian has rank C - 1: its factor's inverse without damping is rounding."""
    K = _kfac(_problem(backend_name))
    v = np.random.default_rng(1).normal(size=K.shape[0])
    with pytest.warns(RuntimeWarning, match=r"gradient covariance of layer .* singular to working"):
        KFACInverseLinearOperator(K, damping=0.0) @ v
    with pytest.warns(RuntimeWarning, match=r"Kronecker block of layer .*condition number"):
        KFACInverseLinearOperator(K, damping=0.0, use_exact_damping=True) @ v
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damped inverse says nothing, and is right
        x = KFACInverseLinearOperator(K, damping=1e-2, use_exact_damping=True) @ v
    dense = np.asarray(K @ np.eye(K.shape[0]))
    assert_close(x, np.linalg.solve(dense + 1e-2 * np.eye(K.shape[0]), v))


def test_undamped_ekfac_inverse_warns(backend_name):
    E = _kfac(_problem(backend_name), EKFACLinearOperator)
    v = np.random.default_rng(1).normal(size=E.shape[0])
    with pytest.warns(RuntimeWarning, match=r"the EKFAC operator plus damping 0 is singular"):
        KFACInverseLinearOperator(E, damping=0.0, use_exact_damping=True) @ v


def test_logdet_and_det_of_singular_and_regular_operators(backend_name):
    p = _problem(backend_name)
    K, E = _kfac(p), _kfac(p, EKFACLinearOperator)
    for op in (K, E):
        assert float(op.logdet) == -np.inf
        assert float(op.det) == 0.0
    # with MSE the factors are regular: the closed forms equal the dense matrix's
    mse = losses.MSELoss() if backend_name == "jax" else torch.nn.MSELoss()
    targets = p["native"](np.random.default_rng(2).normal(size=(N, C)))
    for cls in (KFACLinearOperator, EKFACLinearOperator):
        op = cls(p["model"], mse, p["params"], [(p["X"], targets)], fisher_type="type-2")
        sign, logabsdet = np.linalg.slogdet(np.asarray(op @ np.eye(op.shape[0])))
        assert sign > 0
        assert_close(float(op.logdet), logabsdet, rtol=1e-8)
        assert_close(float(op.det), np.exp(logabsdet), rtol=1e-8)


# --- influence: test data gets the checks of training data ------------------------------
@pytest.fixture
def influence_args(backend_name):
    p = _problem(backend_name)
    G = cl.GGNLinearOperator(p["model"], p["loss"], p["params"], p["data"])
    G = G + 0.1 * cl.IdentityLinearOperator(G)
    return p, (G, p["model"], p["loss"], p["params"], p["data"])


@pytest.mark.parametrize(
    "fault, pattern",
    [
        ("label", r"y of test_data: expected class indices in \[0, 3\)"),
        ("negative label", r"y of test_data: expected class indices in \[0, 3\)"),
        ("features", r"X of test_data: expected inputs the model accepts, like the training"),
        ("labels count", r"y of test_data: expected class indices of shape \(2,\)"),
        ("nan", r"X of test_data: expected finite inputs, got NaN"),
    ],
)
def test_influence_checks_test_data(influence_args, fault, pattern):
    p, args = influence_args
    X, y = np.asarray(p["X"][:2]), np.asarray(p["y"][:2])
    if fault == "label":
        y = np.array([7, 1])
    elif fault == "negative label":
        y = np.array([-1, 1])
    elif fault == "features":
        X = X[:, :3]
    elif fault == "labels count":
        y = np.asarray(p["y"][:3])
    else:
        X = X.copy()
        X[0, 0] = np.nan
    with pytest.raises(ValueError, match=pattern):
        influence_on_test_loss(*args, (p["native"](X), p["native"](y)))


def test_influence_checks_training_batches(influence_args):
    p, (G, model, loss, params, _) = influence_args
    bad = [(p["X"], p["y"]), (p["X"], p["native"](np.full(N, 5)))]
    with pytest.raises(ValueError, match=r"y of train_data batch 1: expected class indices"):
        influence_on_test_loss(G, model, loss, params, bad, (p["X"][:2], p["y"][:2]))


# --- weighted cross-entropy -------------------------------------------------------------
def _weighted(reduction: str) -> "torch.nn.CrossEntropyLoss":
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    return torch.nn.CrossEntropyLoss(weight=weight, reduction=reduction)


def test_weighted_mean_cross_entropy_is_refused_where_terms_are_taken_apart():
    p = _problem("torch")
    args = (p["model"], _weighted("mean"), p["params"], p["data"])
    with pytest.raises(ValueError, match=r"class weights .*reduction='mean'.*Use reduction='sum'"):
        cl.EFLinearOperator(*args)
    with pytest.raises(ValueError, match=r"KFAC's per-example gradients.*class weights"):
        KFACLinearOperator(*args, fisher_type="empirical")
    with pytest.raises(ValueError, match=r"class weights \(weight=\.\.\.\) is what is not supp"):
        KFACLinearOperator(*args, fisher_type="type-2")
    with pytest.raises(ValueError, match=r"sample targets.*class weights \(weight=\.\.\.\) is"):
        cl.FisherMCLinearOperator(*args)
    halves = [(p["X"][:6], p["y"][:6]), (p["X"][6:], p["y"][6:])]
    with pytest.raises(ValueError, match=r"data in several batches .*class weights"):
        cl.HessianLinearOperator(p["model"], _weighted("mean"), p["params"], halves)


def test_weighted_cross_entropy_honoured_where_accepted():
    """One batch with mean, any batches with sum: the weighted loss's own matrices."""
    from torch.func import functional_call, hessian, jacrev, vmap

    p = _problem("torch")
    model, X, y = p["model"], p["X"], p["y"]
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([q.detach().reshape(-1) for q in p["params"]])

    def unflatten(theta):
        pieces, start = {}, 0
        for name, q in zip(names, p["params"]):
            pieces[name] = theta[start : start + q.numel()].reshape(q.shape)
            start += q.numel()
        return pieces

    def loss_of(loss, theta, X, y):
        return loss(functional_call(model, unflatten(theta), (X,)), y)

    H = cl.HessianLinearOperator(model, _weighted("mean"), p["params"], p["data"])
    assert_close(
        H @ np.eye(H.shape[0]), hessian(lambda t: loss_of(_weighted("mean"), t, X, y))(flat)
    )
    halves = [(X[:6], y[:6]), (X[6:], y[6:])]
    EF = cl.EFLinearOperator(model, _weighted("sum"), p["params"], halves)
    per_example = vmap(
        jacrev(lambda t, x, t_: loss_of(_weighted("sum"), t, x[None], t_[None])),
        in_dims=(None, 0, 0),
    )(flat, X, y)
    assert_close(EF @ np.eye(EF.shape[0]), per_example.T @ per_example)


# --- KFAC state dicts are checked whole before anything is written ----------------------
def _parameters_of(K) -> list[np.ndarray]:
    return (
        [np.array(leaf) for leaf in jax.tree_util.tree_leaves(K.backend.primals)]
        if (K.backend.name == "jax")
        else [q.detach().numpy().copy() for q in K.backend.primals]
    )


def _changed(state: dict, change) -> dict:
    state = copy.deepcopy(state)
    change(state)
    return state


def test_state_dict_of_another_model_is_refused_before_any_write(backend_name):
    K = _kfac(_problem(backend_name))
    K.compute_kronecker_factors()
    before = _parameters_of(K)
    other = _kfac(_problem(backend_name, width=7, seed=1))
    other.compute_kronecker_factors()
    with pytest.raises(ValueError, match=r"state_dict\['model_func_state_dict'\].*expected") as e:
        K.load_state_dict(other.state_dict())
    if backend_name == "torch":  # also what curvlinops-for-pytorch's callers catch
        with pytest.raises(RuntimeError, match="loading state_dict"):
            raise e.value
    for old, new in zip(before, _parameters_of(K)):
        np.testing.assert_array_equal(old, new)


def test_state_dict_faults_are_named(backend_name):
    p = _problem(backend_name)
    K = _kfac(p)
    K.compute_kronecker_factors()
    state = K.state_dict()
    last = list(K._mapping)[-1]  # "2" in PyTorch; JAX names layers by their weights
    eye3, nan = p["native"](np.eye(3)), p["native"](np.full((H, H), np.nan))
    cases = [
        (lambda s: s["input_covariances"].pop(last), r"\['input_covariances'\]: expected factors"),
        (lambda s: s["input_covariances"].__setitem__(last, eye3), r"\]: expected shape \(5, 5\)"),
        (lambda s: s["input_covariances"].__setitem__(last, nan), r"\]: expected finite values"),
        (lambda s: s.pop("num_data"), r"state_dict: expected a state .*without \['num_data'\]"),
        (lambda s: s.__setitem__("num_data", 5), r"state_dict\['num_data'\]: expected .*\(12\)"),
    ]
    for change, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            K.load_state_dict(_changed(state, change))
    E = _kfac(p, EKFACLinearOperator)
    with pytest.raises(ValueError, match=r"got a KFACLinearOperator's state \(without"):
        E.load_state_dict(state)
    with pytest.warns(UserWarning, match="overwrite the parameters"):
        K.load_state_dict(state)  # the untouched state still loads
    assert_close(K @ np.eye(K.shape[0]), _kfac(p) @ np.eye(K.shape[0]))


# --- response Jacobian ------------------------------------------------------------------
def test_response_jacobian_objective_and_hyperparams(backend_name):
    if backend_name == "torch":
        w, theta = [torch.zeros(2, dtype=torch.float64)], [torch.ones(2, dtype=torch.float64)]
    else:
        w, theta = jnp.zeros(2), jnp.ones(2)

    def vector(w, t):
        return (jax.tree_util.tree_leaves(w)[0] - jax.tree_util.tree_leaves(t)[0]) ** 2

    with pytest.raises(ValueError, match=r"objective: expected a scalar value .*shape \(2,\)"):
        ResponseJacobianLinearOperator(vector, w, theta)
    with pytest.raises(TypeError, match=r"hyperparams: expected arrays of the params' framework"):
        ResponseJacobianLinearOperator(lambda w, t: vector(w, [t]).sum(), w, 1.0)


# --- models, vectors and data of the wrong kind -------------------------------------------
def test_models_that_return_a_tuple_or_a_dict(backend_name):
    p = _problem(backend_name)
    if backend_name == "torch":

        class Wrapped(torch.nn.Module):
            def __init__(self, inner, as_dict):
                super().__init__()
                self.inner, self.as_dict = inner, as_dict

            def forward(self, x):
                out = self.inner(x)
                return {"logits": out} if self.as_dict else (out, x)

        models = [Wrapped(p["model"], False), Wrapped(p["model"], True)]
        params = [list(m.parameters()) for m in models]
    else:
        models = [lambda q, x: (_jax_mlp(q, x), x), lambda q, x: {"logits": _jax_mlp(q, x)}]
        params = [p["params"]] * 2
    patterns = [r"returned a tuple of 2.*model\(\.\.\.\)\[0\]", r"keys \['logits'\]"]
    for model, params_, pattern in zip(models, params, patterns):
        with pytest.raises(TypeError, match=r"model_func: expected a model that returns one array"):
            cl.HessianLinearOperator(model, p["loss"], params_, p["data"])
        with pytest.raises(TypeError, match=pattern):
            cl.GGNLinearOperator(model, p["loss"], params_, p["data"])


def test_nan_in_the_vector_is_named(backend_name):
    p = _problem(backend_name)
    Hop = cl.HessianLinearOperator(p["model"], p["loss"], p["params"], p["data"])
    with pytest.warns(RuntimeWarning, match=r"the input x contains NaN or inf"):
        Hop @ np.full(Hop.shape[0], np.nan)


def test_float32_data_for_a_float64_torch_model():
    p = _problem("torch")
    data = [(p["X"].float(), p["y"])]
    with pytest.raises(
        ValueError,
        match=r"X of data batch 0: expected inputs of the parameters' dtype float64, "
        r"got dtype float32.*X\.to\(torch\.float64\)",
    ):
        cl.HessianLinearOperator(p["model"], p["loss"], p["params"], data)
