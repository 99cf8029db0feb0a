"""The benchmark problems: the same model, weights and data in PyTorch and in JAX.

Each problem is defined once by a list of named parameter shapes with their
initialisation, a data generator and two forward functions (a PyTorch
``nn.Module`` and a hand-written ``jax.numpy`` function) that compute the same
outputs from the same weights. Weights and data are drawn with numpy from a
fixed seed, so both frameworks see identical numbers and flatten their
parameters in the same order (the order of :attr:`Problem.param_specs`): a
flat vector means the same thing to every contender.

Problems (full size / ``quick=True`` size):

* ``mlp``: 784-256-256-10, tanh, cross-entropy, batch 1024 (quick: 64-32-32-10, batch 64).
* ``cnn``: conv(3→16, 3x3) relu avgpool2 conv(16→32, 3x3) relu avgpool2 linear(2048→10),
  CIFAR-shaped inputs 3x32x32, batch 256 (quick: 3x8x8 inputs, 4/8 channels, batch 16).
* ``transformer``: 2-layer pre-norm causal transformer language model, width 128,
  4 heads, MLP 512, sequence 64, vocabulary 512, batch 16 sequences; per-token
  cross-entropy over the ``B*T`` tokens, outputs of shape ``(B*T, V)`` (quick: 1 layer,
  width 16, 2 heads, sequence 8, vocabulary 32, batch 4).

Frameworks are imported only when a problem is converted (:meth:`Problem.torch`,
:meth:`Problem.jax`), so a JAX-only or PyTorch-only run works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PROBLEMS", "FrameworkProblem", "ParamSpec", "Problem", "make_problem"]

SEED = 0


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its name (as in the PyTorch module), shape and initialisation.

    ``init`` is ``"uniform"`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default
    for linear and conv layers), ``"normal"`` (N(0, 0.02²), for embeddings),
    ``"ones"`` or ``"zeros"`` (layer norms).
    """

    name: str
    shape: tuple[int, ...]
    init: str = "uniform"
    fan_in: int = 1


@dataclass
class FrameworkProblem:
    """A problem in one framework: what the curvature operators take."""

    framework: str
    model_func: Any  # nn.Module (torch) or callable (params, X) -> outputs (jax)
    params: list  # in ParamSpec order
    data: list  # [(X, y)]
    loss_func: Any  # nn.CrossEntropyLoss (torch), curvlinops.losses.CrossEntropyLoss (jax)
    forward: Callable[[Any, Any], Any]  # pure (params list, X) -> outputs (B, C)
    device: Any = None


@dataclass
class Problem:
    """A benchmark problem, framework-free: numpy weights and data.

    Attributes:
        name: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        description: One line for reports.
        dtype: ``"float32"`` or ``"float64"``.
        param_specs: Names, shapes and initialisation, in flattening order.
        weights: numpy arrays, one per spec.
        X, y: One batch of inputs and integer targets.
        num_classes: Size of the output's class axis (last axis).
        damping: Damping ``λ`` of the CG solve on ``G + λ I``: about 0.1 times the largest
            GGN eigenvalue (measured once, float64), so that CG needs tens of iterations.
    """

    name: str
    description: str
    dtype: str
    param_specs: list[ParamSpec]
    weights: list[np.ndarray]
    X: np.ndarray
    y: np.ndarray
    num_classes: int
    damping: float
    torch_module: Callable[[], Any]
    jax_forward: Callable[[list, Any], Any]
    sizes: dict = field(default_factory=dict)
    kfac_params: list[int] | None = None
    """Positions of the parameters KFAC approximates (``None``: all of them)."""
    kfac_note: str = ""
    """What KFAC leaves out, and why (for reports)."""
    skip_ops: dict = field(default_factory=dict)
    """Operations not run on this problem, with the reason (for reports)."""

    @property
    def kfac_positions(self) -> list[int]:
        """Positions (in :attr:`param_specs`) of the parameters of KFAC-supported layers."""
        return list(range(len(self.param_specs))) if self.kfac_params is None else self.kfac_params

    @property
    def kfac_num_params(self) -> int:
        return int(sum(np.prod(self.param_specs[i].shape) for i in self.kfac_positions))

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s.shape) for s in self.param_specs))

    @property
    def batch_size(self) -> int:
        return int(self.X.shape[0])

    @property
    def num_outputs(self) -> int:
        """Rows of the Jacobian: ``len(y) * num_classes``."""
        return int(self.y.shape[0] * self.num_classes)

    def flat_weights(self) -> np.ndarray:
        return np.concatenate([w.reshape(-1) for w in self.weights])

    # --- conversions ------------------------------------------------------------
    def torch(self, device: str = "cpu") -> FrameworkProblem:
        """The problem in PyTorch: an ``nn.Module`` holding the weights, tensors on ``device``."""
        import torch

        dtype = getattr(torch, self.dtype)
        module = self.torch_module().to(dtype=dtype)
        named = list(module.named_parameters())
        names = [n for n, _ in named]
        if names != [s.name for s in self.param_specs]:
            raise RuntimeError(f"{self.name}: module parameters {names} differ from the specs")
        with torch.no_grad():
            for (_, p), w in zip(named, self.weights):
                p.copy_(torch.from_numpy(w))
        module = module.to(device).eval()
        X = torch.from_numpy(self.X).to(device)
        y = torch.from_numpy(self.y).to(device)
        params = [p for _, p in module.named_parameters()]

        def forward(ps: Any, X: Any) -> Any:
            from torch.func import functional_call

            return functional_call(module, dict(zip(names, ps)), (X,))

        return FrameworkProblem(
            "torch", module, params, [(X, y)], torch.nn.CrossEntropyLoss(), forward, device
        )

    def jax(self, device: str = "cpu") -> FrameworkProblem:
        """The problem in JAX: a list of arrays (the specs' order) and a pure function."""
        import jax
        import jax.numpy as jnp

        from curvlinops.losses import CrossEntropyLoss

        dev = jax.devices("gpu" if device.startswith("cuda") else "cpu")[0]
        params = [jax.device_put(jnp.asarray(w), dev) for w in self.weights]
        X = jax.device_put(jnp.asarray(_jax_ints(self.X)), dev)
        y = jax.device_put(jnp.asarray(_jax_ints(self.y)), dev)
        forward = self.jax_forward
        return FrameworkProblem(
            "jax", forward, params, [(X, y)], CrossEntropyLoss("mean"), forward, dev
        )


