"""What curvlinops-for-pytorch 3.0.1 code relies on beyond its top-level names.

Its base classes (``curvlinops._torch_base``) for user-defined operators, tensor
lists through the Jacobians, the KFAC inverse's state dict and the cached closed
forms, GPyTorch's CG keywords, soft cross-entropy targets, its helper modules
(``sampling``, ``kfac_utils``, ``ekfac``, ``experimental``), estimators that
return the operand's arrays, and the ``_matmat`` progress bar. Every number is
checked against a dense reference (``torch.func``, numpy) in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scipy.sparse.linalg import cg  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import (  # noqa: E402
    CGInverseLinearOperator,
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
    hutchinson_trace,
)
from curvlinops.examples import TensorLinearOperator  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

F64 = torch.float64


def small_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(F64)
    X = torch.randn(6, 3, dtype=F64)
    data = [(X[:4], torch.randn(4, 2, dtype=F64)), (X[4:], torch.randn(2, 2, dtype=F64))]
    return model, list(model.parameters()), data


# --- user operators on 3.0.1's base classes ----------------------------------------------
def cfp_style_matrix_operator():
    """An operator written as 3.0.1's documentation shows: ``_matmat`` on tensor lists."""
    from curvlinops._torch_base import PyTorchLinearOperator

    class BlockMatrix(PyTorchLinearOperator):
        def __init__(self, M: torch.Tensor, in_shape, out_shape):
            super().__init__(in_shape, out_shape)
            self._M = M

        def _matmat(self, X):
            flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in X])
            Y = (self._M @ flat).split(self._out_shape_flat)
            return [y.reshape(*s, -1) for y, s in zip(Y, self._out_shape)]

        def _adjoint(self):
            return BlockMatrix(self._M.T, self._out_shape, self._in_shape)

        @property
        def dtype(self):
            return self._M.dtype

        @property
        def device(self):
            return self._M.device

    torch.manual_seed(1)
    M = torch.randn(5, 6, dtype=F64)
    return BlockMatrix(M, [(2, 3)], [(5,)]), M


def test_a_3_0_1_subclass_is_an_operator_of_ours():
    A, M = cfp_style_matrix_operator()
    assert isinstance(A, curvlinops.LinearOperator)
    assert A.dtype == np.float64 and A.torch_dtype == F64  # its dtype property is kept
    assert (A._in_shape, A._out_shape, A.shape) == ([(2, 3)], [(5,)], (5, 6))
    v = torch.randn(6, dtype=F64)
    assert_close(A @ v, M @ v)
    assert_close(A @ v.numpy(), M @ v)  # numpy in, numpy out
    (Av,) = A @ [v.reshape(2, 3)]
    assert_close(Av, M @ v)
    assert_close(A.adjoint() @ torch.ones(5, dtype=F64), M.T @ torch.ones(5, dtype=F64))
    # scipy's solvers and our composition take it
    S = A.adjoint() @ A + 0.5 * curvlinops.IdentityLinearOperator(6)
    dense = M.T @ M + 0.5 * torch.eye(6, dtype=F64)
    x, info = cg(S, np.ones(6), rtol=1e-12)
    assert info == 0
    assert_close(x, np.linalg.solve(dense.numpy(), np.ones(6)), rtol=1e-8)


def test_a_3_0_1_subclass_is_checked_as_3_0_1_checks_it():
    from curvlinops._torch_base import PyTorchLinearOperator

    class WrongOutput(PyTorchLinearOperator):
        def _matmat(self, X):
            return X  # input-shaped, but the output space differs

    op = WrongOutput([(2,)], [(3,)])
    with pytest.raises(ValueError, match=r"WrongOutput._matmat: expected shapes \[\(3, 1\)\]"):
        op @ torch.zeros(2)
    with pytest.raises(ValueError, match=r"x\[0\]: expected shape \(2,\)"):
        op @ [torch.zeros(3)]
    with pytest.raises(NotImplementedError, match="implement _adjoint"):
        op.adjoint()


