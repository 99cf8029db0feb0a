"""Case registry: model x loss x reduction, each built for PyTorch and for JAX.

A :class:`Case` fixes the maths (weights, data, loss); :func:`build` turns it
into a :class:`Problem` for one backend: the operator arguments plus dense
references computed by ``torch.func`` / ``jax`` on the concatenated data, in
float64, with loss formulas written independently of ``curvlinops.losses``.

Weights are drawn once per case in a *canonical* order and layout (PyTorch's:
``Linear.weight`` is ``(out, in)``, convolution kernels ``OIHW``), and both
backends use exactly these numbers. Each backend flattens parameters in its
own order (PyTorch: the order of the list / the dict's insertion order; JAX:
``jax.tree_util.tree_leaves`` order, dict keys sorted); ``Problem.perm`` maps
the operator's flat index to the canonical flat index so that results of the
two backends can be compared entry by entry.

All data come in two batches of unequal size (4 and 3 points).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import curvlinops
from curvlinops import losses

BATCH_SIZES = (4, 3)
NUM_CLASSES = 3
SEQ_LEN = 4
# Few columns per pass, so that products with K = 5 columns go through several
# blocks. JAX compiles once per column count: one column per pass keeps it to
# one compilation per batch shape (test_operators.py checks wider vmapped
# blocks in JAX on one case); PyTorch compiles nothing and takes 4.
COLUMNS_PER_PASS = {"torch": 4, "jax": 1}


@dataclass(frozen=True)
class Case:
    """One model x loss x reduction combination.

    Attributes:
        name: Test id.
        model: ``"mlp"``, ``"cnn"``, ``"seq"`` (outputs ``(B, T, C)``, classes
            last), ``"seq_ct"`` (outputs ``(B, C, T)``, classes on axis 1, as
            ``torch.nn.CrossEntropyLoss`` wants), or ``"dict"`` (dict inputs).
        loss: ``"mse"``, ``"ce"``, ``"bce"`` or ``"quartic"`` (a generic callable
            with a ``reduction`` attribute: the GGN differentiates it).
        reduction: ``"mean"`` or ``"sum"``.
        params: ``"list"`` (PyTorch list / JAX list of ``(W, b)`` tuples, both in
            canonical order) or ``"dict"`` (PyTorch dict in reversed insertion
            order / JAX nested dict, flattened with sorted keys).
        targets: ``"labels"`` (class indices for cross-entropy) or ``"probs"``
            (class probabilities of the outputs' shape, PyTorch's soft labels).
    """

    name: str
    model: str
    loss: str
    reduction: str
    params: str = "list"
    targets: str = "labels"


CASES = [
    *(
        Case(f"mlp-{loss}-{reduction}", "mlp", loss, reduction)
        for loss in ("mse", "ce", "bce")
        for reduction in ("mean", "sum")
    ),
    Case("mlp-ce-mean-dictparams", "mlp", "ce", "mean", params="dict"),
    Case("mlp-ce-mean-probs", "mlp", "ce", "mean", targets="probs"),
    Case("mlp-quartic-sum-dictparams", "mlp", "quartic", "sum", params="dict"),
    Case("cnn-ce-mean", "cnn", "ce", "mean"),
    Case("seq-ce-mean", "seq", "ce", "mean"),
    Case("seq_ct-ce-sum", "seq_ct", "ce", "sum"),
    Case("dict-mse-mean", "dict", "mse", "mean"),
]
CASE_IDS = [case.name for case in CASES]
BY_NAME = {case.name: case for case in CASES}
# The Jacobian does not depend on the loss: one case per model and parameter layout.
JACOBIAN_CASES = list({(case.model, case.params): case for case in reversed(CASES)}.values())[::-1]
JACOBIAN_IDS = [case.name for case in JACOBIAN_CASES]


class QuarticLoss:
    """``Σ (z - y)⁴`` (or its mean): a loss without a closed-form output Hessian.

    It has a ``reduction`` attribute, like PyTorch's loss modules, and works
    on torch tensors and JAX arrays alike.
    """

    def __init__(self, reduction: str) -> None:
        self.reduction = reduction

    def __call__(self, outputs: Any, targets: Any) -> Any:
        d = (outputs - targets) ** 2
        d = d * d
        return d.mean() if self.reduction == "mean" else d.sum()


# --- the framework-free part: weights and data --------------------------------
def _layers(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """Canonical parameter names and shapes (PyTorch layout)."""
    if model in ("mlp", "dict"):
        return [("0.weight", (6, 4)), ("0.bias", (6,)), ("2.weight", (3, 6)), ("2.bias", (3,))]
    if model == "cnn":
        return [
            ("0.weight", (2, 1, 3, 3)),
            ("0.bias", (2,)),
            ("3.weight", (3, 8)),
            ("3.bias", (3,)),
        ]
    if model in ("seq", "seq_ct"):
        return [("0.weight", (5, 3)), ("0.bias", (5,)), ("2.weight", (3, 5)), ("2.bias", (3,))]
    raise ValueError(model)


def _seed(case: Case) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(case.name)) % (2**31)


def _weights(case: Case) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_seed(case))
    return {
        name: rng.normal(scale=0.7, size=shape).astype(np.float64)
        for name, shape in _layers(case.model)
    }


def _inputs(case: Case, rng: np.random.Generator, n: int) -> Any:
    if case.model == "mlp":
        return rng.normal(size=(n, 4))
    if case.model == "cnn":
        return rng.normal(size=(n, 1, 4, 4))
    if case.model in ("seq", "seq_ct"):
        return rng.normal(size=(n, SEQ_LEN, 3))
    return {"a": rng.normal(size=(n, 2)), "b": rng.normal(size=(n, 2))}


def _output_shape(case: Case) -> tuple[int, ...]:
    if case.model == "seq":
        return (SEQ_LEN, NUM_CLASSES)
    if case.model == "seq_ct":
        return (NUM_CLASSES, SEQ_LEN)
    return (NUM_CLASSES,)


def _targets(case: Case, rng: np.random.Generator, n: int) -> np.ndarray:
    out = _output_shape(case)
    if case.targets == "probs":  # rows on the simplex
        return rng.dirichlet(np.ones(NUM_CLASSES), size=n)
    if case.loss == "ce":
        label_shape = {"seq": (SEQ_LEN,), "seq_ct": (SEQ_LEN,)}.get(case.model, ())
        return rng.integers(0, NUM_CLASSES, size=(n, *label_shape))
    if case.loss == "bce":
        return rng.uniform(size=(n, *out))
    return rng.normal(size=(n, *out))


def numpy_data(case: Case) -> list[tuple[Any, np.ndarray]]:
    """The case's data as numpy batches (two batches of unequal size)."""
    rng = np.random.default_rng(_seed(case) + 1)
    return [(_inputs(case, rng, n), _targets(case, rng, n)) for n in BATCH_SIZES]