def _jax_ints(a: np.ndarray) -> np.ndarray:
    """Integer arrays as int32 (JAX's default integer without x64)."""
    return a.astype(np.int32) if a.dtype.kind in "iu" else a


# --- weights and data -------------------------------------------------------------------
def _init_weights(specs: list[ParamSpec], dtype: str, rng: np.random.Generator) -> list:
    weights = []
    for spec in specs:
        if spec.init == "uniform":
            bound = 1.0 / math.sqrt(spec.fan_in)
            w = rng.uniform(-bound, bound, spec.shape)
        elif spec.init == "normal":
            w = 0.02 * rng.standard_normal(spec.shape)
        elif spec.init == "ones":
            w = np.ones(spec.shape)
        elif spec.init == "zeros":
            w = np.zeros(spec.shape)
        else:
            raise ValueError(f"unknown init {spec.init!r}")
        weights.append(np.ascontiguousarray(w, dtype=dtype))
    return weights


def _linear_specs(name: str, fan_in: int, fan_out: int) -> list[ParamSpec]:
    return [
        ParamSpec(f"{name}.weight", (fan_out, fan_in), "uniform", fan_in),
        ParamSpec(f"{name}.bias", (fan_out,), "uniform", fan_in),
    ]


def _conv_specs(name: str, c_in: int, c_out: int, k: int) -> list[ParamSpec]:
    fan_in = c_in * k * k
    return [
        ParamSpec(f"{name}.weight", (c_out, c_in, k, k), "uniform", fan_in),
        ParamSpec(f"{name}.bias", (c_out,), "uniform", fan_in),
    ]


# --- MLP --------------------------------------------------------------------------------
def _mlp(dtype: str, quick: bool) -> Problem:
    sizes = [64, 32, 32, 10] if quick else [784, 256, 256, 10]
    batch = 64 if quick else 1024
    specs = [
        s
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
        for s in _linear_specs(str(2 * i), a, b)
    ]
    rng = np.random.default_rng(SEED)
    weights = _init_weights(specs, dtype, rng)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)

    def torch_module() -> Any:
        from torch import nn

        layers: list = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    def jax_forward(params: list, X: Any) -> Any:
        import jax.numpy as jnp

        h = X
        for i in range(0, len(params), 2):
            h = h @ params[i].T + params[i + 1]
            if i + 2 < len(params):
                h = jnp.tanh(h)
        return h

    label = "-".join(map(str, sizes))
    return Problem(
        "mlp",
        f"MLP {label} tanh, cross-entropy, batch {batch}",
        dtype,
        specs,
        weights,
        X,
        y,
        sizes[-1],
        0.02,  # λ_max(G) = 0.24 (quick), 0.20
        torch_module,
        jax_forward,
        {"layers": sizes, "batch": batch},
    )


