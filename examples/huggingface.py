"""Curvature of Hugging Face transformers (PyTorch) and an equinox transformer (JAX).

    python examples/huggingface.py

Offline: a word-level tokenizer is trained in memory on a few sentences and
wrapped in ``PreTrainedTokenizerFast``; the models are tiny, randomly
initialised GPT-2s built from a ``GPT2Config`` (no download), with the default
``sdpa`` attention: a language model and a sequence classifier. Their batches
are the tokenizer's ``BatchEncoding``s. ``model_func`` adapts the outputs:
next-token logits flattened to ``(N (T-1), V)`` with the shifted
``input_ids`` as labels, or the classifier's logits. On the JAX side, the same
kind of causal transformer written with equinox.

For each model: the top eigenvalues of the Hessian and the GGN by ``eigsh``,
and the largest difference between ``eigsh``'s top Hessian eigenvalue and
the dense matrix's (the models are small enough for ``todense()``).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.flatten_util import ravel_pytree
from scipy.sparse.linalg import eigsh
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

import curvlinops as cl

jax.config.update("jax_enable_x64", True)
torch.manual_seed(0)
SEQ = 6  # tokens per sequence of the language model

SENTENCES = [
    "the cat sat on the warm mat today",
    "a dog ran in the green park this morning",
    "the bird sang a song in the tall tree",
    "we measure the curvature of the loss surface",
    "the model reads the words one by one",
    "a small network learns the next word well",
    "the sun rose over the quiet little town",
    "they trained the tiny model for a minute",
]
SENTIMENT = [1, 1, 1, 0, 0, 1, 1, 0]  # labels for the classifier: any two classes do


def in_memory_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``SENTENCES``, as Hugging Face tokenizers are used."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def gpt2_config(tokenizer: PreTrainedTokenizerFast, **extra) -> GPT2Config:
    return GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=16, n_embd=8, n_layer=1, n_head=2,
        n_inner=16, bos_token_id=0, eos_token_id=0, pad_token_id=tokenizer.pad_token_id, **extra,
    )  # fmt: skip


class NextTokenLogits(torch.nn.Module):
    """A causal LM's logits for positions ``0 .. T-2``, flattened to ``(N (T-1), V)``."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, batch) -> torch.Tensor:
        logits = self.lm(**batch).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


class ClassLogits(torch.nn.Module):
    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, batch) -> torch.Tensor:
        return self.classifier(**batch).logits


def language_model_problem(tokenizer):
    """GPT-2 LM; batches of SEQ tokens (truncated, no padding), labels = shifted ids."""
    lm = GPT2LMHeadModel(gpt2_config(tokenizer)).double().eval()
    data = []
    for start in (0, 4):
        sentences = SENTENCES[start : start + 4]
        batch = tokenizer(sentences, truncation=True, max_length=SEQ, return_tensors="pt")
        data.append((batch, batch["input_ids"][:, 1:].reshape(-1)))
    return NextTokenLogits(lm), data


def classifier_problem(tokenizer):
    """GPT-2 sequence classifier; padded batches with an attention mask."""
    classifier = GPT2ForSequenceClassification(gpt2_config(tokenizer, num_labels=2))
    classifier = classifier.double().eval()
    data = []
    for start in (0, 4):
        batch = tokenizer(SENTENCES[start : start + 4], padding=True, return_tensors="pt")
        data.append((batch, torch.tensor(SENTIMENT[start : start + 4])))
    return ClassLogits(classifier), data


class TinyTransformer(eqx.Module):
    """Token and position embeddings, one causal self-attention block, a read-out."""

    embed: eqx.nn.Embedding
    positions: jax.Array
    attention: eqx.nn.MultiheadAttention
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, vocab_size: int, width: int, key: jax.Array) -> None:
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab_size, width, key=k1)
        self.positions = 0.1 * jax.random.normal(k2, (SEQ, width))
        self.attention = eqx.nn.MultiheadAttention(2, width, use_query_bias=True, key=k3)
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, vocab_size, key=k4)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        T = tokens.shape[0]
        h = jax.vmap(self.embed)(tokens) + self.positions[:T]
        h = h + self.attention(h, h, h, mask=jnp.tril(jnp.ones((T, T), dtype=bool)))
        return jax.vmap(self.head)(jax.vmap(self.norm)(h))


