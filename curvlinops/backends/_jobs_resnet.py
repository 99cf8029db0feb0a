r"""A small residual network with batch normalisation, for ``python -m curvlinops spectrum``.

The spectrum job (:mod:`curvlinops.jobs.spectrum`) is written once against the
backend protocol; only the network and its training loop differ by framework,
so they live here, where frameworks may be imported. Both frameworks take the
same numpy weights in PyTorch's layout and order, and both train the same way:

* architecture: a 3×3 convolution to ``c`` channels, BN, ReLU; ``blocks``
  residual blocks (conv-BN-ReLU-conv-BN, plus the input, ReLU); global average
  pooling; a dense layer to the classes. Convolutions have no bias (BN follows).
* BN in training mode normalises by the batch's mean and biased variance and
  moves the running statistics by ``0.1`` towards the batch's mean and unbiased
  variance (PyTorch's ``BatchNorm2d``); in evaluation mode, the model whose
  curvature is measured, it uses the running statistics, a fixed affine map.
* training: SGD with heavy-ball momentum, PyTorch's convention
  (:math:`v \leftarrow \mu v + g`, :math:`w \leftarrow w - \eta v`), on the
  mini-batches the caller lists.

PyTorch gets a ``torch.nn.Module`` (``eval()`` for the curvature); JAX a plain
function of the parameter list with the running statistics closed over (BN's
state is data, as in Flax and Equinox, which are not needed for a dozen arrays).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curvlinops._checks import value_error

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "Network",
    "jax_eval_forward",
    "population_stats",
    "resnet",
    "train_resnet",
]

BN_MOMENTUM, BN_EPS = 0.1, 1e-5


@dataclass(frozen=True)
class Network:
    """The network in evaluation mode, ready for the operators.

    Attributes:
        model_func: A ``torch.nn.Module`` (BN statistics in its buffers), or the
            JAX function :func:`jax_eval_forward`, the same object for every
            checkpoint so that its compiled products are reused.
        params: The parameters (a list, in PyTorch's order).
        inputs: Turns images ``(N, 1, H, W)`` into the model's input (JAX: a dict
            with the BN statistics, which are data, not parameters).
        batch_size_fn: The operators' ``batch_size_fn`` for those inputs (or ``None``).
    """

    model_func: Any
    params: list[Any]
    inputs: Callable[[np.ndarray], Any]
    batch_size_fn: Callable[[Any], int] | None


def resnet(framework: str, weights: Sequence[np.ndarray], stats: Sequence[np.ndarray]) -> Network:
    """The network in evaluation mode (BN by the statistics ``stats``) and its parameters.

    Args:
        framework: ``"torch"`` or ``"jax"``.
        weights: Parameters in PyTorch's order (see
            :func:`curvlinops.jobs.spectrum.problem.initial_state`): stem conv, BN
            scale, BN shift; per block two (conv, BN scale, BN shift); dense weight
            ``(classes, c)`` and bias.
        stats: Mean and variance of each BN, in the same order.

    Returns:
        The :class:`Network`, in the weights' dtype.
    """
    if framework == "torch":
        module = _torch_module(weights, stats)
        module.eval()
        return Network(module, list(module.parameters()), lambda X: X, None)
    if framework == "jax":
        jnp = importlib.import_module("jax.numpy")
        frozen = [jnp.asarray(s) for s in stats]
        return Network(
            jax_eval_forward,
            [jnp.asarray(w) for w in weights],
            lambda X: {"images": X, "stats": frozen},
            _images_count,
        )
    raise value_error("framework", "'torch' or 'jax'", repr(framework))


def jax_eval_forward(params: Sequence[Any], inputs: dict[str, Any]) -> Any:
    """Logits of the JAX network in evaluation mode; ``inputs``: images and BN statistics."""
    return _jax_forward(params, inputs["stats"], inputs["images"], False)[0]


def _images_count(inputs: dict[str, Any]) -> int:
    return int(inputs["images"].shape[0])


def train_resnet(
    framework: str,
    weights: Sequence[np.ndarray],
    stats: Sequence[np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    batches: Sequence[np.ndarray],
    checkpoints: Iterable[int],
    *,
    lr: float,
    momentum: float,
) -> dict[int, tuple[list[np.ndarray], list[np.ndarray]]]:
    r"""Train from ``(weights, stats)``, one step per mini-batch (indices into ``X``).

    Args:
        framework: ``"torch"`` or ``"jax"``.
        weights: Initial parameters (numpy, PyTorch's layout).
        stats: Initial BN running statistics.
        X: ``(N, 1, H, W)`` images; ``y``: ``(N,)`` integer labels.
        y: Labels.
        batches: The mini-batch of each step, at least ``max(checkpoints)`` of them.
        checkpoints: Steps after which to keep a copy (``0``: the initial state).
        lr: Learning rate :math:`\eta`.
        momentum: Heavy-ball coefficient :math:`\mu` (the buffer starts at zero).

    Returns:
        ``{step: (weights, running statistics)}`` as numpy arrays of the weights' dtype.
    """
    wanted = sorted(set(checkpoints))
    if framework not in ("torch", "jax"):
        raise value_error("framework", "'torch' or 'jax'", repr(framework))
    train = _train_torch if framework == "torch" else _train_jax
    return train(weights, stats, X, y, batches[: wanted[-1]], set(wanted), lr, momentum)


def population_stats(
    framework: str, weights: Sequence[np.ndarray], stats: Sequence[np.ndarray], X: np.ndarray
) -> list[np.ndarray]:
    """Each BN's mean and unbiased variance over all of ``X`` (a training-mode pass, no step).

    In evaluation mode with these statistics the network is the one training
    sees with the whole training set as one batch, its statistics held fixed.
    """
    if framework == "torch":
        torch = importlib.import_module("torch")
        module = _torch_module(weights, stats)
        module.train()
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = 1.0  # the running statistics become the batch's
        with torch.no_grad():
            module(torch.from_numpy(X))
        return _torch_state(module)[1]
    if framework == "jax":
        jnp = importlib.import_module("jax.numpy")
        params = [jnp.asarray(w) for w in weights]
        zeros = [jnp.zeros_like(jnp.asarray(s)) for s in stats]
        _, new = _jax_forward(params, zeros, jnp.asarray(X), True, momentum=1.0)
        return [np.array(s) for s in new]
    raise value_error("framework", "'torch' or 'jax'", repr(framework))


# --- PyTorch --------------------------------------------------------------------------------------
def _torch_module(weights: Sequence[np.ndarray], stats: Sequence[np.ndarray]) -> Any:
    torch = importlib.import_module("torch")
    nn = torch.nn
    dtype = getattr(torch, np.asarray(weights[0]).dtype.name)
    channels, classes = weights[0].shape[0], weights[-1].shape[0]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=dtype)
            self.bn1 = nn.BatchNorm2d(channels, BN_EPS, BN_MOMENTUM, dtype=dtype)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, dtype=dtype)
            self.bn2 = nn.BatchNorm2d(channels, BN_EPS, BN_MOMENTUM, dtype=dtype)

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(h)))

    blocks = (len(weights) - 5) // 6
    module = nn.Sequential(
        nn.Conv2d(weights[0].shape[1], channels, 3, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(channels, BN_EPS, BN_MOMENTUM, dtype=dtype),
        nn.ReLU(),
        *(Block() for _ in range(blocks)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, classes, dtype=dtype),
    )
    with torch.no_grad():
        for param, value in zip(module.parameters(), weights, strict=True):
            param.copy_(torch.from_numpy(np.asarray(value)))
        running = [b for n, b in module.named_buffers() if not n.endswith("num_batches_tracked")]
        for buffer, value in zip(running, stats, strict=True):
            buffer.copy_(torch.from_numpy(np.asarray(value)))
    return module


def _torch_state(module: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights = [p.detach().numpy().copy() for p in module.parameters()]
    stats = [
        b.detach().numpy().copy()
        for n, b in module.named_buffers()
        if not n.endswith("num_batches_tracked")
    ]
    return weights, stats


def _train_torch(weights, stats, X, y, batches, wanted, lr, momentum):  # noqa: ANN001, ANN202
    torch = importlib.import_module("torch")
    module = _torch_module(weights, stats)
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum)
    inputs, targets = torch.from_numpy(X), torch.from_numpy(y)
    kept = {0: _torch_state(module)} if 0 in wanted else {}
    for step, index in enumerate(batches, start=1):
        chosen = torch.from_numpy(np.asarray(index))
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(module(inputs[chosen]), targets[chosen])
        loss.backward()
        optimizer.step()
        if step in wanted:
            kept[step] = _torch_state(module)
    return kept


# --- JAX ------------------------------------------------------------------------------------------
def _jax_forward(
    params: Sequence[Any], stats: Sequence[Any], X: Any, train: bool, momentum: float = BN_MOMENTUM
) -> Any:
    """Logits and (in training) the new running statistics; ``params`` as in :func:`resnet`."""
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")
    new_stats: list[Any] = []

    def conv(h: Any, w: Any) -> Any:
        return jax.lax.conv_general_dilated(
            h, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )

    def bn(h: Any, index: int) -> Any:
        scale, shift = params[3 * index + 1], params[3 * index + 2]
        if train:
            mean, var = jnp.mean(h, axis=(0, 2, 3)), jnp.var(h, axis=(0, 2, 3))
            count = h.shape[0] * h.shape[2] * h.shape[3]
            old_mean, old_var = stats[2 * index], stats[2 * index + 1]
            new_stats.append((1 - momentum) * old_mean + momentum * mean)
            unbiased = var * count / (count - 1)
            new_stats.append((1 - momentum) * old_var + momentum * unbiased)
        else:
            mean, var = stats[2 * index], stats[2 * index + 1]
        normal = (h - mean[:, None, None]) / jnp.sqrt(var[:, None, None] + BN_EPS)
        return normal * scale[:, None, None] + shift[:, None, None]

    h = jax.nn.relu(bn(conv(X, params[0]), 0))
    for block in range((len(params) - 5) // 6):
        first = 3 + 6 * block
        inner = jax.nn.relu(bn(conv(h, params[first]), 1 + 2 * block))
        h = jax.nn.relu(h + bn(conv(inner, params[first + 3]), 2 + 2 * block))
    pooled = jnp.mean(h, axis=(2, 3))
    return pooled @ params[-2].T + params[-1], new_stats


def _train_jax(weights, stats, X, y, batches, wanted, lr, momentum):  # noqa: ANN001, ANN202
    jax = importlib.import_module("jax")
    jnp = importlib.import_module("jax.numpy")

    def loss_fn(params: Any, stats: Any, Xb: Any, yb: Any) -> Any:
        logits, new_stats = _jax_forward(params, stats, Xb, True)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, yb[:, None], axis=1)), new_stats

    @jax.jit
    def step(params: Any, velocity: Any, stats: Any, Xb: Any, yb: Any) -> Any:
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params, stats, Xb, yb)
        velocity = [momentum * v + g for v, g in zip(velocity, grads)]
        params = [p - lr * v for p, v in zip(params, velocity)]
        return params, velocity, new_stats

    params = [jnp.asarray(w) for w in weights]
    velocity = [jnp.zeros_like(p) for p in params]
    state = [jnp.asarray(s) for s in stats]
    inputs, targets = jnp.asarray(X), jnp.asarray(y)

    def snapshot() -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [np.array(p) for p in params], [np.array(s) for s in state]

    kept = {0: snapshot()} if 0 in wanted else {}
    for number, index in enumerate(batches, start=1):
        chosen = jnp.asarray(index)
        params, velocity, state = step(params, velocity, state, inputs[chosen], targets[chosen])
        if number in wanted:
            kept[number] = snapshot()
    return kept
