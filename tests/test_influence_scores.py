"""Influence scores (curvlinops.influence_scores) against dense float64 references.

The reference inverts the dense curvature (``C @ I``) plus the per-layer damping
explicitly and multiplies per-example gradients from ``torch.func``; the same
weights in JAX give the same scores; kronfluence 1.0.1, where installed, gives
the same EK-FAC scores at equal settings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlinops import (
    EKFACLinearOperator,
    GGNDiagonalLinearOperator,
    GGNLinearOperator,
    IdentityLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)
from curvlinops.influence import influence_on_test_loss
from curvlinops.influence_scores import InfluenceScorer

N_TRAIN, N_QUERY, D_IN, D_HIDDEN, C = 12, 3, 4, 5, 3
KINDS = ["ggn", "kfac", "ekfac", "diagonal", "identity"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(D_HIDDEN, C)
    ).double()


def _data() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN + N_QUERY, D_IN, generator=generator, dtype=torch.float64)
    y = torch.randint(0, C, (N_TRAIN + N_QUERY,), generator=generator)
    return X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def _curvature(kind: str, model: torch.nn.Module, data: list) -> object:
    params = list(model.parameters())
    args = (model, torch.nn.CrossEntropyLoss(), params, data)
    if kind == "ggn":
        return GGNLinearOperator(*args)
    if kind == "kfac":
        return KFACLinearOperator(*args, fisher_type="type-2")
    if kind == "ekfac":
        return EKFACLinearOperator(*args, fisher_type="type-2")
    if kind == "diagonal":
        return GGNDiagonalLinearOperator(*args)
    return IdentityLinearOperator(sum(p.numel() for p in params))


def _per_example_gradients(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``(P, n)`` gradients of each example's loss, by ``torch.func``."""
    params = dict(model.named_parameters())

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = torch.func.functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(z, t[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g.reshape(len(X), -1) for g in grads.values()], dim=1).T.detach().numpy()


def _layer_rows(model: torch.nn.Module) -> dict[str, np.ndarray]:
    rows, start = {}, 0
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        rows.setdefault(layer, []).extend(range(start, start + p.numel()))
        start += p.numel()
    return {layer: np.array(r) for layer, r in rows.items()}


def _dense_reference(curvature: object, model: torch.nn.Module, damping: object) -> dict:
    """Pairwise, self and per-layer scores from the explicit inverse of ``C + D``."""
    X, y, X_q, y_q = _data()
    P = sum(p.numel() for p in model.parameters())
    dense = np.asarray(curvature @ np.eye(P))
    rows = _layer_rows(model)
    if damping == "heuristic":
        diag = np.diag(dense)
        damping = {layer: 0.1 * diag[r].mean() for layer, r in rows.items()}
    d = np.zeros(P)
    for layer, r in rows.items():
        d[r] = damping[layer] if isinstance(damping, dict) else damping
    inverse = np.linalg.inv(dense + np.diag(d))
    G_t, G_q = _per_example_gradients(model, X, y), _per_example_gradients(model, X_q, y_q)
    S, R = inverse @ G_q, inverse @ G_t
    return {
        "pairwise": S.T @ G_t,
        "self": np.sum(R * G_t, axis=0),
        "layers": {layer: S[r].T @ G_t[r] for layer, r in rows.items()},
        "damping": d,
    }


@pytest.mark.parametrize("damping", [0.1, "heuristic"])
@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_dense_inverse(kind: str, damping: object) -> None:
    model = _model()
    X, y, X_q, y_q = _data()
    train = [(X[:7], y[:7]), (X[7:], y[7:])]  # two batches, split into passes of 5
    curvature = _curvature(kind, model, [(X, y)])
    scorer = InfluenceScorer(
        curvature,
        model,
        torch.nn.CrossEntropyLoss(),
        list(model.parameters()),
        damping=damping,
        examples_per_pass=5,
    )
    expected = _dense_reference(curvature, model, damping)
    scale = np.abs(expected["pairwise"]).max()
    rtol = 1e-7 if kind == "ggn" else 1e-10  # CG stops at sqrt(eps) relative residual
    pairwise = scorer.pairwise_scores([(X_q, y_q)], train).numpy()
    np.testing.assert_allclose(pairwise, expected["pairwise"], atol=rtol * scale, rtol=0)
    self_scores = scorer.self_scores(train).numpy()
    atol = rtol * np.abs(expected["self"]).max()
    np.testing.assert_allclose(self_scores, expected["self"], atol=atol, rtol=0)
    per_layer = scorer.pairwise_scores([(X_q, y_q)], train, per_layer=True)
    assert list(per_layer) == scorer.layer_names == ["0", "2"]
    for layer, scores in per_layer.items():
        reference = expected["layers"][layer]
        np.testing.assert_allclose(scores.numpy(), reference, atol=rtol * scale, rtol=0)
    if damping == "heuristic":
        used = scorer._per_layer(scorer.damping_per_layer).numpy()
        np.testing.assert_allclose(used, expected["damping"], rtol=1e-12)