def _class_axis(case: Case) -> int:
    return 1 if case.model == "seq_ct" else -1


# --- the problem handed to tests ------------------------------------------------
@dataclass
class Problem:
    """A case built for one backend: operator arguments and dense references."""

    case: Case
    backend: str
    model_func: Any
    loss_func: Any
    params: Any
    data: Any
    options: dict
    param_shapes: list[tuple[int, ...]]
    perm: np.ndarray
    reference: Any
    operators: dict = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s, dtype=int) for s in self.param_shapes))

    @functools.cached_property
    def dense(self) -> dict[str, np.ndarray]:
        """Dense ``H``, ``G``, ``J`` (numpy float64) in the operator's parameter order."""
        return self.reference()

    def operator(self, kind: str, **overrides: Any) -> Any:
        """``"H"``, ``"G"``, ``"J"`` or ``"JT"``, built once per set of options."""
        key = (kind, tuple(sorted(overrides.items())))
        if key not in self.operators:
            options = {**self.options, **overrides}
            if kind == "H":
                op = curvlinops.HessianLinearOperator(
                    self.model_func, self.loss_func, self.params, self.data, **options
                )
            elif kind == "G":
                op = curvlinops.GGNLinearOperator(
                    self.model_func, self.loss_func, self.params, self.data, **options
                )
            elif kind == "J":
                op = curvlinops.JacobianLinearOperator(
                    self.model_func, self.params, self.data, **options
                )
            elif kind == "JT":
                op = curvlinops.TransposedJacobianLinearOperator(
                    self.model_func, self.params, self.data, **options
                )
            else:
                raise ValueError(kind)
            self.operators[key] = op
        return self.operators[key]

    def native(self, x: np.ndarray) -> Any:
        """``x`` as an array of this problem's framework."""
        if self.backend == "torch":
            import torch

            return torch.as_tensor(x)
        import jax.numpy as jnp

        return jnp.asarray(x)

    def param_structure(self, flat: np.ndarray) -> Any:
        """Split a flat vector (``(P,)`` or ``(P, K)``) into ``params``' structure."""
        pieces, start = [], 0
        for shape in self.param_shapes:
            size = int(np.prod(shape, dtype=int))
            block = flat[start : start + size]
            pieces.append(self.native(block.reshape(shape + flat.shape[1:])))
            start += size
        return _rebuild_like(self.params, pieces, self.backend)

    def flatten_structure(self, tree: Any) -> np.ndarray:
        """Concatenate a parameter-shaped structure into a flat numpy vector."""
        from helpers import to_numpy

        leaves = _structure_leaves(tree, self.backend)
        assert len(leaves) == len(self.param_shapes)
        trailing = to_numpy(leaves[0]).shape[len(self.param_shapes[0]) :]
        return np.concatenate([to_numpy(leaf).reshape(-1, *trailing) for leaf in leaves], axis=0)

    def to_canonical(self, flat_result: np.ndarray) -> np.ndarray:
        """Reorder a parameter-space result from the operator's order to the canonical one."""
        out = np.empty_like(flat_result)
        out[self.perm] = flat_result
        return out

    def from_canonical(self, canonical: np.ndarray) -> np.ndarray:
        """Reorder a canonical parameter-space vector into the operator's order."""
        return canonical[self.perm]