class ScaledIdentity:
    """``_matmat_batch``: the identity times the batch size (a known dense matrix)."""

    @staticmethod
    def make(**kwargs):
        from curvlinops._torch_base import CurvatureLinearOperator

        class BatchSized(CurvatureLinearOperator):
            SELF_ADJOINT = True

            def _matmat_batch(self, X, y, M):
                return [X.shape[0] * m for m in M]

        return BatchSized(**kwargs)


def test_curvature_base_class_sums_batches_with_the_loss_normalisation():
    model, params, data = small_problem()
    for reduction, expected in [("sum", 4 + 2), ("mean", (4 * 4 + 2 * 2) / 6)]:
        loss = torch.nn.MSELoss(reduction=reduction)
        op = ScaledIdentity.make(model_func=model, loss_func=loss, params=params, data=data)
        assert op._N_data == 6 and op.SELF_ADJOINT
        assert_close(op.todense(), expected * torch.eye(op.shape[0], dtype=F64))
        gradient, value = op.gradient_and_loss()
        weights = [1.0 if reduction == "sum" else X.shape[0] / 6 for X, _ in data]
        total = sum(w * loss(model(X), y) for w, (X, y) in zip(weights, data))
        assert_close(gradient, list(torch.autograd.grad(total, params)))
        assert_close(value, total.detach())


def test_curvature_base_class_refuses_changing_data_and_dicts_without_batch_size():
    model, params, data = small_problem()
    loss = torch.nn.MSELoss()

    class Shuffled:
        def __iter__(self):
            for X, y in data:
                order = torch.randperm(X.shape[0])
                yield X[order] + 0.1 * torch.rand(1, dtype=F64), y[order]

    with pytest.raises(RuntimeError, match="differs between two passes"):
        ScaledIdentity.make(model_func=model, loss_func=loss, params=params, data=Shuffled())
    dict_data = [({"x": X}, y) for X, y in data]
    with pytest.raises(ValueError, match="batch_size_fn: expected a function X -> batch size"):
        ScaledIdentity.make(model_func=model, loss_func=loss, params=params, data=dict_data)


# --- tensor lists through the Jacobians -------------------------------------------------------
def test_jacobian_lists_have_3_0_1_shapes_on_both_backends():
    model, params, data = small_problem()
    J = JacobianLinearOperator(model, params, data, check_deterministic=False)
    JT = TransposedJacobianLinearOperator(model, params, data, check_deterministic=False)
    dense = J.todense()
    assert J._out_shape == JT._in_shape == [(6, 2)]
    v = [torch.randn_like(p) for p in params]
    flat_v = torch.cat([t.flatten() for t in v])
    (Jv,) = J @ v
    assert Jv.shape == (6, 2)
    assert_close(Jv.flatten(), dense @ flat_v)
    u = torch.randn(6, 2, dtype=F64)
    JTu = JT @ [u]
    assert [t.shape for t in JTu] == [p.shape for p in params]
    assert_close(torch.cat([t.flatten() for t in JTu]), dense.T @ u.flatten())
    with pytest.raises(ValueError, match=r"x\[0\]: expected shape \(6, 2\)"):
        JT @ [torch.zeros(2, 6, dtype=F64)]
    jnp = pytest.importorskip("jax.numpy")
    weights = [jnp.asarray(p.detach().numpy()) for p in params]

    def mlp(w, x):
        return jnp.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]

    jax_data = [(X.numpy(), y.numpy()) for X, y in data]
    J_jax = JacobianLinearOperator(mlp, weights, jax_data, check_deterministic=False)
    (Jv_jax,) = J_jax @ [jnp.asarray(t.numpy()) for t in v]
    assert Jv_jax.shape == (6, 2)
    assert_close(Jv_jax, Jv)


