"""KFAC, its inverse and closed forms (PyTorch), against dense references by autodiff.

The exact cases are those of the literature: deep linear networks with MSE
(type-2, expand), one data point for any network, weight sharing (expand with
outputs per position, reduce when the model averages over the positions).
References are computed with ``torch.func`` on the concatenated data, in
float64; tolerances come from the dtype (``helpers.assert_close``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import scipy.sparse.linalg

torch = pytest.importorskip("torch")
from helpers import assert_close, jax_compilations  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, hessian, jacrev  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import (  # noqa: E402
    EFLinearOperator,
    EKFACLinearOperator,
    FisherMCLinearOperator,
    FisherType,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    KFACType,
)

DTYPE = torch.float64


# --- models, data and dense references ------------------------------------------------
class MeanOverPositions(nn.Module):
    """``(B, T, D) -> (B, D)``: what makes KFAC-reduce exact."""

    def forward(self, x):
        return x.mean(dim=1)


def _seeded(seed: int, *layers: nn.Module) -> nn.Sequential:
    """The layers in sequence, their parameters drawn again from ``seed`` (reproducible)."""
    torch.manual_seed(seed)
    for layer in layers:
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return nn.Sequential(*layers).to(DTYPE)


def deep_linear(seed: int = 0, d_in: int = 3, d_out: int = 2) -> nn.Sequential:
    return _seeded(seed, nn.Linear(d_in, 4), nn.Linear(4, 3), nn.Linear(3, d_out))


def tanh_mlp(seed: int = 0, d_out: int = 3) -> nn.Sequential:
    return _seeded(seed, nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, d_out))


def batches(X, y, sizes=(4, 3)):
    """Data in batches of unequal size."""
    out, start = [], 0
    for size in sizes:
        out.append((X[start : start + size], y[start : start + size]))
        start += size
    return out


def inputs(*shape, seed=1):
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def labels(n, classes, seed=2):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _flat_model(model):
    names = [n for n, _ in model.named_parameters()]
    tensors = [p.detach() for _, p in model.named_parameters()]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    sizes = [t.numel() for t in tensors]

    def unflatten(vector):
        return {n: v.reshape(t.shape) for n, v, t in zip(names, vector.split(sizes), tensors)}

    return flat, unflatten


def dense_ggn(model, loss_func, X, y):
    """``Jᵀ ∇²ℓ J`` of the loss on all data, by autodiff."""
    flat, unflatten = _flat_model(model)
    z = functional_call(model, unflatten(flat), (X,))
    J = jacrev(lambda v: functional_call(model, unflatten(v), (X,)))(flat).reshape(z.numel(), -1)
    H = hessian(lambda u: loss_func(u.reshape(z.shape), y))(z.detach().reshape(-1))
    return (J.T @ H @ J).numpy()


def dense_gradient_outer(model, loss_func, X, y):
    """``∇ℓ ∇ℓᵀ`` of the loss on all data: the empirical Fisher of one data point."""
    flat, unflatten = _flat_model(model)
    g = torch.func.grad(lambda v: loss_func(functional_call(model, unflatten(v), (X,)), y))(flat)
    return torch.outer(g, g).numpy()


def block_diagonal(M, model, joint_layers=True):
    """``M`` restricted to the blocks of KFAC: per layer, or per parameter."""
    sizes = [p.numel() for p in model.parameters()]
    owners = [n.rpartition(".")[0] if joint_layers else n for n, _ in model.named_parameters()]
    mask = np.zeros_like(M, dtype=bool)
    offsets = np.cumsum([0, *sizes])
    for i, owner in enumerate(owners):
        for j, other in enumerate(owners):
            if owner == other:
                mask[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = True
    return np.where(mask, M, 0.0)


def dense(op):
    return op @ np.eye(op.shape[1])


def kfac(model, loss_func, data, **options):
    return KFACLinearOperator(model, loss_func, list(model.parameters()), data, **options)


# --- enums ------------------------------------------------------------------------------
def test_enums_are_strings():
    assert [t.value for t in FisherType] == ["type-2", "mc", "empirical", "forward-only"]
    assert [t.value for t in KFACType] == ["expand", "reduce"]
    assert FisherType.MC == "mc" and KFACType("reduce") is KFACType.REDUCE


def test_plain_strings_are_accepted():
    model = deep_linear()
    X, y = inputs(7, 3), inputs(7, 2, seed=3)
    with_enums = kfac(
        model, nn.MSELoss(), batches(X, y), fisher_type=FisherType.TYPE2, kfac_approx="reduce"
    )
    with_strings = kfac(
        model, nn.MSELoss(), batches(X, y), fisher_type="type-2", kfac_approx=KFACType.REDUCE
    )
    assert_close(dense(with_enums), dense(with_strings))
    assert with_strings._fisher_type is FisherType.TYPE2


# --- exact cases ------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
@pytest.mark.parametrize("d_out", [1, 2], ids=["scalar", "vector"])
def test_deep_linear_mse_type2_expand_is_exact(reduction, separate, d_out):
    model = deep_linear(d_out=d_out)
    X, y = inputs(7, 3), inputs(7, d_out, seed=3)
    loss_func = nn.MSELoss(reduction=reduction)
    K = kfac(
        model,
        loss_func,
        batches(X, y),
        fisher_type="type-2",
        separate_weight_and_bias=separate,
    )
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=not separate)
    assert_close(dense(K), expected)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_one_datum_tanh_mlp_cross_entropy_type2_is_exact(separate, monkeypatch):
    from curvlinops import _kfac_program

    # the 3 classes' columns in chunks of 2: one batched backward pass and one more
    monkeypatch.setattr(_kfac_program, "COLUMNS_PER_CHUNK", 2 if separate else 64)
    model = tanh_mlp()
    X, y = inputs(1, 3), labels(1, 3)
    loss_func = nn.CrossEntropyLoss()
    K = kfac(model, loss_func, [(X, y)], fisher_type="type-2", separate_weight_and_bias=separate)
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=not separate)
    assert_close(dense(K), expected)


def test_one_datum_empirical_is_block_diagonal_empirical_fisher():
    model = tanh_mlp()
    X, y = inputs(1, 3), labels(1, 3)
    loss_func = nn.CrossEntropyLoss()
    K = kfac(model, loss_func, [(X, y)], fisher_type="empirical", separate_weight_and_bias=False)
    expected = block_diagonal(dense_gradient_outer(model, loss_func, X, y), model)
    assert_close(dense(K), expected)
    EF = dense(EFLinearOperator(model, loss_func, list(model.parameters()), [(X, y)]))
    assert_close(dense(K), block_diagonal(EF, model))


def test_one_datum_mc_uses_the_draws_of_fisher_mc():
    """Same seed, same draws: KFAC-MC of one data point is FisherMC's block diagonal."""
    model = tanh_mlp()
    X, y = inputs(1, 3), labels(1, 3)
    loss_func, params = nn.CrossEntropyLoss(), list(model.parameters())
    K = kfac(model, loss_func, [(X, y)], mc_samples=3, seed=5, separate_weight_and_bias=False)
    F = FisherMCLinearOperator(model, loss_func, params, [(X, y)], mc_samples=3, seed=5)
    assert_close(dense(K), block_diagonal(dense(F), model))


