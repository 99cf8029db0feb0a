"""The SLQ task of ``python -m benchmarks --tasks``: the Hessian's spectral density.

Run on the small (``quick``) problem sizes, where the dense float64 Hessian and
its eigenvalues are the reference. Every contender smooths with the same
Gaussian kernel width σ (1 % of the exact spectrum's spread) and is read on the
same grid (1,024 points, 5σ beyond the extreme eigenvalues); the error is the
L1 distance ``∫ |φ̂(t) - φ_σ(t)| dt`` to the exactly smoothed density
:math:`\\phi_\\sigma(t) = \\frac1n \\sum_i g_\\sigma(t - \\lambda_i)` (both integrate
to 1, so the distance lies in [0, 2]). A contender's settings are the number
of probes and Lanczos steps, tried from the fewest products up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.task_defs import Task

LADDER = ((1, 20), (2, 20), (2, 30), (4, 30), (4, 45), (8, 45), (8, 60), (16, 60),
          (16, 90), (32, 90), (64, 90), (64, 130), (128, 130))  # fmt: skip
"""(probes, Lanczos steps), fewest products first."""
NUM_POINTS = 1024
KERNEL_FRACTION = 0.01
"""σ as a fraction of the exact spectrum's spread."""
COLUMNS_PER_BLOCK = 512
"""Columns of the identity per product when the dense reference Hessian is built."""


def slq_reference(problem: Any) -> dict:
    """The exact eigenvalues of the float64 Hessian (this library's PyTorch operator, dense)."""
    import torch

    import curvlinops as cl

    fp = problem.torch()
    H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
    n = problem.num_params
    eye = torch.eye(n, dtype=torch.float64)
    dense = torch.cat([H @ eye[:, s : s + COLUMNS_PER_BLOCK]
                       for s in range(0, n, COLUMNS_PER_BLOCK)], dim=1).numpy()  # fmt: skip
    eigenvalues = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    sigma = KERNEL_FRACTION * float(eigenvalues[-1] - eigenvalues[0])
    grid = np.linspace(eigenvalues[0] - 5 * sigma, eigenvalues[-1] + 5 * sigma, NUM_POINTS)
    return {"eigenvalues": eigenvalues.tolist(), "sigma": sigma, "grid": grid.tolist(),
            "how": "eigvalsh of the dense float64 Hessian (our torch operator)"}  # fmt: skip