# --- KFAC: the inverse's state dict, cached closed forms ------------------------------------
def kfac_problem():
    model, params, data = small_problem()
    return KFACLinearOperator(model, torch.nn.MSELoss(), params, data, fisher_type="type-2")


def test_kfac_inverse_state_dict_round_trip():
    K = kfac_problem()
    inverse = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    expected = inverse.todense()
    dense = K.todense()
    assert_close(expected, torch.linalg.inv(dense + 0.1 * torch.eye(dense.shape[0], dtype=F64)))
    state = inverse.state_dict()
    assert {"A", "damping", "use_exact_damping", "cache"} <= set(state)
    with pytest.warns(UserWarning, match="will overwrite the parameters"):  # as in 3.0.1
        again = KFACInverseLinearOperator.from_state_dict(state, kfac_problem())
    assert_close(again.todense(), expected)
    other = KFACInverseLinearOperator(kfac_problem())
    with pytest.warns(UserWarning, match="will overwrite the parameters"):
        other.load_state_dict(state)
    assert other._use_exact_damping and other._damping == 0.1
    assert_close(other.todense(), expected)
    model, params, data = small_problem()
    wrong = KFACLinearOperator(model, torch.nn.MSELoss(reduction="sum"), params, data)
    with pytest.raises(ValueError, match=r"state_dict\['A'\]: mismatch"):
        KFACInverseLinearOperator(wrong).load_state_dict(state)


def test_kfac_closed_forms_are_cached_until_the_factors_change():
    K = kfac_problem()
    assert K._trace is None and K._N_data == K.num_data == 6
    dense = K.todense()
    assert_close(K.trace, torch.trace(dense))
    assert K._trace is K.trace
    assert_close(K.frobenius_norm, torch.linalg.matrix_norm(dense))
    K.compute_kronecker_factors()
    assert K._trace is None and K._frobenius_norm is None


# --- GPyTorch's CG keywords ---------------------------------------------------------------
def test_cg_takes_gpytorch_keywords_with_their_meaning(monkeypatch):
    import curvlinops.inverse

    monkeypatch.setattr(curvlinops.inverse, "_WARNED_3_0_1", set())  # warn as in a new process
    rng = np.random.default_rng(0)
    B = rng.standard_normal((8, 8))
    A = B @ B.T + np.eye(8)
    b = rng.standard_normal(8)
    solution = np.linalg.solve(A, b)
    with pytest.warns(UserWarning) as caught:
        warm = CGInverseLinearOperator(A, tol=1e-12, initial_guess=solution + 1e-3)
    messages = " ".join(str(w.message) for w in caught)
    assert "initial_guess=...): curvlinops-for-pytorch" in messages
    assert "iterates until its relative residual is below stop_updating_after" in messages
    assert_close(warm @ b, solution, rtol=1e-9)
    assert warm.info.rhs_norms[0] == pytest.approx(np.linalg.norm(b))  # relative to b
    exact = CGInverseLinearOperator(A, tol=1e-10, initial_guess=solution)  # (warned once)
    assert_close(exact @ b, solution, rtol=1e-9)
    assert exact.info.iterations[0] == 0
    with pytest.warns(UserWarning) as caught:  # one warning per keyword, saying what it does
        loose = CGInverseLinearOperator(A, stop_updating_after=1e-3, eps=0.0, n_tridiag=0)
    assert {str(w.message).split("(")[1].split("=")[0] for w in caught} == {
        "eps",
        "n_tridiag",
        "stop_updating_after",
    }
    assert any("is taken as tol" in str(w.message) for w in caught)
    assert loose.tol == 1e-3
    assert CGInverseLinearOperator(A, eps=0.0).tol == 1e-10  # GPyTorch's stop_updating_after
    guarded = CGInverseLinearOperator(A, eps=1e30, tol=1e-12)  # every curvature below eps
    with pytest.warns(curvlinops.ConvergenceWarning, match="not positive definite"):
        guarded @ b
    assert guarded.info.indefinite.all()
    with pytest.raises(ValueError, match="n_tridiag: expected 0"):
        CGInverseLinearOperator(A, n_tridiag=2)
    with pytest.raises(ValueError, match=r"initial_guess: expected shape \(8,\)"):
        CGInverseLinearOperator(A, initial_guess=np.zeros(3)) @ b