def _structure_leaves(tree: Any, backend: str) -> list[Any]:
    if backend == "jax":
        import jax

        return jax.tree_util.tree_leaves(tree)
    if isinstance(tree, dict):
        return list(tree.values())
    return list(tree)


def _rebuild_like(params: Any, pieces: list[Any], backend: str) -> Any:
    if backend == "jax":
        import jax

        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), pieces)
    if isinstance(params, dict):
        return dict(zip(params, pieces))
    return list(pieces)


def _permutation(canonical: list[str], order: list[str], shapes: dict) -> np.ndarray:
    """Flat index map: operator position -> canonical position."""
    offsets, start = {}, 0
    for name in canonical:
        size = int(np.prod(shapes[name], dtype=int))
        offsets[name] = np.arange(start, start + size)
        start += size
    return np.concatenate([offsets[name] for name in order])


@functools.cache
def build(name: str, backend: str) -> Problem:
    """The case ``name`` built for ``backend`` (cached: tests share operators)."""
    case = BY_NAME[name]
    return _build_torch(case) if backend == "torch" else _build_jax(case)


# --- PyTorch -------------------------------------------------------------------
def _torch_module(case: Case) -> Any:
    import torch
    from torch import nn

    class Permute(nn.Module):
        def forward(self, x: Any) -> Any:
            return x.permute(0, 2, 1)

    class ConcatInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, X: dict) -> Any:
            return self.net(torch.cat([X["a"], X["b"]], dim=1))

    if case.model == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    if case.model == "cnn":
        return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3))
    if case.model == "seq":
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    if case.model == "seq_ct":
        return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3), Permute())
    return ConcatInputs()


def _torch_reference_loss(case: Case) -> Any:
    import torch.nn.functional as F

    r = case.reduction
    if case.loss == "mse":
        return lambda z, y: F.mse_loss(z, y, reduction=r)
    if case.loss == "bce":
        return lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction=r)
    if case.loss == "quartic":
        return lambda z, y: ((z - y) ** 4).mean() if r == "mean" else ((z - y) ** 4).sum()
    if case.model == "seq":  # classes last: F.cross_entropy wants them on axis 1
        return lambda z, y: F.cross_entropy(z.movedim(-1, 1), y, reduction=r)
    return lambda z, y: F.cross_entropy(z, y, reduction=r)


def _torch_loss_func(case: Case) -> Any:
    from torch import nn

    r = case.reduction
    if case.loss == "quartic":
        return QuarticLoss(r)
    if case.model == "seq":
        # nn.CrossEntropyLoss would read axis 1 as classes; say where they are.
        return losses.CrossEntropyLoss(reduction=r, class_axis=-1)
    return {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}[case.loss](
        reduction=r
    )


