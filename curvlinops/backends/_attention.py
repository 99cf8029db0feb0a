"""Attention layers that second-order and forward-mode autodiff can go through.

``torch.nn.functional.scaled_dot_product_attention`` (what Hugging Face
models with the default ``attn_implementation="sdpa"`` and
``torch.nn.MultiheadAttention`` call) picks a fused kernel: flash or
memory-efficient attention. Their backward passes have no derivative of
their own, and they have no forward-mode or vmap rule, so a Hessian-vector
product, a JVP or a vmapped VJP through them fails (or warns and loops).
PyTorch's math kernel is written with ordinary operations, which autodiff
differentiates to any order, in forward mode and under vmap.
``nn.MultiheadAttention`` in ``eval()`` mode may also take a "fast path"
(``aten::_native_multi_head_attention``) that has no forward-mode rule.

:func:`differentiable_attention` selects the math kernel and switches the
fast path off while the model runs; the PyTorch backend enters it around its
autodiff transforms, so plain forward passes (data checks, KFAC's factors)
keep the fused kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_attention"]


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """Run attention with kernels that autodiff differentiates twice, forward and vmapped.

    Restores the caller's kernel choice and fast-path setting on exit, also
    when the body raises; nesting is harmless. Usable as a decorator.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
