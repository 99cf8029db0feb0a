"""Attention models: ``scaled_dot_product_attention``, ``nn.MultiheadAttention``,
Hugging Face GPT-2 with its default ``sdpa`` attention (inputs as a
``BatchEncoding``) and an equinox transformer, against dense float64 references.

PyTorch's fused attention kernels have no second derivative, no forward mode
and no vmap rule; the backend runs attention on its math kernel inside its
autodiff transforms (``curvlinops/backends/_attention.py``). The references
compute attention explicitly (softmax of the scores, or Hugging Face's
``eager`` implementation), so they check that path, too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import assert_close
from scipy.sparse.linalg import eigsh

import curvlinops as cl

torch = pytest.importorskip("torch", reason="the attention models here are PyTorch modules")
nn, F = torch.nn, torch.nn.functional

DIM, HEADS, CLASSES, BATCH, SEQ = 8, 2, 3, 4, 5


# --- a hand-written attention classifier, in PyTorch and in JAX ------------------------
def attention_weights(seed: int = 0) -> list[np.ndarray]:
    """qkv weight and bias, output weight and bias (PyTorch's Linear layout)."""
    rng = np.random.default_rng(seed)
    shapes = [(3 * DIM, DIM), (3 * DIM,), (CLASSES, DIM), (CLASSES,)]
    return [rng.normal(size=s) / math.sqrt(DIM) for s in shapes]


def attention_inputs(seed: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``{"x": (B, T, D), "mask": (B, T)}`` with padded tails, and class labels."""
    rng = np.random.default_rng(seed)
    lengths = np.array([SEQ, 3, 4, 1])  # every sequence keeps its first position
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    return {"x": rng.normal(size=(BATCH, SEQ, DIM)), "mask": mask}, rng.integers(0, CLASSES, BATCH)


class SelfAttentionClassifier(nn.Module):
    """One self-attention layer, mean-pooled; ``explicit`` computes the softmax by hand."""

    def __init__(self, variant: str, explicit: bool = False) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM, dtype=torch.float64)
        self.out = nn.Linear(DIM, CLASSES, dtype=torch.float64)
        self.variant, self.explicit = variant, explicit
        with torch.no_grad():  # float64 weights, shared with the JAX model
            for p, w in zip(self.parameters(), attention_weights()):
                p.copy_(torch.from_numpy(w))

    def forward(self, X: dict) -> torch.Tensor:
        x = X["x"]
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        causal = self.variant == "causal"
        keys = X["mask"][:, None, None, :] if self.variant == "masked" else None
        if self.explicit:
            y = explicit_attention(q, k, v, keys, causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, is_causal=causal)
        return self.out(torch.tanh(y.transpose(1, 2).reshape(B, T, DIM)).mean(1))


def explicit_attention(q, k, v, keys, causal):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[-2]
    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    if keys is not None:
        allowed = allowed & keys
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1) @ v


class MultiheadClassifier(nn.Module):
    """``nn.MultiheadAttention`` (``need_weights=False`` calls SDPA), mean-pooled."""

    def __init__(self, need_weights: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.out = nn.Linear(DIM, CLASSES)
        self.need_weights = need_weights

    def forward(self, X: dict) -> torch.Tensor:
        x = X["x"]
        y, _ = self.attn(x, x, x, key_padding_mask=~X["mask"], need_weights=self.need_weights)
        return self.out(torch.tanh(y).mean(1))


# --- dense references by torch.func ----------------------------------------------------
def dense_curvatures(model: nn.Module, X: dict, y: torch.Tensor, loss_func) -> dict:
    """Dense float64 Hessian, GGN, empirical Fisher and Jacobian of ``model`` on ``(X, y)``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflatten(flat):
        pieces = torch.split(flat, [math.prod(s) for s in shapes])
        return {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}

    def outputs(flat):
        return torch.func.functional_call(model, unflatten(flat), (X,))

    def risk(flat):
        return loss_func(outputs(flat), y)

    z = outputs(theta).detach()
    J = torch.func.jacrev(outputs)(theta).reshape(z.numel(), -1)
    Hz = torch.func.hessian(lambda out: loss_func(out, y))(z).reshape(z.numel(), z.numel())
    per_row = torch.func.jacrev(lambda out: F.cross_entropy(out, y, reduction="none"))(z)
    row_grads = per_row.reshape(z.shape[0], -1) @ J  # (N, P): one gradient per loss term
    return {
        # plain autograd's double backward: torch.func.hessian over a flat vector gets
        # layer norms wrong (PyTorch 2.13; test_layer_norm_hessian_is_exact_and_symmetric)
        "hessian": torch.autograd.functional.hessian(risk, theta, vectorize=True),
        "ggn": J.T @ Hz @ J,
        "ef": row_grads.T @ row_grads / z.shape[0],
        "jacobian": J,
    }


def check_products(model, reference, X, y, batch_size_fn, first_order=True):
    """H, G, J (and EF, Jᵀ) products, one column and three, against dense references.

    ``first_order=False`` leaves out EF and Jᵀ (VJPs only, as a gradient).
    """
    loss_func, params, data = nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)]
    # (determinism checks have tests of their own; these models are deterministic)
    options = {"batch_size_fn": batch_size_fn, "check_deterministic": False}
    dense = dense_curvatures(reference, X, y, loss_func)
    P = dense["hessian"].shape[0]
    V = torch.from_numpy(np.random.default_rng(2).normal(size=(P, 3)))
    operators = {
        "hessian": cl.HessianLinearOperator(model, loss_func, params, data, **options),
        "ggn": cl.GGNLinearOperator(model, loss_func, params, data, **options),
        "jacobian": cl.JacobianLinearOperator(model, params, data, **options),
    }
    if first_order:
        operators["ef"] = cl.EFLinearOperator(model, loss_func, params, data, **options)
    for name, A in operators.items():
        assert_close(A @ V, dense[name] @ V, name=f"{name} @ V")
        assert_close(A @ V[:, 0], dense[name] @ V[:, 0], name=f"{name} @ v")
    if first_order:
        JT = cl.TransposedJacobianLinearOperator(model, params, data, **options)
        U = torch.from_numpy(np.random.default_rng(3).normal(size=(JT.shape[1], 2)))
        assert_close(JT @ U, dense["jacobian"].T @ U, name="J^T @ U")
    return dense, operators


