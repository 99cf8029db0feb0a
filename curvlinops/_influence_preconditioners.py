r"""The inverse an :class:`~curvlinops.influence_scores.InfluenceScorer` applies, by curvature.

:math:`(c\,C + D)^{-1}` with :math:`D` constant on each layer: KFAC and EK-FAC
in their eigenbases, a diagonal entry by entry, the identity as a scalar, any
other operator by batched CG; the damping is resolved per layer here
(kronfluence's heuristic: 0.1 × the layer's mean eigenvalue).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from curvlinops._base import IdentityLinearOperator
from curvlinops._checks import type_error, value_error
from curvlinops._kfac_program import scale_in_eigenbasis
from curvlinops._operand import check_real
from curvlinops.backends import Backend
from curvlinops.diagonal import DiagonalLinearOperator, _DiagonalProducts
from curvlinops.influence import _check_hessian, _check_no_cg_options, _default_tol
from curvlinops.inverse import CGInverseLinearOperator, _InverseBase
from curvlinops.kfac import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

HEURISTIC_DAMPING = "heuristic"
"""``damping=HEURISTIC_DAMPING``: per layer, 0.1 × its mean eigenvalue (kronfluence's default)."""

HEURISTIC_DAMPING_SCALE = 0.1
"""kronfluence's factor of the mean eigenvalue in its heuristic damping."""

DEFAULT_DAMPING = 1e-8
"""The damping when none is given: kronfluence's default ``damping_factor``."""

DIAGONAL_COLUMNS_PER_PASS = 64
"""Unit vectors multiplied at once to read a generic operator's diagonal (heuristic damping)."""


def layers_of(curvature: Any, b: Backend) -> dict[str, list[int]]:
    """Layer name -> parameter positions: KFAC's layers, else grouped by owner name."""
    kfac = curvature._A if isinstance(curvature, KFACInverseLinearOperator) else curvature
    if isinstance(kfac, KFACLinearOperator):
        return {name: sorted(parts.values()) for name, parts in kfac._mapping.items()}
    layers: dict[str, list[int]] = {}
    for position, name in enumerate(b.param_names):
        layers.setdefault(_owner(name, b.name), []).append(position)
    return layers


def _owner(name: str, framework: str) -> str:
    """``"0.weight"`` -> ``"0"``; a JAX key path ``"['l1']['w']"`` -> ``"['l1']"``."""
    if framework == "jax":
        return name[: name.rfind("[")] if name.endswith("]") else name
    return name.rpartition(".")[0]


# --- preconditioners ----------------------------------------------------------------
def preconditioner(
    curvature: Any, scorer: Any, damping: Any, tol: Any, maxiter: Any
) -> tuple[Any, dict[str, float]]:
    r"""``(apply, damping per layer)``: ``apply(G)`` is :math:`(c\,C + D)^{-1} G`."""
    is_inverse = isinstance(curvature, (KFACInverseLinearOperator, _InverseBase))
    if damping is None:
        damping = 0.0 if is_inverse else DEFAULT_DAMPING
    if is_inverse:
        if not (isinstance(damping, (int, float)) and damping == 0 and scorer._scale == 1.0):
            raise value_error(
                "damping/curvature_scale",
                f"0 and 1 when curvature is already an inverse ({type(curvature).__name__})",
                f"{damping!r} and {scorer._scale!r}",
                "Give the damping to the inverse when you build it, or pass the operator itself.",
            )
        _check_no_cg_options(curvature, tol, maxiter)
        return (lambda G: curvature._native(G, False)), dict.fromkeys(scorer._layers, 0.0)
    if isinstance(curvature, KFACLinearOperator):
        _check_no_cg_options(curvature, tol, maxiter)
        return _kfac_preconditioner(curvature, scorer, damping)
    if isinstance(curvature, (_DiagonalProducts, IdentityLinearOperator)):
        _check_no_cg_options(curvature, tol, maxiter)
        d = _diagonal_of(curvature, scorer.backend) * scorer._scale
        dampings = _resolve_damping(damping, scorer, _layer_means(d, scorer))
        inverse = 1.0 / (d + scorer._per_layer(dampings))
        return (lambda G: inverse[:, None] * G), dampings
    return _cg_preconditioner(curvature, scorer, damping, tol, maxiter)


def _kfac_preconditioner(
    K: KFACLinearOperator, scorer: Any, damping: Any
) -> tuple[Any, dict[str, float]]:
    r"""KFAC, EK-FAC: :math:`(Q_G \otimes Q_A)(c\Lambda + \lambda_l)^{-1}(Q_G \otimes Q_A)^\top`."""
    xp = K.backend.xp
    Q_A, Q_G, tables = _eigen_tables(K)
    means = {
        name: scorer._scale
        * sum(float(xp.sum(t)) for t in parts.values())
        / sum(math.prod(t.shape) for t in parts.values())
        for name, parts in tables.items()
    }
    dampings = _resolve_damping(damping, scorer, means)
    inverse = {
        name: {part: 1.0 / (scorer._scale * t + dampings[name]) for part, t in parts.items()}
        for name, parts in tables.items()
    }
    program = K._program

    def solve(Q_A: dict, Q_G: dict, inverse: dict, X: Any) -> Any:
        def multiply(name: str, part: str, M: Any) -> Any:
            Q = None if part == "bias" else Q_A[name]
            return scale_in_eigenbasis(xp, Q_G[name], Q, M, inverse[name][part])

        return program.blockwise(X, multiply)

    compiled = K.backend.compile(solve)
    return (lambda G: compiled(Q_A, Q_G, inverse, G)), dampings


def _eigen_tables(K: KFACLinearOperator) -> tuple[dict, dict, dict]:
    """Eigenvectors of the factors and each block's eigenvalues ``(d_out, d_in or 1)``."""
    K._factors_ready()
    xp = K.backend.xp
    if isinstance(K, EKFACLinearOperator):
        Q_A, Q_G = K._input_covariances_eigenvectors, K._gradient_covariances_eigenvectors
        values = K._corrected_eigenvalues
        tables = {}
        for name, parts in K._mapping.items():
            if K._is_joint(name):
                tables[name] = {"joint": values[name]}
                continue
            tables[name] = {
                part: values[name][p][:, None] if part == "bias" else values[name][p]
                for part, p in parts.items()
            }
        return Q_A, Q_G, tables
    eig_A = {name: xp.linalg.eigh(A) for name, A in K._input_covariances.items()}
    eig_G = {name: xp.linalg.eigh(G) for name, G in K._gradient_covariances.items()}
    tables = {}
    for name, parts in K._mapping.items():
        values_G = eig_G[name][0]
        if K._is_joint(name):
            tables[name] = {"joint": values_G[:, None] * eig_A[name][0][None, :]}
            continue
        tables[name] = {
            part: values_G[:, None] if part == "bias" else values_G[:, None] * eig_A[name][0]
            for part in parts
        }
    Q_A = {name: pair[1] for name, pair in eig_A.items()}
    Q_G = {name: pair[1] for name, pair in eig_G.items()}
    return Q_A, Q_G, tables


def _cg_preconditioner(
    curvature: Any, scorer: Any, damping: Any, tol: Any, maxiter: Any
) -> tuple[Any, dict[str, float]]:
    r"""Any other operator: batched CG on :math:`c\,C + D`."""
    b = scorer.backend
    means = None
    if isinstance(damping, str):  # the heuristic needs each layer's trace
        means = _layer_means(_exact_diagonal(curvature, b) * scorer._scale, scorer)
    dampings = _resolve_damping(damping, scorer, means)
    operator = curvature if scorer._scale == 1.0 else scorer._scale * curvature
    values = set(dampings.values())
    uniform = values.pop() if len(values) == 1 else None
    if uniform is None:
        operator = operator + DiagonalLinearOperator(scorer._per_layer(dampings), like=curvature)
    inverse = CGInverseLinearOperator(
        operator,
        damping=uniform or 0.0,
        tol=_default_tol(b.dtype) if tol is None else tol,
        maxiter=maxiter,
    )
    return (lambda G: inverse._native(G, False)), dampings


def _diagonal_of(curvature: Any, b: Backend) -> Any:
    """A diagonal or identity operator's diagonal, as a native ``(P,)`` array."""
    if isinstance(curvature, IdentityLinearOperator):
        return b.import_array(np.ones(curvature.shape[0], dtype=b.dtype), "curvature")[0]
    return b.import_array(curvature.diagonal(), "curvature")[0]


def _exact_diagonal(curvature: Any, b: Backend) -> Any:
    """The diagonal of any operator, from products with unit vectors (``P`` products)."""
    P, xp, size = curvature.shape[0], b.xp, DIAGONAL_COLUMNS_PER_PASS
    eye = np.eye(P, dtype=b.dtype)
    parts = []
    for start in range(0, P, size):
        E = b.import_array(eye[:, start : start + size], "unit vectors")[0]
        product = curvature @ E
        parts.append(xp.sum(product[start : start + size] * E[start : start + size], axis=1))
    return b.concat(parts, axis=0)


def _layer_means(d: Any, scorer: Any) -> dict[str, float]:
    """Each layer's mean diagonal entry (the mean eigenvalue of its block)."""
    xp = scorer.backend.xp
    means = {}
    for layer in scorer.layer_names:
        rows = scorer._rows(layer)
        total = sum(float(xp.sum(d[start:stop])) for start, stop in rows)
        means[layer] = total / sum(stop - start for start, stop in rows)
    return means


def _resolve_damping(damping: Any, scorer: Any, means: dict[str, float] | None) -> dict[str, float]:
    """``{layer: λ_l}`` from a number, a dict, or ``"heuristic"`` (0.1 × the layer's mean)."""
    layers = scorer.layer_names
    if isinstance(damping, str):
        if damping != HEURISTIC_DAMPING:
            raise value_error(
                "damping",
                f"a number >= 0, a dict per layer, or {HEURISTIC_DAMPING!r}",
                repr(damping),
            )
        return {layer: HEURISTIC_DAMPING_SCALE * means[layer] for layer in layers}
    if isinstance(damping, dict):
        if set(damping) != set(layers):
            raise value_error(
                "damping",
                f"a dict with one entry per layer, {layers}",
                f"the keys {sorted(damping)}",
                "Read the layers off InfluenceScorer(...).layer_names.",
            )
        return {
            layer: check_real(damping[layer], f"damping[{layer!r}]", minimum=0.0)
            for layer in layers
        }
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)):
        raise type_error(
            "damping", f"a number >= 0, a dict per layer, or {HEURISTIC_DAMPING!r}", damping
        )
    value = check_real(damping, "damping", minimum=0.0)
    return dict.fromkeys(layers, value)


def check_curvature(curvature: Any, P: int, b: Backend) -> Any:
    """A ``P × P`` operator of the parameters' backend (or framework-free)."""
    return _check_hessian(curvature, P, b, "curvature")
