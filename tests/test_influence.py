"""Response Jacobians and influence functions on L2-regularised logistic regression.

The references are numpy: Newton's method re-solves the (convex) problem to
machine precision for leave-one-out retraining and for finite differences.
With a KFAC or EKFAC curvature (EK-FAC influence), the references are dense:
per-example gradients by autodiff, one at a time, and the dense Hessian or GGN.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from helpers import assert_close, to_numpy

from curvlinops import (
    CGInverseLinearOperator,
    EKFACLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    IdentityLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops.influence import ResponseJacobianLinearOperator, influence_on_test_loss
from curvlinops.inverse import ConvergenceWarning

N_TRAIN, N_TEST, FEATURES = 60, 20, 5
L2 = 0.2  # on the mean loss; weaker L2 makes removals less linear (r = 0.988 at 0.05)
BIAS_PENALTY = 0.1
FEATURE_PENALTIES = np.array([0.02, 0.05, 0.1, 0.2, 0.4])


# --- numpy reference: logistic regression and Newton's method --------------------------------
@functools.cache
def dataset():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N_TRAIN + N_TEST, FEATURES))
    logits = X @ np.array([1.5, -2.0, 0.5, 1.0, 0.0]) + 0.3
    y = (rng.random(N_TRAIN + N_TEST) < 1 / (1 + np.exp(-logits))).astype(np.float64)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def augmented(X):
    return np.hstack([X, np.ones((X.shape[0], 1))])


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def losses(theta, X, y):
    """Per-example BCE-with-logits losses ℓ_n for weights θ = (w, b)."""
    z = augmented(X) @ theta
    return np.logaddexp(0.0, z) - y * z


def per_example_gradients(theta, X, y):
    """Columns ∇ℓ_n, shape (P, N)."""
    A = augmented(X)
    return (A * (sigmoid(A @ theta) - y)[:, None]).T


def minimise(penalties, weights=None, theta=None):
    """argmin (1/N) Σ c_n ℓ_n + ½ θᵀ diag(penalties) θ, by Newton's method."""
    X, y, _, _ = dataset()
    c = np.ones(N_TRAIN) if weights is None else weights
    A = augmented(X)
    theta = np.zeros(FEATURES + 1) if theta is None else theta.copy()
    for _ in range(100):
        p = sigmoid(A @ theta)
        gradient = A.T @ (c * (p - y)) / N_TRAIN + penalties * theta
        hessian = (A * (c * p * (1 - p))[:, None]).T @ A / N_TRAIN + np.diag(penalties)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.max(np.abs(step)) < 1e-15:
            break
    return theta, hessian


def uniform_penalties(l2=L2):
    return np.full(FEATURES + 1, l2)


def feature_penalties(theta_hyper):
    return np.append(theta_hyper, BIAS_PENALTY)


# --- operators of each backend -------------------------------------------------------------------
def logistic_regression(backend_name, theta):
    """Model, loss, parameters (w then b) at θ, and the data as native/numpy batches."""
    X, y, X_test, y_test = dataset()
    if backend_name == "torch":
        import torch

        model = torch.nn.Linear(FEATURES, 1).double()
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(theta[:FEATURES])[None])
            model.bias.copy_(torch.from_numpy(theta[FEATURES:]))

        def as_batch(A, t):
            return torch.from_numpy(A), torch.from_numpy(t)[:, None]

        return model, torch.nn.BCEWithLogitsLoss(), list(model.parameters()), as_batch
    import jax.numpy as jnp

    from curvlinops.losses import BCEWithLogitsLoss

    def model(p, x):
        return x @ p[0] + p[1]

    params = [jnp.asarray(theta[:FEATURES, None]), jnp.asarray(theta[FEATURES:])]

    def as_batch(A, t):
        return jnp.asarray(A), jnp.asarray(t)[:, None]

    return model, BCEWithLogitsLoss(), params, as_batch


def regularised_hessian(backend_name, theta):
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, _, _ = dataset()
    H = HessianLinearOperator(model, loss, params, [as_batch(X, y)])
    return H + L2 * IdentityLinearOperator(H)


