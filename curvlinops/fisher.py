r"""Empirical Fisher and Monte-Carlo Fisher: second moments of loss gradients.

Both are written as :math:`J^\top M J` with an output-space matrix ``M`` built
from per-term output gradients :math:`g = \partial \ell / \partial z` (closed
form for the standard losses), so a product costs one forward pass with a
JVP and one VJP, like the GGN; no per-example parameter gradient is formed.

Terms follow curvlinops-for-pytorch: a term is what one target random
variable contributes to the loss, i.e. one row of the last axis for MSE and
BCE, and one position's class vector for cross-entropy. For outputs of shape
``(N, C)`` a term is an example.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error
from curvlinops._curvature import CurvatureOperator, map_columns, outputs_with_jvp

__all__ = ["EFLinearOperator", "FisherMCLinearOperator"]

DEFAULT_SEED = 2147483647
"""Default seed of Monte-Carlo operators (the one of curvlinops-for-pytorch)."""

ELEMENTS_PER_PASS = 2**25
"""Memory bound for per-example diagonals: examples x columns x parameters per pass."""


class _GradientMomentOperator(CurvatureOperator):
    r"""Base of :math:`\sum_b w_b c_b J_b^\top (\frac1k \sum_{s,t} g_{st} g_{st}^\top) J_b`.

    Subclasses say which output gradients ``g`` (``k`` per term) they use.
    """

    is_symmetric = True
    _params_in = _params_out = True
    _vector_products = True
    _activation_factors = (2.5, 0.6)

    def __init__(self, model_func: Any, loss_func: Any, params: Any, data: Any, **options: Any):
        self._output_shapes: dict[int, tuple[int, ...]] = {}
        super().__init__(model_func, loss_func, params, data, **options)

    # --- what subclasses write ------------------------------------------------
    def _noise(self, index: int, X: Any) -> Any:
        """Random numbers of batch ``index`` (``None`` when nothing is sampled)."""
        return None

    def _gradients(self, z: Any, y: Any, noise: Any) -> Any:
        """Output gradients ``(k, *z.shape)`` of the terms' un-normalised losses."""
        raise NotImplementedError

    # --- products -----------------------------------------------------------------
    def _batch_extras(self, index: int, X: Any, n: int) -> tuple:
        return self._weight(n), self._noise(index, X)

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any, noise: Any) -> Any:
        b, loss, model = self.backend, self._loss, self.backend.model_fn

        def column(v: Any) -> Any:
            z, pullback, Jv = outputs_with_jvp(b, model, primals, X, v)
            G = self._gradients(z, y, noise)
            inner = loss.term_sum(b, G * Jv, z)  # gᵀ J v per term and sample
            scale = loss.normalization(z) / G.shape[0]
            return b.flatten(pullback(scale * b.xp.sum(G * inner, axis=0)))

        return weight * map_columns(b, column, V)

    # --- kept linearization: the model's graph, its transpose, the gradients -----
    def _batch_linearize(self, primals: Any, X: Any, y: Any, weight: Any, noise: Any) -> Any:
        b, loss, model = self.backend, self._loss, self.backend.model_fn
        lin = b.linearize(lambda p: model(p, X), primals, transpose=True)
        z = b.linear_output(lin)
        G = self._gradients(z, y, noise)
        return lin, G, weight * loss.normalization(z) / G.shape[0]

    def _linearized_matmat(self, state: Any, V: Any) -> Any:
        b, loss, (lin, G, scale) = self.backend, self._loss, state
        z = b.linear_output(lin)

        def column(v: Any) -> Any:
            inner = loss.term_sum(b, G * b.linear_jvp(lin, b.unflatten(v)), z)
            return b.flatten(b.linear_vjp(lin, scale * b.xp.sum(G * inner, axis=0)))

        return map_columns(b, column, V)

    # --- diagonal -----------------------------------------------------------------
    def diagonal(self) -> Any:
        r"""The exact diagonal of this operator, from per-example gradients.

        :math:`\mathrm{diag} = \sum_b w_b \frac{c_b}{k} \sum_{n,s,t}
        (J_n^\top g_{nst})^{\odot 2}`: one VJP per example, sample and term,
        vectorised over examples in chunks that bound the memory (no
        :math:`P \times P` or :math:`N \times P` array over the data).

        Returns:
            A ``(P,)`` array of the backend's type.
        """
        return _per_example_diagonal(self)

    def _diagonal_columns(self, primals: Any, X: Any, y: Any, noise: Any) -> Any:
        """Cotangents ``(k', N, *out)`` whose per-example VJPs square-sum to the diagonal."""
        b, loss = self.backend, self._loss
        z = b.model_fn(primals, X)
        G = self._gradients(z, y, noise)
        return math.sqrt(loss.normalization(z) / G.shape[0]) * _split_terms(b, loss, z, G)

    def _columns_per_example(self, shape: tuple[int, ...]) -> int:
        """Columns of :meth:`_diagonal_columns` per example, for outputs of ``shape``."""
        return self._loss.terms_per_example(shape) * (getattr(self, "mc_samples", None) or 1)

    def _output_shape(self, index: int, X: Any) -> tuple[int, ...]:
        """Shape of the model outputs on batch ``index`` (one forward pass, then cached)."""
        if index not in self._output_shapes:
            b = self.backend
            self._output_shapes[index] = tuple(b.model_fn(b.primals, X).shape)
        return self._output_shapes[index]


