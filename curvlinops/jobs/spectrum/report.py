"""The spectrum job's table, agreement between backends, and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops.jobs._report import format_rows
from curvlinops.jobs.spectrum.study import gaussian_mixture

__all__ = ["agreement", "density_grid", "format_table", "plot_densities", "plot_over_steps"]

GRID_POINTS = 2000
DENSITY_FLOOR = 1e-6
"""Lower limit of the log-scale density axis (the densities integrate to 1)."""


def density_grid(sections: Sequence[dict], kind: str = "hessian") -> np.ndarray:
    """One grid for every checkpoint and backend, padded by 5 kernel widths."""
    low, high = np.inf, -np.inf
    for section in sections:
        for entry in section["checkpoints"]:
            q = entry[kind]
            low = min(low, np.min(q["nodes"]) - 5 * q["kernel_width"])
            high = max(high, np.max(q["nodes"]) + 5 * q["kernel_width"])
    return np.linspace(low, high, GRID_POINTS)


def density(entry: dict, grid: np.ndarray, kind: str = "hessian", width: float | None = None):
    """A checkpoint's smoothed density on ``grid`` (its own kernel width unless given)."""
    q = entry[kind]
    return gaussian_mixture(grid, q["nodes"], q["weights"], width or q["kernel_width"])


def agreement(backends: dict[str, dict], names: Sequence[str]) -> dict:
    r"""Top eigenvalues and Hessian densities of the first two backends, per checkpoint.

    At the checkpoints both measured. Densities are compared with the first
    backend's kernel width on a common grid: ``density_l1`` is
    :math:`\int |\phi_1 - \phi_2|` (0 to 2).
    """
    if len(names) < 2:
        return {}
    first, second = backends[names[0]]["checkpoints"], backends[names[1]]["checkpoints"]
    grid = density_grid([backends[names[0]], backends[names[1]]])
    twin = {entry["step"]: entry for entry in second}
    steps = []
    for a, b in ((a, twin[a["step"]]) for a in first if a["step"] in twin):
        top_a, top_b = np.asarray(a["top_eigenvalues"]), np.asarray(b["top_eigenvalues"])
        width = a["hessian"]["kernel_width"]
        gap = np.abs(density(a, grid, width=width) - density(b, grid, width=width))
        steps.append(
            {
                "step": a["step"],
                "top_max_relative_difference": float(np.max(np.abs(top_a - top_b) / np.abs(top_a))),
                "density_l1": float(np.trapezoid(gap, grid)),
                "negative_mass": [a["negative_mass"], b["negative_mass"]],
            }
        )
    return {"backends": list(names[:2]), "checkpoints": steps}


def format_table(report: dict, names: Sequence[str]) -> str:
    """One row per backend and checkpoint; the agreement and the validation below."""
    header = [
        "backend",
        "step",
        "loss",
        "train acc",
        "test acc",
        "lambda_max",
        "lambda_min",
        "min/max",
        "neg. mass",
        "clearly neg.",
        "GGN max",
        "s",
    ]
    rows = []
    for name in names:
        for e in report["backends"][name]["checkpoints"]:
            rows.append(
                [
                    name,
                    str(e["step"]),
                    f"{e['loss']:.3f}",
                    f"{e['train_accuracy']:.3f}",
                    f"{e['test_accuracy']:.3f}",
                    f"{e['top_eigenvalues'][0]:.4g}",
                    f"{e['smallest_eigenvalue']:.3g}",
                    f"{e['ratio_smallest_to_largest']:.3f}",
                    f"{e['negative_mass']:.3f}",
                    f"{e['negative_mass_clear']:.3f}",
                    f"{np.max(e['ggn']['nodes']):.4g}",
                    f"{e['seconds']:.1f}",
                ]
            )
    text = [format_rows(header, rows, left=1)]
    match = report["agreement"]
    if match:
        first = match["checkpoints"][0]
        l1 = ", ".join(f"{c['density_l1']:.3f}" for c in match["checkpoints"])
        text.append(
            f"{' vs '.join(match['backends'])}: step-{first['step']} top eigenvalues agree to "
            f"{first['top_max_relative_difference']:.1e} (relative); Hessian density L1 per "
            f"checkpoint: {l1}"
        )
    for name in names:
        v = report["backends"][name].get("validation")
        if v:
            text.append(
                f"validation ({name}, {v['num_params']} parameters, dense Hessian): SLQ density "
                f"L1 {v['slq_l1_to_exact']:.3f}; top-{len(v['top_eigenvalues'])} eigenvalues "
                f"relative error {v['top_max_relative_error']:.1e}; negative mass SLQ "
                f"{v['negative_mass_slq']:.3f}, exact {v['negative_mass_exact']:.3f}"
            )
    return "\n".join(text)