def influences(backend_name, theta, **options):
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, X_test, y_test = dataset()
    H = regularised_hessian(backend_name, theta)
    halves = [as_batch(X[:30], y[:30]), as_batch(X[30:], y[30:])]
    return influence_on_test_loss(
        H, model, loss, params, halves, as_batch(X_test, y_test), tol=1e-12, **options
    )


# --- influence functions ------------------------------------------------------------------------
def test_influence_matches_the_dense_formula(backend_name):
    theta, H = minimise(uniform_penalties())
    X, y, X_test, y_test = dataset()
    expected = -per_example_gradients(theta, X_test, y_test).T @ np.linalg.solve(
        H, per_example_gradients(theta, X, y)
    )
    result = influences(backend_name, theta, examples_per_pass=16)
    assert type(result).__module__.split(".")[0] in ("torch", "jaxlib", "jax")
    assert tuple(result.shape) == (N_TEST, N_TRAIN)
    assert_close(result, expected)


def leave_one_out_changes(theta):
    """Test-loss change when each training point is removed, by retraining (Newton)."""
    _, _, X_test, y_test = dataset()
    base = losses(theta, X_test, y_test).mean()
    changes = []
    for i in range(N_TRAIN):
        weights = np.ones(N_TRAIN)
        weights[i] = 0.0
        theta_i, _ = minimise(uniform_penalties(), weights, theta)
        changes.append(losses(theta_i, X_test, y_test).mean() - base)
    return np.array(changes)


def test_influence_predicts_leave_one_out_retraining(backend_name):
    """Pearson r >= 0.99 between predicted and retrained test-loss changes (60 points)."""
    theta, _ = minimise(uniform_penalties())
    # removing point i is weight ε = -1/N; the test loss is the mean over test points
    predicted = -to_numpy(influences(backend_name, theta)).mean(axis=0) / N_TRAIN
    actual = leave_one_out_changes(theta)
    r = float(np.corrcoef(predicted, actual)[0, 1])
    print(f"{backend_name}: Pearson r = {r:.6f} over {N_TRAIN} leave-one-out retrainings")
    assert r >= 0.99
    slope = np.polyfit(predicted, actual, 1)[0]  # the scale, not only the correlation
    assert 0.9 < slope < 1.2, f"least-squares slope of retrained on predicted: {slope:.3f}"


def test_influence_errors(backend_name):
    theta, _ = minimise(uniform_penalties())
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, X_test, y_test = dataset()
    H = regularised_hessian(backend_name, theta)
    train, test = [as_batch(X, y)], as_batch(X_test, y_test)
    with pytest.raises(ValueError, match=r"hessian: expected a \(6, 6\) operator.*shape \(5, 5\)"):
        influence_on_test_loss(np.eye(5), model, loss, params, train, test)
    with pytest.raises(TypeError, match="hessian: expected a 6 x 6 operator"):
        influence_on_test_loss("H", model, loss, params, train, test)
    with pytest.raises(TypeError, match=r"test_data: expected one batch \(X_test, y_test\)"):
        influence_on_test_loss(H, model, loss, params, train, [test, test, test])
    with pytest.raises(ValueError, match="examples_per_pass: expected an integer >= 1, got 0"):
        influence_on_test_loss(H, model, loss, params, train, test, examples_per_pass=0)
    with pytest.raises(TypeError, match="data: expected a re-iterable"):
        influence_on_test_loss(H, model, loss, params, iter(train), test)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        influence_on_test_loss(H, model, loss, params, train, test, maxiter=1)


# --- response Jacobian ---------------------------------------------------------------------------
def objective_for(backend_name):
    """(w, b), per-feature penalties θ -> mean BCE + ½ Σ θ_k w_k² + ½ c b², and array makers."""
    if backend_name == "torch":
        import torch

        xp, array = torch, torch.from_numpy
    else:
        import jax.numpy as jnp

        xp, array = jnp, jnp.asarray

    def objective(params, hyper, X, y):
        w, b = params
        z = X @ w + b
        softplus = (z + xp.abs(z)) / 2 + xp.log1p(xp.exp(-xp.abs(z)))
        penalty = xp.sum(hyper[0] * w * w) + BIAS_PENALTY * xp.sum(b * b)
        return xp.mean(softplus - y * z) + 0.5 * penalty

    return objective, array