class EFLinearOperator(_GradientMomentOperator):
    r"""Empirical Fisher (uncentred gradient covariance), as a matrix-free operator.

    .. math::
        F_{\mathrm{emp}} = c \sum_{t} \nabla_\theta \ell_t \, (\nabla_\theta \ell_t)^\top
        = \sum_b w_b \, c_b \, J_b^\top \Big(\sum_{t \in b} g_t g_t^\top\Big) J_b,
        \qquad g_t = \partial \ell_t / \partial z,

    where :math:`\ell_t` are the un-normalised loss terms (one per example for
    outputs ``(N, C)``; see the module docstring for sequences), and
    :math:`c = 1/R` for ``reduction="mean"`` with :math:`R` the number the
    loss divides by (:math:`N` for cross-entropy on ``(N, C)`` logits,
    :math:`N C` for MSE and BCE on ``(N, C)`` outputs), :math:`c = 1` for
    ``"sum"``. So ``"mean"`` is ``"sum"`` divided by :math:`R`, as for the
    Hessian and the GGN, and the numbers are those of curvlinops-for-pytorch.
    For a callable loss, a term is an example: :math:`\ell_n` is the callable
    on a batch of one, and :math:`c = 1/N` for ``"mean"``.

    The output gradients are closed-form (``2(z - y)`` for MSE,
    ``softmax(z) - onehot(y)`` for cross-entropy, ``σ(z) - y`` for BCE; by
    autodiff for callables), and a product is one forward pass with a JVP and
    one VJP, the cost of a GGN product.

    Args:
        model_func, loss_func, params, data: As for
            :class:`~curvlinops.HessianLinearOperator`.
        **options: ``progressbar``, ``check_deterministic``, ``num_data``,
            ``batch_size_fn``, ``backend``, ``columns_per_pass``.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops.fisher import EFLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> loss_func, params = torch.nn.CrossEntropyLoss(), list(model.parameters())
        >>> F = EFLinearOperator(model, loss_func, params, [(X, y)])
        >>> grads = torch.func.vmap(torch.func.grad(
        ...     lambda p, x, t: loss_func(torch.func.functional_call(
        ...         model, dict(zip(["weight", "bias"], p)), (x[None],)), t[None])),
        ...     in_dims=(None, 0, 0))(tuple(params), X, y)
        >>> g = torch.cat([gi.detach().reshape(8, -1) for gi in grads], dim=1)
        >>> bool(np.allclose(F @ np.eye(8), (g.T @ g / 8).numpy()))
        True
    """

    def _gradients(self, z: Any, y: Any, noise: Any) -> Any:
        return self._loss.output_gradient(self.backend, z, y)[None]


