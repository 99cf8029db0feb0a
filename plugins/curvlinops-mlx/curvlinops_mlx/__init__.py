"""MLX backend for curvlinops, registered through the entry point ``curvlinops.backends``.

Importing this package imports no MLX: curvlinops reads :data:`BACKEND` when
it first looks for backends, asks its detector only once ``mlx`` is imported
by the user, and imports :mod:`curvlinops_mlx._backend` when an operator is
built from MLX arrays (or with ``backend="mlx"``).

Example:
    >>> import mlx.core as mx
    >>> from curvlinops import HessianLinearOperator, losses
    >>> params = {"w": mx.ones((3, 2))}
    >>> X, y = mx.ones((4, 3)), mx.zeros((4, 2))
    >>> H = HessianLinearOperator(lambda p, X: X @ p["w"], losses.MSELoss(), params, [(X, y)])
    >>> H.shape, H.backend.name
    ((6, 6), 'mlx')
"""

from __future__ import annotations

import sys
from typing import Any

from curvlinops.backends import BackendSpec

__all__ = ["BACKEND"]


def is_mlx_object(obj: Any) -> bool:
    """Whether ``obj`` is an MLX array or an ``mlx.nn.Module`` (called once ``mlx`` is imported)."""
    core = sys.modules.get("mlx.core")
    if core is not None and isinstance(obj, core.array):
        return True
    nn = sys.modules.get("mlx.nn")
    return nn is not None and isinstance(obj, nn.Module)


BACKEND = BackendSpec(
    name="mlx",
    factory="curvlinops_mlx._backend:MlxBackend",
    detect=is_mlx_object,
    modules=("mlx",),
    install='pip install "curvlinops-mlx" "mlx[cpu]"',
)
"""What curvlinops registers under the name ``mlx``."""