def response_jacobian(backend_name, hyper, **options):
    theta, _ = minimise(feature_penalties(hyper))
    objective, array = objective_for(backend_name)
    X, y, _, _ = dataset()
    params = [array(theta[:FEATURES]), array(theta[FEATURES:])]
    J = ResponseJacobianLinearOperator(
        objective, params, [array(hyper)], [(array(X), array(y))], tol=1e-12, **options
    )
    return J, theta


def finite_difference_jacobian(hyper, step=1e-5):
    columns = []
    for k in range(hyper.size):
        e = np.zeros_like(hyper)
        e[k] = step
        plus, _ = minimise(feature_penalties(hyper + e))
        minus, _ = minimise(feature_penalties(hyper - e))
        columns.append((plus - minus) / (2 * step))
    return np.stack(columns, axis=1)


def test_response_jacobian_matches_finite_differences(backend_name):
    J, theta = response_jacobian(backend_name, FEATURE_PENALTIES)
    assert J.shape == (FEATURES + 1, FEATURES)
    dense = J @ np.eye(FEATURES)
    assert_close(dense, finite_difference_jacobian(FEATURE_PENALTIES), rtol=1e-6)
    # the mixed derivative of ½ Σ θ_k w_k² is w_k e_k
    expected_mixed = np.vstack([np.diag(theta[:FEATURES]), np.zeros((1, FEATURES))])
    assert_close(J.mixed @ np.eye(FEATURES), expected_mixed)
    assert_close(J.mixed.T @ np.eye(FEATURES + 1), expected_mixed.T)
    # adjoint (hypergradients), also from parameter-shaped inputs
    assert_close(J.T @ np.eye(FEATURES + 1), dense.T, rtol=1e-9)
    u = np.arange(1.0, FEATURES + 2.0)
    # lists in, lists out: the hyperparameters' structure ([array(hyper)])
    assert_close(J.T @ [u[:FEATURES], u[FEATURES:]], [dense.T @ u], rtol=1e-9)
    assert J.inverse.info.converged.all()


def test_response_jacobian_for_a_scalar_l2_strength(backend_name):
    """θ = λ scales every penalty: dw*/dλ = -H⁻¹ w*."""
    objective_vector, array = objective_for(backend_name)

    def objective(params, hyper, X, y):
        w, b = params
        scaled = [hyper[0] * array(np.ones(FEATURES, dtype=np.float64))]
        return objective_vector(params, scaled, X, y)

    l2 = 0.1
    theta, H = minimise(feature_penalties(np.full(FEATURES, l2)))
    X, y, _, _ = dataset()
    params = [array(theta[:FEATURES]), array(theta[FEATURES:])]
    J = ResponseJacobianLinearOperator(
        objective, params, [array(np.array(l2))], [(array(X), array(y))], tol=1e-12
    )
    assert J.shape == (FEATURES + 1, 1)
    expected = -np.linalg.solve(H, np.append(theta[:FEATURES], 0.0))
    plus, _ = minimise(feature_penalties(np.full(FEATURES, l2 + 1e-5)))
    minus, _ = minimise(feature_penalties(np.full(FEATURES, l2 - 1e-5)))
    assert_close(expected, (plus - minus) / 2e-5, rtol=1e-6)
    assert_close(J @ np.ones(1), expected, rtol=1e-9)


def test_response_jacobian_with_a_given_hessian(backend_name):
    hyper = FEATURE_PENALTIES
    theta, H = minimise(feature_penalties(hyper))
    J, _ = response_jacobian(backend_name, hyper)
    J_given, _ = response_jacobian(backend_name, hyper, hessian=H)
    assert_close(J_given @ np.eye(FEATURES), J @ np.eye(FEATURES), rtol=1e-9)
    # damping shifts the solve: J = -(H + δI)⁻¹ M
    J_damped, _ = response_jacobian(backend_name, hyper, damping=0.5)
    M = J.mixed @ np.eye(FEATURES)
    assert_close(J_damped @ np.eye(FEATURES), -np.linalg.solve(H + 0.5 * np.eye(6), M))