def torch_inputs() -> tuple[dict, torch.Tensor]:
    X, y = attention_inputs()
    return {"x": torch.from_numpy(X["x"]), "mask": torch.from_numpy(X["mask"])}, torch.from_numpy(y)


@pytest.mark.parametrize("variant", ["causal", "masked"])
def test_scaled_dot_product_attention_products(variant):
    X, y = torch_inputs()
    model = SelfAttentionClassifier(variant)
    reference = SelfAttentionClassifier(variant, explicit=True)
    check_products(model, reference, X, y, lambda X: X["x"].shape[0])


def test_multihead_attention_products_in_eval_mode():
    # eval(): without our context, MultiheadAttention may take its fused fast path
    X, y = torch_inputs()
    model = MultiheadClassifier().double().eval()
    reference = MultiheadClassifier(need_weights=True).double().eval()
    dense, operators = check_products(model, reference, X, y, lambda X: X["x"].shape[0])
    G = dense["ggn"].numpy()
    assert_close(G, G.T, name="dense GGN symmetric")  # the reference is a GGN at all
    assert np.linalg.eigvalsh(G).min() > -1e-10 * np.abs(G).max()


class LayerNormClassifier(nn.Module):
    """Linear, LayerNorm, tanh, Linear: the layer norm's input depends on parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.norm = nn.Linear(DIM, DIM), nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, CLASSES)
        with torch.no_grad():  # not the default ones and zeros
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, X: dict) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inner(X["x"]))).mean(1))


def test_layer_norm_hessian_is_exact_and_symmetric():
    # torch.func.hessian of a flat-vector loss through F.layer_norm is not symmetric in
    # PyTorch 2.13 (the references here use plain autograd): the operators must not be hit
    X, y = torch_inputs()
    model = LayerNormClassifier().double()
    dense, operators = check_products(model, model, X, y, lambda X: X["x"].shape[0], False)
    H = operators["hessian"] @ torch.eye(operators["hessian"].shape[1], dtype=torch.float64)
    assert_close(H, H.T, name="H symmetric")
    assert_close(dense["hessian"], dense["hessian"].T, name="reference H symmetric")


def test_kernels_are_restored_around_products():
    """The math kernel is used inside products only; the caller's choice holds elsewhere."""
    seen = []

    class Recorder(SelfAttentionClassifier):
        def forward(self, X):
            seen.append(
                (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled())
            )
            return super().forward(X)

    X, y = torch_inputs()
    model = Recorder("causal")
    H = cl.HessianLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)],
        batch_size_fn=lambda X: X["x"].shape[0], check_deterministic=False,
    )  # fmt: skip
    plain = "plain forward passes keep the fused kernels and the fast path"
    assert seen and all(flash and fast for flash, fast in seen), plain
    seen.clear()
    H @ torch.ones(H.shape[1], dtype=torch.float64)
    assert seen and not any(flash or fast for flash, fast in seen)
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.mha.get_fastpath_enabled()