def equinox_problem(tokenizer):
    """The equinox transformer, float64, as a ``(params, X) -> logits`` function."""
    module = TinyTransformer(tokenizer.vocab_size, 8, jax.random.key(0))
    params, static = eqx.partition(module, eqx.is_inexact_array)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)

    def model_func(p, X):
        logits = jax.vmap(eqx.combine(p, static))(X["input_ids"])[:, :-1]
        return logits.reshape(-1, logits.shape[-1])

    data = []
    for start in (0, 4):
        sentences = SENTENCES[start : start + 4]
        batch = tokenizer(sentences, truncation=True, max_length=SEQ, return_tensors="np")
        ids = batch["input_ids"]
        data.append(({"input_ids": jnp.asarray(ids)}, ids[:, 1:].reshape(-1)))
    return model_func, params, data


def equinox_dense_hessian(model_func, params, data):
    """The Hessian of the mean cross-entropy over all batches by ``jax.hessian``."""
    flat, unravel = ravel_pytree(params)

    def risk(theta):
        terms = [
            -jnp.take_along_axis(jax.nn.log_softmax(model_func(unravel(theta), X)), y[:, None], 1)
            for X, y in data
        ]
        return jnp.mean(jnp.concatenate(terms))

    return np.asarray(jax.jit(jax.hessian(risk))(flat))


def study(name, model_func, loss_func, params, data, dense_hessian=None):
    """Top eigenvalues of H and G, and eigsh's top Hessian eigenvalue against the dense one.

    ``dense_hessian``: the dense Hessian (default: the operator's ``todense()``).
    """
    options = {"batch_size_fn": lambda X: X["input_ids"].shape[0]}
    H = cl.HessianLinearOperator(model_func, loss_func, params, data, **options)
    G = cl.GGNLinearOperator(model_func, loss_func, params, data, **options)
    top_H = np.sort(eigsh(H, k=3, which="LA", return_eigenvectors=False))[::-1]
    top_G = np.sort(eigsh(G, k=3, which="LA", return_eigenvectors=False))[::-1]
    if dense_hessian is None:
        dense_hessian = np.asarray(H.todense())
    dense = np.linalg.eigvalsh(dense_hessian)[-1]
    error = abs(top_H[0] - dense) / abs(dense)
    print(
        f"{name:<22} {H.shape[0]:>5}  {' '.join(f'{v:8.4f}' for v in top_H)}   "
        f"{' '.join(f'{v:8.4f}' for v in top_G)}   {error:.1e}"
    )
    return top_H, top_G, error


tokenizer = in_memory_tokenizer()
print(f"tokenizer: {tokenizer.vocab_size} words; batches are {type(tokenizer('a')).__name__}s")
header = ["model".ljust(22), "P".rjust(5), " top 3 Hessian eigenvalues".ljust(28)]
print(" ".join(header), "top 3 GGN eigenvalues".ljust(28), "dense check")
results = {}
lm, lm_data = language_model_problem(tokenizer)
assert lm.lm.config._attn_implementation == "sdpa"  # the default: fused kernels on CPU
results["GPT-2 LM (PyTorch)"] = study(
    "GPT-2 LM (PyTorch)", lm, torch.nn.CrossEntropyLoss(), list(lm.parameters()), lm_data
)
clf, clf_data = classifier_problem(tokenizer)
results["GPT-2 classifier"] = study(
    "GPT-2 classifier", clf, torch.nn.CrossEntropyLoss(), list(clf.parameters()), clf_data
)
model_func, params, eqx_data = equinox_problem(tokenizer)
reference = equinox_dense_hessian(model_func, params, eqx_data)
results["equinox LM (JAX)"] = study(
    "equinox LM (JAX)", model_func, cl.losses.CrossEntropyLoss(), params, eqx_data, reference
)

for name, (_, top_G, error) in results.items():
    assert error < 1e-8, f"{name}: eigsh's top Hessian eigenvalue is off by {error:.1e}"
    assert top_G.min() > -1e-10, f"{name}: the GGN of cross-entropy is positive semi-definite"
