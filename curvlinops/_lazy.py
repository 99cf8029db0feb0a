"""Names that a module hands out on first use, so that importing it imports no framework.

curvlinops-for-pytorch 3.0.1's helper modules (``curvlinops.sampling``,
``curvlinops.kfac_utils``, ...) hold PyTorch functions; here those live in
:mod:`curvlinops.backends` and the public modules forward to them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(module: str, names: list[str], source: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that hands out ``names`` from the module ``source``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(source), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