def _build_torch(case: Case) -> Problem:
    import torch
    from torch.func import functional_call, hessian, jacrev

    weights = _weights(case)
    module = _torch_module(case).double()
    named = dict(module.named_parameters())
    canonical_names = [n for n, _ in _layers(case.model)]
    with torch.no_grad():
        for canonical, (name, p) in zip(canonical_names, named.items()):
            assert tuple(p.shape) == weights[canonical].shape, (name, canonical)
            p.copy_(torch.as_tensor(weights[canonical]))
    to_canonical_name = dict(zip(named, canonical_names))

    options: dict = {"columns_per_pass": COLUMNS_PER_PASS["torch"]}
    model_func: Any = module
    if case.model == "dict":
        # a functional model (params_dict, X) -> outputs, params as a dict
        params: Any = dict(named)
        options["batch_size_fn"] = lambda X: X["a"].shape[0]

        def model_func(p: dict, X: dict) -> Any:
            return functional_call(module, p, (X,))

    elif case.params == "dict":
        params = dict(reversed(list(named.items())))
    else:
        params = list(module.parameters())

    op_names = list(params) if isinstance(params, dict) else list(named)
    tensors = list(params.values()) if isinstance(params, dict) else list(params)
    shapes = [tuple(t.shape) for t in tensors]

    def to_torch(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: torch.as_tensor(v) for k, v in x.items()}
        return torch.as_tensor(x)

    data = [(to_torch(X), to_torch(y)) for X, y in numpy_data(case)]
    if case.model == "cnn":
        # a DataLoader: batches of 4 and 3
        dataset = torch.utils.data.TensorDataset(
            torch.cat([X for X, _ in data]), torch.cat([y for _, y in data])
        )
        data = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZES[0], shuffle=False)

    def concat(batches: list) -> Any:
        if isinstance(batches[0], dict):
            return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        return torch.cat(batches)

    X_all = concat([X for X, _ in data])
    y_all = concat([y for _, y in data])
    ref_loss = _torch_reference_loss(case)
    sizes = [int(np.prod(s, dtype=int)) for s in shapes]

    def outputs(theta: Any) -> Any:
        pieces = torch.split(theta, sizes)
        p = {n: piece.reshape(s) for n, piece, s in zip(op_names, pieces, shapes)}
        return functional_call(module, p, (X_all,))

    def reference() -> dict[str, np.ndarray]:
        theta = torch.cat([t.detach().reshape(-1) for t in tensors])
        H = hessian(lambda t: ref_loss(outputs(t), y_all))(theta)
        J = jacrev(outputs)(theta).reshape(-1, theta.numel())
        z = outputs(theta).detach()
        Hz = hessian(lambda out: ref_loss(out, y_all))(z).reshape(J.shape[0], J.shape[0])
        G = J.T @ Hz @ J
        return {k: v.detach().numpy() for k, v in {"H": H, "G": G, "J": J}.items()}

    perm = _permutation(
        canonical_names, [to_canonical_name[n] for n in op_names], dict(_layers(case.model))
    )
    return Problem(
        case,
        "torch",
        model_func,
        _torch_loss_func(case),
        params,
        data,
        options,
        shapes,
        perm,
        reference,
    )


