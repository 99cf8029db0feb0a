"""Dense references computed with ``torch.func``, as curvlinops-for-pytorch 3.0.1's.

``functorch_hessian``, ``functorch_ggn``, ``functorch_empirical_fisher`` (each
``P x P``), ``functorch_jacobian`` (``N C x P``) and
``functorch_gradient_and_loss`` take 3.0.1's arguments
``(model_func, loss_func, params, data, input_key=None)`` (the Jacobian
without ``loss_func``): all batches are concatenated and differentiated at
once, so use them on small models, to check the operators. ``X`` may be a
dict of tensors: with ``input_key`` only that entry is passed to the model
(as in 3.0.1), without it every entry is concatenated.

They need PyTorch, which is imported on the first call (this module
imports no framework); the code is in
``curvlinops/backends/_functorch_references.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__all__ = [
    "functorch_empirical_fisher",
    "functorch_ggn",
    "functorch_gradient_and_loss",
    "functorch_hessian",
    "functorch_jacobian",
]


def _references() -> Any:
    if importlib.util.find_spec("torch") is None:
        raise ImportError(
            "curvlinops.examples.functorch needs PyTorch, which is not installed. Install it "
            "with: pip install 'curvlinops[torch]'"
        )
    return importlib.import_module("curvlinops.backends._functorch_references")


def functorch_hessian(
    model_func: Any, loss_func: Any, params: Any, data: Any, input_key: str | None = None
) -> Any:
    """The Hessian of the loss over all data, a ``P x P`` tensor."""
    return _references().functorch_hessian(model_func, loss_func, params, data, input_key)


def functorch_ggn(
    model_func: Any, loss_func: Any, params: Any, data: Any, input_key: str | None = None
) -> Any:
    """The generalised Gauss-Newton matrix over all data, a ``P x P`` tensor."""
    return _references().functorch_ggn(model_func, loss_func, params, data, input_key)


def functorch_gradient_and_loss(
    model_func: Any, loss_func: Any, params: Any, data: Any, input_key: str | None = None
) -> tuple[list, Any]:
    """The gradient (a list of tensors shaped like ``params``) and the loss over all data."""
    return _references().functorch_gradient_and_loss(model_func, loss_func, params, data, input_key)


def functorch_empirical_fisher(
    model_func: Any, loss_func: Any, params: Any, data: Any, input_key: str | None = None
) -> Any:
    """The empirical Fisher over all data, a ``P x P`` tensor (normalised like the loss)."""
    return _references().functorch_empirical_fisher(model_func, loss_func, params, data, input_key)


def functorch_jacobian(
    model_func: Any, params: Any, data: Any, input_key: str | None = None
) -> Any:
    """The Jacobian of the outputs (flattened row-major) over all data, an ``N C x P`` tensor."""
    return _references().functorch_jacobian(model_func, params, data, input_key)
