"""The demo's comparison table and the problem's report section."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from curvlinops.jobs._report import format_rows
from curvlinops.jobs.demo.problem import N_TEST, TOP_K, D, K, N, Problem


# --- comparison table ------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One quantity of the table: where it is in a backend's report, and how to print it."""

    label: str
    get: Callable[[dict], float | int]
    fmt: str
    compare: bool = True  # timings are not compared
    # a curvature number (eigenvalue, Rayleigh quotient, solve): enters the largest difference
    curvature: bool = False


def _rows() -> list[Row]:
    rows = [
        Row("training steps", lambda r: r["training"]["steps"], "d"),
        Row("final gradient norm", lambda r: r["training"]["gradient_norm"], ".2e"),
        Row("distance to closed form", lambda r: r["training"]["distance_to_closed_form"], ".2e"),
        Row("max angle W1 row vs PC (deg)", lambda r: max(r["training"]["angles_deg"]), ".2e"),
        Row("objective at the optimum", lambda r: r["training"]["final_objective"], ".10f"),
        Row(
            "Rayleigh quotient, scaling",
            lambda r: r["rayleigh_quotients"]["scaling"],
            ".8f",
            curvature=True,
        ),
        Row(
            "Rayleigh quotient, rotation",
            lambda r: r["rayleigh_quotients"]["rotation"],
            ".4e",
            curvature=True,
        ),
        Row(
            "ratio scaling / rotation",
            lambda r: r["rayleigh_quotients"]["ratio"],
            ".2f",
            curvature=True,
        ),
    ]
    for kind, key in (("Hessian", "hessian_top"), ("GGN", "ggn_top")):
        for i in range(TOP_K):
            rows.append(
                Row(
                    f"{kind} eigenvalue {i + 1}",
                    _getter("eigenvalues", key, i),
                    ".8f",
                    curvature=True,
                )
            )
    rows += [
        Row(
            "eigsh vs dense, max |error|", lambda r: r["eigenvalues"]["eigsh_max_abs_error"], ".1e"
        ),
        Row(
            "Hessian smallest eigenvalue",
            lambda r: r["eigenvalues"]["hessian_min_dense"],
            ".4e",
            curvature=True,
        ),
        Row(
            "2 / lambda_max",
            lambda r: r["eigenvalues"]["max_stable_learning_rate"],
            ".8f",
            curvature=True,
        ),
        Row(
            "SLQ vs exact density, L1",
            lambda r: r["spectral_density"]["l1_distance_to_exact"],
            ".3f",
        ),
        Row("CG iterations", lambda r: r["cg"]["iterations"], "d"),
        Row("CG relative residual", lambda r: r["cg"]["true_relative_residual"], ".1e"),
        Row("g^T (H + 1e-3 I)^-1 g", lambda r: r["cg"]["rhs_dot_solution"], ".8f", curvature=True),
        Row("time (s)", lambda r: r["timings_s"]["total"], ".1f", compare=False),
    ]
    return rows


def _getter(section: str, key: str, index: int) -> Callable[[dict], float]:
    return lambda report: report[section][key][index]


def comparison(backends: dict[str, dict]) -> dict:
    """Every row's values per backend and the largest difference between backends."""
    rows, worst = [], (None, None)
    for row in _rows():
        values = {name: row.get(report) for name, report in backends.items()}
        difference = None
        if row.compare and len(values) > 1:
            numbers = list(values.values())
            difference = max(numbers) - min(numbers)
            if row.curvature:
                relative = float(difference) / max(abs(v) for v in numbers)
                if worst[1] is None or relative > worst[1]:
                    worst = (row.label, relative)
        rows.append({"quantity": row.label, "values": values, "max_abs_difference": difference})
    return {
        "rows": rows,
        "largest_relative_difference": {"quantity": worst[0], "value": worst[1]},
    }


def format_table(table: dict, names: Sequence[str]) -> str:
    """The comparison as aligned text: a column per backend and the largest difference."""
    formats = {row.label: row.fmt for row in _rows()}
    header = ["quantity", *names] + (["max |diff|"] if len(names) > 1 else [])
    lines = []
    for row in table["rows"]:
        fmt = formats[row["quantity"]]
        cells = [row["quantity"]] + [format(row["values"][n], fmt) for n in names]
        if len(names) > 1:
            diff = row["max_abs_difference"]
            cells.append("-" if diff is None else format(diff, "d" if fmt == "d" else ".1e"))
        lines.append(cells)
    text = [format_rows(header, lines, left=1)]
    worst = table["largest_relative_difference"]
    if worst["quantity"] is not None:
        text.append(
            f"largest relative difference between backends (curvature): {worst['value']:.1e} "
            f"({worst['quantity']})"
        )
    return "\n".join(text)


def _problem_section(problem: Problem, optimal_objective: float) -> dict:
    return {
        "seed": problem.seed,
        "D": D,
        "K": K,
        "N": N,
        "N_test": N_TEST,
        "penalties": problem.penalties.tolist(),
        "variances": problem.variances.tolist(),
        "optimal_objective": optimal_objective,
    }


def _describe(problem: Problem, dtype: str, names: Sequence[str]) -> str:
    variances = ", ".join(f"{v:.3f}" for v in problem.variances)
    penalties = ", ".join(f"{p:g}" for p in problem.penalties)
    return (
        f"Regularised linear autoencoder (lecture 2): D={D}, K={K}, N={N}, seed {problem.seed}, "
        f"{dtype}\n  top variances s^2 = [{variances}], penalties Lambda = [{penalties}]\n"
        f"  backends: {', '.join(names)}"
    )


def _summary(name: str, report: dict) -> str:
    training, rq = report["training"], report["rayleigh_quotients"]
    trained = "trained in" if training["converged"] else "NOT converged after"
    return (
        f"{name}: {trained} {training['steps']} steps (|grad| {training['gradient_norm']:.1e}, "
        f"{training['distance_to_closed_form']:.1e} from the closed form); curvature along "
        f"scaling {rq['scaling']:.4f}, rotation {rq['rotation']:.3e}, ratio {rq['ratio']:.0f}; "
        f"{report['timings_s']['total']:.1f} s"
    )