def test_forward_only_is_ggn_of_one_linear_layer_with_sum_mse():
    """One linear layer, MSE: GGN = (Σ x xᵀ) ⊗ 2I; forward-only has 2I -> I and A / N."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).to(DTYPE)
    X, y = inputs(7, 3), inputs(7, 2, seed=3)
    loss_func = nn.MSELoss(reduction="sum")
    K = kfac(model, loss_func, batches(X, y), fisher_type="forward-only")
    assert_close(2 * 7 * dense(K), dense_ggn(model, loss_func, X, y))
    assert_close(K._gradient_covariances["0"], torch.eye(2, dtype=DTYPE))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weight_sharing_expand_is_exact_for_deep_linear_sequence_outputs(reduction):
    model = deep_linear()
    X, y = inputs(7, 5, 3), inputs(7, 5, 2, seed=3)  # (B, T, D) -> (B, T, C)
    loss_func = nn.MSELoss(reduction=reduction)
    K = kfac(model, loss_func, batches(X, y), fisher_type="type-2", kfac_approx="expand")
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=False)
    assert_close(dense(K), expected)


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_weight_sharing_reduce_is_exact_when_the_model_averages_positions(separate):
    model = _seeded(0, nn.Linear(3, 4), nn.Linear(4, 3), MeanOverPositions(), nn.Linear(3, 2))
    X, y = inputs(7, 5, 3), inputs(7, 2, seed=3)
    loss_func = nn.MSELoss()
    K = kfac(
        model,
        loss_func,
        batches(X, y),
        fisher_type="type-2",
        kfac_approx="reduce",
        separate_weight_and_bias=separate,
    )
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=not separate)
    assert_close(dense(K), expected)
    assert list(K._mapping) == ["0", "1", "3"]


def test_sequence_cross_entropy_classes_on_either_axis():
    """Outputs (B, C, T) with PyTorch's loss give the KFAC of (B, T, C) with classes last."""

    class ClassesFirst(nn.Module):
        def forward(self, x):
            return x.transpose(1, 2)

    classes_last = _seeded(0, nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    classes_first = _seeded(0, nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), ClassesFirst())
    X, y = inputs(7, 5, 3), labels(35, 3).reshape(7, 5)
    for fisher_type in ("type-2", "empirical"):
        first = kfac(classes_first, nn.CrossEntropyLoss(), batches(X, y), fisher_type=fisher_type)
        last = kfac(
            classes_last,
            curvlinops.losses.CrossEntropyLoss(class_axis=-1),
            batches(X, y),
            fisher_type=fisher_type,
        )
        assert_close(dense(first), dense(last))


# --- factors as downstream code reads them ---------------------------------------------------
def test_mapping_and_factor_normalisation():
    """Layer names, positions and the normalisation of curvlinops-for-pytorch 3.0.1."""
    model = _seeded(0, nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    X, y = inputs(7, 3), inputs(7, 2, seed=3)
    K = kfac(model, nn.MSELoss(), batches(X, y), fisher_type="type-2")
    K.compute_kronecker_factors()
    assert K._mapping == {"0": {"weight": 0, "bias": 1}, "2": {"weight": 2, "bias": 3}}
    assert "layers={'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}" in repr(K)
    assert_close(K._input_covariances["0"], X.T @ X / 7)
    # the last layer's output is the model's: G = c Σ_n 2 I = 2 I / C for the mean
    assert_close(K._gradient_covariances["2"], torch.eye(2, dtype=DTYPE))
    joint = kfac(model, nn.MSELoss(), batches(X, y), separate_weight_and_bias=False)
    joint.compute_kronecker_factors()
    assert joint._input_covariances["0"].shape == (4, 4)


def test_only_some_parameters():
    """A bias alone has no input covariance; a dict of parameters keeps its positions."""
    model = deep_linear()
    X, y = inputs(7, 3), inputs(7, 2, seed=3)
    params = {"2.bias": model[2].bias, "0.weight": model[0].weight}
    K = KFACLinearOperator(model, nn.MSELoss(), params, batches(X, y), fisher_type="type-2")
    K.compute_kronecker_factors()
    assert K._mapping == {"0": {"weight": 1}, "2": {"bias": 0}}
    assert set(K._input_covariances) == {"0"}
    full = dense(kfac(model, nn.MSELoss(), batches(X, y), fisher_type="type-2"))
    w0, b2 = slice(0, 12), slice(full.shape[0] - 2, full.shape[0])
    expected = np.zeros((14, 14))
    expected[:2, :2], expected[2:, 2:] = full[b2, b2], full[w0, w0]
    assert_close(dense(K), expected)


def test_mc_error_falls_like_one_over_the_root_of_the_samples():
    """The MC gradient factor is an unbiased mean of ``mc_samples`` draws: its mean squared
    error is ``c / mc_samples``, so the RMS error over seeds has slope -1/2 on a log-log
    plot (``benchmarks/kfac_mc_convergence.py`` draws it). With 12 seeds at 1, 16 and 256
    samples, ten disjoint sets of seeds gave fitted slopes from -0.40 to -0.59: the band
    ±0.15 is three of their standard deviations."""
    model = tanh_mlp()
    X, y = inputs(7, 3), labels(7, 3)
    exact = dense(kfac(model, nn.CrossEntropyLoss(), batches(X, y), fisher_type="type-2"))

    def error(samples, seed):
        options = dict(mc_samples=samples, seed=seed, check_deterministic=False)
        K = kfac(model, nn.CrossEntropyLoss(), batches(X, y), **options)
        return np.linalg.norm(dense(K) - exact) / np.linalg.norm(exact)

    samples = [1, 16, 256]
    rms = [np.sqrt(np.mean([error(m, seed) ** 2 for seed in range(36, 48)])) for m in samples]
    slope = np.polyfit(np.log(samples), np.log(rms), 1)[0]
    assert -0.65 < slope < -0.35, f"RMS errors {rms}, slope {slope}"
    assert rms[-1] < 0.1


def _patches_by_loops(x, kernel, padding):
    """Patches ``(N * L, C k k)`` of a stride-1 convolution, by explicit loops."""
    x = np.pad(x.numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    N, _, H, W = x.shape
    rows = [
        x[n, :, i : i + kernel, j : j + kernel].reshape(-1)
        for n in range(N)
        for i in range(H - kernel + 1)
        for j in range(W - kernel + 1)
    ]
    return np.stack(rows)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_input_covariance_from_patches(approx):
    model = _seeded(0, nn.Conv2d(2, 3, 2, padding=1), nn.Flatten(), nn.Linear(48, 2))
    X, y = inputs(5, 2, 3, 3), labels(5, 2)
    K = kfac(model, nn.CrossEntropyLoss(), batches(X, y, (3, 2)), kfac_approx=approx)
    K.compute_kronecker_factors()
    patches = _patches_by_loops(X, kernel=2, padding=1)  # (5 * 16, 8)
    if approx == "expand":
        expected = patches.T @ patches / (5 * 16)
    else:
        mean = patches.reshape(5, 16, 8).mean(axis=1)
        expected = mean.T @ mean / 5
    assert_close(K._input_covariances["0"], expected)


def test_conv_without_weight_sharing_is_exact_for_one_datum():
    """A kernel that covers the whole input: a dense layer, so one data point is exact."""
    model = _seeded(0, nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 2))
    X, y = inputs(1, 2, 3, 3), labels(1, 2)
    loss_func = nn.CrossEntropyLoss()
    K = kfac(model, loss_func, [(X, y)], fisher_type="type-2")
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=False)
    assert_close(dense(K), expected)