# --- JAX ------------------------------------------------------------------------
def _jax_model(case: Case) -> Any:
    """``model(params, X)`` with params as ``[(W0, b0), (W1, b1)]`` (canonical layout)."""
    import jax
    import jax.numpy as jnp

    def dense(layer: tuple, x: Any) -> Any:
        W, b = layer
        return x @ W.T + b

    def mlp(layers: list, x: Any) -> Any:
        return dense(layers[1], jnp.tanh(dense(layers[0], x)))

    if case.model in ("mlp", "seq"):
        return mlp
    if case.model == "seq_ct":
        return lambda layers, x: jnp.transpose(mlp(layers, x), (0, 2, 1))
    if case.model == "dict":
        return lambda layers, X: mlp(layers, jnp.concatenate([X["a"], X["b"]], axis=1))

    def cnn(layers: list, x: Any) -> Any:
        W, b = layers[0]
        h = jax.lax.conv_general_dilated(
            x, W, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        h = jnp.tanh(h + b[None, :, None, None])
        return dense(layers[1], h.reshape(h.shape[0], -1))

    return cnn


def _jax_reference_loss(case: Case) -> Any:
    import jax
    import jax.numpy as jnp

    reduce = jnp.mean if case.reduction == "mean" else jnp.sum
    if case.loss == "mse":
        return lambda z, y: reduce((z - y) ** 2)
    if case.loss == "bce":
        return lambda z, y: reduce(-(y * jax.nn.log_sigmoid(z) + (1 - y) * jax.nn.log_sigmoid(-z)))
    if case.loss == "quartic":
        return lambda z, y: reduce((z - y) ** 4)
    axis = _class_axis(case)

    def cross_entropy(z: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(z, axis=axis)
        if case.targets == "probs":
            return -reduce(jnp.sum(y * logp, axis=axis))
        picked = jnp.take_along_axis(logp, jnp.expand_dims(y, axis), axis=axis)
        return -reduce(picked)

    return cross_entropy


def _jax_loss_func(case: Case) -> Any:
    r = case.reduction
    if case.loss == "quartic":
        return QuarticLoss(r)
    if case.loss == "ce":
        return losses.CrossEntropyLoss(reduction=r, class_axis=_class_axis(case))
    return {"mse": losses.MSELoss, "bce": losses.BCEWithLogitsLoss}[case.loss](reduction=r)


def _build_jax(case: Case) -> Problem:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    weights = _weights(case)
    canonical_names = [n for n, _ in _layers(case.model)]
    arrays = [jnp.asarray(weights[n]) for n in canonical_names]
    layers = [(arrays[0], arrays[1]), (arrays[2], arrays[3])]
    model = _jax_model(case)
    if case.params == "dict":
        # a nested dict: tree_leaves sorts keys, so biases come before weights
        params: Any = {
            "hidden": {"weight": arrays[0], "bias": arrays[1]},
            "out": {"weight": arrays[2], "bias": arrays[3]},
        }
        op_names = [canonical_names[i] for i in (1, 0, 3, 2)]

        def model_func(p: dict, X: Any) -> Any:
            return model(
                [
                    (p["hidden"]["weight"], p["hidden"]["bias"]),
                    (p["out"]["weight"], p["out"]["bias"]),
                ],
                X,
            )

    else:
        params, op_names, model_func = layers, canonical_names, model

    options: dict = {"columns_per_pass": COLUMNS_PER_PASS["jax"]}
    if case.model == "dict":
        options["batch_size_fn"] = lambda X: X["a"].shape[0]
    # MLP data as JAX arrays; the other models' data stay numpy (the operator converts)
    batches = numpy_data(case)
    if case.model == "mlp":
        batches = [(jnp.asarray(X), jnp.asarray(y)) for X, y in batches]
    data = batches

    def concat(parts: list) -> Any:
        if isinstance(parts[0], dict):
            return {k: jnp.concatenate([jnp.asarray(p[k]) for p in parts]) for k in parts[0]}
        return jnp.concatenate([jnp.asarray(p) for p in parts])

    X_all = concat([X for X, _ in data])
    y_all = concat([y for _, y in data])
    ref_loss = _jax_reference_loss(case)
    theta, unravel = ravel_pytree(params)

    def outputs(t: Any) -> Any:
        return model_func(unravel(t), X_all)

    @jax.jit
    def dense_matrices(t: Any) -> dict[str, Any]:
        H = jax.hessian(lambda t: ref_loss(outputs(t), y_all))(t)
        J = jax.jacrev(outputs)(t).reshape(-1, t.size)
        z = outputs(t)
        Hz = jax.hessian(lambda out: ref_loss(out, y_all))(z).reshape(J.shape[0], J.shape[0])
        return {"H": H, "G": J.T @ Hz @ J, "J": J}

    def reference() -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in dense_matrices(theta).items()}

    shapes = [tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)]
    perm = _permutation(canonical_names, op_names, dict(_layers(case.model)))
    return Problem(
        case,
        "jax",
        model_func,
        _jax_loss_func(case),
        params,
        data,
        options,
        shapes,
        perm,
        reference,
    )