def gaussian_mixture(grid: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> Any:
    """``Σ_k weights_k g_σ(grid - nodes_k)``, in blocks of nodes (bounded memory)."""
    density = np.zeros_like(grid)
    for start in range(0, nodes.size, 256):
        diff = grid[:, None] - nodes[None, start : start + 256]
        density += np.exp(-0.5 * (diff / sigma) ** 2) @ weights[start : start + 256]
    return density / (sigma * math.sqrt(2 * math.pi))


def error(density: np.ndarray, ref: dict) -> float:
    """L1 distance to the exactly smoothed density on the reference grid."""
    grid, eigenvalues = np.asarray(ref["grid"]), np.asarray(ref["eigenvalues"])
    if "exact" not in ref:  # computed once per process
        weights = np.full(eigenvalues.size, 1.0 / eigenvalues.size)
        ref["exact"] = gaussian_mixture(grid, eigenvalues, weights, ref["sigma"])
    return float(np.trapezoid(np.abs(np.asarray(density) - ref["exact"]), grid))


def _ours(framework: str) -> Callable:
    def make(problem: Any, ref: dict) -> tuple[Callable, tuple, str]:
        import curvlinops as cl

        fp = problem.torch() if framework == "torch" else problem.jax()
        H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
        grid = np.asarray(ref["grid"])

        def run(setting: tuple[int, int]) -> np.ndarray:
            probes, steps = setting
            return cl.spectral_density(H, num_probes=probes, num_steps=steps, grid=grid,
                                       kernel_width=ref["sigma"], seed=0).density  # fmt: skip

        return run, LADDER, "probes, steps"

    return make


def _hessian_eigenthings(problem: Any, ref: dict) -> tuple[Callable, tuple, str]:
    import hessian_eigenthings as he

    fp = problem.torch()
    operator = he.HessianOperator(fp.model_func, fp.data, he.supervised_loss(fp.loss_func))
    grid = np.asarray(ref["grid"])

    def run(setting: tuple[int, int]) -> np.ndarray:
        probes, steps = setting
        result = he.spectral_density(operator, num_runs=probes, lanczos_steps=steps,
                                     sigma=ref["sigma"], seed=0)  # fmt: skip
        return np.interp(grid, result.grid.double().numpy(), result.density.double().numpy())

    return run, LADDER, "probes, steps"


def _cfp(problem: Any, ref: dict) -> tuple[Callable, tuple, str]:
    """3.0.1's ``lanczos_approximate_spectrum`` (Papyan's algorithm: no reorthogonalisation).

    Its kernel width is set through ``kappa`` on the spectrum rescaled to [-1, 1]; the
    boundaries it rescales with are estimated first (timed), then ``kappa`` is chosen
    so that the width is σ.
    """
    import torch

    from benchmarks.contenders import load_cfp

    cfp = load_cfp()
    spectrum = cfp.papyan2020traces.spectrum
    fp = problem.torch()
    H = cfp.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data,
                                  check_deterministic=False)  # fmt: skip
    grid, margin = np.asarray(ref["grid"]), 0.05

    def run(setting: tuple[int, int]) -> np.ndarray:
        probes, steps = setting
        torch.manual_seed(0)
        low, high = spectrum.approximate_boundaries(H, tol=1e-2)
        half_width = (1 + 2 * margin) * (high - low) / 2
        kappa = math.exp((2 / ((steps - 1) * ref["sigma"] / half_width)) ** 2 / 8)
        points, density = spectrum.lanczos_approximate_spectrum(
            H, steps, num_points=NUM_POINTS, num_repeats=probes, kappa=kappa,
            boundaries=(low, high), margin=margin,
        )  # fmt: skip
        return np.interp(grid, points.double().numpy(), density.double().numpy(), 0.0, 0.0)

    return run, LADDER, "probes, steps"


def _floor(problem: Any, ref: dict) -> tuple[Callable, tuple, str]:
    """Lanczos by hand (full reorthogonalisation), the probes as columns of a ``vmap``-ped HVP."""
    import torch

    from benchmarks.contenders import make_setup

    hvp = make_setup("raw-torch", problem).products["hvp"]
    n, dtype = problem.num_params, getattr(torch, problem.dtype)
    grid = np.asarray(ref["grid"])

    def run(setting: tuple[int, int]) -> np.ndarray:
        probes, steps = setting
        generator = torch.Generator().manual_seed(0)
        q = (torch.randint(0, 2, (n, probes), generator=generator).to(dtype) * 2 - 1) / n**0.5
        alphas, betas = _lanczos_columns(hvp, q, steps)
        density = np.zeros_like(grid)
        for a, b in zip(alphas.T, betas.T):
            T = np.diag(a) + np.diag(b[:-1], 1) + np.diag(b[:-1], -1)
            nodes, vectors = np.linalg.eigh(T)
            density += gaussian_mixture(grid, nodes, vectors[0] ** 2, ref["sigma"])
        return density / probes

    return run, LADDER, "probes, steps"


def _lanczos_columns(hvp: Callable, q: Any, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` Lanczos steps from each column of ``q``; the tridiagonals' entries."""
    import torch

    basis = torch.zeros((steps, *q.shape), dtype=q.dtype)
    alphas, betas = [], []
    for j in range(steps):
        basis[j] = q
        w = hvp(q)
        alphas.append((q * w).sum(0))
        coefficients = torch.einsum("jnp,np->jp", basis[: j + 1], w)
        w = w - torch.einsum("jnp,jp->np", basis[: j + 1], coefficients)
        betas.append(torch.linalg.vector_norm(w, dim=0))
        q = w / betas[-1]
    return torch.stack(alphas).double().numpy(), torch.stack(betas).double().numpy()


SLQ = Task(
    "float32", 0.05, "Hessian spectral density by SLQ, L1 distance 0.05 (small sizes)",
    slq_reference, error,
    {"ours-torch": _ours("torch"), "ours-jax": _ours("jax"),
     "hessian-eigenthings": _hessian_eigenthings, "cfp": _cfp, "floor": _floor},
    small=True,
)  # fmt: skip