def plot_densities(Figure: Any, report: dict, name: str, path: Path) -> Path:
    """The lecture's Figure 2: Hessian (and GGN) densities per checkpoint, log scale, same axes."""
    section = report["backends"][name]
    entries = section["checkpoints"]
    grid = density_grid([section])
    figure = Figure(figsize=(4.2 * len(entries), 3.4), dpi=80)
    axes = []
    for index, entry in enumerate(entries):
        ax = figure.add_subplot(1, len(entries), index + 1, sharey=axes[0] if axes else None)
        axes.append(ax)
        ax.semilogy(grid, np.maximum(density(entry, grid), DENSITY_FLOOR), lw=1.2, label="Hessian")
        ax.semilogy(
            grid,
            np.maximum(density(entry, grid, "ggn"), DENSITY_FLOOR),
            lw=0.9,
            color="0.55",
            ls="--",
            label="GGN",
        )
        ax.axvline(0.0, color="0.8", lw=0.8)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_ylim(DENSITY_FLOOR, None)
        ax.set_title(
            f"step {entry['step']}: {entry['negative_mass_clear']:.3f} of the mass "
            f"< -1e-3 lambda_max, lambda_min/lambda_max {entry['ratio_smallest_to_largest']:.3f}",
            fontsize=8,
        )
        ax.set_xlabel("eigenvalue")
        if index == 0:
            ax.set_ylabel("density (log scale)")
            ax.legend(loc="upper right", fontsize=8)
    problem = report["problem"]
    figure.suptitle(
        f"Hessian spectral density (SLQ, {problem['slq_probes']} probes x "
        f"{problem['slq_steps']} steps) of a ResNet ({problem['num_params']} parameters, BN) "
        f"on digits during SGD with momentum {problem['momentum']} ({name})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_over_steps(Figure: Any, report: dict, names: Sequence[str], path: Path) -> Path:
    """Negative mass and lambda_max (and |lambda_min|) against the step, a line per backend."""
    figure = Figure(figsize=(9, 3.4), dpi=80)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for marker, name in zip("ox+", names):
        entries = report["backends"][name]["checkpoints"]
        steps = [e["step"] for e in entries]
        left.plot(
            steps,
            [e["negative_mass"] for e in entries],
            f"-{marker}",
            color="C0",
            label=f"below 0 ({name})",
        )
        left.plot(
            steps,
            [e["negative_mass_clear"] for e in entries],
            f"--{marker}",
            color="C3",
            label=f"clearly negative ({name})",
        )
        right.semilogy(
            steps,
            [e["top_eigenvalues"][0] for e in entries],
            f"-{marker}",
            color="C0",
            label=f"lambda_max ({name})",
        )
        right.semilogy(
            steps,
            [abs(e["smallest_eigenvalue"]) for e in entries],
            f"--{marker}",
            color="C3",
            label=f"|lambda_min| ({name})",
        )
    left.set_xlabel("SGD step")
    left.set_ylabel("share of spectral mass")
    left.set_title("negative eigenvalue mass of the Hessian", fontsize=10)
    left.legend(fontsize=7)
    right.set_xlabel("SGD step")
    right.set_title("extreme eigenvalues", fontsize=10)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
