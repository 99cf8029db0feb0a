r"""Preconditioned query gradients in low rank, kept as their factors.

kronfluence's ``query_gradient_low_rank`` with ``use_full_svd=True``: a
query's block of a layer, a ``(d_out, d_in)`` matrix (the bias as a last
column where KFAC keeps weight and bias in one block; without KFAC each
parameter of two or more axes as ``(shape[0], rest)``), is replaced by its
best rank-``r`` approximation :math:`L R` (truncated SVD) where both sides
exceed ``r``. What is held per query is :math:`L` ``(d_out, r)`` and
:math:`R` ``(r, d_in)``, never the ``(d_out, d_in)`` block; a block of
training gradients :math:`M` ``(d_out, d_in, n)`` scores
:math:`\sum_{o,i} (L R)_{oi} M_{oin}` as :math:`\sum_{r,o} L_{or} (R M)_{ron}`.
Biases and smaller blocks are held as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["LowRankQueries", "held_bytes_per_query", "matrix_blocks"]


def matrix_blocks(scorer: Any) -> Callable[[Any], list[tuple[str, Any]]]:
    """``blocks(X)``: ``(layer, (d_out, d_in, K) block)`` of ``X`` ``(P, K)``, in a fixed order."""
    from curvlinops.kfac import KFACInverseLinearOperator, KFACLinearOperator

    curvature = scorer._curvature
    K = curvature._A if isinstance(curvature, KFACInverseLinearOperator) else curvature
    xp = scorer.backend.xp
    if isinstance(K, KFACLinearOperator):

        def kfac_blocks(X: Any) -> list[tuple[str, Any]]:
            blocks: list[tuple[str, Any]] = []
            K._program.blockwise(X, lambda name, part, M: blocks.append((name, M)) or M)
            return blocks

        return kfac_blocks
    owner = {p: layer for layer, positions in scorer._layers.items() for p in positions}

    def parameter_blocks(X: Any) -> list[tuple[str, Any]]:
        blocks = []
        for p, shape in enumerate(scorer.backend.param_shapes):
            rows = X[int(scorer._offsets[p]) : int(scorer._offsets[p + 1])]
            d_out = shape[0] if len(shape) >= 2 else rows.shape[0]
            blocks.append((owner[p], xp.reshape(rows, (d_out, -1, X.shape[1]))))
        return blocks

    return parameter_blocks


class LowRankQueries:
    """Preconditioned query gradients of ``T`` queries as per-block factors (see the module).

    Args:
        scorer: The :class:`~curvlinops.influence_scores.InfluenceScorer`.
        S: ``(P, T)`` preconditioned gradients of a block of queries (transient).
        rank: The rank ``r``.
    """

    def __init__(self, scorer: Any, S: Any, rank: int) -> None:
        self.xp = scorer.backend.xp
        self.blocks = matrix_blocks(scorer)
        self.held: list[tuple[str, Any]] = [
            (layer, self._truncate(M, rank)) for layer, M in self.blocks(S)
        ]

    def _truncate(self, M: Any, rank: int) -> Any:
        """``M`` ``(d_out, d_in, T)`` as it is, or ``(L (T, d_out, r), R (T, r, d_in))``."""
        xp = self.xp
        d_out, d_in, _ = M.shape
        if min(d_out, d_in) <= rank:
            return M
        U, sigma, Vh = xp.linalg.svd(xp.permute_dims(M, (2, 0, 1)), full_matrices=False)
        return U[..., :rank] * sigma[:, None, :rank], Vh[:, :rank, :]

    @staticmethod
    def concat(parts: list[LowRankQueries]) -> LowRankQueries:
        """The queries of ``parts`` one after another."""
        if len(parts) == 1:
            return parts[0]
        first, xp = parts[0], parts[0].xp
        held = []
        for i, (layer, value) in enumerate(first.held):
            values = [part.held[i][1] for part in parts]
            if isinstance(value, tuple):
                held.append((layer, tuple(xp.concat(side, axis=0) for side in zip(*values))))
            else:
                held.append((layer, xp.concat(values, axis=2)))
        joined = object.__new__(LowRankQueries)
        joined.xp, joined.blocks, joined.held = xp, first.blocks, held
        return joined

    def scores(self, G: Any, layers: list[str]) -> dict[str, Any]:
        """``{layer: (T, n)}``: the queries' scores against training gradients ``G`` ``(P, n)``."""
        xp = self.xp
        totals: dict[str, Any] = {}
        for (layer, value), (_, M) in zip(self.held, self.blocks(G)):
            if layer not in layers:
                continue
            d_out, d_in, n = M.shape
            if isinstance(value, tuple):
                L, R = value  # (T, d_out, r), (T, r, d_in)
                T, rank = R.shape[:2]
                RM = R @ xp.reshape(xp.permute_dims(M, (1, 0, 2)), (d_in, d_out * n))
                Lt = xp.reshape(xp.permute_dims(L, (0, 2, 1)), (T, 1, rank * d_out))
                part = (Lt @ xp.reshape(RM, (T, rank * d_out, n)))[:, 0, :]
            else:
                part = xp.reshape(value, (d_out * d_in, -1)).T @ xp.reshape(M, (d_out * d_in, n))
            totals[layer] = part if layer not in totals else totals[layer] + part
        return totals


def held_bytes_per_query(scorer: Any, rank: int, layers: list[str], itemsize: int) -> int:
    """Bytes :class:`LowRankQueries` holds per query of ``layers``: ``r (d_out + d_in)`` a block."""
    P = int(scorer._offsets[-1])
    total = 0
    for layer, M in matrix_blocks(scorer)(scorer.backend.zeros((P, 1))):
        if layer in layers:
            d_out, d_in = M.shape[:2]
            low = min(d_out, d_in) > rank
            total += rank * (d_out + d_in) if low else math.prod(M.shape[:2])
    return total * itemsize