def test_differentiable_attention_restores_flags_after_an_error():
    from curvlinops.backends._attention import differentiable_attention

    torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(ZeroDivisionError):
        with differentiable_attention():
            assert not torch.backends.cuda.flash_sdp_enabled()
            1 / 0  # noqa: B018
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.mha.get_fastpath_enabled()


# --- the same weights in JAX ---------------------------------------------------------
def jax_attention_classifier(variant: str):
    jnp = pytest.importorskip("jax.numpy", reason="the cross-backend check needs JAX")
    import jax

    def model(params, X):
        w_qkv, b_qkv, w_out, b_out = params
        x = X["x"]
        B, T, _ = x.shape
        qkv = (x @ w_qkv.T + b_qkv).reshape(B, T, 3, HEADS, DIM // HEADS)
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        scores = q @ jnp.swapaxes(k, -1, -2) / math.sqrt(DIM // HEADS)
        allowed = jnp.ones((T, T), dtype=bool)
        if variant == "causal":
            allowed = jnp.tril(allowed)
        else:
            allowed = allowed & X["mask"][:, None, None, :]
        y = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1) @ v
        pooled = jnp.tanh(jnp.swapaxes(y, 1, 2).reshape(B, T, DIM)).mean(1)
        return pooled @ w_out.T + b_out

    return model


@pytest.mark.parametrize("variant", ["masked"])  # "causal" differs only in the mask
def test_same_attention_weights_in_pytorch_and_jax(variant):
    jax_model = jax_attention_classifier(variant)
    import jax.numpy as jnp

    X_np, y_np = attention_inputs()
    X, y = torch_inputs()
    model = SelfAttentionClassifier(variant)
    params_jax = [jnp.asarray(w) for w in attention_weights()]
    X_jax = {k: jnp.asarray(v) for k, v in X_np.items()}
    size = {"batch_size_fn": lambda X: X["x"].shape[0], "check_deterministic": False}
    V = np.random.default_rng(4).normal(size=(sum(w.size for w in params_jax), 3))
    for op in (cl.HessianLinearOperator, cl.GGNLinearOperator):
        A_torch = op(model, nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)], **size)
        A_jax = op(jax_model, cl.losses.CrossEntropyLoss(), params_jax, [(X_jax, y_np)], **size)
        assert_close(A_torch @ V, A_jax @ V, name=f"{op.__name__}: PyTorch vs JAX")
    J_torch = cl.JacobianLinearOperator(model, list(model.parameters()), [(X, y)], **size)
    J_jax = cl.JacobianLinearOperator(jax_model, params_jax, [(X_jax, y_np)], **size)
    assert_close(J_torch @ V, J_jax @ V, name="Jacobian: PyTorch vs JAX")


# --- Hugging Face GPT-2 (default sdpa attention) with BatchEncoding inputs ------------
SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park today",
    "the bird sang",
    "curvature of the loss",
]


@pytest.fixture(scope="module")
def encoded():
    """A tokenizer trained in memory on four sentences, and their padded BatchEncoding."""
    pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    )
    return wrapped(SENTENCES, padding=True, return_tensors="pt"), wrapped


def tiny_gpt2(kind: str, vocab_size: int, attention: str) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=8, n_embd=4, n_layer=1, n_head=2, n_inner=8,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, num_labels=CLASSES,
        attn_implementation=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config) if kind == "lm" else GPT2ForSequenceClassification(config)
    return model.double().eval()