# --- soft cross-entropy targets -------------------------------------------------------------
def test_soft_targets_not_summing_to_one_on_both_backends():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).to(F64)  # linear: the GGN is the Hessian
    params = list(model.parameters())
    X = torch.randn(5, 3, dtype=F64)
    Y = torch.rand(5, 4, dtype=F64) * torch.tensor([[0.2], [1.0], [0.5], [0.1], [0.9]], dtype=F64)
    data = [(X, Y)]

    def loss_of(weight, bias):
        logits = X @ weight.T + bias
        return -(Y * torch.log_softmax(logits, 1)).sum(1).mean()

    blocks = torch.func.hessian(loss_of, argnums=(0, 1))(*[p.detach() for p in params])
    sizes = [p.numel() for p in params]
    dense = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1)
            for i in range(2)
        ]
    )
    loss = torch.nn.CrossEntropyLoss()
    fast = {"check_deterministic": False}
    G = GGNLinearOperator(model, loss, params, data, **fast)
    assert_close(G.todense(), dense)
    assert_close(HessianLinearOperator(model, loss, params, data, **fast).todense(), dense)
    grads = torch.func.vmap(
        torch.func.grad(
            lambda w, b, x, y: -(y * torch.log_softmax(x @ w.T + b, 0)).sum(), argnums=(0, 1)
        ),
        in_dims=(None, None, 0, 0),
    )(*[p.detach() for p in params], X, Y)
    per_example = torch.cat([g.reshape(5, -1) for g in grads], 1)
    assert_close(
        EFLinearOperator(model, loss, params, data, **fast).todense(),
        per_example.T @ per_example / 5,
    )
    jnp = pytest.importorskip("jax.numpy")
    weights = [jnp.asarray(p.detach().numpy()) for p in params]
    G_jax = GGNLinearOperator(
        lambda w, x: x @ w[0].T + w[1],
        curvlinops.losses.CrossEntropyLoss(),
        weights,
        [(X.numpy(), Y.numpy())],
        **fast,
    )
    assert_close(G_jax.todense(), dense)


# --- helper modules -----------------------------------------------------------------------------
def test_kfac_utils_and_eigenvalue_correction_against_dense():
    from curvlinops.ekfac import compute_eigenvalue_correction_linear_weight_sharing as correction
    from curvlinops.kfac_utils import (
        extract_averaged_patches,
        extract_patches,
        loss_hessian_matrix_sqrt,
    )

    torch.manual_seed(0)
    f, y = torch.randn(1, 4, dtype=F64), torch.tensor([2])
    for loss, target in [
        (torch.nn.CrossEntropyLoss(), y),
        (torch.nn.MSELoss(), torch.randn(1, 4, dtype=F64)),
    ]:
        S = loss_hessian_matrix_sqrt(f, target, loss)
        H = torch.func.hessian(lambda z, loss=loss, target=target: loss(z[None], target))(f[0])
        assert_close(S @ S.T, H)
    x = torch.randn(2, 4, 5, 5, dtype=F64)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False).to(F64)
    patches = extract_patches(x, 3, 2, 1, 1, 2)
    assert patches.shape == (2, 9, 2 * 9)
    assert_close(extract_averaged_patches(x, 3, 2, 1, 1, 2), patches.mean(1))
    grouped_mean = x.reshape(2, 2, 2, 5, 5).mean(1)
    single = torch.nn.functional.conv2d(grouped_mean, conv.weight[:1], stride=2, padding=1)
    assert_close(patches @ conv.weight[0].flatten(), single.flatten(1))
    g, a = torch.randn(3, 2, 4, dtype=F64), torch.randn(3, 2, 5, dtype=F64)
    QG, QA = (
        torch.linalg.qr(torch.randn(4, 4, dtype=F64))[0],
        torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0],
    )
    per_example = torch.einsum("nsi,nsj->nij", g @ QG, a @ QA)  # per-example gradient, eigenbasis
    for strategy in ("gramian", "per_example_gradients", None):
        assert_close(correction(g, QG, a, QA, _force_strategy=strategy), (per_example**2).sum(0))
    with pytest.raises(ValueError, match="Invalid _force_strategy"):
        correction(g, QG, a, QA, _force_strategy="fast")


