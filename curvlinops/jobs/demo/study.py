"""The demo on one backend: curvature operators, Rayleigh quotients, eigsh, SLQ, CG."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops.backends._namespaces import cpu_threads
from curvlinops.diagonal import DiagonalLinearOperator
from curvlinops.directional import rayleigh_quotient, transformation_tangent
from curvlinops.eigen import eigsh, max_stable_learning_rate
from curvlinops.ggn import GGNLinearOperator
from curvlinops.gradient import gradient_and_loss
from curvlinops.hessian import HessianLinearOperator
from curvlinops.inverse import CGInverseLinearOperator
from curvlinops.jobs.demo.problem import (
    BATCH_SIZE,
    CG_DAMPING,
    CG_TOL,
    PHASES,
    SLQ_PROBES,
    SLQ_STEPS,
    TOP_K,
    TORCH_THREADS,
    D,
    K,
    N,
    Problem,
    regulariser_diagonal,
)
from curvlinops.jobs.demo.training import (
    DATA_LOSS,
    Framework,
    Progress,
    _rescaling,
    _rotation,
    autoencoder,
    train,
    training_report,
)
from curvlinops.spectral import SpectralDensity, spectral_density


@dataclass
class Operators:
    r"""The curvature of :math:`\mathcal{J}` at the trained weights."""

    hessian: Any  # data-term Hessian + regulariser
    ggn: Any  # data-term GGN + regulariser


def curvature_operators(fw: Framework, problem: Problem, params: list[Any]) -> Operators:
    """Hessian and GGN of the whole objective (data term over 4 batches, plus regulariser)."""
    batches = [fw.asarray(problem.X[i : i + BATCH_SIZE]) for i in range(0, N, BATCH_SIZE)]
    data = [(X, X) for X in batches]
    options = {"backend": fw.name, "columns_per_pass": 2 * K * D}
    H_data = HessianLinearOperator(autoencoder, DATA_LOSS, params, data, **options)
    G_data = GGNLinearOperator(autoencoder, DATA_LOSS, params, data, **options)
    regulariser = DiagonalLinearOperator(regulariser_diagonal(problem), like=H_data)
    return Operators(H_data + regulariser, G_data + regulariser)


def rayleigh_report(fw: Framework, ops: Operators, params: list[Any]) -> dict:
    """Curvature along the rescaling and the latent-rotation tangents, and their ratio."""
    v_scale = transformation_tangent(_rescaling, params, at=1.0, backend=fw.name)
    v_rotation = transformation_tangent(_rotation(fw.xp, fw.dtype), params, at=0.0, backend=fw.name)
    scaling = float(rayleigh_quotient(ops.hessian, v_scale))
    rotation = float(rayleigh_quotient(ops.hessian, v_rotation))
    return {"scaling": scaling, "rotation": rotation, "ratio": scaling / rotation}


def eigsh_report(fw: Framework, ops: Operators) -> dict:
    """Top eigenvalues of the Hessian and the GGN by ``eigsh``, and ``2 / lambda_max``."""
    top = {}
    for name, op in (("hessian_top", ops.hessian), ("ggn_top", ops.ggn)):
        values = eigsh(op, k=TOP_K, which="LA", return_eigenvectors=False)
        top[name] = np.sort(fw.to_numpy(values))[::-1].tolist()
    rate = max_stable_learning_rate(ops.hessian)
    return {"k": TOP_K, **top, "lambda_max": 2.0 / rate, "max_stable_learning_rate": rate}


def dense_spectra(fw: Framework, ops: Operators) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues of the Hessian and the GGN from their dense matrices, ascending."""
    spectra = []
    for op in (ops.hessian, ops.ggn):
        matrix = fw.to_numpy(op.todense())
        spectra.append(np.linalg.eigvalsh(0.5 * (matrix + matrix.T)))
    return spectra[0], spectra[1]


def dense_report(top: dict, hessian: np.ndarray, ggn: np.ndarray) -> dict:
    """The dense eigenvalues next to ``eigsh``'s, and the largest difference."""
    h_top, g_top = hessian[::-1][:TOP_K], ggn[::-1][:TOP_K]
    error = max(
        float(np.max(np.abs(np.asarray(top["hessian_top"]) - h_top))),
        float(np.max(np.abs(np.asarray(top["ggn_top"]) - g_top))),
    )
    return {
        "hessian_dense_top": h_top.tolist(),
        "ggn_dense_top": g_top.tolist(),
        "hessian_min_dense": float(hessian[0]),
        "eigsh_max_abs_error": error,
    }


def smoothed_density(grid: np.ndarray, eigenvalues: np.ndarray, width: float) -> np.ndarray:
    r""":math:`\frac1n \sum_i g_\sigma(t - \lambda_i)`, Gaussian kernel of width :math:`\sigma`."""
    z = (grid[:, None] - eigenvalues[None, :]) / width
    return np.exp(-0.5 * z**2).mean(axis=1) / (width * math.sqrt(2 * math.pi))


