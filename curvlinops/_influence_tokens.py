r"""Per-token influence scores of sequence models, from KFAC's layer capture.

A linear layer's weight gradient for one sequence is a sum over its tokens,
:math:`\nabla_W \ell_n = \sum_s g_{ns} a_{ns}^\top` (bias: :math:`\sum_s
g_{ns}`), with :math:`a_{ns}` the layer's input at token :math:`s` and
:math:`g_{ns}` the gradient of the sequence's loss at the layer's output
there. The score against a preconditioned query gradient :math:`S_q` splits
the same way (kronfluence's per-token scores):

.. math::
    s_{qns} = \sum_l g_{ns}^{(l)\top} S_{q}^{(l)} a_{ns}^{(l)}
    \big(+\, g_{ns}^{(l)\top} S_{q,b}^{(l)}\big), \qquad \sum_s s_{qns} = s_{qn}.
"""

from __future__ import annotations

from typing import Any

from curvlinops._checks import type_error


def kfac_of(curvature: Any) -> Any:
    """The KFAC/EK-FAC operator behind ``curvature`` (its layer capture gives the tokens)."""
    from curvlinops.kfac import KFACInverseLinearOperator, KFACLinearOperator

    K = curvature._A if isinstance(curvature, KFACInverseLinearOperator) else curvature
    if not isinstance(K, KFACLinearOperator):
        raise type_error(
            "curvature",
            "a KFACLinearOperator or EKFACLinearOperator for per-token scores (its layers "
            "give each token's input and output gradient)",
            curvature,
        )
    return K


def capturing_kfac(curvature: Any, model_func: Any, b: Any, loss: Any) -> Any:
    """The PyTorch KFAC/EK-FAC behind ``curvature`` if its capture sees ``model_func``'s layers.

    Its layer capture then gives per-example gradients in one batched pass
    (:func:`captured_gradients`); JAX compiles its ``vmap`` of gradients
    instead, and other curvatures have no capture (``None``), nor losses
    whose examples are coupled (a weighted mean).
    """
    from curvlinops.kfac import KFACInverseLinearOperator, KFACLinearOperator

    K = curvature._A if isinstance(curvature, KFACInverseLinearOperator) else curvature
    coupled = getattr(loss, "weighted_mean", False) and loss.reduction == "mean"
    if not isinstance(K, KFACLinearOperator) or b.name != "torch" or coupled:
        return None
    same_model = getattr(K._capture, "_model", None) is model_func
    return K if same_model and K.backend.param_names == b.param_names else None


def query_blocks(K: Any, S: Any) -> dict[tuple[str, str], Any]:
    """The preconditioned query gradients ``(P, T)`` per layer part, ``(d_out, d_in, T)``."""
    pieces: dict[tuple[str, str], Any] = {}

    def collect(name: str, part: str, M: Any) -> Any:
        pieces[(name, part)] = M
        return M

    K._program.blockwise(S, collect)
    return pieces


def _captures(scorer: Any, K: Any, X: Any, y: Any) -> tuple[dict, dict, int]:
    """Layer inputs ``(n, S, d_in)``, each example's own output gradients ``(1, n, S, d_out)``."""
    b, loss = scorer.backend, scorer._gradients.loss
    K._capture.prepare(X)
    z, inputs, pullback = K._capture.forward(b.model_fn, b.primals, X, True)
    # each sequence's own loss: the batch's un-normalised term gradients, scaled as for one example
    scale = loss.normalization(z[:1])
    return inputs, pullback(scale * loss.output_gradient(b, z, y)[None]), z.shape[0]


def captured_gradients(scorer: Any, K: Any, X: Any, y: Any) -> Any:
    r"""``(P, n)``: per-example gradients from one forward and backward pass of the batch.

    A linear layer's weight gradient of example :math:`n` is
    :math:`\sum_s g_{ns} a_{ns}^\top`, a batched product of the captured
    output gradients and inputs, formed in the parameter's own layout (a
    ``Conv1D``'s ``(d_in, d_out)``: :math:`\sum_s a_{ns} g_{ns}^\top`); the
    bias: :math:`\sum_s g_{ns}`. The rows are gathered as ``(n, P)`` (one
    copy) and returned transposed.
    """
    inputs, gradients, n = _captures(scorer, K, X, y)
    return gradients_from_captures(scorer, K, inputs, gradients, n)


def gradients_from_captures(scorer: Any, K: Any, inputs: dict, gradients: dict, n: int) -> Any:
    """``(P, n)`` per-example gradients from layer inputs and per-example output gradients."""
    xp = scorer.backend.xp
    shapes = scorer.backend.param_shapes
    pieces: list[Any] = [None] * len(shapes)
    for name, parts in K._mapping.items():
        g = gradients[name][0]  # (n, S, d_out)
        for part, position in parts.items():
            if part == "bias":
                pieces[position] = xp.sum(g, axis=1)
                continue
            layout = K._program.weight_layout(name)
            a = inputs[name]
            if layout == (1, 0):  # stored (d_in, d_out)
                pieces[position] = xp.reshape(xp.matrix_transpose(a) @ g, (n, -1))
                continue
            block = xp.matrix_transpose(g) @ a  # (n, d_out, d_in...), axes in layout order
            permuted = xp.reshape(block, (n, *(shapes[position][axis] for axis in layout)))
            inverse = tuple(1 + layout.index(axis) for axis in range(len(layout)))
            pieces[position] = xp.reshape(xp.permute_dims(permuted, (0, *inverse)), (n, -1))
    return xp.concat(pieces, axis=1).T


def token_scores(scorer: Any, K: Any, pieces: dict, X: Any, y: Any) -> Any:
    """``(T, n, S)``: the scores of each token of a block of ``n`` training sequences."""
    xp = scorer.backend.xp
    inputs, gradients, n = _captures(scorer, K, X, y)
    total = None
    for (name, part), M in pieces.items():
        g = gradients[name][0]  # (n, S, d_out)
        if part == "bias":
            term = g @ M[:, 0, :]  # (n, S, T)
        else:
            a = inputs[name]
            if part == "joint":
                a = xp.concat([a, xp.ones_like(a[..., :1])], axis=-1)
            d_out, d_in, T = M.shape
            gM = xp.reshape(g @ xp.reshape(M, (d_out, d_in * T)), (n, -1, d_in, T))
            term = xp.sum(gM * a[..., None], axis=2)  # (n, S, T)
        total = term if total is None else total + term
    return xp.permute_dims(total, (2, 0, 1))