# --- CNN ----------------------------------------------------------------------------------
def _cnn(dtype: str, quick: bool) -> Problem:
    side, c1, c2, batch = (8, 4, 8, 16) if quick else (32, 16, 32, 256)
    classes = 10
    flat = c2 * (side // 4) ** 2
    specs = [
        *_conv_specs("0", 3, c1, 3),
        *_conv_specs("3", c1, c2, 3),
        *_linear_specs("7", flat, classes),
    ]
    rng = np.random.default_rng(SEED + 1)
    weights = _init_weights(specs, dtype, rng)
    X = rng.standard_normal((batch, 3, side, side)).astype(dtype)
    y = rng.integers(0, classes, batch).astype(np.int64)

    def torch_module() -> Any:
        from torch import nn

        return nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, classes),
        )

    def jax_forward(params: list, X: Any) -> Any:
        import jax.numpy as jnp

        w1, b1, w2, b2, w3, b3 = params
        h = _avgpool2(jnp.maximum(_conv2d(X, w1, b1), 0.0))
        h = _avgpool2(jnp.maximum(_conv2d(h, w2, b2), 0.0))
        return jnp.reshape(h, (h.shape[0], -1)) @ w3.T + b3

    return Problem(
        "cnn",
        f"CNN 3x{side}x{side} conv{c1}-conv{c2}-linear, relu, cross-entropy, batch {batch}",
        dtype,
        specs,
        weights,
        X,
        y,
        classes,
        0.03 if quick else 0.2,  # λ_max(G) = 0.29 (quick), 2.26
        torch_module,
        jax_forward,
        {"side": side, "channels": [c1, c2], "batch": batch},
    )


def _conv2d(X: Any, w: Any, b: Any) -> Any:
    """``nn.Conv2d(padding=1)`` in JAX: NCHW inputs, OIHW kernels."""
    import jax

    out = jax.lax.conv_general_dilated(
        X, w, window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )  # fmt: skip
    return out + b[None, :, None, None]