class LanguageModelLogits(nn.Module):
    """Next-token logits ``(N (T-1), V)`` of a causal LM on a dict of inputs."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch) -> torch.Tensor:
        logits = self.lm(**batch).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


class ClassifierLogits(nn.Module):
    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, batch) -> torch.Tensor:
        return self.classifier(**batch).logits


@pytest.mark.parametrize("kind", ["lm", "classifier"])
def test_gpt2_with_sdpa_attention_and_batch_encoding(encoded, kind):
    batch, tokenizer = encoded
    wrap = LanguageModelLogits if kind == "lm" else ClassifierLogits
    model = wrap(tiny_gpt2(kind, tokenizer.vocab_size, "sdpa"))
    reference = wrap(tiny_gpt2(kind, tokenizer.vocab_size, "eager"))
    reference.load_state_dict(model.state_dict())
    if kind == "lm":
        y = batch["input_ids"][:, 1:].reshape(-1)  # padding predicted too: no ignore_index
    else:
        y = torch.tensor([0, 1, 2, 1])
    batch_size_fn = lambda X: X["input_ids"].shape[0]  # noqa: E731
    dense, operators = check_products(model, reference, batch, y, batch_size_fn, first_order=False)
    if kind == "lm":
        top = eigsh(operators["hessian"], k=1, which="LA", return_eigenvectors=False)
        expected = np.linalg.eigvalsh(dense["hessian"].numpy())[-1]
        assert_close(top, np.array([expected]), rtol=1e-8, name="top Hessian eigenvalue")


# --- JAX: an equinox causal transformer ----------------------------------------------
def equinox_lm(vocab_size: int, width: int = 4):
    eqx = pytest.importorskip("equinox", reason="the JAX transformer is an equinox module")
    import jax
    import jax.numpy as jnp

    class TinyTransformer(eqx.Module):
        embed: eqx.nn.Embedding
        positions: jax.Array
        attention: eqx.nn.MultiheadAttention
        norm: eqx.nn.LayerNorm
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.embed = eqx.nn.Embedding(vocab_size, width, key=k1)
            self.positions = 0.1 * jax.random.normal(k2, (SEQ, width))
            self.attention = eqx.nn.MultiheadAttention(HEADS, width, use_query_bias=True, key=k3)
            self.norm = eqx.nn.LayerNorm(width)
            self.head = eqx.nn.Linear(width, vocab_size, key=k4)

        def __call__(self, tokens):
            T = tokens.shape[0]
            h = jax.vmap(self.embed)(tokens) + self.positions[:T]
            h = h + self.attention(h, h, h, mask=jnp.tril(jnp.ones((T, T), dtype=bool)))
            return jax.vmap(self.head)(jax.vmap(self.norm)(h))

    module = TinyTransformer(jax.random.key(0))
    params, static = eqx.partition(module, eqx.is_inexact_array)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)

    def model_func(p, X):
        logits = jax.vmap(eqx.combine(p, static))(X["input_ids"])[:, :-1]
        return logits.reshape(-1, logits.shape[-1])

    return model_func, params


def test_equinox_transformer_against_jax_hessian():
    pytest.importorskip("jax", reason="the equinox test needs JAX")
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    vocab = 7
    model_func, params = equinox_lm(vocab)
    tokens = np.random.default_rng(5).integers(0, vocab, size=(BATCH, SEQ))
    X, y = {"input_ids": jnp.asarray(tokens)}, tokens[:, 1:].reshape(-1)
    flat, unravel = ravel_pytree(params)  # tree_leaves order, as the operators flatten

    def mean_cross_entropy(logits):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def outputs(theta):
        return model_func(unravel(theta), X)

    # jit: ten times faster than running jax.hessian op by op
    H_dense = np.asarray(jax.jit(jax.hessian(lambda t: mean_cross_entropy(outputs(t))))(flat))
    z = outputs(flat)
    J = jax.jit(jax.jacrev(outputs))(flat).reshape(z.size, -1)
    Hz = jax.jit(jax.hessian(mean_cross_entropy))(z).reshape(z.size, z.size)
    G_dense = np.asarray(J.T @ Hz @ J)

    loss, data = cl.losses.CrossEntropyLoss(), [(X, y)]
    size = {"batch_size_fn": lambda X: X["input_ids"].shape[0], "check_deterministic": False}
    H = cl.HessianLinearOperator(model_func, loss, params, data, **size)
    G = cl.GGNLinearOperator(model_func, loss, params, data, **size)
    V = np.random.default_rng(6).normal(size=(flat.size, 3))
    assert_close(H @ V, H_dense @ V, name="equinox H @ V")
    assert_close(G @ V, G_dense @ V, name="equinox G @ V")
    top = eigsh(H, k=1, which="LA", return_eigenvectors=False)
    assert_close(top, np.linalg.eigvalsh(H_dense)[-1:], rtol=1e-8, name="equinox top eigenvalue")