def test_response_jacobian_errors(backend_name):
    objective, array = objective_for(backend_name)
    theta, _ = minimise(feature_penalties(FEATURE_PENALTIES))
    X, y, _, _ = dataset()
    params = [array(theta[:FEATURES]), array(theta[FEATURES:])]
    data = [(array(X), array(y))]
    hyper = [array(FEATURE_PENALTIES)]
    with pytest.raises(TypeError, match="objective: expected a callable"):
        ResponseJacobianLinearOperator(None, params, hyper, data)
    with pytest.raises(ValueError, match="hyperparams: expected the dtype of params"):
        ResponseJacobianLinearOperator(
            objective, params, [array(FEATURE_PENALTIES.astype(np.float32))], data
        )
    with pytest.raises(ValueError, match=r"hessian: expected a \(6, 6\) operator"):
        ResponseJacobianLinearOperator(objective, params, hyper, data, hessian=np.eye(3))
    with pytest.raises(TypeError, match="data: expected a re-iterable"):
        ResponseJacobianLinearOperator(objective, params, hyper, 3)
    J = ResponseJacobianLinearOperator(objective, params, hyper, data, maxiter=1)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        J @ np.eye(FEATURES)


# --- KFAC and EKFAC as the curvature (EK-FAC influence) ------------------------------------------
def network(backend_name, layers, loss_name):
    """An MLP (tanh between the layers) with weights ``layers`` = [(W (out, in), b), ...].

    The same weights in both frameworks, in the same parameter order and layout
    (``x @ W.T + b`` in JAX), with the framework's loss and a per-example loss.
    """
    arrays = [a for W, b in layers for a in (W, b)]
    if backend_name == "torch":
        import torch

        modules = []
        for W, _ in layers:
            modules += [torch.nn.Linear(W.shape[1], W.shape[0]).double(), torch.nn.Tanh()]
        model = torch.nn.Sequential(*modules[:-1])
        params = list(model.parameters())
        with torch.no_grad():
            for p, a in zip(params, arrays):
                p.copy_(torch.from_numpy(a))
        loss = {"mse": torch.nn.MSELoss, "ce": torch.nn.CrossEntropyLoss}[loss_name]()
        return model, loss, params, torch.from_numpy
    import jax.numpy as jnp

    from curvlinops.losses import CrossEntropyLoss, MSELoss

    def model(p, x):
        for i in range(0, len(p), 2):
            x = x @ p[i].T + p[i + 1]
            x = jnp.tanh(x) if i + 2 < len(p) else x
        return x

    loss = {"mse": MSELoss, "ce": CrossEntropyLoss}[loss_name]()
    return model, loss, [jnp.asarray(a) for a in arrays], jnp.asarray


def per_example_loss(backend_name, loss_name, z, t):
    """The loss of one example (a batch of one), written out in the framework."""
    if backend_name == "torch":
        import torch.nn.functional as F

        return F.mse_loss(z, t) if loss_name == "mse" else F.cross_entropy(z, t)
    import jax
    import jax.numpy as jnp

    if loss_name == "mse":
        return jnp.mean((z - t) ** 2)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), t[:, None], axis=1))


def gradient_columns(backend_name, loss_name, model, params, X, y):
    """Columns ∇ℓ_n (P, N) by autodiff, one example at a time."""
    columns = []
    for n in range(X.shape[0]):
        if backend_name == "torch":
            import torch

            value = per_example_loss(backend_name, loss_name, model(X[n : n + 1]), y[n : n + 1])
            grads = torch.autograd.grad(value, params)
        else:
            import jax

            def value(p, n=n):
                return per_example_loss(
                    backend_name, loss_name, model(p, X[n : n + 1]), y[n : n + 1]
                )

            grads = jax.grad(value)(params)
        columns.append(np.concatenate([to_numpy(g).ravel() for g in grads]))
    return np.stack(columns, axis=1)


