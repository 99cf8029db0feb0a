"""KFAC's array computations, as pure functions of a configuration without arrays.

A :class:`KFACProgram` holds what KFAC's computations read besides arrays:
the backend (its parameter arrays aside), the loss, the layer capture, the
options and the layers. Its methods take parameters, data, factors and
vectors as arguments, so JAX compiles each of them once per *configuration*
(:func:`curvlinops._tracing.compiled_method`): a new operator for new
parameters of the same model reuses the compiled factor, correction,
product and inverse programs. PyTorch runs them as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np

from curvlinops._checks import value_error

__all__ = ["FisherType", "KFACProgram", "KFACType"]


class FisherType(str, Enum):
    """Which output-gradient covariance KFAC uses (the strings are accepted too).

    ``TYPE2``: the exact output Hessian, from the columns of its square root;
    ``MC``: gradients at targets sampled from the model's distribution;
    ``EMPIRICAL``: gradients at the data's targets; ``FORWARD_ONLY``: identity
    gradient covariances (FOOF, Benzing 2022; ISAAC, Petersen et al. 2023).
    """

    TYPE2 = "type-2"
    MC = "mc"
    EMPIRICAL = "empirical"
    FORWARD_ONLY = "forward-only"


class KFACType(str, Enum):
    """KFAC for layers with weight sharing (Eschenhagen et al. 2023).

    ``EXPAND`` treats each shared position as an example of its own;
    ``REDUCE`` averages inputs and sums output gradients over the positions.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


EXAMPLES_PER_CHUNK = 64
"""Examples whose rotated gradients EKFAC forms at once for a layer with weight sharing."""

COLUMNS_PER_CHUNK = 64
"""Output cotangents backpropagated together: the layers' output gradients of only this
many columns are held at once (type-2 on a 512-class sequence model has 512 columns)."""


