"""Checks of a KFAC/EKFAC state dict, made whole before any of it is loaded.

``load_state_dict`` overwrites the model's parameters and the operator's
factors; a state that does not fit (another model, a missing layer, a factor
of the wrong shape or with NaN, a KFAC state given to EKFAC) must be refused
with its fault named before the first write, not half-loaded or found at the
first product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error

__all__ = ["check_state"]

KFAC_KEYS = (
    "model_func_state_dict",
    "loss_type",
    "loss_reduction",
    "progressbar",
    "seed",
    "fisher_type",
    "mc_samples",
    "kfac_approx",
    "num_per_example_loss_terms",
    "separate_weight_and_bias",
    "num_data",
    "input_covariances",
    "gradient_covariances",
)
EKFAC_KEYS = (
    "input_covariances_eigenvectors",
    "gradient_covariances_eigenvectors",
    "corrected_eigenvalues",
)


def check_state(op: Any, state_dict: Any, ekfac: bool) -> None:
    """Raise unless ``state_dict`` can be loaded into ``op`` as a whole."""
    kind = "EKFACLinearOperator" if ekfac else "KFACLinearOperator"
    if not isinstance(state_dict, Mapping):
        raise type_error("state_dict", f"a dict from {kind}.state_dict()", state_dict)
    _check_keys(state_dict, ekfac, kind)
    _check_loss(op, state_dict)
    if state_dict["num_data"] != op.num_data:
        raise value_error(
            "state_dict['num_data']",
            f"the number of data points of this operator's data ({op.num_data})",
            repr(state_dict["num_data"]),
            "Load a state computed on the same data.",
        )
    op._capture.check_model_state(state_dict["model_func_state_dict"], op.backend)
    _check_finite_tree(
        op, state_dict["model_func_state_dict"], "state_dict['model_func_state_dict']"
    )
    joint = not bool(state_dict["separate_weight_and_bias"])
    shapes = factor_shapes(op, joint)
    input_shapes = {name: pair[0] for name, pair in shapes.items() if pair[0] is not None}
    gradient_shapes = {name: pair[1] for name, pair in shapes.items()}
    pairs = [("input_covariances", input_shapes), ("gradient_covariances", gradient_shapes)]
    if ekfac:
        pairs += [
            ("input_covariances_eigenvectors", input_shapes),
            ("gradient_covariances_eigenvectors", gradient_shapes),
            ("corrected_eigenvalues", _eigenvalue_shapes(op, shapes, joint)),
        ]
    pairs = [(key, expected) for key, expected in pairs if expected]  # e.g. no weights
    present = [key for key, expected in pairs if _check_factors(op, state_dict, key, expected)]
    _check_complete(present, [key for key, _ in pairs])


def factor_shapes(op: Any, joint: bool) -> dict[str, tuple[tuple | None, tuple]]:
    """``{layer: (input covariance shape or None, gradient covariance shape)}``."""
    param_shapes = op.backend.param_shapes
    shapes = {}
    for name, parts in op._mapping.items():
        if "weight" not in parts:
            d_out = int(param_shapes[parts["bias"]][0])
            shapes[name] = (None, (d_out, d_out))
            continue
        weight = param_shapes[parts["weight"]]
        d_out = int(weight[0])
        d_in = math.prod(int(n) for n in weight[1:]) + int(joint and len(parts) == 2)
        shapes[name] = ((d_in, d_in), (d_out, d_out))
    return shapes


def _eigenvalue_shapes(op: Any, shapes: dict, joint: bool) -> dict[str, Any]:
    """EKFAC's corrected eigenvalues: one array per joint block, else one per parameter."""
    expected: dict[str, Any] = {}
    for name, parts in op._mapping.items():
        input_shape, (d_out, _) = shapes[name]
        if joint and len(parts) == 2:
            expected[name] = (d_out, input_shape[0])
            continue
        expected[name] = {
            position: (d_out,) if part == "bias" else (d_out, input_shape[0])
            for part, position in parts.items()
        }
    return expected