def test_block_diagonal_curvature_gives_per_layer_influence() -> None:
    """KFAC is block-diagonal: a layer's score is its own block's influence."""
    model = _model()
    X, y, X_q, y_q = _data()
    K = _curvature("kfac", model, [(X, y)])
    scorer = InfluenceScorer(K, model, torch.nn.CrossEntropyLoss(), list(model.parameters()))
    self_layers = scorer.self_scores([(X, y)], per_layer=True)
    total = scorer.self_scores([(X, y)])
    torch.testing.assert_close(sum(self_layers.values()), total, rtol=1e-12, atol=0)
    assert all(bool((s > 0).all()) for s in self_layers.values())  # SPD blocks


def test_scores_are_minus_influence_on_test_loss() -> None:
    model = _model()
    X, y, X_q, y_q = _data()
    params = list(model.parameters())
    E = _curvature("ekfac", model, [(X, y)])
    scores = InfluenceScorer(E, model, torch.nn.CrossEntropyLoss(), params, damping=0.01)
    ours = scores.pairwise_scores([(X_q, y_q)], [(X, y)])
    theirs = influence_on_test_loss(
        E, model, torch.nn.CrossEntropyLoss(), params, [(X, y)], (X_q, y_q), damping=0.01
    )
    torch.testing.assert_close(ours, -theirs, rtol=1e-12, atol=1e-14)


def test_curvature_scale_and_inverse_operator() -> None:
    """``curvature_scale`` scales C; a prepared inverse is applied as it is."""
    model = _model()
    X, y, X_q, y_q = _data()
    params, loss = list(model.parameters()), torch.nn.CrossEntropyLoss()
    K = _curvature("kfac", model, [(X, y)])
    scaled = InfluenceScorer(K, model, loss, params, damping=0.2, curvature_scale=2.0)
    plain = InfluenceScorer(K, model, loss, params, damping=0.1)
    torch.testing.assert_close(
        scaled.self_scores([(X, y)]), plain.self_scores([(X, y)]) / 2, rtol=1e-12, atol=0
    )
    inverse = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
    given = InfluenceScorer(inverse, model, loss, params)
    assert given.damping_per_layer == {"0": 0.0, "2": 0.0}  # the inverse holds its damping
    default = InfluenceScorer(K, model, loss, params)
    assert default.damping_per_layer == {"0": 1e-8, "2": 1e-8}  # kronfluence's default
    torch.testing.assert_close(
        given.pairwise_scores([(X_q, y_q)], [(X, y)]),
        plain.pairwise_scores([(X_q, y_q)], [(X, y)]),
        rtol=1e-12,
        atol=1e-14,
    )


def test_kfac_capture_gives_the_per_example_gradients() -> None:
    """With a PyTorch KFAC curvature, per-example gradients come from its layer capture."""
    model = _model()
    X, y, _, _ = _data()
    K = _curvature("kfac", model, [(X, y)])
    scorer = InfluenceScorer(K, model, torch.nn.CrossEntropyLoss(), list(model.parameters()))
    assert scorer._capturing is K
    expected = _per_example_gradients(model, X, y)
    np.testing.assert_allclose(scorer.gradients(X, y).numpy(), expected, rtol=1e-13, atol=1e-15)
    twin = _model()  # another module: the capture's hooks would not see it
    other = InfluenceScorer(K, twin, torch.nn.CrossEntropyLoss(), list(twin.parameters()))
    assert other._capturing is None