def test_conv_same_padding_matches_explicit_padding():
    X, y = inputs(3, 1, 4, 4), labels(3, 2)
    same = _seeded(0, nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(32, 2))
    explicit = _seeded(0, nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
    options = {"fisher_type": "empirical"}
    assert_close(
        dense(kfac(same, nn.CrossEntropyLoss(), [(X, y)], **options)),
        dense(kfac(explicit, nn.CrossEntropyLoss(), [(X, y)], **options)),
    )


# --- the operator interface ------------------------------------------------------------------
def test_products_in_every_format_and_scipy():
    model = tanh_mlp()
    X, y = inputs(7, 3), labels(7, 3)
    K = kfac(model, nn.CrossEntropyLoss(), batches(X, y), fisher_type="type-2")
    K_dense = dense(K)
    v = np.random.default_rng(0).normal(size=K.shape[0])
    assert_close(K @ v, K_dense @ v)
    assert_close(K @ torch.from_numpy(v), K_dense @ v)
    assert_close(K.todense(), K_dense)
    shapes = [p.shape for p in model.parameters()]
    pieces = np.split(v, np.cumsum([int(np.prod(s)) for s in shapes])[:-1])
    as_list = [torch.from_numpy(p).reshape(s) for p, s in zip(pieces, shapes)]
    result = K @ as_list
    assert_close(torch.cat([r.reshape(-1) for r in result]), K_dense @ v)
    G = GGNLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), batches(X, y))
    assert_close((G - K) @ v, dense(G) @ v - K_dense @ v)
    largest = scipy.sparse.linalg.eigsh(K, k=2, which="LA", return_eigenvectors=False)
    assert_close(np.sort(largest), np.linalg.eigvalsh(K_dense)[-2:])


# --- inverse and closed forms ------------------------------------------------------------------
def _well_conditioned_kfac(**options):
    """Tanh MLP with MSE: every factor has full rank."""
    model = tanh_mlp()
    X, y = inputs(7, 3), inputs(7, 3, seed=3)
    return kfac(model, nn.MSELoss(), batches(X, y), fisher_type="type-2", **options), model


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_exact_damping_inverts_kfac_plus_damping(separate):
    K, _ = _well_conditioned_kfac(separate_weight_and_bias=separate)
    K_inv = KFACInverseLinearOperator(K, damping=0.3, use_exact_damping=True)
    v = np.random.default_rng(0).normal(size=K.shape[0])
    assert_close(K_inv @ (K @ v + 0.3 * v), v)


def _damped_factor_inverse_reference(K, damping_A, damping_G):
    """Dense inverse of the blocks ``(G + δ_G I) ⊗ (A + δ_A I)`` (a bias: ``G + δ_G I``)."""
    blocks = []
    for name, parts in K._mapping.items():
        G = K._gradient_covariances[name].numpy()
        G_inv = np.linalg.inv(G + damping_G(name) * np.eye(len(G)))
        if K._is_joint(name) or "weight" in parts:
            A = K._input_covariances[name].numpy()
            A_inv = np.linalg.inv(A + damping_A(name) * np.eye(len(A)))
            blocks.append(np.kron(G_inv, A_inv))
        if not K._is_joint(name) and "bias" in parts:
            blocks.append(G_inv)  # the layer's damped G, as in 3.0.1
    return scipy.linalg.block_diag(*blocks)


@pytest.mark.parametrize("damping", [0.2, (0.1, 0.3)], ids=["one", "pair"])
def test_damped_factor_inverse_against_dense(damping):
    K, _ = _well_conditioned_kfac()
    d_A, d_G = damping if isinstance(damping, tuple) else (damping, damping)
    K_inv = KFACInverseLinearOperator(K, damping=damping)
    expected = _damped_factor_inverse_reference(K, lambda name: d_A, lambda name: d_G)
    assert_close(dense(K_inv), expected)


def test_heuristic_damping_against_dense():
    K, _ = _well_conditioned_kfac()
    K_inv = KFACInverseLinearOperator(K, damping=0.2, use_heuristic_damping=True, min_damping=1e-3)

    def ratio(name):
        A, G = K._input_covariances[name].numpy(), K._gradient_covariances[name].numpy()
        return np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))

    def damping_A(name):
        return max(np.sqrt(0.2) * ratio(name), 1e-3)

    def damping_G(name):
        return max(np.sqrt(0.2) / ratio(name), 1e-3)

    assert_close(dense(K_inv), _damped_factor_inverse_reference(K, damping_A, damping_G))


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_closed_forms_against_dense(separate):
    K, _ = _well_conditioned_kfac(separate_weight_and_bias=separate)
    K_dense = dense(K)
    sign, logdet = np.linalg.slogdet(K_dense)
    assert sign > 0
    assert_close(K.trace, np.trace(K_dense))
    assert_close(K.logdet, logdet)
    assert_close(K.det, np.linalg.det(K_dense), rtol=1e-8)  # a product of many factors
    assert_close(K.frobenius_norm, np.linalg.norm(K_dense))