def slq_report(
    fw: Framework, ops: Operators, exact: np.ndarray, out_dir: Path | None, seed: int
) -> dict:
    """SLQ density of the Hessian against the exact eigenvalues (and the PNG)."""
    result = spectral_density(ops.hessian, num_probes=SLQ_PROBES, num_steps=SLQ_STEPS, seed=seed)
    reference = smoothed_density(result.grid, exact, result.kernel_width)
    l1 = float(np.trapezoid(np.abs(result.density - reference), result.grid))
    png = None
    if out_dir is not None:
        png = plot_spectrum(
            result,
            exact,
            out_dir / f"hessian_spectrum_{fw.name}.png",
            f"Hessian spectrum at the optimum ({fw.name}, {fw.dtype_name})",
        )
    return {
        "num_probes": SLQ_PROBES,
        "num_steps": SLQ_STEPS,
        "kernel_width": float(result.kernel_width),
        "l1_distance_to_exact": l1,
        "mean_eigenvalue_slq": float(np.sum(result.weights * result.nodes) / SLQ_PROBES),
        "mean_eigenvalue_exact": float(np.mean(exact)),
        "png": None if png is None else str(png),
    }


def plot_spectrum(
    result: SpectralDensity, exact: np.ndarray, path: Path, title: str
) -> Path | None:
    """Save the SLQ density over a histogram of the exact eigenvalues as a PNG.

    Returns:
        The path, or ``None`` when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(7, 4.2), dpi=120)
    ax = figure.add_subplot()
    ax.hist(exact, bins=60, density=True, color="0.8", edgecolor="0.6", label="exact eigenvalues")
    ax.plot(result.grid, result.density, color="C0", lw=1.8, label="SLQ density")
    reference = smoothed_density(result.grid, exact, result.kernel_width)
    ax.plot(result.grid, reference, "--", color="C1", lw=1.2, label="exact, same smoothing")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-3)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (integrates to 1)")
    ax.set_title(title)
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def cg_report(fw: Framework, problem: Problem, ops: Operators, params: list[Any]) -> dict:
    r"""One CG solve of :math:`(H + \lambda I) x = g`, ``g`` the held-out data gradient."""
    X_test = fw.asarray(problem.X_test)
    g, _ = gradient_and_loss(
        autoencoder, DATA_LOSS, params, [(X_test, X_test)], flat=True, backend=fw.name
    )
    tol = CG_TOL[fw.dtype_name]
    inverse = CGInverseLinearOperator(ops.hessian, damping=CG_DAMPING, tol=tol)
    x = inverse @ g
    info = inverse.info
    residual = ops.hessian @ x + CG_DAMPING * x - g
    g_host, x_host = fw.to_numpy(g), fw.to_numpy(x)
    rhs_norm = float(np.linalg.norm(g_host))
    return {
        "damping": CG_DAMPING,
        "tol": tol,
        "iterations": int(info.iterations[0]),
        "num_products": int(info.num_products),
        "converged": bool(info.converged[0]),
        "residual_norm": float(info.residual_norms[0]),
        "relative_residual": float(info.relative_residuals[0]),
        "true_relative_residual": float(np.linalg.norm(fw.to_numpy(residual)) / rhs_norm),
        "rhs_norm": rhs_norm,
        "solution_norm": float(np.linalg.norm(x_host)),
        "rhs_dot_solution": float(g_host @ x_host),
    }


class _Clock:
    """Wall-clock seconds per phase."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self._last
        self._last = now


def run_backend(
    name: str,
    dtype: str,
    problem: Problem,
    *,
    out_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """The whole study on one backend; returns its section of the JSON report.

    Args:
        name: ``"torch"`` or ``"jax"``.
        dtype: ``"float32"`` or ``"float64"``.
        problem: From :func:`make_problem`.
        out_dir: Where to save the PNG (``None``: no plot).
        progress: Progress bars (default: none).
    """
    progress = progress or Progress(enabled=False)
    clock, start = _Clock(), time.perf_counter()
    with cpu_threads(name, TORCH_THREADS):
        fw = Framework(name, dtype)
        clock.lap("setup")
        with progress.bar(len(PHASES), f"{name}: study", unit="phase") as phases:
            phases.set_postfix_str(PHASES[0])
            report = _study(
                fw, problem, out_dir, progress, lambda phase: _advance(phases, clock, phase)
            )
    report["timings_s"] = {**clock.times, "total": time.perf_counter() - start}
    return report


def _study(
    fw: Framework,
    problem: Problem,
    out_dir: Path | None,
    progress: Progress,
    done: Callable[[str], None],
) -> dict:
    """The steps of :func:`run_backend`; ``done(phase)`` is called after each."""
    report: dict[str, Any] = {"dtype": fw.dtype_name}
    trained = train(fw, problem, progress)
    report["training"] = training_report(fw, problem, trained)
    report["weights"] = {
        "W1": fw.to_numpy(trained.params[0]).tolist(),
        "W2": fw.to_numpy(trained.params[1]).tolist(),
    }
    done("training")
    ops = curvature_operators(fw, problem, trained.params)
    report["device"] = str(ops.hessian.backend.device)
    done("operators")
    report["rayleigh_quotients"] = rayleigh_report(fw, ops, trained.params)
    done("rayleigh")
    report["eigenvalues"] = eigsh_report(fw, ops)
    done("eigsh")
    hessian_spectrum, ggn_spectrum = dense_spectra(fw, ops)
    report["eigenvalues"].update(
        dense_report(report["eigenvalues"], hessian_spectrum, ggn_spectrum)
    )
    done("dense")
    report["spectral_density"] = slq_report(fw, ops, hessian_spectrum, out_dir, problem.seed)
    done("slq")
    report["cg"] = cg_report(fw, problem, ops, trained.params)
    done("cg")
    return report


def _advance(bar: Any, clock: _Clock, phase: str) -> None:
    clock.lap(phase)
    bar.update(1)
    following = PHASES.index(phase) + 1
    if following < len(PHASES):
        bar.set_postfix_str(PHASES[following])