# --- across backends and against kronfluence ---------------------------------------
def jax_twin(model: torch.nn.Module) -> tuple:
    """The Linear-Tanh-Linear model's weights as a JAX dict ``{layer: {weight, bias}}`` and
    the function computing the same outputs (on inputs of any leading axes)."""
    jnp = pytest.importorskip("jax.numpy")
    params = {
        layer: {
            "weight": jnp.asarray(getattr(model, layer).weight.detach().numpy()),
            "bias": jnp.asarray(getattr(model, layer).bias.detach().numpy()),
        }
        for layer in ("0", "2")
    }

    def model_func(p: dict, x: object) -> object:
        h = jnp.tanh(x @ p["0"]["weight"].T + p["0"]["bias"])
        return h @ p["2"]["weight"].T + p["2"]["bias"]

    return model_func, params


@pytest.mark.parametrize("kind", ["ggn", "ekfac"])
def test_jax_scores_equal_torch_scores(kind: str) -> None:
    """Same weights in both frameworks: same per-layer scores and damping.

    The GGN is solved by CG with a damping per layer, EK-FAC has the heuristic's.
    """
    from curvlinops import losses

    model = _model()
    model_func, params = jax_twin(model)
    X, y, X_q, y_q = _data()
    jax_data = [(X.numpy(), y.numpy())]
    loss = losses.CrossEntropyLoss()
    if kind == "ggn":
        curvature = GGNLinearOperator(model_func, loss, params, jax_data, check_deterministic=False)
        jax_damping, torch_damping = {"['0']": 0.1, "['2']": 0.2}, {"0": 0.1, "2": 0.2}
    else:
        curvature = EKFACLinearOperator(model_func, loss, params, jax_data, fisher_type="type-2")
        jax_damping = torch_damping = "heuristic"
    ours = InfluenceScorer(curvature, model_func, loss, params, damping=jax_damping)
    torch_scorer = InfluenceScorer(
        _curvature(kind, model, [(X, y)]),
        model,
        torch.nn.CrossEntropyLoss(),
        list(model.parameters()),
        damping=torch_damping,
    )
    assert ours.layer_names == ["['0']", "['2']"]
    np.testing.assert_allclose(
        list(ours.damping_per_layer.values()),
        list(torch_scorer.damping_per_layer.values()),
        rtol=1e-12,
    )
    jax_scores = ours.pairwise_scores([(X_q.numpy(), y_q.numpy())], jax_data, per_layer=True)
    torch_scores = torch_scorer.pairwise_scores([(X_q, y_q)], [(X, y)], per_layer=True)
    rtol = 1e-7 if kind == "ggn" else 1e-12  # two CG runs stop at sqrt(eps) residuals
    for jax_layer, torch_layer in zip(jax_scores.values(), torch_scores.values()):
        expected = torch_layer.numpy()
        atol = rtol * np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(jax_layer), expected, atol=atol, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")  # kronfluence's
def test_ekfac_scores_equal_kronfluence(tmp_path: object) -> None:
    """EK-FAC (empirical Fisher) pairwise, per-module and self scores as kronfluence 1.0.1's."""
    pytest.importorskip("kronfluence")
    from benchmarks.kronfluence_runner import KronfluenceContender, tensor_dataset

    model = _model()
    X, y, X_q, y_q = _data()
    params, loss = list(model.parameters()), torch.nn.CrossEntropyLoss()
    E = EKFACLinearOperator(
        model, loss, params, [(X, y)], fisher_type="empirical", separate_weight_and_bias=False
    )
    contender = KronfluenceContender(model, tmp_path, strategy="ekfac", empirical=True)
    train, query = tensor_dataset(X, y), tensor_dataset(X_q, y_q)
    contender.fit_factors(train, batch_size=N_TRAIN)
    for damping in (1e-3, None):  # None: kronfluence's heuristic
        ours = InfluenceScorer(E, model, loss, params, damping=damping or "heuristic")
        theirs = contender.pairwise_scores(query, train, N_TRAIN, damping, per_module=True)
        pairwise = ours.pairwise_scores([(X_q, y_q)], [(X, y)], per_layer=True)
        assert list(pairwise) == list(theirs)
        scale = max(float(t.abs().max()) for t in theirs.values())
        for layer, scores in pairwise.items():
            torch.testing.assert_close(scores, theirs[layer], rtol=0, atol=1e-10 * scale)
        expected = contender.self_scores(train, N_TRAIN, damping)["all_modules"]
        atol = 1e-10 * float(expected.abs().max())
        torch.testing.assert_close(ours.self_scores([(X, y)]), expected, rtol=0, atol=atol)
    # query gradients in rank 2 (both layers' blocks, 5 x 5 and 3 x 6, are truncated)
    theirs = contender.pairwise_scores(query, train, N_TRAIN, None, rank=2)["all_modules"]
    low_rank = ours.pairwise_scores([(X_q, y_q)], [(X, y)], query_rank=2)
    atol = 1e-10 * float(theirs.abs().max())
    torch.testing.assert_close(low_rank, theirs, rtol=0, atol=atol)
    assert float((low_rank - ours.pairwise_scores([(X_q, y_q)], [(X, y)])).abs().max()) > atol