# --- errors ------------------------------------------------------------------------------------
def _args():
    model = _seeded(0, nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    return model, nn.MSELoss(), inputs(4, 3), inputs(4, 2, seed=3)


def test_parameters_of_unsupported_layers_are_refused():
    model, loss_func, X, y = _args()
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\].*LayerNorm"):
        KFACLinearOperator(model, loss_func, list(model.parameters()), [(X, y)])
    # without them it works
    params = [model[0].weight, model[0].bias, model[2].weight]
    KFACLinearOperator(model, loss_func, params, [(X, y)])


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"fisher_type": "type-3"}, ValueError, "fisher_type: expected a FisherType"),
        ({"fisher_type": 2}, TypeError, "fisher_type"),
        ({"kfac_approx": "extend"}, ValueError, "kfac_approx: expected a KFACType"),
        ({"mc_samples": 0}, ValueError, "mc_samples: expected a positive int"),
        ({"fisher_type": "type-2", "mc_samples": 2}, ValueError, "mc_samples: expected 1"),
        ({"num_per_example_loss_terms": 0}, ValueError, "num_per_example_loss_terms"),
    ],
)
def test_bad_options_are_refused(options, error, match):
    model, loss_func, X, y = _args()
    params = [model[0].weight, model[0].bias]
    with pytest.raises(error, match=match):
        KFACLinearOperator(model, loss_func, params, [(X, y)], **options)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_callable_loss_needs_a_distribution_or_hessian(fisher_type):
    model, _, X, y = _args()
    params = [model[0].weight]

    def loss_func(outputs, targets):
        return ((outputs - targets) ** 4).sum()

    loss_func.reduction = "sum"
    with pytest.raises(TypeError, match="loss_func: expected MSELoss"):
        KFACLinearOperator(model, loss_func, params, [(X, y)], fisher_type=fisher_type)
    # the empirical Fisher only needs gradients
    KFACLinearOperator(model, loss_func, params, [(X, y)], fisher_type="empirical")


def test_model_must_be_a_module():
    model, loss_func, X, y = _args()
    params = {"0.weight": model[0].weight}

    def model_func(p, x):
        return x @ p["0.weight"].T

    with pytest.raises(TypeError, match="model_func: expected a torch.nn.Module"):
        KFACLinearOperator(model_func, loss_func, params, [(X, y[:, :1].repeat(1, 4))])


def test_inverse_options_are_checked():
    K, _ = _well_conditioned_kfac()
    with pytest.raises(ValueError, match="at most one of them"):
        KFACInverseLinearOperator(K, use_heuristic_damping=True, use_exact_damping=True)
    with pytest.raises(ValueError, match="damping: expected one number"):
        KFACInverseLinearOperator(K, damping=(0.1, 0.2), use_exact_damping=True)
    with pytest.raises(TypeError, match="A: expected a KFACLinearOperator"):
        KFACInverseLinearOperator(np.eye(3))
    with pytest.raises(ValueError, match="damping: expected a damping that makes"):
        KFACInverseLinearOperator(K, damping=-100.0) @ np.ones(K.shape[0])


# --- EKFAC -----------------------------------------------------------------------------------
def ekfac(model, loss_func, data, **options):
    return EKFACLinearOperator(model, loss_func, list(model.parameters()), data, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_ekfac_is_exact_where_kfac_is(reduction, separate, monkeypatch):
    from curvlinops import _kfac_program

    # the 2 output columns in chunks of 1 (the correction summed over chunks) or together
    monkeypatch.setattr(_kfac_program, "COLUMNS_PER_CHUNK", 1 if separate else 64)
    model = deep_linear()
    X, y = inputs(7, 3), inputs(7, 2, seed=3)
    loss_func = nn.MSELoss(reduction=reduction)
    E = ekfac(
        model, loss_func, batches(X, y), fisher_type="type-2", separate_weight_and_bias=separate
    )
    expected = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=not separate)
    assert_close(dense(E), expected)


def test_ekfac_one_datum_is_exact():
    model = tanh_mlp()
    X, y = inputs(1, 3), labels(1, 3)
    E = ekfac(model, nn.CrossEntropyLoss(), [(X, y)], fisher_type="empirical")
    expected = dense_gradient_outer(model, nn.CrossEntropyLoss(), X, y)
    assert_close(dense(E), block_diagonal(expected, model, joint_layers=False))


def _eigenbasis_reference(E, ggn, model):
    """The block's exact diagonal in EKFAC's eigenbasis, rotated back: what EKFAC must be."""
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0, *sizes])
    result = np.zeros_like(ggn)
    for name, parts in E._mapping.items():
        Q_G = E._gradient_covariances_eigenvectors[name].numpy()
        if E._is_joint(name):
            blocks = [([parts["weight"], parts["bias"]], E._input_covariances_eigenvectors[name])]
        else:
            blocks = [
                ([pos], E._input_covariances_eigenvectors[name] if part == "weight" else None)
                for part, pos in parts.items()
            ]
        for positions, Q_A in blocks:
            index = np.concatenate([np.arange(offsets[p], offsets[p + 1]) for p in positions])
            if len(positions) == 2:  # joint: rows of (W | b) interleaved as (d_out, d_in + 1)
                d_out = model.get_submodule(name).weight.shape[0]
                w, b = index[:-d_out].reshape(d_out, -1), index[-d_out:, None]
                index = np.concatenate([w, b], axis=1).reshape(-1)
            Q = np.kron(Q_G, np.eye(1) if Q_A is None else Q_A.numpy())
            B = ggn[np.ix_(index, index)]
            result[np.ix_(index, index)] = Q @ np.diag(np.diag(Q.T @ B @ Q)) @ Q.T
    return result


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "joint"])
def test_ekfac_eigenvalues_are_the_blocks_diagonal_in_its_eigenbasis(separate):
    """Type-2 EKFAC: Λ is diag((Q_G ⊗ Q_A)ᵀ B (Q_G ⊗ Q_A)) for the exact GGN block B."""
    model = tanh_mlp()
    X, y = inputs(7, 3), labels(7, 3)
    loss_func = nn.CrossEntropyLoss()
    E = ekfac(
        model, loss_func, batches(X, y), fisher_type="type-2", separate_weight_and_bias=separate
    )
    E_dense = dense(E)
    ggn = dense_ggn(model, loss_func, X, y)
    assert_close(E_dense, _eigenbasis_reference(E, ggn, model))
    # so EKFAC is at least as close to the block diagonal as KFAC
    K = kfac(
        model, loss_func, batches(X, y), fisher_type="type-2", separate_weight_and_bias=separate
    )
    target = block_diagonal(ggn, model, joint_layers=not separate)
    assert np.linalg.norm(E_dense - target) <= np.linalg.norm(dense(K) - target)