class FisherMCLinearOperator(_GradientMomentOperator):
    r"""Monte-Carlo Fisher: gradients at targets drawn from the model's distribution.

    .. math::
        \hat F = \sum_b w_b \, c_b \, J_b^\top \Big(\frac1k \sum_{s=1}^{k}
        \sum_{t \in b} \tilde g_{ts} \tilde g_{ts}^\top\Big) J_b,
        \qquad \tilde g_{ts} = \partial \ell(z_t, \tilde y_{ts}) / \partial z_t,
        \quad \tilde y_{ts} \sim p(y \mid z_t),

    with terms and :math:`c_b` as in :class:`EFLinearOperator`. The
    distributions are those whose negative log-likelihood is the loss:
    :math:`\mathcal N(z, I/2)` for MSE, the categorical ``softmax(z)`` for
    cross-entropy, the Bernoulli ``σ(z)`` for BCE. Since
    :math:`\mathbb E[\tilde g \tilde g^\top]` is the output Hessian,
    :math:`\hat F` is an unbiased estimate of the GGN, with an error that falls
    like :math:`1/\sqrt{k}`.

    The samples of batch ``i`` are drawn from a seed made of ``seed`` and
    ``i``, so the operator is a fixed (deterministic, symmetric PSD) matrix:
    every product, and every operator with the same ``seed`` and
    ``mc_samples``, uses the same draws (per backend: PyTorch and JAX have
    different random number generators). A product costs what a GGN product
    costs, plus the draws.

    Args:
        model_func, loss_func, params, data: As for
            :class:`~curvlinops.HessianLinearOperator`; ``loss_func`` must be
            MSE, cross-entropy or BCE-with-logits.
        mc_samples: Number ``k`` of sampled targets per term.
        seed: Seed of the draws (a non-negative int).
        **options: ``progressbar``, ``check_deterministic``, ``num_data``,
            ``batch_size_fn``, ``backend``, ``columns_per_pass``.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import GGNLinearOperator
        >>> from curvlinops.fisher import FisherMCLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> args = (model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
        >>> F = FisherMCLinearOperator(*args, mc_samples=2000, seed=1)
        >>> G = GGNLinearOperator(*args) @ np.eye(8)
        >>> bool(np.linalg.norm(F @ np.eye(8) - G) < 0.1 * np.linalg.norm(G))
        True
    """

    def __init__(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        mc_samples: int = 1,
        seed: int = DEFAULT_SEED,
        **options: Any,
    ) -> None:
        self.mc_samples = check_mc_samples(mc_samples)
        self.seed = check_seed(seed)
        super().__init__(model_func, loss_func, params, data, **options)
        # without the determinism check nothing was sampled yet: fail now, not at a product,
        # for a loss without a distribution
        self._loss.sample_noise(self.backend, (1,), 1, 0)

    def _noise(self, index: int, X: Any) -> Any:
        return draw_noise(self, index, X)

    def _gradients(self, z: Any, y: Any, noise: Any) -> Any:
        return self._loss.sampled_gradient(self.backend, z, noise)

    def sampled_targets(self) -> list[Any]:
        """The targets this operator drew, one array ``(k, *outputs.shape)`` per batch.

        Classes come one-hot (a probability vector per position), so that they
        can be passed to the loss as targets.
        """
        b, loss = self.backend, self._loss
        if "_draw_targets" not in self.__dict__:

            def targets(primals: Any, X: Any, noise: Any) -> Any:
                return loss.sample_targets(b, b.model_fn(primals, X), noise)

            self._draw_targets = b.compile(targets, data_args=(1,))
        return [
            self._draw_targets(b.primals, X, self._noise(index, X))
            for index, X, _, _ in self._batches("FisherMCLinearOperator samples")
        ]


# --- helpers shared with the diagonal operators --------------------------------------
def draw_noise(op: Any, index: int, X: Any) -> Any:
    """The random numbers behind ``op``'s samples on batch ``index``.

    ``op`` has ``mc_samples`` and ``seed``; the draws depend on these, the
    batch index and the outputs' shape only.
    """
    shape = op._output_shape(index, X)
    return op._loss.sample_noise(op.backend, shape, op.mc_samples, batch_seed(op.seed, index))


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index``: a hash of ``(seed, index)`` below 2**31."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)
    return int(state[0]) & 0x7FFFFFFF


def check_mc_samples(mc_samples: Any, argument: str = "mc_samples") -> int:
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, (int, np.integer)):
        raise type_error(argument, "a positive int (the number of sampled targets)", mc_samples)
    if mc_samples <= 0:
        raise value_error(argument, "a positive int", str(mc_samples))
    return int(mc_samples)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise type_error("seed", "a non-negative int", seed)
    if seed < 0:
        raise value_error("seed", "a non-negative int", str(seed))
    return int(seed)


def _split_terms(b: Any, loss: Any, z: Any, G: Any) -> Any:
    """Columns ``(k U, N, *out)``: each of an example's ``U`` terms gets its own column."""
    masks = loss.term_masks(b, z)
    if masks is None:
        return G
    split = G[:, None] * masks[None]
    return b.xp.reshape(split, (G.shape[0] * masks.shape[0], *z.shape))