def test_activation_hessian_against_the_softmax_hessian():
    from curvlinops.experimental.activation_hessian import (
        ActivationHessianLinearOperator,
        store_activation,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Identity()).to(F64)
    X, y = torch.randn(2, 3, dtype=F64), torch.tensor([0, 3])
    H = ActivationHessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(reduction="sum"), ("1", "input", 0), [(X, y)]
    )
    p = model(X).softmax(1).detach()
    expected = torch.block_diag(*[torch.diag(q) - torch.outer(q, q) for q in p])
    assert_close(H.todense(), expected)
    with pytest.raises(ValueError, match="module_name: expected one of"):
        store_activation(model, "9", "input", 0, [])
    with pytest.raises(ValueError, match="data: expected a single batch"):
        ActivationHessianLinearOperator(
            model, torch.nn.CrossEntropyLoss(), ("1", "input", 0), [(X, y)] * 2
        )


def test_sampling_draws_from_torchs_generator():
    from curvlinops.sampling import random_vector

    torch.manual_seed(3)
    first = random_vector(1000, "rademacher", "cpu", np.dtype("float64"))
    torch.manual_seed(3)
    assert torch.equal(first, random_vector(1000, "rademacher", "cpu", F64))
    assert set(first.tolist()) == {-1.0, 1.0} and first.dtype == F64
    with pytest.raises(ValueError, match="distribution: expected 'rademacher' or 'normal'"):
        random_vector(3, "uniform", "cpu", F64)


# --- estimators and the progress bar -------------------------------------------------------------
def test_estimators_return_the_matrixs_arrays_with_fresh_probes():
    A = torch.diag(torch.arange(1.0, 31.0, dtype=F64)) + 0.1
    op = TensorLinearOperator(A)
    estimates = torch.stack([hutchinson_trace(op, 5) for _ in range(3)])  # as 3.0.1's example
    assert estimates.dtype == F64 and len(set(estimates.tolist())) == 3  # fresh probes each call
    torch.manual_seed(0)
    first = hutchinson_trace(A, 5, "normal")  # distribution positional, as in 3.0.1
    torch.manual_seed(0)
    assert torch.equal(first, hutchinson_trace(A, 5, "normal"))
    assert hutchinson_trace(A, 5, seed=1) == hutchinson_trace(A, 5, seed=1)


def test_progressbar_names_each_product_matmat(capsys):
    model, params, data = small_problem()
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, data, progressbar=True)
    capsys.readouterr()
    G @ torch.ones(G.shape[1], dtype=F64)
    assert "GGNLinearOperator._matmat (on cpu)" in capsys.readouterr().err


def test_3_0_1_module_paths_import_no_framework():
    import subprocess
    import sys

    modules = [
        "curvlinops._torch_base",
        "curvlinops.ekfac",
        "curvlinops.sampling",
        "curvlinops.kfac_utils",
        "curvlinops.gradient_moments",
        "curvlinops.experimental.activation_hessian",
        "curvlinops.trace.hutchinson",
        "curvlinops.trace.meyer2020hutch",
        "curvlinops.trace.epperly2024xtrace",
        "curvlinops.diagonal.hutchinson",
        "curvlinops.diagonal.epperly2024xtrace",
        "curvlinops.norm.hutchinson",
    ]
    code = (
        f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted({'torch', 'jax', 'cupy'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