def test_ekfac_cnn_is_closer_than_kfac():
    model = _seeded(0, nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))
    X, y = inputs(5, 1, 4, 4), labels(5, 3)
    loss_func = nn.CrossEntropyLoss()
    options = {"fisher_type": "type-2"}
    E = dense(ekfac(model, loss_func, batches(X, y, (3, 2)), **options))
    K = dense(kfac(model, loss_func, batches(X, y, (3, 2)), **options))
    target = block_diagonal(dense_ggn(model, loss_func, X, y), model, joint_layers=False)
    assert np.linalg.norm(E - target) <= np.linalg.norm(K - target)


def test_ekfac_inverse_and_closed_forms():
    model = tanh_mlp()
    X, y = inputs(7, 3), inputs(7, 3, seed=3)
    E = ekfac(model, nn.MSELoss(), batches(X, y), fisher_type="type-2")
    E_dense = dense(E)
    v = np.random.default_rng(0).normal(size=E.shape[0])
    E_inv = KFACInverseLinearOperator(E, damping=0.3, use_exact_damping=True)
    assert_close(E_inv @ (E @ v + 0.3 * v), v)
    sign, logdet = np.linalg.slogdet(E_dense)
    assert sign > 0
    assert_close(E.trace, np.trace(E_dense))
    assert_close(E.logdet, logdet)
    assert_close(E.det, np.linalg.det(E_dense), rtol=1e-8)
    assert_close(E.frobenius_norm, np.linalg.norm(E_dense))
    with pytest.raises(ValueError, match="use_exact_damping: expected True"):
        KFACInverseLinearOperator(E, damping=0.3)


def test_ekfac_refuses_forward_only_and_sequence_outputs():
    model = deep_linear()
    X, y = inputs(4, 5, 3), inputs(4, 5, 2, seed=3)
    with pytest.raises(ValueError, match="fisher_type: expected 'type-2', 'mc' or 'empirical'"):
        ekfac(model, nn.MSELoss(), [(X[:, 0], y[:, 0])], fisher_type="forward-only")
    with pytest.raises(ValueError, match=r"model_func: expected outputs of shape \(N, C\)"):
        ekfac(model, nn.MSELoss(), [(X, y)], fisher_type="type-2")


def test_num_per_example_loss_terms_enters_the_mean_normalisation():
    """As in curvlinops-for-pytorch: G scales with the number given (for 'mean' only)."""
    model = deep_linear()
    X, y = inputs(7, 5, 3), inputs(7, 5, 2, seed=3)
    for reduction, factor in (("mean", 2.0), ("sum", 1.0)):
        loss_func = nn.MSELoss(reduction=reduction)

        def kfac_with(terms, loss_func=loss_func):
            K = kfac(
                model,
                loss_func,
                batches(X, y),
                fisher_type="type-2",
                num_per_example_loss_terms=terms,
            )
            return dense(K)

        inferred = kfac_with(None)
        assert_close(kfac_with(5), inferred)  # the number read off the outputs
        assert_close(kfac_with(10), factor * inferred)


def test_layers_called_twice_or_never_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.layer(self.layer(x))

    torch.manual_seed(0)
    model = Tied().to(DTYPE)
    X, y = inputs(4, 3), inputs(4, 3, seed=3)
    with pytest.raises(ValueError, match="layer 'layer' called more than once"):
        KFACLinearOperator(model, nn.MSELoss(), list(model.layer.parameters()), [(X, y)])
    model.forward = lambda x: model.layer(x)
    with pytest.raises(ValueError, match=r"layers \['unused'\] not called"):
        KFACLinearOperator(model, nn.MSELoss(), list(model.parameters()), [(X, y)])


# --- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_state_dict_round_trip(operator, tmp_path):
    model = tanh_mlp()
    X, y = inputs(7, 3), labels(7, 3)
    data, params = batches(X, y), list(model.parameters())
    A = operator(model, nn.CrossEntropyLoss(), params, data, fisher_type="type-2")
    expected = dense(A)
    torch.save(A.state_dict(), tmp_path / "kfac.pt")
    state = torch.load(tmp_path / "kfac.pt", weights_only=False)
    assert state["fisher_type"] == "type-2" and state["loss_type"] == "CrossEntropyLoss"
    restored = operator.from_state_dict(state, model, params, data)
    assert_close(dense(restored), expected)
    # loading overwrites the model's parameters and the factors
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    other = operator(model, nn.CrossEntropyLoss(), params, data, fisher_type="empirical")
    with pytest.warns(UserWarning, match="overwrite the parameters"):
        other.load_state_dict(state)
    assert_close(dense(other), expected)
    assert_close(torch.cat([p.reshape(-1) for p in params]), _flat_model(tanh_mlp())[0])


def test_state_dict_of_another_loss_is_refused():
    model = tanh_mlp()
    X, y = inputs(7, 3), labels(7, 3)
    K = kfac(model, nn.CrossEntropyLoss(), batches(X, y))
    other = kfac(model, nn.CrossEntropyLoss(reduction="sum"), batches(X, y))
    with pytest.raises(ValueError, match="state_dict: expected"):  # before any write
        other.load_state_dict(K.state_dict())


