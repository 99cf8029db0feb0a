r"""Influence scores for any curvature: pairwise, self-influence and per layer.

For a query example :math:`z_q` and a training example :math:`z_i`, the
*influence score* (kronfluence's convention, Grosse et al. 2023) is

.. math::
    s_{qi} = \nabla_w \ell(z_q)^\top \big(c\,C + D\big)^{-1} \nabla_w \ell(z_i),

with :math:`C` a curvature operator (an exact Hessian or GGN solved by CG,
:class:`~curvlinops.KFACLinearOperator`,
:class:`~curvlinops.EKFACLinearOperator`, a diagonal, the identity),
:math:`c` a scale (``curvature_scale``) and :math:`D` a damping that is
constant on each layer. A positive score means that up-weighting
:math:`z_i` lowers the loss at :math:`z_q` (it is :math:`-\mathcal{I}` of
:func:`~curvlinops.influence.influence_on_test_loss`). The *self-influence*
of :math:`z_i` is :math:`s_{ii}`.

Damping is a number, one number per layer, or ``"heuristic"``:
kronfluence's default, :math:`\lambda_l = 0.1 \times` the mean eigenvalue of
layer :math:`l`'s diagonal block of :math:`c\,C` (its trace over its size;
for EK-FAC the mean corrected eigenvalue).

Per-example gradients are computed by ``vmap`` over ``examples_per_pass``
examples at a time; the preconditioned query gradients (``P × T``) are
formed once and each block of training gradients (``P × examples_per_pass``)
is reduced to its scores before the next is formed: no ``N × P`` array.

Beyond pairwise and self scores: per-layer scores (``per_layer=True``),
per-token scores of sequence models (:meth:`InfluenceScorer.per_token_scores`),
query gradients in low rank (``query_rank``), query partitions within a
memory budget and layer partitions (``memory_budget``, ``layers``), and runs
that save their blocks as they go and resume (``output_dir``; see
``curvlinops.influence_store`` for saved factors and scores).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from curvlinops._checks import check_positive_int, type_error, value_error
from curvlinops._curvature import _check_data, _split_batch
from curvlinops._influence_low_rank import LowRankQueries, held_bytes_per_query
from curvlinops._influence_preconditioners import (
    HEURISTIC_DAMPING,
    HEURISTIC_DAMPING_SCALE,
    check_curvature,
    layers_of,
    preconditioner,
)
from curvlinops._influence_tokens import (
    captured_gradients,
    capturing_kfac,
    kfac_of,
    query_blocks,
    token_scores,
)
from curvlinops._memory import MemoryEstimate, resolve_budget
from curvlinops._operand import check_real
from curvlinops.backends import make_backend
from curvlinops.influence import (
    DEFAULT_EXAMPLES_PER_PASS,
    _leading_size,
    _PerExampleGradients,
    _rows,
)

__all__ = ["HEURISTIC_DAMPING", "HEURISTIC_DAMPING_SCALE", "InfluenceScorer"]


class InfluenceScorer:
    r"""Pairwise and self-influence scores of a trained model for a curvature operator.

    .. math::
        s_{qi} = \nabla_w \ell(z_q)^\top \big(c\,C + D\big)^{-1} \nabla_w \ell(z_i),
        \qquad D = \mathrm{blockdiag}(\lambda_l I_{P_l}).

    The inverse is applied from the operator's structure: KFAC and EK-FAC in
    their eigenbases (:math:`(c\,\Lambda_l + \lambda_l)^{-1}`, as kronfluence),
    a diagonal entry by entry, the identity as :math:`1/(c + \lambda_l)`, any
    other operator by batched CG (whose non-convergence is warned about). An
    inverse operator (:class:`~curvlinops.KFACInverseLinearOperator`,
    :class:`~curvlinops.CGInverseLinearOperator`, ...) is applied as it is.

    Layers are KFAC's (``_mapping``) for KFAC and EK-FAC, else the parameters
    grouped by their owner (``"0.weight"`` → ``"0"``; a JAX path without its
    last key). Per-layer scores split the dot product by layer; they sum to
    the total, and for a block-diagonal curvature they are each layer's own
    influence (kronfluence's per-module scores).

    Args:
        curvature: The ``P × P`` curvature :math:`C` (see above).
        model_func, loss_func, params: The trained model, as for
            :class:`~curvlinops.HessianLinearOperator`. ``loss_func`` on a
            batch of one example is :math:`\ell(z)` (kronfluence sums a
            sequence's token losses: use ``reduction="sum"`` for that).
        damping: :math:`\lambda \ge 0` for every layer, a dict ``{layer:
            λ_l}`` naming every layer, or ``"heuristic"``. Default:
            kronfluence's ``1e-8`` (none for an inverse operator, which holds
            its own).
        curvature_scale: :math:`c > 0` (e.g. ``1 / N`` for a curvature of a
            summed loss over ``N`` examples).
        tol, maxiter: CG's residual tolerance (default: the square root of
            the dtype's epsilon) and iterations; only for operators solved by
            CG.
        examples_per_pass: Examples whose gradients one ``vmap`` forms.
        backend: ``"torch"``, ``"jax"`` or ``None`` to read it off ``params``.

    Attributes:
        layer_names: The layers, in the order of the per-layer scores.
        damping_per_layer: ``{layer: λ_l}`` as used (heuristic resolved).

    Example:
        >>> import torch
        >>> from curvlinops import IdentityLinearOperator
        >>> from curvlinops.influence_scores import InfluenceScorer
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
        >>> params = list(model.parameters())
        >>> scorer = InfluenceScorer(IdentityLinearOperator(8), model,
        ...                          torch.nn.CrossEntropyLoss(), params)
        >>> scorer.pairwise_scores([(X[:2], y[:2])], [(X, y)]).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        curvature: Any,
        model_func: Any,
        loss_func: Any,
        params: Any,
        *,
        damping: float | str | dict[str, float] | None = None,
        curvature_scale: float = 1.0,
        tol: float | None = None,
        maxiter: int | None = None,
        examples_per_pass: int = DEFAULT_EXAMPLES_PER_PASS,
        backend: str | None = None,
    ) -> None:
        b = make_backend(model_func, params, backend)
        self.backend = b
        self._offsets = np.cumsum([0, *(math.prod(s) for s in b.param_shapes)])
        P = int(self._offsets[-1])
        curvature = check_curvature(curvature, P, b)
        self._scale = check_real(curvature_scale, "curvature_scale", minimum=0.0)
        if self._scale == 0.0:
            raise value_error("curvature_scale", "a positive number", "0")
        self._curvature = curvature
        self._curvature_kind = type(curvature).__name__
        self._layers = layers_of(curvature, b)
        self.layer_names = list(self._layers)
        self._gradients = _PerExampleGradients(b, b.loss(loss_func), examples_per_pass)
        self._capturing = capturing_kfac(curvature, model_func, b, self._gradients.loss)
        self._precondition, self.damping_per_layer = preconditioner(
            curvature, self, damping, tol, maxiter
        )

    # --- layers -------------------------------------------------------------------
    def settings(self, layers: Iterable[str] | None = None) -> dict[str, Any]:
        """What the scores depend on besides the data (saved with them, checked on resuming)."""
        return {
            "curvature": self._curvature_kind,
            "curvature_scale": self._scale,
            "damping_per_layer": dict(self.damping_per_layer),
            "layers": self.layer_names if layers is None else list(layers),
            "num_params": int(self._offsets[-1]),
            "dtype": str(np.dtype(self.backend.dtype)),
            "backend": self.backend.name,
        }

    def _rows(self, layer: str) -> list[tuple[int, int]]:
        """The row ranges of the flat parameter vector that ``layer`` holds."""
        return [(int(self._offsets[p]), int(self._offsets[p + 1])) for p in self._layers[layer]]

    def _per_layer(self, values: dict[str, float]) -> Any:
        """A native ``(P,)`` vector holding ``values[layer]`` on each layer's rows."""
        vector = np.zeros(int(self._offsets[-1]), dtype=self.backend.dtype)
        for layer, value in values.items():
            for start, stop in self._rows(layer):
                vector[start:stop] = value
        return self.backend.import_array(vector, "damping")[0]

    # --- gradients ----------------------------------------------------------------
    def example_blocks(self, data: Iterable) -> Iterator[tuple[int, int, Any, Any]]:
        """``(batch index, n, X rows, y rows)`` of ``data``, ``examples_per_pass`` at a time."""
        b, chunk = self.backend, self._gradients.chunk
        empty = True
        for index, batch in enumerate(_check_data(data)):
            X, y = _split_batch(batch, index)
            X, y = b.import_batch(X, index), b.import_batch(y, index)
            n = _leading_size(b, X)
            for start in range(0, n, chunk):
                empty = False
                stop = min(start + chunk, n)
                yield index, stop - start, _rows(b, X, start, stop), _rows(b, y, start, stop)
        if empty:
            raise value_error("data", "at least one example in batches (X, y)", "no examples")

    def gradients(self, X: Any, y: Any) -> Any:
        """``(P, n)``: the per-example gradients of a block from :meth:`example_blocks`.

        With a PyTorch KFAC or EK-FAC curvature of the same model, from one
        forward and backward pass of the block through KFAC's layer capture
        (a batched product per layer); else by ``vmap`` over the examples.
        """
        if self._capturing is not None:
            return captured_gradients(self, self._capturing, X, y)
        return self._gradients._compiled(self.backend.primals, X, y)

    def _training_gradients(self, data: Iterable, kept: Any, blocks: bool = False) -> Iterator[Any]:
        """Gradient blocks of ``data``: the kept captures' where they hold the batch.

        ``blocks``: ``data`` is already :meth:`example_blocks`' output.
        """
        start, previous = 0, None
        for index, n, X, y in data if blocks else self.example_blocks(data):
            start = 0 if index != previous else start
            G = None if kept is None else kept.gradients(self, index, start, X, y)
            yield self.gradients(X, y) if G is None else G
            start, previous = start + n, index

    def gradient_blocks(self, data: Iterable) -> Iterator[Any]:
        """Per-example gradients of ``data``'s batches, in ``(P, examples_per_pass)`` blocks."""
        for _, _, X, y in self.example_blocks(data):
            yield self.gradients(X, y)

    def preconditioned_gradients(self, data: Iterable) -> Any:
        r"""``(P, T)``: :math:`(c\,C + D)^{-1} \nabla_w \ell(z_t)` for ``data``'s examples."""
        blocks = [self._precondition(G) for G in self.gradient_blocks(data)]
        return blocks[0] if len(blocks) == 1 else self.backend.concat(blocks, axis=1)

    # --- scores -------------------------------------------------------------------
    def pairwise_scores(
        self,
        query_data: Iterable,
        train_data: Iterable,
        *,
        per_layer: bool = False,
        layers: Iterable[str] | None = None,
        memory_budget: float | None = None,
        output_dir: Any = None,
        query_rank: int | None = None,
        train_captures: Any = None,
    ) -> Any:
        """Scores ``(T, N)`` of ``T`` query against ``N`` training examples.

        The preconditioned query gradients are held for a partition of the
        queries at a time, as many as ``memory_budget`` allows (all by
        default); the training gradients stream through, ``examples_per_pass``
        at a time, once per query partition.

        Args:
            query_data: Re-iterable of ``(X, y)`` batches: the rows.
            train_data: Re-iterable of ``(X, y)`` batches: the columns.
            per_layer: Return ``{layer: (T, N)}`` (summing to the total).
            layers: Only these layers (a layer partition): scores of their
                parameters alone, and only their rows of the query gradients
                are held. Default: all.
            memory_budget: Bytes for the preconditioned query gradients and
                the gradient blocks (default: all queries at once).
            output_dir: A folder where each (query partition, training batch)
                block of scores is saved as it is done, with the settings; a
                rerun with the same settings loads the blocks found there
                instead of computing them (resuming an interrupted run).
            query_rank: Truncate each query's preconditioned gradient, layer by
                layer, to this rank (kronfluence's ``query_gradient_low_rank``
                with ``use_full_svd=True``): a layer's ``(d_out, d_in)`` block
                (bias as a last column where KFAC keeps one block) becomes its
                best rank-``query_rank`` approximation where both sides
                exceed it. Only the factors are held (``r (d_out + d_in)``
                numbers a block and query, not ``d_out d_in``); scoring a block
                of training gradients then takes ``r`` times the products.
            train_captures: The :class:`~curvlinops.influence_factors.KeptCaptures`
                of ``fit_ekfac(curvature, keep_captures=True)`` on ``train_data``:
                the training gradients of the batches kept there are formed
                from them, without running the model.

        Returns:
            A native ``(T, N)`` array, or a dict of them per layer.
        """
        self._check_captures(train_captures)
        selection = self._selection(layers)
        rank = None if query_rank is None else check_positive_int(query_rank, "query_rank")
        size = self._query_partition_size(selection, memory_budget, rank)
        store = None
        if output_dir is not None:
            from curvlinops.influence_store import ScoreBlockStore

            settings = {
                **self.settings(selection.names),
                "per_layer": bool(per_layer),
                "query_blocks_per_partition": size,
                "examples_per_pass": self._gradients.chunk,
                "query_rank": query_rank,
            }
            store = ScoreBlockStore(output_dir, "pairwise", settings, self.backend)
        rows = [
            self._pairwise_row(
                part, query_blocks, train_data, per_layer, selection, store, rank, train_captures
            )
            for part, query_blocks in enumerate(_partitions(self.example_blocks(query_data), size))
        ]
        return self._assemble(rows, per_layer, selection, axis=0)

    def _pairwise_row(
        self,
        part: int,
        query_blocks: list,
        train_data: Iterable,
        per_layer: bool,
        selection: _Selection,
        store: Any,
        rank: int | None,
        kept: Any,
    ) -> Any:
        """One query partition's scores against all training batches (saved batch by batch)."""
        S, row = None, []
        batches = itertools.groupby(self.example_blocks(train_data), key=lambda block: block[0])
        for index, examples in batches:
            if store is not None and store.has(part, index):
                row.append(store.get(part, index, per_layer))
                continue
            if S is None:  # computed only where a block is missing
                S = self._held_queries(query_blocks, selection, rank)
            blocks = [
                self._pair_block(S, G, per_layer, selection)
                for G in self._training_gradients(examples, kept, blocks=True)
            ]
            row.append(self._assemble(blocks, per_layer, selection))
            if store is not None:
                store.put(part, index, row[-1])
        return self._assemble(row, per_layer, selection)

    def self_scores(
        self,
        train_data: Iterable,
        *,
        per_layer: bool = False,
        layers: Iterable[str] | None = None,
        train_captures: Any = None,
    ) -> Any:
        r"""Self-influence :math:`s_{ii}` ``(N,)`` of ``train_data``'s examples (or per layer).

        ``layers`` restricts the scores to a layer partition's parameters, and
        ``train_captures`` gives the kept batches' gradients (see
        :meth:`pairwise_scores`).
        """
        self._check_captures(train_captures)
        selection = self._selection(layers)
        blocks = []
        for G in self._training_gradients(train_data, train_captures):
            R = selection.take(self._precondition(G))
            blocks.append(self._self_block(R, selection.take(G), per_layer, selection))
        return self._assemble(blocks, per_layer, selection)

    def _check_captures(self, train_captures: Any) -> None:
        """``None``, or kept captures of this scorer's curvature, loss and parameters."""
        if train_captures is None:
            return
        from curvlinops.influence_factors import KeptCaptures

        if not isinstance(train_captures, KeptCaptures):
            raise type_error(
                "train_captures",
                "None or the KeptCaptures of fit_ekfac(curvature, keep_captures=True)",
                train_captures,
            )
        train_captures.check_scorer(self)

    def _held_queries(self, query_blocks: list, selection: _Selection, rank: int | None) -> Any:
        """A query partition's preconditioned gradients: ``(P_selected, T)``, or their factors."""
        if rank is None:
            S = [
                selection.take(self._precondition(self.gradients(X, y)))
                for *_, X, y in query_blocks
            ]
            return self._concat(S, axis=1)
        return LowRankQueries.concat(
            [
                LowRankQueries(self, self._precondition(self.gradients(X, y)), rank)
                for *_, X, y in query_blocks
            ]
        )

    def per_token_scores(self, query_data: Iterable, train_data: Iterable) -> Any:
        r"""Scores ``(T, N, S)`` of each token of ``N`` training sequences (kronfluence's).

        The score of sequence :math:`n` splits over its tokens through each
        linear layer's weight gradient :math:`\sum_s g_{ns} a_{ns}^\top`: token
        :math:`s` scores :math:`\sum_l g_{ns}^\top S_q a_{ns}` (plus the bias
        term), and the tokens' scores sum to :meth:`pairwise_scores`. Needs
        a :class:`~curvlinops.KFACLinearOperator` or
        :class:`~curvlinops.EKFACLinearOperator` as curvature (its layers
        give the tokens' inputs and output gradients) and training batches of
        equal sequence length.
        """
        K = kfac_of(self._curvature)
        pieces = query_blocks(K, self.preconditioned_gradients(query_data))
        blocks = [
            token_scores(self, K, pieces, X, y) for _, _, X, y in self.example_blocks(train_data)
        ]
        return self._concat(blocks, axis=1)

    def _pair_block(self, S: Any, G: Any, per_layer: bool, selection: _Selection) -> Any:
        if isinstance(S, LowRankQueries):
            totals = S.scores(G, selection.names)
            if per_layer:
                return [totals[layer] for layer in selection.names]
            return sum(totals[layer] for layer in selection.names)
        G = selection.take(G)
        if not per_layer:
            return S.T @ G
        return [
            sum(S[start:stop].T @ G[start:stop] for start, stop in selection.rows[layer])
            for layer in selection.names
        ]

    def _self_block(self, R: Any, G: Any, per_layer: bool, selection: _Selection) -> Any:
        xp = self.backend.xp
        if not per_layer:
            return xp.sum(R * G, axis=0)
        return [
            sum(xp.sum(R[a:b] * G[a:b], axis=0) for a, b in selection.rows[layer])
            for layer in selection.names
        ]

    def _concat(self, blocks: list[Any], axis: int) -> Any:
        return blocks[0] if len(blocks) == 1 else self.backend.concat(blocks, axis=axis)

    def _assemble(
        self, blocks: list[Any], per_layer: bool, selection: _Selection, axis: int = -1
    ) -> Any:
        if not per_layer:
            return self._concat(blocks, axis)
        if isinstance(blocks[0], dict):
            return {
                layer: self._concat([block[layer] for block in blocks], axis)
                for layer in selection.names
            }
        return {
            layer: self._concat([block[i] for block in blocks], axis)
            for i, layer in enumerate(selection.names)
        }

    # --- partitions ---------------------------------------------------------------
    def _selection(self, layers: Iterable[str] | None) -> _Selection:
        if layers is None:
            return _Selection(self, self.layer_names)
        names = list(layers) if not isinstance(layers, str) else [layers]
        unknown = [name for name in names if name not in self._layers]
        if unknown or not names:
            raise value_error(
                "layers",
                f"a non-empty selection of the layers {self.layer_names}",
                repr(names),
                "Read the layers off InfluenceScorer(...).layer_names.",
            )
        return _Selection(self, [name for name in self.layer_names if name in names])

    def _query_partition_size(
        self, selection: _Selection, memory_budget: Any, rank: int | None = None
    ) -> int | None:
        """Query gradient blocks per partition: all, or as many as ``memory_budget`` holds."""
        if memory_budget is None:
            return None
        budget, available = resolve_budget(memory_budget, self.backend.device)
        itemsize = np.dtype(self.backend.dtype).itemsize
        P, chunk = int(self._offsets[-1]), self._gradients.chunk
        per_query = selection.size * itemsize  # preconditioned query gradients, held
        if rank is not None:  # their low-rank factors
            per_query = held_bytes_per_query(self, rank, selection.names, itemsize)
        block = per_query * chunk
        parts = {
            "gradient and preconditioner blocks (3 x P x examples_per_pass)": 3
            * P
            * chunk
            * itemsize
        }
        blocks = (budget - parts[next(iter(parts))]) // block
        parts["preconditioned query gradients (one block)"] = block
        estimate = MemoryEstimate(
            "InfluenceScorer.pairwise_scores",
            parts,
            budget,
            available,
            fixes=["lower examples_per_pass", "pass layers= (a layer partition)"],
        )
        estimate.check()
        return max(1, int(blocks))


# --- partitions -------------------------------------------------------------------
class _Selection:
    """The rows of a selection of layers: their ranges in the flat vector and in the selection."""

    def __init__(self, scorer: InfluenceScorer, names: list[str]) -> None:
        self.names = names
        self.ranges = [r for name in names for r in scorer._rows(name)]
        self.whole = names == scorer.layer_names
        self.rows: dict[str, list[tuple[int, int]]] = {}
        offset = 0
        for name in names:
            self.rows[name] = []
            for start, stop in scorer._rows(name):
                self.rows[name].append((offset, offset + stop - start))
                offset += stop - start
        self.size = offset
        self._concat = scorer.backend.concat

    def take(self, M: Any) -> Any:
        """The selected rows of ``M`` ``(P, K)`` (``M`` itself for all layers)."""
        if self.whole:
            return M
        return self._concat([M[start:stop] for start, stop in self.ranges], axis=0)


def _partitions(blocks: Iterator[Any], size: int | None) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` blocks (all blocks for ``None``)."""
    part: list[Any] = []
    for block in blocks:
        part.append(block)
        if size is not None and len(part) == size:
            yield part
            part = []
    if part:
        yield part
