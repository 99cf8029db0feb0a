"""The influence job's report: the JSON's sections, the table, progress lines, plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import scipy.optimize
import scipy.stats

from curvlinops.jobs._report import format_rows, versions
from curvlinops.jobs.influence.problem import (
    CURVE_POINTS,
    MODELS,
    NUM_CLASSES,
    SCHEMA,
    DigitsProblem,
    StudyConfig,
    architecture,
)


def _assemble(
    problem: DigitsProblem,
    config: StudyConfig,
    names: Sequence[str],
    results: dict,
    scores: dict,
    command: Sequence[str],
) -> dict:
    n = len(problem.y_train)
    sections: dict[str, Any] = {"models": {}, "methods": {}, "loo": {}}
    for section in sections:
        for name in names:
            for key, value in results[name][section].items():
                sections[section].setdefault(key, {})[name] = value
    return {
        "schema": SCHEMA,
        "command": list(command),
        "problem": {
            "seed": problem.seed,
            "n_train": n,
            "n_test": len(problem.y_test),
            "n_flipped": int(problem.flipped.sum()),
            "num_classes": NUM_CLASSES,
            "flip_fraction": config.flip_fraction,
            "l2": config.l2,
            "cg_tol": config.cg_tol,
            "block_size": config.block_size,
            "models": {m: _architecture_label(m, config) for m in MODELS},
            "inspected_at_10pct": round(0.1 * n),
        },
        "versions": versions(sklearn="scikit-learn"),
        **sections,
        "random_recall_at_10pct": round(0.1 * n) / n,
        "agreement": agreement(scores, names),
        "test_influence": {name: results[name]["test_influence"] for name in names},
    }


def agreement(scores: dict[str, dict[str, np.ndarray]], names: Sequence[str]) -> dict:
    """Spearman correlation and largest relative difference of the first two backends' scores."""
    if len(names) < 2:
        return {}
    first, second = scores[names[0]], scores[names[1]]
    result = {}
    for key in first:
        if key.endswith("_random"):
            continue
        a, c = first[key], second[key]
        result[key] = {
            "spearman": float(scipy.stats.spearmanr(a, c).statistic),
            "max_relative_difference": float(np.max(np.abs(a - c)) / np.max(np.abs(a))),
        }
    return result


def _architecture_label(model: str, config: StudyConfig) -> str:
    widths = "-".join(str(w) for w in architecture(model, config))
    return f"{widths} softmax" if model == "logreg" else f"{widths} tanh"


# --- text ---------------------------------------------------------------------------------------
def format_table(report: dict, names: Sequence[str]) -> str:
    """Recall at 10% inspected and seconds per method and backend, and the agreement."""
    header = ["model", "method"]
    for name in names:
        header += [f"recall@10% {name}", f"s {name}"]
    if len(names) > 1:
        header.append("Spearman")
    lines = []
    for key, per_backend in report["methods"].items():
        first = per_backend[names[0]]
        cells = [first["model"], first["method"]]
        for name in names:
            entry = per_backend[name]
            cells += [f"{entry['recall_at_10pct']:.3f}", f"{entry['seconds']:.1f}"]
        if len(names) > 1:
            match = report["agreement"].get(key)
            cells.append("-" if match is None else f"{match['spearman']:.6f}")
        lines.append(cells)
    text = [format_rows(header, lines, left=2)]
    text.append(f"random order: recall@10% = {report['random_recall_at_10pct']:.3f} expected")
    for model, per_backend in report["loo"].items():
        rs = ", ".join(f"{n} r = {per_backend[n]['pearson_r']:.4f}" for n in names)
        text.append(f"leave-one-out, {model} ({len(per_backend[names[0]]['actual'])} points): {rs}")
    return "\n".join(text)


def _describe(problem: DigitsProblem, config: StudyConfig, names: Sequence[str]) -> str:
    models = ", ".join(_architecture_label(m, config) for m in MODELS)
    return (
        f"Influence functions on scikit-learn's digits: {len(problem.y_train)} training images "
        f"({int(problem.flipped.sum())} labels flipped), {len(problem.y_test)} test images, "
        f"seed {problem.seed}\n  models: {models}; l2 {config.l2:g}; backends: {', '.join(names)}"
    )


def _training_line(framework: str, name: str, section: dict) -> str:
    t = section["training"]
    state = "trained" if t["converged"] else "NOT converged"
    return (
        f"{framework} {name}: {state} in {t['iterations']} L-BFGS iterations "
        f"(|grad| {t['gradient_norm']:.1e}), train accuracy {t['train_accuracy']:.3f}, "
        f"test accuracy {t['test_accuracy']:.3f}, {t['seconds']:.1f} s"
    )


def _method_line(framework: str, report: dict) -> str:
    text = (
        f"  {framework} {report['model']} {report['method']}: recall@10% "
        f"{report['recall_at_10pct']:.3f}, {report['seconds']:.1f} s"
    )
    cg = report["cg"]
    if cg is not None:
        text += (
            f"; CG {cg['converged']}/{cg['columns']} converged, iterations "
            f"{cg['iterations_min']}..{cg['iterations_max']}, relative residual <= "
            f"{cg['max_relative_residual']:.1e}"
        )
        if not cg["all_converged"]:
            text += f" (NOT all converged: {cg['indefinite']} met non-positive curvature)"
    return text