# --- the reference: curvlinops-for-pytorch 3.0.1 ----------------------------------------------
REFERENCE_SCRIPT = """
import sys, numpy as np, torch
from torch import nn
from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # tiny matrices: a second thread only waits (for long, on a busy machine)
LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


class ClassesFirst(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def model_of(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)
        )
    tail = [ClassesFirst()] if kind == "seq_ct" else []
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), *tail)


def data_of(kind, loss):
    g = torch.Generator().manual_seed(1)
    shape = {"mlp": (4,), "seq": (6, 4), "seq_ct": (6, 4), "cnn": (2, 4, 4)}[kind]
    out = {"mlp": (3,), "seq": (6, 3), "seq_ct": (3, 6), "cnn": (3,)}[kind]
    X = torch.randn(7, *shape, generator=g)
    if loss == "ce":
        y = torch.randint(0, 3, (7, 6) if kind == "seq_ct" else (7,), generator=g)
    elif loss == "bce":
        y = torch.rand(7, *out, generator=g).round()
    else:
        y = torch.randn(7, *out, generator=g)
    return [(X[:4], y[:4]), (X[4:], y[4:])]


def as_array(D):
    return np.asarray(D.detach() if isinstance(D, torch.Tensor) else D)


cases = [
    ("mlp", loss, reduction, fisher_type, "expand", separate)
    for loss in LOSSES
    for reduction in ("mean", "sum")
    for fisher_type in ("type-2", "empirical", "forward-only")
    for separate in (True, False)
] + [
    (kind, loss, reduction, fisher_type, approx, True)
    for kind, loss in (("seq", "mse"), ("seq_ct", "ce"), ("cnn", "ce"))
    for reduction in ("mean", "sum")
    for approx in ("expand", "reduce")
    for fisher_type in ("type-2", "empirical")
]
results = {}
for case in cases:
    kind, loss, reduction, fisher_type, approx, separate = case
    model, key = model_of(kind), "|".join(map(str, case))
    params = list(model.parameters())
    options = dict(
        fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=separate
    )
    args = (model, LOSSES[loss](reduction=reduction), params, data_of(kind, loss))
    K = KFACLinearOperator(*args, **options)
    eye = torch.eye(sum(p.numel() for p in params))
    results["kfac " + key] = as_array(K @ eye)
    results["mapping " + key] = np.array(str(K._mapping))
    for name in K._mapping:
        if name in K._input_covariances:
            results[f"A {name} {key}"] = K._input_covariances[name].numpy()
        results[f"G {name} {key}"] = K._gradient_covariances[name].numpy()
    if kind == "mlp" and loss == "mse" and fisher_type == "type-2":
        for damping in (dict(damping=(0.1, 0.2)), dict(damping=0.1, use_heuristic_damping=True),
                        dict(damping=0.1, use_exact_damping=True)):
            results[f"inverse {damping} {key}"] = as_array(
                KFACInverseLinearOperator(K, **damping) @ eye
            )
        for name in ("trace", "frobenius_norm"):
            results[f"{name} {key}"] = np.asarray(float(getattr(K, name)))
    if (kind == "mlp" or (kind == "cnn" and approx == "expand")) and fisher_type != "forward-only":
        E = EKFACLinearOperator(*args, **options)
        results["ekfac " + key] = as_array(E @ eye)
        inverse = KFACInverseLinearOperator(E, damping=0.1, use_exact_damping=True)
        results["ekfac inverse " + key] = as_array(inverse @ eye)
np.savez(sys.argv[1], **results)
"""


def _reference_path():
    import os
    from pathlib import Path

    default = Path(__file__).resolve().parents[1] / ".venv" / "curvlinops-for-pytorch"
    return Path(os.environ.get("CURVLINOPS_FOR_PYTORCH_PATH", default))