def _avgpool2(X: Any) -> Any:
    """``nn.AvgPool2d(2)`` on NCHW inputs with even height and width."""
    import jax.numpy as jnp

    B, C, H, W = X.shape
    return jnp.mean(jnp.reshape(X, (B, C, H // 2, 2, W // 2, 2)), axis=(3, 5))


# --- transformer language model ---------------------------------------------------------
def _transformer(dtype: str, quick: bool) -> Problem:
    if quick:
        layers, width, heads, seq, vocab, batch = 1, 16, 2, 8, 32, 4
    else:
        layers, width, heads, seq, vocab, batch = 2, 128, 4, 64, 512, 16
    hidden = 4 * width
    specs = [
        ParamSpec("tok_emb", (vocab, width), "normal"),
        ParamSpec("pos_emb", (seq, width), "normal"),
    ]
    for i in range(layers):
        p = f"blocks.{i}"
        specs += [
            ParamSpec(f"{p}.ln1.weight", (width,), "ones"),
            ParamSpec(f"{p}.ln1.bias", (width,), "zeros"),
            *_linear_specs(f"{p}.qkv", width, 3 * width),
            *_linear_specs(f"{p}.proj", width, width),
            ParamSpec(f"{p}.ln2.weight", (width,), "ones"),
            ParamSpec(f"{p}.ln2.bias", (width,), "zeros"),
            *_linear_specs(f"{p}.fc1", width, hidden),
            *_linear_specs(f"{p}.fc2", hidden, width),
        ]
    specs += [
        ParamSpec("ln_f.weight", (width,), "ones"),
        ParamSpec("ln_f.bias", (width,), "zeros"),
        *_linear_specs("head", width, vocab),
    ]
    rng = np.random.default_rng(SEED + 2)
    weights = _init_weights(specs, dtype, rng)
    # KFAC: the Linear layers; embeddings and LayerNorms have no Kronecker factorisation in
    # either library (their parameters are left out, as a curvlinops-for-pytorch user would)
    linear = [i for i, s in enumerate(specs) if _layer_of(s.name) in _LM_LINEAR]
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int64)
    X, y = tokens[:, :-1].copy(), tokens[:, 1:].reshape(-1).copy()

    def torch_module() -> Any:
        return _torch_lm(layers, width, heads, seq, vocab, hidden)

    def jax_forward(params: list, X: Any) -> Any:
        return _jax_lm(params, X, layers, heads)

    return Problem(
        "transformer",
        f"Transformer LM {layers} layers, width {width}, {heads} heads, seq {seq}, "
        f"vocab {vocab}, batch {batch}, per-token cross-entropy",
        dtype,
        specs,
        weights,
        X,
        y,
        vocab,
        35.0 if quick else 5.0,  # λ_max(G) = 346 (quick), 54
        torch_module,
        jax_forward,
        {"layers": layers, "width": width, "heads": heads, "seq": seq, "vocab": vocab,
         "batch": batch},
        kfac_params=linear,
        kfac_note="KFAC on the Linear layers (qkv, proj, fc1, fc2, head); embeddings and "
        "LayerNorm parameters left out",
        skip_ops={} if quick else {"kfac_type2": _TYPE2_TOO_LONG},
    )  # fmt: skip


_TYPE2_TOO_LONG = (
    "not timed: type-2 backpropagates one column per class (512); one call took 240 s "
    "(ours, PyTorch), 179 s (cfp), 16 s (ours, JAX) on 2 loaded cores"
)


_LM_LINEAR = ("qkv", "proj", "fc1", "fc2", "head")


def _layer_of(name: str) -> str:
    """The module a parameter belongs to, without its path: "qkv" for "blocks.0.qkv.bias"."""
    return name.rpartition(".")[0].rpartition(".")[2]


def _torch_lm(layers: int, width: int, heads: int, seq: int, vocab: int, hidden: int) -> Any:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.ln2 = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, hidden)
            self.fc2 = nn.Linear(hidden, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, D = x.shape
            dh = D // heads
            q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
            q, k, v = (t.reshape(B, T, heads, dh).transpose(1, 2) for t in (q, k, v))
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, -1e9)
            att = torch.softmax(scores, dim=-1) @ v
            x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok_emb = nn.Parameter(torch.empty(vocab, width))
            self.pos_emb = nn.Parameter(torch.empty(seq, width))
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.tok_emb[tokens] + self.pos_emb[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.ln_f(x))
            return logits.reshape(-1, logits.shape[-1])

    return LM()


def _jax_layer_norm(x: Any, w: Any, b: Any, eps: float = 1e-5) -> Any:
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * w + b


def _jax_gelu_tanh(x: Any) -> Any:
    import jax.numpy as jnp

    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _jax_lm(params: list, X: Any, layers: int, heads: int) -> Any:
    import jax
    import jax.numpy as jnp

    it = iter(params)
    tok_emb, pos_emb = next(it), next(it)
    B, T = X.shape
    x = tok_emb[X] + pos_emb[:T]
    D = x.shape[-1]
    dh = D // heads
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    for _ in range(layers):
        ln1w, ln1b, qkvw, qkvb, projw, projb = (next(it) for _ in range(6))
        ln2w, ln2b, fc1w, fc1b, fc2w, fc2b = (next(it) for _ in range(6))
        qkv = _jax_layer_norm(x, ln1w, ln1b) @ qkvw.T + qkvb
        q, k, v = (
            jnp.transpose(jnp.reshape(t, (B, T, heads, dh)), (0, 2, 1, 3))
            for t in jnp.split(qkv, 3, axis=-1)
        )
        scores = (q @ jnp.swapaxes(k, -2, -1)) / math.sqrt(dh)
        scores = jnp.where(causal, scores, -1e9)
        att = jax.nn.softmax(scores, axis=-1) @ v
        # residual added after the bias, as in the PyTorch module (and so that the bias
        # is added to the layer's output, where KFAC's tracing of JAX functions finds it)
        x = x + (jnp.reshape(jnp.transpose(att, (0, 2, 1, 3)), (B, T, D)) @ projw.T + projb)
        h = _jax_gelu_tanh(_jax_layer_norm(x, ln2w, ln2b) @ fc1w.T + fc1b)
        x = x + (h @ fc2w.T + fc2b)
    lnfw, lnfb, headw, headb = (next(it) for _ in range(4))
    logits = _jax_layer_norm(x, lnfw, lnfb) @ headw.T + headb
    return jnp.reshape(logits, (-1, logits.shape[-1]))


PROBLEMS: dict[str, Callable[[str, bool], Problem]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "transformer": _transformer,
}


def make_problem(name: str, *, dtype: str = "float32", quick: bool = False) -> Problem:
    """Build problem ``name`` (``"mlp"``, ``"cnn"``, ``"transformer"``) in ``dtype``.

    ``quick=True`` gives the small sizes used by ``python -m benchmarks --quick``.
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem: expected one of {sorted(PROBLEMS)}, got {name!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return PROBLEMS[name](dtype, quick)