def test_query_rank_truncates_each_parameter_matrix() -> None:
    """Without KFAC, each weight ``(d_out, d_in)`` of a query is truncated by SVD."""
    model = _model()
    X, y, X_q, y_q = _data()
    params = list(model.parameters())
    identity = IdentityLinearOperator(sum(p.numel() for p in params))
    scorer = InfluenceScorer(identity, model, torch.nn.CrossEntropyLoss(), params, damping=0.0)
    G_q, G_t = _per_example_gradients(model, X_q, y_q), _per_example_gradients(model, X, y)
    truncated, start = [], 0
    for p in params:
        rows = G_q[start : start + p.numel()]
        start += p.numel()
        if p.ndim == 2:
            matrices = np.moveaxis(rows.reshape(*p.shape, -1), -1, 0)
            U, sigma, Vh = np.linalg.svd(matrices, full_matrices=False)
            rows = np.moveaxis((U[..., :2] * sigma[:, None, :2]) @ Vh[:, :2], 0, -1)
        truncated.append(rows.reshape(p.numel(), -1))
    expected = np.concatenate(truncated).T @ G_t
    ours = scorer.pairwise_scores([(X_q, y_q)], [(X, y)], query_rank=2).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    with pytest.raises(ValueError, match="query_rank"):
        scorer.pairwise_scores([(X_q, y_q)], [(X, y)], query_rank=0)


# --- bad input ----------------------------------------------------------------------
def _scorer(**options: object) -> InfluenceScorer:
    model = _model()
    X, y, _, _ = _data()
    K = options.pop("curvature", None) or _curvature("kfac", model, [(X, y)])
    return InfluenceScorer(
        K, model, torch.nn.CrossEntropyLoss(), list(model.parameters()), **options
    )


def test_bad_damping_is_refused() -> None:
    with pytest.raises(ValueError, match="damping.*'heuristic'.*'huristic'"):
        _scorer(damping="huristic")
    with pytest.raises(ValueError, match=r"damping.*one entry per layer.*\['0'\]"):
        _scorer(damping={"0": 0.1})
    with pytest.raises(ValueError, match="damping"):
        _scorer(damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        _scorer(damping=[0.1])
    with pytest.raises(ValueError, match="curvature_scale.*positive"):
        _scorer(curvature_scale=0.0)


def test_cg_options_and_damping_of_an_inverse_are_refused() -> None:
    with pytest.raises(ValueError, match="tol.*no CG solve runs"):
        _scorer(tol=1e-6)
    model = _model()
    X, y, _, _ = _data()
    inverse = KFACInverseLinearOperator(_curvature("kfac", model, [(X, y)]), damping=0.1)
    with pytest.raises(ValueError, match="damping/curvature_scale.*already an inverse"):
        _scorer(curvature=inverse, damping=0.1)


def test_wrong_curvature_shape_and_empty_data_are_refused() -> None:
    with pytest.raises(ValueError, match=r"curvature.*\(43, 43\).*got shape \(5, 5\)"):
        _scorer(curvature=IdentityLinearOperator(5))
    scorer = _scorer()
    with pytest.raises(ValueError, match="data.*at least one example"):
        scorer.self_scores([])
    with pytest.raises(TypeError, match="curvature.*operator"):
        _scorer(curvature="ggn")
