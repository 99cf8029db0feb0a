r"""The Hessian spectrum of a ResNet during the first steps of momentum training.

``python -m curvlinops spectrum`` reproduces the lecture's Figure 2 (after
Ghorbani, Krishnan & Xiao, 2019) at laptop scale, on every installed backend:

1. **Data**: scikit-learn's digits (8×8 images, 10 classes, no download), a
   seeded split into 500 test and 1,297 training images.
2. **Network**: a small ResNet with batch normalisation (a 3×3 convolution to
   6 channels, two residual blocks, global average pooling, a dense layer: 1,480
   parameters;
   :mod:`curvlinops.backends._jobs_resnet`), He-initialised from ``--seed``, the
   same numpy weights in PyTorch and JAX. Trained by SGD with heavy-ball momentum
   0.9 (learning rate 0.05, mini-batches of 64, the same order in both), BN in
   training mode; the curvature is that of the network in evaluation mode, BN
   a fixed affine map by the mean and variance of the whole training set at
   the checkpoint (the running averages lag behind the weights in the first
   steps; at step 0 they are still 0 and 1).
3. **At each checkpoint** (``--steps``, default 0, 50, 100, 200, 400), over the
   full training set: the Hessian's spectral density by SLQ (4 probes, 30
   Lanczos steps each, as the columns of one product per step), its top
   eigenvalues and its smallest by ``eigsh``, the share of the spectral mass
   below zero (quadrature weight of the Ritz values below 0, and below
   :math:`-10^{-3}\lambda_{\max}`: "clearly negative"), the ratio
   :math:`\lambda_{\min}/\lambda_{\max}`, the loss and accuracies; the GGN's
   density for contrast (positive semi-definite).
4. **Validation**, on a reduced network (2 channels, one block, 100 images) at
   initialisation: the SLQ density against the dense Hessian's exact eigenvalues
   (L1 distance, same smoothing), ``eigsh`` against dense ``eigh``.
5. With two backends: the second, the first's twin from the same weights,
   measures the first and last checkpoints (``SpectrumConfig.twin_steps``;
   ``"all"`` for every one): the top eigenvalues at step 0 (same weights) and
   the densities' L1 distance per checkpoint that both measured. Alone, a
   backend measures every checkpoint.

Outputs in ``--out``: ``hessian_spectrum.png`` (densities per checkpoint, log
scale, same axes) and ``negative_mass.png`` (negative mass and extreme
eigenvalues over the steps); a table; the JSON report (``--json``), schema
``"curvlinops-spectrum/1"``::

    {"schema", "command", "problem": {...sizes and settings...}, "versions",
     "backends": {"<backend>": {"training_seconds", "seconds": float,
        "checkpoints": [{"step": int, "loss", "train_accuracy", "test_accuracy",
            "top_eigenvalues": [float] (descending), "smallest_eigenvalue",
            "ratio_smallest_to_largest", "negative_mass", "negative_mass_clear",
            "seconds": float, "eigsh": {"top", "smallest": {"converged", "products",
            "restarts", "warnings"}}, "hessian", "ggn": {"nodes", "weights":
            [[float]] (probes x steps), "kernel_width": float}}],
        "validation": {"num_params", "num_data", "slq_l1_to_exact",
            "top_eigenvalues", "dense_top_eigenvalues", "top_max_relative_error",
            "negative_mass_slq", "negative_mass_exact", "eigsh_converged"}}},
     "agreement": {"backends", "checkpoints": [{"step", "top_max_relative_difference",
                   "density_l1", "negative_mass"}]} or {},
     "finding": {"negative_mass_first", "negative_mass_last", "steps": [int, int]},
     "plots": {"densities", "over_steps": str or null},
     "timings": {...}, "threads": {...}, "load": {...}}
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from curvlinops.jobs._parallel import plan_threads, run_backends
from curvlinops.jobs._report import Clock, figure_class, printer, versions, write_json
from curvlinops.jobs.spectrum.problem import (
    SpectrumConfig,
    make_digits,
    measured_steps,
    num_params,
)
from curvlinops.jobs.spectrum.report import agreement, format_table, plot_densities, plot_over_steps
from curvlinops.jobs.spectrum.study import run_backend

__all__ = ["SCHEMA", "SpectrumConfig", "run_spectrum"]

SCHEMA = "curvlinops-spectrum/1"


def run_spectrum(
    backends: Iterable[str],
    *,
    steps: Sequence[int] | None = None,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    seed: int = 0,
    quiet: bool = False,
    stream: TextIO | None = None,
    command: Sequence[str] = (),
    config: SpectrumConfig | None = None,
    processes: bool = True,
    twin_steps: str | None = None,
) -> dict:
    """Train and measure on each backend; print the table, save the plots and the JSON.

    Args:
        backends: Installed framework names (the first one's densities are plotted).
        steps: Checkpoints (default ``config.steps``).
        out_dir: Directory for the PNGs, or ``None``.
        json_path: Where to write the JSON report, or ``None``.
        seed: Seed of split, initial weights and mini-batches.
        quiet: Print only the table.
        stream: Where to print (default ``sys.stdout``).
        command: The command line, recorded in the report.
        config: Sizes and settings (default :class:`SpectrumConfig`).
        processes: Run two backends side by side where there is a core for each.
        twin_steps: The second backend's checkpoints, ``"ends"`` or ``"all"``
            (default ``config.twin_steps``).

    Returns:
        The report (see the module docstring).
    """
    stream = stream or sys.stdout
    clock, names = Clock(), list(backends)
    config = config or SpectrumConfig()
    if steps is not None:
        config = replace(config, steps=tuple(sorted(set(steps))))
    if twin_steps is not None:
        config = replace(config, twin_steps=twin_steps)
    measured_steps(config, twin=True)  # a bad twin_steps fails before any work
    say = printer(quiet, stream)
    digits = make_digits(seed, config)
    say(_describe(config, digits, names))
    threads = plan_threads(names, processes=processes)
    say(threads.describe())
    work = (digits, config, names[0])
    sections, observed = run_backends(names, threads, run_backend, work, say)
    report = {
        "schema": SCHEMA,
        "command": list(command),
        "problem": _problem(config, digits),
        "versions": versions(sklearn="scikit-learn"),
        "backends": sections,
        "agreement": agreement(sections, names),
        "finding": _finding(sections[names[0]]),
    }
    print(format_table(report, names), file=stream)
    report["plots"] = _plots(report, names, out_dir, stream)
    report["timings"] = clock.timings()
    report["threads"] = {**threads.as_dict(), "observed": observed}
    report["load"] = clock.load()
    write_json(report, json_path, stream)
    print(clock.summary(report["timings"]), file=stream)
    return report


def _problem(config: SpectrumConfig, digits) -> dict:  # noqa: ANN001
    return {
        "seed": digits.seed,
        "n_train": len(digits.y_train),
        "n_test": len(digits.y_test),
        "architecture": f"ResNet: conv3x3-{config.channels}, {config.blocks} residual blocks, "
        "BN, global average pooling, dense-10",
        "num_params": num_params(config.channels, config.blocks),
        "bn_mode": {"training": "train (batch statistics)", "curvature": "eval (running stats)"},
        "optimizer": "SGD, heavy-ball momentum",
        "lr": config.lr,
        "momentum": config.momentum,
        "batch_size": config.batch_size,
        "steps": list(config.steps),
        "slq_probes": config.slq_probes,
        "slq_steps": config.slq_steps,
        "top_k": config.top_k,
        "eigsh_tol": config.eigsh_tol,
        "negative_threshold": config.negative_threshold,
        "dtype": config.dtype,
        "twin_steps": config.twin_steps,
    }


def _finding(section: dict) -> dict:
    first, last = section["checkpoints"][0], section["checkpoints"][-1]
    return {
        "steps": [first["step"], last["step"]],
        "negative_mass_first": first["negative_mass"],
        "negative_mass_last": last["negative_mass"],
        "negative_mass_clear_first": first["negative_mass_clear"],
        "negative_mass_clear_last": last["negative_mass_clear"],
        "ratio_first": first["ratio_smallest_to_largest"],
        "ratio_last": last["ratio_smallest_to_largest"],
    }


def _plots(report: dict, names: Sequence[str], out_dir: Path | None, stream: TextIO) -> dict:
    paths: dict[str, str | None] = {"densities": None, "over_steps": None}
    Figure = None if out_dir is None else figure_class(stream)
    if Figure is None:
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["densities"] = str(
        plot_densities(Figure, report, names[0], out_dir / "hessian_spectrum.png")
    )
    paths["over_steps"] = str(plot_over_steps(Figure, report, names, out_dir / "negative_mass.png"))
    print(f"plots: {paths['densities']}, {paths['over_steps']}", file=stream)
    return paths


def _describe(config: SpectrumConfig, digits, names: Sequence[str]) -> str:  # noqa: ANN001
    return (
        f"Hessian spectrum during training: ResNet ({num_params(config.channels, config.blocks)} "
        f"parameters, BN) on {len(digits.y_train)} digits, SGD momentum {config.momentum}, "
        f"checkpoints {', '.join(map(str, config.steps))}; backends: {', '.join(names)}"
    )