def _check_keys(state_dict: Mapping, ekfac: bool, kind: str) -> None:
    missing = [key for key in KFAC_KEYS if key not in state_dict]
    if missing:
        raise value_error(
            "state_dict",
            f"a state from {kind}.state_dict() (with the keys {list(KFAC_KEYS)})",
            f"a dict without {missing}",
            "Save the state with state_dict() of an operator of the same kind.",
        )
    missing = [key for key in EKFAC_KEYS if key not in state_dict]
    if ekfac and missing:
        raise value_error(
            "state_dict",
            "a state from EKFACLinearOperator.state_dict()",
            f"a KFACLinearOperator's state (without {missing})",
            "Load it into a KFACLinearOperator, or save the state of an EKFACLinearOperator.",
        )


def _check_loss(op: Any, state_dict: Mapping) -> None:
    saved = (state_dict["loss_type"], state_dict["loss_reduction"])
    own = (type(op._loss).__name__, op._loss.reduction)
    if saved != own:
        raise value_error(
            "state_dict",
            f"a state of an operator with the loss {own[0]}(reduction={own[1]!r})",
            f"{saved[0]}(reduction={saved[1]!r})",
            "Build the operator with the loss the state was computed with.",
        )


def _check_factors(op: Any, state_dict: Mapping, key: str, expected: dict) -> bool:
    """Check one factor dict against ``expected`` shapes; whether it holds any factor."""
    factors = state_dict[key]
    argument = f"state_dict[{key!r}]"
    if not isinstance(factors, Mapping):
        raise type_error(argument, "a dict of factors keyed by layer name", factors)
    if not factors:
        return False
    if set(factors) != set(expected):
        raise value_error(
            argument,
            f"factors of this operator's layers {sorted(expected)}",
            f"layers {sorted(factors)}",
            "Load a state saved from an operator of the same model.",
        )
    for name, shape in expected.items():
        _check_factor(op, factors[name], shape, f"{argument}[{name!r}]")
    return True


def _check_factor(op: Any, factor: Any, shape: Any, argument: str) -> None:
    if isinstance(shape, dict):
        if not isinstance(factor, Mapping) or set(factor) != set(shape):
            raise value_error(argument, f"a dict with the keys {sorted(shape)}", repr(factor))
        for position, entry in shape.items():
            _check_factor(op, factor[position], entry, f"{argument}[{position!r}]")
        return
    if not (hasattr(factor, "shape") and hasattr(factor, "dtype")):
        raise type_error(argument, f"an array of shape {shape}", factor)
    dtype = np.dtype(str(factor.dtype).rsplit(".", 1)[-1])
    if tuple(factor.shape) != shape or dtype != op.backend.dtype:
        raise value_error(
            argument,
            f"shape {shape} and dtype {op.backend.dtype} (this operator's)",
            f"shape {tuple(factor.shape)} and dtype {dtype}",
            "Load a state saved from an operator of the same model, options and dtype.",
        )
    if not np.all(np.isfinite(op.backend.to_numpy(factor))):
        raise value_error(argument, "finite values", "NaN or inf", "Recompute the factors.")


def _check_complete(present: list[str], keys: list[str]) -> None:
    """Factors, then eigenvectors, then corrections: each saved only with those before it."""
    groups = [keys[:n] for n in (0, 2, 4, 5) if n <= len(keys)] + [keys]
    if present not in groups:
        raise value_error(
            "state_dict",
            f"factors saved together: the first 0, 2, 4 or all of {keys}",
            f"only {present}",
            "Save the state after the factors (and EKFAC's correction) are computed.",
        )


def _check_finite_tree(op: Any, tree: Any, argument: str) -> None:
    """NaN or inf in a saved parameter would make every product NaN: name it now."""
    if isinstance(tree, Mapping):
        items = list(tree.items())
    elif isinstance(tree, (list, tuple)):
        items = list(enumerate(tree))
    else:
        dtype = getattr(tree, "dtype", None)
        if dtype is not None and "float" in str(dtype):
            if not np.all(np.isfinite(op.backend.to_numpy(tree))):
                raise value_error(argument, "finite values", "NaN or inf")
        return
    for key, leaf in items:
        _check_finite_tree(op, leaf, f"{argument}[{key!r}]")