def weights(rng, sizes):
    return [
        (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in), 0.1 * rng.standard_normal(d_out))
        for d_in, d_out in zip(sizes[:-1], sizes[1:])
    ]


def kfac_problem(backend_name, sizes, loss_name, n_train, n_test, seed=0):
    """Model, loss, params, two training batches of unequal size, the test batch, numpy data."""
    rng = np.random.default_rng(seed)
    model, loss, params, array = network(backend_name, weights(rng, sizes), loss_name)
    X = rng.standard_normal((n_train + n_test, sizes[0]))
    if loss_name == "mse":
        y = rng.standard_normal((n_train + n_test, sizes[-1]))
    else:
        y = rng.integers(0, sizes[-1], n_train + n_test)
    Xa, ya = array(X), array(y)
    split = (2 * n_train) // 3
    train = [(Xa[:split], ya[:split]), (Xa[split:n_train], ya[split:n_train])]
    test = (Xa[n_train:], ya[n_train:])
    return model, loss, params, train, test


def dense_influences(backend_name, loss_name, model, params, train, test, curvature, damping):
    """-∇ℓ_testᵀ (C + λI)⁻¹ ∇ℓ_train from the dense curvature ``C``."""
    grads = [gradient_columns(backend_name, loss_name, model, params, X, y) for X, y in train]
    G_train = np.concatenate(grads, axis=1)
    G_test = gradient_columns(backend_name, loss_name, model, params, *test)
    damped = curvature + damping * np.eye(curvature.shape[0])
    return -G_test.T @ np.linalg.solve(damped, G_train)


@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_kfac_influence_is_exact_where_kfac_is(backend_name, operator):
    """One linear layer with MSE, type-2, weight and bias in one block: KFAC = GGN = Hessian."""
    model, loss, params, train, test = kfac_problem(backend_name, (4, 3), "mse", 40, 8)
    K = operator(model, loss, params, train, fisher_type="type-2", separate_weight_and_bias=False)
    H = to_numpy(HessianLinearOperator(model, loss, params, train).todense())
    args = (model, loss, params, train, test)
    for damping in (0.1, 0.0):
        expected = dense_influences(backend_name, "mse", model, params, train, test, H, damping)
        # the operator itself, inverted from its factors with the damping on its eigenvalues
        result = influence_on_test_loss(K, *args, damping=damping)
        assert type(result).__module__.split(".")[0] in ("torch", "jaxlib", "jax")
        assert tuple(result.shape) == (8, 40)
        assert_close(result, expected)
        # an inverse built beforehand is applied as it is
        inverse = KFACInverseLinearOperator(K, damping=damping, use_exact_damping=True)
        assert_close(influence_on_test_loss(inverse, *args), expected)
    if operator is KFACLinearOperator:  # the default (Cholesky) inverse of the factors
        expected = dense_influences(backend_name, "mse", model, params, train, test, H, 0.0)
        inverse = KFACInverseLinearOperator(K)
        assert_close(influence_on_test_loss(inverse, *args), expected)


def test_ekfac_influence_correlates_with_the_exact_ggn_influence(backend_name):
    """A tanh MLP with cross-entropy (seeded): Pearson r of (E)KFAC against the damped GGN.

    (E)KFAC approximates the GGN's blocks (one per parameter here), so the
    influences are compared with those of the full GGN and of its blocks.
    Measured at λ = 0.01 (both backends): KFAC r = 0.891 / 0.976, EKFAC
    0.890 / 0.983 (full GGN / its blocks); the blocks' own influences have
    r = 0.912 against the full GGN's.
    """
    model, loss, params, train, test = kfac_problem(backend_name, (4, 8, 3), "ce", 60, 10)
    damping = 0.01
    G = to_numpy(GGNLinearOperator(model, loss, params, train).todense())
    blocks = np.zeros_like(G)
    offsets = np.cumsum([0, *(to_numpy(p).size for p in params)])
    for start, stop in zip(offsets[:-1], offsets[1:]):
        blocks[start:stop, start:stop] = G[start:stop, start:stop]
    references = {
        curvature: dense_influences(backend_name, "ce", model, params, train, test, C, damping)
        for curvature, C in (("GGN", G), ("GGN blocks", blocks))
    }
    args = (model, loss, params, train, test)
    for operator in (KFACLinearOperator, EKFACLinearOperator):
        K = operator(model, loss, params, train, fisher_type="type-2")
        result = to_numpy(influence_on_test_loss(K, *args, damping=damping)).ravel()
        r = {name: np.corrcoef(result, ref.ravel())[0, 1] for name, ref in references.items()}
        print(
            f"{backend_name}, {operator.__name__}: Pearson r = {r['GGN']:.4f} against the "
            f"damped GGN, {r['GGN blocks']:.4f} against its blocks"
        )
        assert r["GGN"] > 0.8 and r["GGN blocks"] > 0.95