def _run_script(tmp_path, name, first_on_path):
    import os
    import subprocess
    import sys

    script, output = tmp_path / "reference_cases.py", tmp_path / f"{name}.npz"
    script.write_text(REFERENCE_SCRIPT)
    path = os.pathsep.join([str(first_on_path), os.environ.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, str(script), str(output)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    return process, output


def test_same_numbers_as_curvlinops_for_pytorch(tmp_path):
    """KFAC, EKFAC, inverses and factors equal 3.0.1's (deterministic fisher types)."""
    from pathlib import Path

    reference = _reference_path()
    if not (reference / "curvlinops").is_dir():
        pytest.skip(f"curvlinops-for-pytorch 3.0.1 is not installed in {reference}")
    theirs, their_file = _run_script(tmp_path, "theirs", reference)
    if theirs.returncode != 0 and "ModuleNotFoundError" in theirs.stderr:
        pytest.skip(f"curvlinops-for-pytorch 3.0.1 lacks a dependency: {theirs.stderr[-200:]}")
    assert theirs.returncode == 0, theirs.stderr
    ours, our_file = _run_script(tmp_path, "ours", Path(__file__).resolve().parents[1])
    assert ours.returncode == 0, ours.stderr
    expected, actual = np.load(their_file), np.load(our_file)
    assert sorted(actual.files) == sorted(expected.files)
    for key in expected.files:
        if expected[key].dtype.kind == "U":
            assert str(actual[key]) == str(expected[key]), key
        else:
            assert_close(actual[key], expected[key], name=key)


# --- JAX: layers of a plain function, found by tracing ------------------------------------------
needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="jax is not installed"
)


def _jax_twin(model):
    """JAX copies of a torch model's parameters, in its order and PyTorch's layout."""
    import jax.numpy as jnp

    return [jnp.asarray(p.detach().numpy()) for p in model.parameters()]


def _jax_data(data):
    import jax.numpy as jnp

    return [(jnp.asarray(X.numpy()), jnp.asarray(y.numpy())) for X, y in data]


def _torch_style_function(kind):
    """``(params, X) -> outputs`` in JAX for the torch models below (same parameter order)."""
    import jax.numpy as jnp
    from jax import lax

    def dense(x, W, b):
        return x @ W.T + b

    def mlp(p, x):
        return dense(jnp.tanh(dense(x, p[0], p[1])), p[2], p[3])

    def deep_linear_seq(p, x):
        return dense(dense(dense(x, p[0], p[1]), p[2], p[3]), p[4], p[5])

    def mean_seq(p, x):
        h = dense(dense(x, p[0], p[1]), p[2], p[3]).mean(axis=1)
        return dense(h, p[4], p[5])

    def cnn(p, x):
        h = lax.conv_general_dilated(x, p[0], (2, 2), ((1, 1), (1, 1))) + p[1][:, None, None]
        return dense(jnp.tanh(h).reshape(h.shape[0], -1), p[2], p[3])

    return {"mlp": mlp, "seq": deep_linear_seq, "mean_seq": mean_seq, "cnn": cnn}[kind]


def _torch_twin_problem(kind):
    if kind == "mlp":
        model, X, y = tanh_mlp(), inputs(7, 3), inputs(7, 3, seed=3)
    elif kind == "seq":
        model, X, y = deep_linear(), inputs(7, 5, 3), inputs(7, 5, 2, seed=3)
    elif kind == "mean_seq":
        layers = (nn.Linear(3, 4), nn.Linear(4, 3), MeanOverPositions(), nn.Linear(3, 2))
        model, X, y = _seeded(0, *layers), inputs(7, 5, 3), inputs(7, 2, seed=3)
    else:
        layers = (nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten())
        model = _seeded(0, *layers, nn.Linear(12, 3))
        X, y = inputs(7, 2, 4, 4), inputs(7, 3, seed=3)
    return model, batches(X, y)


@needs_jax
@pytest.mark.parametrize(
    ("kind", "approx", "separate"),
    [
        ("mlp", "expand", True),
        ("seq", "expand", False),
        ("mean_seq", "reduce", True),
        ("cnn", "expand", False),
    ],
)
def test_jax_gives_the_numbers_of_torch(kind, approx, separate):
    """The same weights in PyTorch and in a plain JAX function: the same (E)KFAC."""
    from curvlinops import losses

    model, data = _torch_twin_problem(kind)
    options = dict(fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=separate)
    args = (_torch_style_function(kind), losses.MSELoss(), _jax_twin(model), _jax_data(data))
    K_jax = KFACLinearOperator(*args, **options)
    K_torch = kfac(model, nn.MSELoss(), data, **options)
    assert_close(dense(K_jax), dense(K_torch))
    assert list(K_jax._mapping.values()) == list(K_torch._mapping.values())
    assert_close(K_jax.trace, K_torch.trace)
    v = np.random.default_rng(0).normal(size=K_jax.shape[0])
    inverse = {"damping": 0.1, "use_heuristic_damping": True}
    assert_close(
        KFACInverseLinearOperator(K_jax, **inverse) @ v,
        KFACInverseLinearOperator(K_torch, **inverse) @ v,
    )
    if kind in ("mlp", "cnn"):  # EKFAC needs outputs (N, C)
        E_jax = EKFACLinearOperator(*args, **options)
        assert_close(dense(E_jax), dense(ekfac(model, nn.MSELoss(), data, **options)))


@needs_jax
def test_jax_flax_and_equinox_layouts():
    """Kernels (in, out) and HWIO with NHWC inputs (flax), vmapped ``W @ x + b`` (equinox)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from curvlinops import losses

    torch_model = _seeded(0, nn.Conv2d(2, 3, 3, padding=1), nn.Tanh())
    head = _seeded(1, nn.Linear(3, 2))
    model = nn.Sequential(*torch_model, GlobalMean(), *head)
    X, y = inputs(5, 2, 4, 4), inputs(5, 2, seed=3)
    data = batches(X, y, (3, 2))
    conv_w, conv_b, lin_w, lin_b = (p.detach().numpy() for p in model.parameters())
    params = {  # flax: conv kernel HWIO, dense kernel (in, out); leaves sorted by key
        "conv": {"kernel": jnp.asarray(conv_w.transpose(2, 3, 1, 0)), "bias": conv_b},
        "head": {"kernel": jnp.asarray(lin_w.T), "bias": lin_b},
    }
    params = jax.tree_util.tree_map(jnp.asarray, params)

    def flax_style(p, x):  # x: NHWC
        h = lax.conv_general_dilated(
            x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jnp.tanh(h + p["conv"]["bias"]).mean(axis=(1, 2))
        return jax.vmap(lambda v: p["head"]["kernel"].T @ v + p["head"]["bias"])(h)

    nhwc = [
        (jnp.asarray(Xb.numpy().transpose(0, 2, 3, 1)), jnp.asarray(yb.numpy())) for Xb, yb in data
    ]
    K_jax = KFACLinearOperator(flax_style, losses.MSELoss(), params, nhwc, fisher_type="type-2")
    K_torch = kfac(model, nn.MSELoss(), data, fisher_type="type-2")
    assert K_jax._mapping == {
        "['conv']": {"weight": 1, "bias": 0},
        "['head']": {"weight": 3, "bias": 2},
    }
    # the JAX flat order (conv bias, conv kernel HWIO, head bias, head kernel (in, out))
    sizes = [p.numel() for p in model.parameters()]
    torch_index = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    order = np.concatenate(
        [
            torch_index[1],
            torch_index[0].reshape(conv_w.shape).transpose(2, 3, 1, 0).reshape(-1),
            torch_index[3],
            torch_index[2].reshape(lin_w.shape).T.reshape(-1),
        ]
    )
    assert_close(dense(K_jax), dense(K_torch)[np.ix_(order, order)])


class GlobalMean(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


@needs_jax
def test_jax_layers_inside_jit_and_unmatched_leaves():
    import jax
    import jax.numpy as jnp

    from curvlinops import losses

    @jax.jit
    def layer(x, W, b):
        return x @ W + b

    def model_func(p, x):
        return layer(jnp.tanh(layer(x, p["W1"], p["b1"])), p["W2"], p["b2"]) * p["scale"]

    rng = np.random.default_rng(0)
    params = {
        "W1": rng.normal(size=(3, 4)),
        "b1": rng.normal(size=4),
        "W2": rng.normal(size=(4, 2)),
        "b2": rng.normal(size=2),
    }
    params = {k: jnp.asarray(v) for k, v in params.items()}
    data = [(jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 2))))]
    with pytest.raises(
        ValueError, match=r"params: expected leaves .* got leaves \[\"\['scale'\]\"\]"
    ):
        KFACLinearOperator(model_func, losses.MSELoss(), {**params, "scale": jnp.ones(2)}, data)
    closed = lambda p, x: model_func({**p, "scale": 2.0}, x)  # noqa: E731
    K = KFACLinearOperator(closed, losses.MSELoss(), params, data, fisher_type="type-2")
    assert K._mapping == {"['W1']": {"weight": 0, "bias": 2}, "['W2']": {"weight": 1, "bias": 3}}

    def tied(p, x):  # an autoencoder with a tied decoder
        return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W1"].T

    X = data[0][0]
    with pytest.raises(ValueError, match=r"\['W1'\]\"\] used by several"):
        KFACLinearOperator(tied, losses.MSELoss(), params, [(X, X)])


@needs_jax
def test_jax_mc_uses_the_draws_of_fisher_mc():
    from curvlinops import losses

    model = tanh_mlp()
    X, y = inputs(1, 3), inputs(1, 3, seed=3)
    args = (_torch_style_function("mlp"), losses.MSELoss(), _jax_twin(model), _jax_data([(X, y)]))
    K = KFACLinearOperator(*args, mc_samples=3, seed=5, separate_weight_and_bias=False)
    F = FisherMCLinearOperator(*args, mc_samples=3, seed=5)
    assert_close(dense(K), block_diagonal(dense(F), model))


def _jax_one_datum_ggn(model_func, params, X, y):
    """The dense GGN of cross-entropy (mean) at one datum, in the flat parameter order."""
    import jax
    import jax.flatten_util

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    J = jax.jacobian(lambda theta: model_func(unravel(theta), X)[0])(flat)
    p = jax.nn.softmax(model_func(params, X)[0])
    return np.asarray(J.T @ (np.diag(p) - np.outer(p, p)) @ J)


@needs_jax
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_jax_programs_compile_once_per_configuration(operator):
    """A new operator for new parameters reuses the factor, correction, product and
    inverse programs (no XLA compilation); its numbers are those of the dense GGN
    (exact for one data point)."""
    import jax.numpy as jnp

    from curvlinops import losses

    def model_func(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    rng = np.random.default_rng(7)
    X = jnp.asarray(rng.normal(size=(1, 4)))
    data = [(X, jnp.asarray([2]))]

    def params(seed):
        r = np.random.default_rng(seed)
        shapes = {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)}
        return {k: jnp.asarray(r.normal(size=s)) for k, s in shapes.items()}

    v = rng.normal(size=43)
    for seed in range(2):
        before = jax_compilations()
        K = operator(
            model_func, losses.CrossEntropyLoss(), params(seed), data, fisher_type="type-2",
            separate_weight_and_bias=False, check_deterministic=False,
        )  # fmt: skip
        Kv = K @ v
        inverse = KFACInverseLinearOperator(K, damping=0.5, use_exact_damping=True)
        round_trip = inverse @ (K @ v + 0.5 * v)
        compilations = jax_compilations() - before
        if seed == 0:
            assert compilations > 0  # the counter sees the first operator's programs
        else:
            assert compilations == 0, "a new operator of equal configuration compiled again"
        G = _jax_one_datum_ggn(model_func, params(seed), X, data[0][1])
        blocks = np.zeros_like(G)
        for layer in (np.r_[0:5, 8:28], np.r_[5:8, 28:43]):  # flat order b1, b2, w1, w2
            blocks[np.ix_(layer, layer)] = G[np.ix_(layer, layer)]
        assert_close(Kv, blocks @ v)
        assert_close(round_trip, v)


class ResidualMLP(nn.Module):
    """``l3(h + inner(h))`` with ``h = tanh(l1(x))``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.inner, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l3(h + self.inner(h))


@needs_jax
def test_jax_bias_added_after_a_residual_is_the_layers_bias():
    """``h + h @ W.T + b`` adds ``b`` to the residual sum: still the layer's bias."""
    import jax.numpy as jnp

    from curvlinops import losses

    def model_func(p, x):
        h = jnp.tanh(x @ p[0].T + p[1])
        return (h + h @ p[2].T + p[3]) @ p[4].T + p[5]

    model, X, y = ResidualMLP(), inputs(7, 3), inputs(7, 2, seed=3)
    data = batches(X, y)
    args = (model_func, losses.MSELoss(), _jax_twin(model), _jax_data(data))
    K_jax = KFACLinearOperator(*args, fisher_type="type-2")
    K_torch = kfac(model, nn.MSELoss(), data, fisher_type="type-2")
    assert list(K_jax._mapping.values()) == list(K_torch._mapping.values())
    assert_close(dense(K_jax), dense(K_torch))

    def read_twice(p, x):  # the sum before the bias is read again: not the layer's output
        h = jnp.tanh(x @ p[0].T + p[1])
        s = h + h @ p[2].T
        return (s + p[3] + s) @ p[4].T + p[5]

    with pytest.raises(ValueError, match=r"got leaves \['\[3\]'\] that are not"):
        KFACLinearOperator(read_twice, *args[1:])


@needs_jax
def test_jax_layers_named_explicitly():
    """A bias tracing cannot follow (scaled before the addition), named by ``layers``."""
    import jax.numpy as jnp

    from curvlinops import losses

    def model_func(p, x):
        return jnp.tanh(x @ p[0].T + 1.0 * p[1]) @ p[2].T + p[3]

    model, X, y = tanh_mlp(), inputs(7, 3), inputs(7, 3, seed=3)
    data = batches(X, y)
    args = (model_func, losses.MSELoss(), _jax_twin(model), _jax_data(data))
    with pytest.raises(ValueError, match=r"got leaves \['\[1\]'\] that are not"):
        KFACLinearOperator(*args)
    layers = {"first": {"weight": "[0]", "bias": "[1]"}}
    K_jax = KFACLinearOperator(*args, fisher_type="type-2", layers=layers)
    assert K_jax._mapping == {"first": {"weight": 0, "bias": 1}, "[2]": {"weight": 2, "bias": 3}}
    assert_close(dense(K_jax), dense(kfac(model, nn.MSELoss(), data, fisher_type="type-2")))
    for bad, error, match in [
        (["[0]"], TypeError, "layers: expected a dict"),
        ({"first": {"weight": "[0]", "bias": "[9]"}}, ValueError, r"\['bias'\]: expected the name"),
        ({"first": {"weight": "[1]"}}, ValueError, r"\['weight'\]: expected a leaf that is the"),
        ({"first": {"weight": "[0]", "scale": "[1]"}}, ValueError, "expected the keys"),
    ]:
        with pytest.raises(error, match=match):
            KFACLinearOperator(*args, layers=bad)
    with pytest.raises(ValueError, match="layers: expected None for PyTorch"):
        kfac(model, nn.MSELoss(), data, layers=layers)


@needs_jax
@pytest.mark.parametrize("operator", [KFACLinearOperator, EKFACLinearOperator])
def test_jax_state_dict_round_trip(operator):
    import jax
    import jax.numpy as jnp

    from curvlinops import losses

    model, X, y = tanh_mlp(), inputs(7, 3), labels(7, 3)
    data, params = _jax_data(batches(X, y)), _jax_twin(model)
    model_func, loss = _torch_style_function("mlp"), losses.CrossEntropyLoss(class_axis=1)
    A = operator(model_func, loss, params, data, fisher_type="type-2")
    expected, state = dense(A), A.state_dict()
    assert state["fisher_type"] == "type-2" and state["loss_class_axis"] == 1
    restored = operator.from_state_dict(state, model_func, params, data)
    assert_close(dense(restored), expected)
    shifted = [p + 1.0 for p in params]  # loading replaces the parameters and the factors
    other = operator(model_func, loss, shifted, data, fisher_type="empirical")
    with pytest.warns(UserWarning, match="overwrite the parameters"):
        other.load_state_dict(state)
    assert_close(dense(other), expected)
    for loaded, original in zip(jax.tree_util.tree_leaves(other.backend.primals), params):
        assert_close(loaded, original)
    state["model_func_state_dict"] = [jnp.ones(3)]
    with pytest.raises(ValueError, match="a parameter pytree"):  # before any write
        other.load_state_dict(state)