def _per_example_diagonal(op: Any) -> Any:
    """``Σ_b w_b Σ_n Σ_j (J_nᵀ S[j]_n)²`` with ``S`` from ``op._diagonal_columns``.

    A batch that fits into one pass is one compiled call; larger batches are
    walked in chunks of examples.
    """
    b = op.backend
    columns, square_sum_chunk, whole = _diagonal_functions(op)
    primals, total = b.primals, None
    for index, X, y, n in op._batches(f"{type(op).__name__} diagonal"):
        if n == 0:  # an empty batch (shard) adds nothing
            continue
        noise = op._noise(index, X)
        shape = op._output_shape(index, X)
        rows = _rows_per_example(shape, n)
        columns_per_example = rows * op._columns_per_example(shape)
        chunk = _examples_per_pass(op, columns_per_example, n)
        if chunk >= n:
            part = whole(primals, X, y, noise)
        else:
            S = columns(primals, X, y, noise)
            part = sum(
                square_sum_chunk(
                    primals,
                    _slice_batch(b, X, start, start + chunk),
                    S[:, rows * start : rows * (start + chunk)],
                )
                for start in range(0, n, chunk)
            )
        part = op._weight(n) * part
        total = part if total is None else total + part
    if total is None:
        total = b.zeros((op.num_params,))
    # data parallelism: the sum over all processes' data
    return op._comm.all_reduce_sum(total)


def _diagonal_functions(op: Any) -> tuple[Any, Any, Any]:
    """Compiled per-batch functions of the diagonal, made once per operator."""
    if "_diagonal_functions" not in op.__dict__:
        b = op.backend
        square_sum = _square_sum_fn(b)

        def whole_batch(primals: Any, X: Any, y: Any, noise: Any) -> Any:
            return square_sum(primals, X, op._diagonal_columns(primals, X, y, noise))

        op._diagonal_functions = (
            b.compile(op._diagonal_columns, data_args=(1, 2)),
            b.compile(square_sum, data_args=(1, 2)),
            b.compile(whole_batch, data_args=(1, 2)),
        )
    return op._diagonal_functions


def _examples_per_pass(op: Any, num_columns: int, batch_size: int) -> int:
    chosen = getattr(op, "examples_per_pass", None)
    if chosen is None:
        chosen = max(1, ELEMENTS_PER_PASS // max(1, num_columns * op.num_params))
    return min(chosen, batch_size)


def _square_sum_fn(b: Any) -> Any:
    model, xp = b.model_fn, b.xp

    def square_sum(primals: Any, X: Any, S: Any) -> Any:
        def example(x: Any, s: Any) -> Any:
            x_batch = _map_leaves(b, lambda leaf: xp.expand_dims(leaf, axis=0), x)
            _, pullback = b.vjp(lambda p: model(p, x_batch), primals)

            def column(cotangent: Any) -> Any:  # the outputs of one example: (rows, *out)
                return b.flatten(pullback(cotangent))

            grads = b.vmap(column)(s)  # (k, P)
            return xp.sum(grads * grads, axis=0)

        S = _columns_by_example(b, S, _leading_size(b, X))
        return xp.sum(b.vmap(example, in_axes=(0, 1))(X, S), axis=0)

    return square_sum


def _rows_per_example(shape: tuple[int, ...], num_examples: int) -> int:
    """Output rows per input example (1 for outputs ``(N, ...)`` of ``N`` examples).

    ``T`` for a model whose ``(N, T)`` inputs give ``(N T, C)`` outputs: a
    language model's tokens, flattened example by example.
    """
    if shape[0] % num_examples:
        raise value_error(
            "model_func",
            f"outputs whose leading axis is a multiple of the {num_examples} examples of "
            "the batch (one row or the same number of rows per example)",
            f"outputs of shape {shape}",
            "Return outputs of shape (N, ...) or (N * T, ...), example by example.",
        )
    return shape[0] // num_examples


def _leading_size(b: Any, X: Any) -> int:
    return int(b.tree_flatten(X)[0][0].shape[0])


def _columns_by_example(b: Any, S: Any, num_examples: int) -> Any:
    """Columns ``(k, N R, *out)`` as ``(k R, N, R, *out)``: per example, a column per row.

    With ``R`` output rows per example, each row is a loss term of its own
    (``(J_tᵀ s_t)²`` summed over rows ``t``, not ``(Σ_t J_tᵀ s_t)²``): row
    ``t``'s column keeps row ``t`` of the example's cotangents and zeros the others.
    """
    xp, (k, rows_total), out = b.xp, S.shape[:2], S.shape[2:]
    rows = rows_total // num_examples
    S = xp.reshape(S, (k, num_examples, rows, *out))
    if rows == 1:
        return S
    masks = xp.reshape(b.eye(rows), (rows, 1, 1, rows, *(1,) * len(out)))
    return xp.reshape(masks * S[None], (rows * k, num_examples, rows, *out))


def _map_leaves(b: Any, fn: Any, tree: Any) -> Any:
    leaves, rebuild = b.tree_flatten(tree)
    return rebuild([fn(leaf) for leaf in leaves])


def _slice_batch(b: Any, X: Any, start: int, stop: int) -> Any:
    return _map_leaves(b, lambda leaf: leaf[start:stop], X)