def _loo_line(framework: str, name: str, loo: dict) -> str:
    return (
        f"  {framework} {name} leave-one-out ({len(loo['actual'])} retrainings): Pearson r "
        f"{loo['pearson_r']:.4f}, {loo['seconds']:.1f} s"
    )


# --- plots --------------------------------------------------------------------------------------
def _plots(
    report: dict,
    problem: DigitsProblem,
    config: StudyConfig,
    names: Sequence[str],
    out_dir: Path | None,
    stream: TextIO,
) -> dict:
    paths: dict[str, str | None] = {"recall": None, "test_influence": None, "loo": None}
    if out_dir is None:
        return paths
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'curvlinops[plot]')", file=stream)
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    paths["recall"] = str(plot_recall(Figure, report, names, out_dir / "recall.png"))
    paths["test_influence"] = str(
        plot_test_influence(
            Figure, report["test_influence"][names[0]], problem, out_dir / "test_influence.png"
        )
    )
    paths["loo"] = str(plot_loo(Figure, report["loo"], names, out_dir / "loo.png"))
    print("plots: " + ", ".join(p for p in paths.values() if p), file=stream)
    return paths


def plot_recall(Figure: Any, report: dict, names: Sequence[str], path: Path) -> Path:
    """Recall against fraction inspected, one panel per model, a line per method and backend."""
    figure = Figure(figsize=(9, 3.8), dpi=80)
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    styles = ["-", "--", ":"]
    for column, model in enumerate(MODELS):
        ax = figure.add_subplot(1, len(MODELS), column + 1)
        entries = [v for v in report["methods"].values() if v[names[0]]["model"] == model]
        for color, per_backend in enumerate(entries):
            for style, name in zip(styles, names):
                entry = per_backend[name]
                label = entry["method"] if style == "-" else None
                ax.plot(grid, entry["recall_curve"], style, color=f"C{color}", lw=1.4, label=label)
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, label="random (expected)")
        ax.axvline(0.1, color="0.8", lw=0.8)
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_title(_architecture_label(model, _config_of(report)))
        if column == 0:
            ax.set_ylabel("fraction of flipped labels found")
            ax.legend(loc="lower right", fontsize=8)
    figure.suptitle(
        "Self-influence finds flipped labels ("
        + ", ".join(f"{s} {n}" for s, n in zip(styles, names))
        + ")",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _config_of(report: dict) -> StudyConfig:
    hidden = int(report["problem"]["models"]["mlp"].split("-")[1])
    return StudyConfig(hidden=hidden)


def plot_test_influence(Figure: Any, section: dict, problem: DigitsProblem, path: Path) -> Path:
    """Each row: a test image, its most helpful and most harmful training images."""
    rows, k = len(section["test_indices"]), len(section["helpful"][0])
    figure = Figure(figsize=(1.0 * (2 * k + 1.4), 1.25 * rows + 0.4), dpi=80)
    columns = 2 * k + 1
    for r, t in enumerate(section["test_indices"]):
        ax = figure.add_subplot(rows, columns, r * columns + 1)
        _digit(ax, problem.X_test[t], f"test {problem.y_test[t]}", "C0")
        for j, kind in enumerate(("helpful", "harmful")):
            for c, i in enumerate(section[kind][r]):
                ax = figure.add_subplot(rows, columns, r * columns + 2 + j * k + c)
                if problem.flipped[i]:
                    title, color = f"{problem.y_train[i]} (was {problem.y_clean[i]})", "red"
                else:
                    title, color = f"{problem.y_train[i]}", "0.5"
                _digit(ax, problem.X_train[i], title, color)
    figure.suptitle(
        f"Most helpful (left {k}) and harmful (right {k}) training images for the test images "
        "of largest loss; red: flipped label",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _digit(ax: Any, pixels: np.ndarray, title: str, color: str) -> None:
    ax.imshow(pixels.reshape(8, 8), cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8, color="red" if color == "red" else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color(color)
        spine.set_linewidth(2.0 if color == "red" else 0.8)


def plot_loo(Figure: Any, loo: dict, names: Sequence[str], path: Path) -> Path:
    """Predicted against retrained change of the test loss, one panel per model."""
    figure = Figure(figsize=(8, 3.8), dpi=80)
    markers = ["o", "x", "+"]
    for column, model in enumerate(loo):
        ax = figure.add_subplot(1, len(loo), column + 1)
        values = []
        for marker, name in zip(markers, names):
            entry = loo[model][name]
            ax.scatter(
                entry["actual"],
                entry["predicted"],
                marker=marker,
                s=18,
                label=f"{name}: r = {entry['pearson_r']:.3f}",
            )
            values += entry["actual"] + entry["predicted"]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="0.6", lw=0.8)
        ax.set_xlabel("actual change of test loss (retrained)")
        ax.set_title(f"leave-one-out, {model}")
        if column == 0:
            ax.set_ylabel("predicted by influence")
        ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