class KFACProgram:
    """KFAC's configuration (no arrays) and the computations that read it.

    Attributes:
        backend: The operator's backend (its ``primals`` are passed as arguments).
        loss: The loss.
        capture: The framework's capture of layer inputs and output gradients.
        mapping: Layer name -> ``{"weight": position, "bias": position}``.
    """

    def __init__(self, op: Any) -> None:
        self.backend = op.backend
        self.loss = op._loss
        self.capture = op._capture
        self.mapping = op._capture.mapping
        self.fisher_type = op._fisher_type
        self.mc_samples = op._mc_samples
        self.kfac_approx = op._kfac_approx
        self.separate_weight_and_bias = op._separate_weight_and_bias
        self.num_per_example_loss_terms = op._num_per_example_loss_terms
        self.num_data = op.num_data

    # --- layers ---------------------------------------------------------------------
    def is_joint(self, name: str) -> bool:
        """Whether layer ``name``'s weight and bias share one Kronecker block."""
        return not self.separate_weight_and_bias and len(self.mapping[name]) == 2

    def weight_layout(self, name: str) -> tuple[int, ...]:
        """The permutation of layer ``name``'s weight axes into ``(out, in, ...)`` order."""
        layouts = getattr(self.capture, "weight_layouts", None)
        if layouts is not None:
            return layouts[name]
        ndim = len(self.backend.param_shapes[self.mapping[name]["weight"]])
        return tuple(range(ndim))

    def output_size(self, name: str) -> int:
        """``d_out`` of layer ``name``."""
        parts = self.mapping[name]
        if "bias" in parts:
            return self.backend.param_shapes[parts["bias"]][0]
        out_axis = self.weight_layout(name)[0]
        return self.backend.param_shapes[parts["weight"]][out_axis]

    def correction_keys(self) -> list[tuple[str, Any]]:
        """``(layer, position or "joint")`` of every block, in the layers' order."""
        keys = []
        for name, parts in self.mapping.items():
            joint = ["joint"] if self.is_joint(name) else list(parts.values())
            keys.extend((name, key) for key in joint)
        return keys

    # --- the Kronecker factors ------------------------------------------------------
    def batch_factors(
        self, primals: Any, X: Any, y: Any, noise: Any, weight: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One batch's parts of ``A`` and ``G``, per layer."""
        with_gradients = self.fisher_type != FisherType.FORWARD_ONLY
        forward = self.capture.forward(self.backend.model_fn, primals, X, with_gradients)
        z, layer_inputs, pullback = forward
        inputs = {name: self.input_covariance(name, a) for name, a in layer_inputs.items()}
        if pullback is None:
            return inputs, {}
        columns, scale = self.output_cotangents(z, y, noise, weight)
        gradients: dict[str, Any] = {}
        for chunk in column_chunks(columns):
            for name, g in pullback(chunk).items():
                part = self.gradient_covariance(g)
                gradients[name] = part if name not in gradients else gradients[name] + part
        return inputs, {name: scale * G for name, G in gradients.items()}

    def input_covariance(self, name: str, a: Any) -> Any:
        """One batch's part of ``A`` from inputs ``(n, S, d_in)``."""
        xp = self.backend.xp
        n, S, d_in = a.shape
        if self.kfac_approx == KFACType.EXPAND:
            a, divisor = xp.reshape(a, (n * S, d_in)), self.num_data * S
        else:
            a, divisor = xp.mean(a, axis=1), self.num_data
        if self.is_joint(name):
            ones = xp.ones_like(a[:, :1])
            a = xp.concat([a, ones], axis=1)
        return (a.T @ a) / divisor

    def gradient_covariance(self, g: Any) -> Any:
        """One batch's ``Σ g gᵀ`` from output gradients ``(k, n, S, d_out)``."""
        xp = self.backend.xp
        k, n, S, d_out = g.shape
        if self.kfac_approx == KFACType.EXPAND:
            g = xp.reshape(g, (k * n * S, d_out))
        else:
            g = xp.reshape(xp.sum(g, axis=2), (k * n, d_out))
        return g.T @ g

    def output_cotangents(self, z: Any, y: Any, noise: Any, weight: Any) -> tuple[Any, Any]:
        """Columns ``(k, *z.shape)`` to backpropagate, and the factor of their covariance."""
        b, loss = self.backend, self.loss
        scale = weight * loss.normalization(z) * self.terms_correction(z)
        if self.fisher_type == FisherType.TYPE2:
            return hessian_sqrt_term_columns(b, loss, z), scale
        if self.fisher_type == FisherType.MC:
            return loss.sampled_gradient(b, z, noise), scale / self.mc_samples
        return loss.output_gradient(b, z, y)[None], scale

    def terms_correction(self, z: Any) -> float:
        """A user's ``num_per_example_loss_terms`` in the ``"mean"`` normalisation.

        curvlinops-for-pytorch normalises by the number it is given; with the
        number read off the outputs this factor is 1.
        """
        given = self.num_per_example_loss_terms
        if given is None or self.loss.reduction != "mean":
            return 1.0
        return given / self.loss.terms_per_example(tuple(z.shape))

    # --- EKFAC --------------------------------------------------------------------
    def eigenvectors(self, factors: dict[str, Any]) -> dict[str, Any]:
        """The eigenvectors of each factor."""
        eigh = self.backend.xp.linalg.eigh
        return {name: eigh(M)[1] for name, M in factors.items()}

    def batch_correction(
        self, primals: Any, X: Any, y: Any, noise: Any, weight: Any, Q_A: dict, Q_G: dict
    ) -> list[Any]:
        """One batch's corrected eigenvalues, one array per :meth:`correction_keys` entry."""
        z, layer_inputs, pullback = self.capture.forward(self.backend.model_fn, primals, X, True)
        if self.fisher_type == FisherType.TYPE2:
            check_two_dimensional(z)
        columns, scale = self.output_cotangents(z, y, noise, weight)
        corrections: dict[tuple[str, Any], Any] = {}
        for chunk in column_chunks(columns):
            for name, g in pullback(chunk).items():
                a = layer_inputs.get(name)
                for key, value in self.layer_correction(
                    name, a, g, Q_A.get(name), Q_G[name]
                ).items():
                    previous = corrections.get((name, key))
                    corrections[(name, key)] = value if previous is None else previous + value
        return [scale * corrections[key] for key in self.correction_keys()]

    def layer_correction(self, name: str, a: Any, g: Any, Q_A: Any, Q_G: Any) -> dict[Any, Any]:
        """Per block of layer ``name``: Σ over examples and columns of rotated gradients squared."""
        xp = self.backend.xp
        g_rotated = g @ Q_G  # (k, n, S, d_out)
        parts = self.mapping[name]
        if self.is_joint(name):
            a = xp.concat([a, xp.ones_like(a[..., :1])], axis=-1)
            return {"joint": rotated_square_sum(xp, g_rotated, a, Q_A)}
        result = {}
        for part, position in parts.items():
            if part == "bias":
                summed = xp.sum(g_rotated, axis=2)  # (k, n, d_out)
                result[position] = xp.sum(summed * summed, axis=(0, 1))
            else:
                result[position] = rotated_square_sum(xp, g_rotated, a, Q_A)
        return result

    # --- captures, kept between the two passes (curvlinops.influence_factors) ------
    def batch_captures(
        self, primals: Any, X: Any, y: Any, noise: Any, weight: Any
    ) -> tuple[dict[str, Any], dict[str, Any], Any]:
        """One batch's layer inputs ``(n, S, d_in)``, output gradients ``(k, n, S, d_out)``, scale.

        What both EK-FAC passes read: :meth:`captured_factors` and
        :meth:`captured_correction` give what :meth:`batch_factors` and
        :meth:`batch_correction` give, from these (all columns at once).
        """
        z, layer_inputs, pullback = self.capture.forward(self.backend.model_fn, primals, X, True)
        if self.fisher_type == FisherType.TYPE2:
            check_two_dimensional(z)
        columns, scale = self.output_cotangents(z, y, noise, weight)
        return layer_inputs, pullback(columns), scale

    def captured_factors(
        self, inputs: dict, gradients: dict, scale: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One batch's parts of ``A`` and ``G`` from its :meth:`batch_captures`."""
        A = {name: self.input_covariance(name, a) for name, a in inputs.items()}
        G = {name: scale * self.gradient_covariance(g) for name, g in gradients.items()}
        return A, G

    def captured_correction(
        self, inputs: dict, gradients: dict, scale: Any, Q_A: dict, Q_G: dict
    ) -> list[Any]:
        """One batch's corrected eigenvalues (as :meth:`batch_correction`) from its captures."""
        corrections = {}
        for name, g in gradients.items():
            parts = self.layer_correction(name, inputs.get(name), g, Q_A.get(name), Q_G[name])
            corrections.update({(name, key): value for key, value in parts.items()})
        return [scale * corrections[key] for key in self.correction_keys()]

    # --- products -------------------------------------------------------------------
    def kfac_product(self, A: dict, G: dict, X: Any) -> Any:
        """``(G ⊗ A) X`` block by block (also the inverse, with inverted factors)."""
        xp = self.backend.xp

        def multiply(name: str, part: str, M: Any) -> Any:
            return sandwich(xp, G[name], M, A.get(name) if part != "bias" else None)

        return self.blockwise(X, multiply)

    def exact_damped_solve(self, eigen_A: dict, eigen_G: dict, damping: Any, X: Any) -> Any:
        """``(G ⊗ A + λ I)⁻¹ X`` block by block, from the factors' eigendecompositions."""
        xp = self.backend.xp

        def multiply(name: str, part: str, M: Any) -> Any:
            values_G, vectors_G = eigen_G[name]
            if part == "bias":
                values_A, vectors_A = xp.ones_like(values_G[:1]), None
            else:
                values_A, vectors_A = eigen_A[name]
            scale = 1.0 / (values_G[:, None] * values_A[None, :] + damping)
            return scale_in_eigenbasis(xp, vectors_G, vectors_A, M, scale)

        return self.blockwise(X, multiply)

    def ekfac_product(self, Q_A: dict, Q_G: dict, values: dict, damping: Any, X: Any) -> Any:
        """``E X`` (``damping`` ``None``) or ``(E + λ I)⁻¹ X``, block by block."""
        xp = self.backend.xp

        def multiply(name: str, part: str, M: Any) -> Any:
            layer_values = values[name]
            if part != "joint":
                layer_values = layer_values[self.mapping[name][part]]
            if part == "bias":
                layer_values = layer_values[:, None]
            if damping is not None:
                layer_values = 1.0 / (layer_values + damping)
            Q = None if part == "bias" else Q_A[name]
            return scale_in_eigenbasis(xp, Q_G[name], Q, M, layer_values)

        return self.blockwise(X, multiply)

    def blockwise(self, X: Any, multiply: Callable[[str, str, Any], Any]) -> Any:
        """Apply ``multiply(layer, part, M)`` to each block of ``X`` ``(P, K)``, in parameter order.

        ``M`` is ``(d_out, d_in, K)`` for a weight (``d_in`` + 1 for a joint
        weight and bias, ``part = "joint"``), ``(d_out, 1, K)`` for a bias.
        """
        xp = self.backend.xp
        shapes = self.backend.param_shapes
        sizes = [math.prod(shape) for shape in shapes]
        offsets = np.cumsum([0, *sizes])
        K = X.shape[1]

        def block(position: int, layout: tuple[int, ...]) -> Any:
            """Rows of one parameter as ``(d_out, d_in, K)``, its axes put in ``layout`` order."""
            rows = X[int(offsets[position]) : int(offsets[position + 1])]
            shaped = xp.permute_dims(
                xp.reshape(rows, (*shapes[position], K)), (*layout, len(layout))
            )
            return xp.reshape(shaped, (shaped.shape[0], -1, K))

        def unblock(R: Any, position: int, layout: tuple[int, ...]) -> Any:
            """The inverse of ``block``: ``(size, K)`` rows in the parameter's own layout."""
            permuted = xp.reshape(R, (*(shapes[position][axis] for axis in layout), K))
            inverse = tuple(layout.index(axis) for axis in range(len(layout)))
            return xp.reshape(
                xp.permute_dims(permuted, (*inverse, len(layout))), (sizes[position], K)
            )

        results: list[Any] = [None] * len(shapes)
        for name, parts in self.mapping.items():
            layouts = {
                part: self.weight_layout(name) if part == "weight" else (0,) for part in parts
            }
            if self.is_joint(name):
                w, bias = parts["weight"], parts["bias"]
                M = xp.concat([block(w, layouts["weight"]), block(bias, (0,))], axis=1)
                R = multiply(name, "joint", M)
                d_in = M.shape[1] - 1
                results[w] = unblock(R[:, :d_in], w, layouts["weight"])
                results[bias] = unblock(R[:, d_in:], bias, (0,))
                continue
            for part, position in parts.items():
                R = multiply(name, part, block(position, layouts[part]))
                results[position] = unblock(R, position, layouts[part])
        return xp.concat(results, axis=0)


# --- block mathematics ------------------------------------------------------------
def column_chunks(columns: Any) -> list[Any]:
    """``columns`` ``(k, ...)`` in chunks of at most :data:`COLUMNS_PER_CHUNK`."""
    k = columns.shape[0]
    return [columns[start : start + COLUMNS_PER_CHUNK] for start in range(0, k, COLUMNS_PER_CHUNK)]


def rotated_square_sum(xp: Any, g_rotated: Any, a: Any, Q_A: Any) -> Any:
    """``Σ_{k,n} (Σ_s g̃_{kns} ãₙₛᵀ)^∘2`` for ``g̃`` ``(k, n, S, d_out)``, ``a`` ``(n, S, d_in)``.

    Without weight sharing (``S = 1``) each example's matrix is an outer
    product, whose square is the outer product of the squares: the sum is
    one matrix product ``(Σ_k g̃_k^∘2)ᵀ ã^∘2``, with no per-example matrix.
    With weight sharing, the per-example matrices are formed for
    :data:`EXAMPLES_PER_CHUNK` examples at a time.
    """
    a_rotated = a @ Q_A
    k, n, S, d_out = g_rotated.shape
    if S == 1:
        g_squared = xp.sum(g_rotated[:, :, 0, :] ** 2, axis=0)  # (n, d_out)
        return g_squared.T @ (a_rotated[:, 0, :] ** 2)
    total = None
    for start in range(0, n, EXAMPLES_PER_CHUNK):
        stop = min(start + EXAMPLES_PER_CHUNK, n)
        per_example = xp.matrix_transpose(g_rotated[:, start:stop]) @ a_rotated[None, start:stop]
        part = xp.sum(per_example * per_example, axis=(0, 1))
        total = part if total is None else total + part
    return total


def sandwich(xp: Any, G: Any, M: Any, A: Any) -> Any:
    """``G M A`` for each column of ``M`` ``(d_out, d_in, K)`` (``A`` ``None``: identity)."""
    columns_first = xp.permute_dims(M, (2, 0, 1))
    product = G @ columns_first if A is None else G @ columns_first @ A
    return xp.permute_dims(product, (1, 2, 0))


def scale_in_eigenbasis(xp: Any, Q_G: Any, Q_A: Any, M: Any, scale: Any) -> Any:
    """``(Q_G ⊗ Q_A) diag(s) (Q_G ⊗ Q_A)ᵀ M``; for a bias ``Q_A`` is ``None``, ``s`` ``(d, 1)``."""
    rotated = sandwich(xp, Q_G.T, M, Q_A)
    return sandwich(xp, Q_G, rotated * scale[:, :, None], None if Q_A is None else Q_A.T)


def hessian_sqrt_term_columns(b: Any, loss: Any, z: Any) -> Any:
    """Columns ``(C, *z.shape)``: column ``c`` holds the square root's column ``c`` of every term.

    Backpropagating the columns of all terms together, one per entry of a
    term, is what curvlinops-for-pytorch does (``C`` passes, not one per
    output entry); it is exact where positions do not mix.
    """
    xp = b.xp
    axis = loss.term_axis(z.ndim)
    if axis is None:
        unit = xp.ones_like(z)[None]  # one column: every entry is a term
    else:
        C = z.shape[axis]
        shape = [1] * z.ndim
        shape[axis] = C
        unit = xp.reshape(b.eye(C), (C, *shape))
    return loss.hessian_sqrt(b, z, unit)


def check_two_dimensional(z: Any) -> None:
    """EKFAC with ``type-2`` needs outputs ``(N, C)``.

    Its columns hold one column of every term's output-Hessian square root at
    once, so an example's gradient would mix its terms' columns; a sampled
    (``mc``) or empirical gradient is one example's whole gradient, exact for
    any output shape (a sequence's summed token losses, as kronfluence).
    """
    if z.ndim != 2:
        raise value_error(
            "model_func",
            "outputs of shape (N, C) for EKFAC with fisher_type='type-2' (as in "
            "curvlinops-for-pytorch)",
            f"outputs of shape {tuple(z.shape)}",
            "Only 2d outputs are supported for type-2 (curvlinops-for-pytorch's words); use "
            "fisher_type='mc' or 'empirical' for models with sequence or image outputs.",
        )
