"""PyTorch functions of curvlinops-for-pytorch 3.0.1's helper modules.

``curvlinops.sampling``, ``curvlinops.kfac_utils`` and
``curvlinops.ekfac.compute_eigenvalue_correction_linear_weight_sharing``
hand these out on first use (importing those modules imports no framework).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import unfold

from curvlinops._checks import type_error, value_error

__all__ = [
    "compute_eigenvalue_correction_linear_weight_sharing",
    "random_columns",
    "extract_averaged_patches",
    "extract_patches",
    "loss_hessian_matrix_sqrt",
    "normal",
    "rademacher",
    "random_vector",
]


# --- curvlinops.sampling: PyTorch's global generator, as 3.0.1 -------------------------
def rademacher(dim: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A vector of ``dim`` independent ±1 entries (from PyTorch's global generator)."""
    # Bernoulli draws, as 3.0.1 (the same numbers after torch.manual_seed)
    return (
        torch.empty(dim, device=device, dtype=_torch_dtype(dtype)).bernoulli_(0.5).mul_(2).sub_(1)
    )


def normal(dim: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A standard-normal vector of ``dim`` entries (from PyTorch's global generator)."""
    return torch.randn(dim, device=device, dtype=_torch_dtype(dtype))


def random_vector(dim: int, distribution: str, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """A ``'rademacher'`` or ``'normal'`` random vector of ``dim`` entries."""
    draw = {"rademacher": rademacher, "normal": normal}.get(distribution)
    if draw is None:
        raise value_error("distribution", "'rademacher' or 'normal'", repr(distribution))
    return draw(dim, device, dtype)


def random_columns(dim: int, count: int, distribution: str, like: torch.Tensor) -> torch.Tensor:
    """``count`` vectors of :func:`random_vector`, drawn one after another, as columns.

    The estimators' probes for ``seed=None``: one draw per vector (not one for the block)
    keeps PyTorch's global generator in step with curvlinops-for-pytorch 3.0.1's.
    """
    columns = [random_vector(dim, distribution, like.device, like.dtype) for _ in range(count)]
    return torch.stack(columns, dim=1) if columns else like.new_zeros((dim, 0))


def _torch_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype, also from a numpy dtype (an operator's ``.dtype`` here)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "name", None) or str(dtype)
    converted = getattr(torch, name.rsplit(".", 1)[-1], None)
    if not isinstance(converted, torch.dtype):
        raise type_error("dtype", "a torch or numpy floating dtype", dtype)
    return converted


# --- curvlinops.kfac_utils ---------------------------------------------------------------
def loss_hessian_matrix_sqrt(
    output_one_datum: torch.Tensor, target_one_datum: torch.Tensor, loss_func: Any
) -> torch.Tensor:
    r"""A ``C x C`` matrix :math:`S` with :math:`S S^\top` the loss's Hessian in one output.

    Args:
        output_one_datum: The model's output on one example, shape ``(1, C)``.
        target_one_datum: Its target.
        loss_func: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss``.
    """
    if output_one_datum.ndim != 2 or output_one_datum.shape[0] != 1:
        raise value_error(
            "output_one_datum", "shape (1, C)", f"shape {tuple(output_one_datum.shape)}"
        )
    f = output_one_datum[0]
    C = f.shape[0]
    if isinstance(loss_func, torch.nn.MSELoss):
        scale = 2.0 if loss_func.reduction == "sum" else 2.0 / C
        return scale**0.5 * torch.eye(C, dtype=f.dtype, device=f.device)
    if isinstance(loss_func, torch.nn.CrossEntropyLoss):
        p = f.softmax(0)
        sqrt_p = p.sqrt()
        return torch.diag(sqrt_p) - torch.outer(p, sqrt_p)
    if isinstance(loss_func, torch.nn.BCEWithLogitsLoss):
        if C != 1:
            raise value_error("output_one_datum", "one output for BCEWithLogitsLoss", f"{C}")
        p = f.sigmoid()
        return (p * (1 - p)).sqrt().reshape(1, 1)
    raise type_error(
        "loss_func", "nn.MSELoss, nn.CrossEntropyLoss or nn.BCEWithLogitsLoss", loss_func
    )


def extract_patches(
    x: torch.Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any, groups: int
) -> torch.Tensor:
    """The patches of a 2d convolution's input, averaged over channel groups.

    Returns:
        Shape ``(batch, O1 * O2, C_in // groups * K1 * K2)``.
    """
    x = _group_average(x, groups)
    if isinstance(padding, str):
        padding = _symmetric_padding(padding, kernel_size, stride, dilation)
    patches = unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)


def extract_averaged_patches(
    x: torch.Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any, groups: int
) -> torch.Tensor:
    """:func:`extract_patches` averaged over output locations.

    Returns:
        Shape ``(batch, C_in // groups * K1 * K2)``.
    """
    return extract_patches(x, kernel_size, stride, padding, dilation, groups).mean(1)


def _group_average(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, i1, i2 = x.shape
    return x.reshape(b, groups, c // groups, i1, i2).mean(1)


def _symmetric_padding(padding: str, kernel_size: Any, stride: Any, dilation: Any) -> tuple:
    pairs = [_pair(v) for v in (kernel_size, stride, dilation)]
    if padding == "valid":
        return (0, 0)
    result = []
    for k, s, d in zip(*pairs):
        total = d * (k - 1)
        if padding != "same" or s != 1 or total % 2:
            raise NotImplementedError(f"padding={padding!r}: unequal padding is not supported.")
        result.append(total // 2)
    return tuple(result)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


# --- curvlinops.ekfac -------------------------------------------------------------------
def compute_eigenvalue_correction_linear_weight_sharing(
    g: torch.Tensor,
    ggT_eigvecs: torch.Tensor,
    a: torch.Tensor,
    aaT_eigvecs: torch.Tensor | None,
    _force_strategy: str | None = None,
) -> torch.Tensor:
    r"""EKFAC's eigenvalue correction of a linear layer with weight sharing.

    :math:`\Lambda_{ij} = \sum_n \big(\sum_s (Q_G^\top g_{ns})_i (Q_A^\top a_{ns})_j\big)^2`
    (without ``aaT_eigvecs``, a bias: :math:`\sum_n (\sum_s Q_G^\top g_{ns})_i^2`).

    Args:
        g: Output gradients, ``(N, S, D1)``.
        ggT_eigvecs: Eigenvectors of the gradient covariance, ``(D1, D1)``.
        a: Layer inputs, ``(N, S, D2)``.
        aaT_eigvecs: Eigenvectors of the input covariance ``(D2, D2)``, or ``None``.
        _force_strategy: ``'gramian'`` or ``'per_example_gradients'``; default: the
            one with fewer intermediate entries.
    """
    strategies = ("gramian", "per_example_gradients")
    if _force_strategy is not None and _force_strategy not in strategies:
        raise ValueError(
            f"Invalid _force_strategy: expected one of {strategies} or None, got "
            f"{_force_strategy!r}."
        )
    g_hat = g @ ggT_eigvecs
    if aaT_eigvecs is None:
        return g_hat.sum(1).square().sum(0)
    a_hat = a @ aaT_eigvecs
    N, S, D1 = g_hat.shape
    D2 = a_hat.shape[-1]
    strategy = _force_strategy or ("gramian" if S * S < D1 * D2 else "per_example_gradients")
    if strategy == "per_example_gradients":
        return torch.einsum("nsi,nsj->nij", g_hat, a_hat).square().sum(0)
    g_gram = torch.einsum("nsi,nti->nsti", g_hat, g_hat)
    a_gram = torch.einsum("nsj,ntj->nstj", a_hat, a_hat)
    return torch.einsum("nsti,nstj->ij", g_gram, a_gram)