def test_response_jacobian_with_a_kfac_curvature(backend_name):
    """KFAC of the data term, the L2 strength as damping: J = -(K + δI)⁻¹ ∇²_{wθ}𝒥."""
    hyper = np.full(FEATURES, L2)
    theta, _ = minimise(feature_penalties(hyper))
    objective, array = objective_for(backend_name)
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, _, _ = dataset()
    K = EKFACLinearOperator(model, loss, params, [as_batch(X, y)], fisher_type="type-2")
    K_dense = to_numpy(K @ np.eye(FEATURES + 1))
    w = [array(theta[:FEATURES]), array(theta[FEATURES:])]
    data, hyper = [(array(X), array(y))], [array(hyper)]
    J = ResponseJacobianLinearOperator(objective, w, hyper, data, hessian=K, damping=L2)
    assert isinstance(J.inverse, KFACInverseLinearOperator)
    M = J.mixed @ np.eye(FEATURES)
    expected = -np.linalg.solve(K_dense + L2 * np.eye(FEATURES + 1), M)
    assert_close(J @ np.eye(FEATURES), expected)
    assert_close(J.T @ np.eye(FEATURES + 1), expected.T)
    inverse = KFACInverseLinearOperator(K, damping=L2, use_exact_damping=True)
    J_given = ResponseJacobianLinearOperator(objective, w, hyper, data, hessian=inverse)
    assert J_given.inverse is inverse
    assert_close(J_given @ np.eye(FEATURES), expected)


def test_influence_with_a_given_inverse(backend_name):
    """A CG inverse built beforehand gives the default CG solve's influences."""
    theta, _ = minimise(uniform_penalties())
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, X_test, y_test = dataset()
    H = regularised_hessian(backend_name, theta)
    train, test = [as_batch(X, y)], as_batch(X_test, y_test)
    expected = influence_on_test_loss(H, model, loss, params, train, test, tol=1e-12)
    inverse = CGInverseLinearOperator(H, tol=1e-12)
    assert_close(influence_on_test_loss(inverse, model, loss, params, train, test), expected)


def test_influence_with_an_inverse_or_kfac_refuses_cg_options(backend_name):
    theta, _ = minimise(uniform_penalties())
    model, loss, params, as_batch = logistic_regression(backend_name, theta)
    X, y, X_test, y_test = dataset()
    train, test = [as_batch(X, y)], as_batch(X_test, y_test)
    K = KFACLinearOperator(model, loss, params, train, fisher_type="type-2")
    inverse = KFACInverseLinearOperator(K, damping=0.1)
    args = (model, loss, params, train, test)
    with pytest.raises(ValueError, match="damping: expected 0 when hessian is already an inverse"):
        influence_on_test_loss(inverse, *args, damping=0.1)
    with pytest.raises(ValueError, match="tol: expected None when hessian is a KFACInverse"):
        influence_on_test_loss(inverse, *args, tol=1e-6)
    with pytest.raises(ValueError, match="maxiter: expected None when hessian is a KFACLinear"):
        influence_on_test_loss(K, *args, maxiter=10)
    with pytest.raises(ValueError, match="damping: expected a number >= 0.0"):
        influence_on_test_loss(K, *args, damping=-1.0)
