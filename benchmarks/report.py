"""Tables, targets and a chart from a ``results.json`` of ``python -m benchmarks``.

``python -m benchmarks.report DIR`` rewrites ``DIR/results.md`` and
``DIR/results.png`` from ``DIR/results.json``.

Ratios ``×grad`` divide by the same framework's loss+gradient, timed in the
same run by the hand-written contender (``raw-torch`` for ``ours-torch`` and
``cfp``, ``raw-jax`` for ``ours-jax``). The targets are those of issues 2, 6 and 13
(KFAC).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["markdown", "target_rows", "write_chart", "write_reports"]

ORDER = ("ours-torch", "raw-torch", "cfp", "ours-jax", "raw-jax")
SHORT = {
    "ours-torch": "ours torch",
    "raw-torch": "torch.func",
    "cfp": "cfp 3.0.1",
    "ours-jax": "ours JAX",
    "raw-jax": "JAX jit",
}
OP_LABELS = {
    "grad": "loss+gradient",
    "hvp": "H@v",
    "ggnvp": "G@v",
    "jvp": "J@v",
    "vjp": "Jᵀ@u",
    "matmat16": "H@V (K=16)",
    "eigsh5": "eigsh(H, k=5)",
    "trace100": "Hutchinson tr(H), 100",
    "cg": "CG (G+λI) to 1e-6",
    "kfac_mc": "KFAC factors, MC",
    "kfac_ef": "KFAC factors, empirical",
    "kfac_type2": "KFAC factors, type-2",
    "ekfac": "EKFAC factors + correction",
    "kfac_mv": "KFAC@v",
    "ekfac_mv": "EKFAC@v",
    "kfac_inv": "(KFAC+λ)⁻¹@v",
    "ekfac_inv": "(EKFAC+λ)⁻¹@v",
}
KFAC_FACTORS = ("kfac_mc", "kfac_ef", "kfac_type2", "ekfac")
KFAC_PRODUCTS = ("kfac_mv", "ekfac_mv", "kfac_inv", "ekfac_inv")
PRODUCTS = ("hvp", "ggnvp", "jvp", "vjp")


class Results:
    """Look-ups over the records of one run."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.meta = data["meta"]
        self.ok = {
            (r["problem"], r["op"], r["contender"]): r
            for r in data["results"]
            if r.get("status") == "ok"
        }
        self.problems = list(data["problems"])
        present = {r["contender"] for r in data["results"]}
        self.contenders = [k for k in ORDER if k in present]

    def median(self, problem: str, op: str, key: str) -> float | None:
        rec = self.ok.get((problem, op, key))
        return None if rec is None else rec["median"]

    def unit(self, problem: str, key: str) -> float | None:
        """The same framework's loss+gradient time (hand-written, else this contender's)."""
        raw = "raw-jax" if key.endswith("jax") else "raw-torch"
        return self.median(problem, "grad", raw) or self.median(problem, "grad", key)

    def over_grad(self, problem: str, op: str, key: str) -> float | None:
        t, unit = self.median(problem, op, key), self.unit(problem, key)
        return None if t is None or not unit else t / unit

    def ratio(self, problem: str, op: str, a: str, b: str) -> float | None:
        """time(a) / time(b)."""
        ta, tb = self.median(problem, op, a), self.median(problem, op, b)
        return None if ta is None or not tb else ta / tb


# --- formatting ----------------------------------------------------------------------------------
def _seconds(t: float) -> str:
    if t >= 1.0:
        return f"{t:.2f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.1f} ms"
    return f"{t * 1e6:.0f} µs"


def _cell(res: Results, problem: str, op: str, key: str) -> str:
    rec = res.ok.get((problem, op, key))
    if rec is None:
        bad = [r for r in res.data["results"]
               if (r["problem"], r["op"], r["contender"]) == (problem, op, key)]  # fmt: skip
        return bad[0]["status"] if bad else "–"
    text = _seconds(rec["median"])
    if op in ("eigsh5", "cg"):
        text += f", {rec['products']} products"
        if op == "cg" and rec.get("info", 0) != 0:
            text += " (not converged)"
        return text
    if op == "trace100":
        return text
    ratio = res.over_grad(problem, op, key)
    return text if ratio is None else f"{text} ({ratio:.2f}×)"


def _header(res: Results) -> list[str]:
    meta = res.meta
    m, args, versions = meta["machine"], meta["args"], meta["versions"]
    threads = meta.get("threads", {})
    pools = ", ".join(
        f"{p['internal_api']} {p['prefix']} {p['num_threads']}"
        for p in threads.get("threadpools") or []
    )
    absent = "; ".join(f"{k}: {v}" for k, v in meta.get("absent", {}).items()) or "none"
    load = m.get("loadavg") or []
    load_end = m.get("loadavg_end") or []
    lines = [
        f"Run of {meta['date']} on {m['cpu_model']} ({m['cpu_affinity']} usable CPUs of "
        f"{m['cpu_count']}, {m['memory_gib']} GiB), {m['platform']}.",
        "",
        f"- {args['dtype']}, device {args['device']}, {args['repeats']} timed calls per product "
        f"(median, after 2 warm-up calls), {args['algo_repeats']} run(s) per algorithm"
        f"{', quick sizes' if args['quick'] else ''}; whole run {meta.get('seconds', 0):.0f} s.",
        f"- Threads: torch {threads.get('torch_num_threads', '–')} (interop "
        f"{threads.get('torch_num_interop_threads', '–')}); XLA one per usable CPU; "
        f"pools: {pools or '–'}.",
        f"- Load average (1, 5, 15 min) at start {_load(load)}, at end {_load(load_end)}.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- Absent contenders: {absent}.",
        "- Times are medians; in brackets the ratio to the same framework's loss+gradient "
        "(hand-written: torch.func `grad_and_value`, `jax.jit(jax.value_and_grad)`).",
    ]
    return lines


def _load(values: list) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "–"


def _time_tables(res: Results) -> list[str]:
    lines = []
    cols = res.contenders
    for problem in res.problems:
        info = res.data["problems"][problem]
        lines += [
            "",
            f"### {problem}: {info['description']} ({info['num_params']:,} parameters)",
            "",
            "| operation | " + " | ".join(SHORT[k] for k in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        ran = {r["op"] for r in res.data["results"] if r["problem"] == problem}
        ops = [op for op in OP_LABELS if op in ran]
        for op in ops:
            cells = [_cell(res, problem, op, k) for k in cols]
            lines.append(f"| {OP_LABELS[op]} | " + " | ".join(cells) + " |")
        if any(op in ops for op in (*KFAC_FACTORS, *KFAC_PRODUCTS)):
            lines += ["", _kfac_scope(info)]
    return lines


def _kfac_scope(info: dict) -> str:
    """Which parameters the KFAC rows approximate."""
    n, total = info.get("kfac_num_params", info["num_params"]), info["num_params"]
    note = info.get("kfac_note") or "all parameters (every layer is Linear or Conv2d)"
    return (
        f"KFAC rows: {note} ({n:,} of {total:,} parameters); products and inverses use "
        "the empirical factors, EKFAC the empirical Fisher."
    )


def _detail_tables(res: Results) -> list[str]:
    cols = res.contenders
    lines = [
        "",
        "### eigsh end to end against its products",
        "",
        "| problem | contender | eigsh | products | H@v (native) | eigsh / (products × H@v) | "
        "scipy-path matvec after eigsh |",
        "|---|---|---|---|---|---|---|",
    ]
    for problem in res.problems:
        for key in cols:
            rec = res.ok.get((problem, "eigsh5", key))
            if rec is None:
                continue
            ratio = _eigsh_ratio(res, problem, key)
            host = _seconds(rec["host_matvec"]) if "host_matvec" in rec else "–"
            lines.append(
                f"| {problem} | {SHORT[key]} | {_seconds(rec['median'])} | {rec['products']} | "
                f"{_seconds(res.median(problem, 'hvp', key) or 0)} | "
                f"{'–' if ratio is None else f'{ratio:.2f}'} | {host} |"
            )
    lines += ["", "### Peak memory growth (MiB, RSS) and first-call time", "",
              "| problem | operation | " + " | ".join(SHORT[k] for k in cols) + " |",
              "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for problem in res.problems:
        for op in OP_LABELS:
            recs = [res.ok.get((problem, op, k)) for k in cols]
            if not any(recs):
                continue
            cells = []
            for rec in recs:
                if rec is None:
                    cells.append("–")
                    continue
                mem = "–" if rec.get("peak_mib") is None else f"{rec['peak_mib']:.0f}"
                first = f", first {_seconds(rec['first'])}" if "first" in rec else ""
                cells.append(mem + first)
            lines.append(f"| {problem} | {OP_LABELS[op]} | " + " | ".join(cells) + " |")
    lines += _compile_table(res)
    trace = {r.get("method") for r in res.data["results"]
             if r["op"] == "trace100" and r.get("status") == "ok"}  # fmt: skip
    if trace:
        lines += ["", "Trace methods: " + "; ".join(sorted(m for m in trace if m)) + "."]
    return lines


def _eigsh_ratio(res: Results, problem: str, key: str) -> float | None:
    """eigsh time over (its number of products × the contender's median H@v time)."""
    rec, hvp = res.ok.get((problem, "eigsh5", key)), res.median(problem, "hvp", key)
    if rec is None or not hvp:
        return None
    return rec["median"] / (rec["products"] * hvp)


def _compile_table(res: Results) -> list[str]:
    """XLA compilations of this library's JAX KFAC operations: first call, timed calls, new
    operator of the same configuration (with its time)."""
    rows = []
    for problem in res.problems:
        for op in (*KFAC_FACTORS, *KFAC_PRODUCTS):
            rec = res.ok.get((problem, op, "ours-jax"))
            if rec is None or "compiles_first" not in rec:
                continue
            fresh = rec.get("compiles_fresh_operator")
            fresh_time = _seconds(rec["fresh_operator"]) if "fresh_operator" in rec else "–"
            first = _seconds(rec["first"]) if "first" in rec else "–"
            rows.append(f"| {problem} | {OP_LABELS[op]} | {rec['compiles_first']} | "
                        f"{rec.get('compiles_timed', '–')} | {'–' if fresh is None else fresh} | "
                        f"{first} | {fresh_time} |")  # fmt: skip
    if not rows:
        return []
    return ["", "### KFAC, JAX: XLA compilations (ours)", "",
            "| problem | operation | first call | timed calls | new operator, same "
            "configuration | first call time | new operator time |",
            "|---|---|---|---|---|---|---|", *rows]  # fmt: skip


# --- targets -------------------------------------------------------------------------------------
def _target(name: str, problem: str, measured: float | None, bar: float, at_most: bool) -> dict:
    if measured is None:
        return {"target": name, "problem": problem, "measured": None, "bar": bar,
                "at_most": at_most, "met": None, "margin": None}  # fmt: skip
    met = measured <= bar if at_most else measured >= bar
    if bar == 0:  # a count that should be zero: the margin is the count
        margin = float(measured)
    else:
        margin = (measured / bar - 1.0) if at_most else (bar / measured - 1.0)
    return {"target": name, "problem": problem, "measured": measured, "bar": bar,
            "at_most": at_most, "met": bool(met), "margin": margin}  # fmt: skip


def target_rows(res: Results) -> list[dict]:
    """Every target of issues 2 and 6 that the run can judge, per problem."""
    rows = []
    for p in res.problems:
        rows += [
            _target("H@v ≤ 2.3× gradient (PyTorch)", p, res.over_grad(p, "hvp", "ours-torch"),
                    2.3, True),
            _target("H@v ≤ 1.7× gradient (JAX)", p, res.over_grad(p, "hvp", "ours-jax"), 1.7,
                    True),
            _target("G@v ≤ 2.0× gradient (PyTorch)", p, res.over_grad(p, "ggnvp", "ours-torch"),
                    2.0, True),
            _target("G@v ≤ 1.6× gradient (JAX)", p, res.over_grad(p, "ggnvp", "ours-jax"), 1.6,
                    True),
        ]  # fmt: skip
        for op, bar in (("hvp", 1.25), ("ggnvp", 1.25), ("matmat16", 1.3), ("eigsh5", 2.0)):
            rows.append(_target(f"{OP_LABELS[op]} ≥ {bar}× faster than cfp", p,
                                res.ratio(p, op, "cfp", "ours-torch"), bar, False))  # fmt: skip
        for fw, ours, raw in (("PyTorch", "ours-torch", "raw-torch"),
                              ("JAX", "ours-jax", "raw-jax")):  # fmt: skip
            for op in PRODUCTS:
                rows.append(_target(f"{OP_LABELS[op]} ≤ 1.10× hand-written ({fw})", p,
                                    res.ratio(p, op, ours, raw), 1.10, True))  # fmt: skip
        for fw, key in (("PyTorch", "ours-torch"), ("JAX", "ours-jax")):
            t16, t1 = res.median(p, "matmat16", key), res.median(p, "hvp", key)
            rows.append(_target(f"H@V K=16 ≤ 0.7× 16 matvecs ({fw})", p,
                                t16 / (16 * t1) if t16 and t1 else None, 0.7, True))  # fmt: skip
            rows.append(_target(f"eigsh end-to-end ≤ 1.2× products × H@v ({fw})", p,
                                _eigsh_ratio(res, p, key), 1.2, True))  # fmt: skip
        rows += _kfac_target_rows(res, p)
    return [r for r in rows if r["measured"] is not None]


def _kfac_target_rows(res: Results, p: str) -> list[dict]:
    """Issue 13: factors against cfp and the gradient, K@v against G@v, JAX compilations."""
    rows = []
    for fw, key in (("PyTorch", "ours-torch"), ("JAX", "ours-jax")):
        for op in KFAC_FACTORS:
            rows.append(_target(f"{OP_LABELS[op]} ≤ 1.5× cfp ({fw})", p,
                                res.ratio(p, op, key, "cfp"), 1.5, True))  # fmt: skip
        for op in ("kfac_mc", "kfac_ef"):
            rows.append(_target(f"{OP_LABELS[op]} ≤ 2.5× gradient ({fw})", p,
                                res.over_grad(p, op, key), 2.5, True))  # fmt: skip
        if p == "mlp":
            rows.append(_target(f"KFAC@v ≤ 0.25× G@v ({fw})", p,
                                _over(res, p, "kfac_mv", "ggnvp", key), 0.25, True))  # fmt: skip
    for op in KFAC_FACTORS:
        rec = res.ok.get((p, op, "ours-jax"), {})
        rows.append(_target(f"{OP_LABELS[op]}: compilations of a new operator of equal "
                            "configuration = 0 (JAX)", p, rec.get("compiles_fresh_operator"),
                            0, True))  # fmt: skip
        rows.append(_target(f"{OP_LABELS[op]}: compilations in the timed calls = 0 (JAX)", p,
                            rec.get("compiles_timed"), 0, True))  # fmt: skip
    return rows


def _over(res: Results, p: str, op: str, other: str, key: str) -> float | None:
    """time(op) / time(other), one contender."""
    t, u = res.median(p, op, key), res.median(p, other, key)
    return None if t is None or not u else t / u


def _target_table(res: Results) -> list[str]:
    lines = ["", "### Targets (issues 2, 6 and 13)", "",
             "| target | problem | measured | status |", "|---|---|---|---|"]  # fmt: skip
    for r in target_rows(res):
        if r["met"]:
            status = "met"
        elif r["bar"] == 0:
            status = "**missed**"
        else:
            status = f"**missed** by {100 * r['margin']:.0f}%"
        measured = f"{r['measured']:.0f}" if r["bar"] == 0 else f"{r['measured']:.2f}"
        lines.append(f"| {r['target']} | {r['problem']} | {measured} | {status} |")
    return lines


def _agreement_lines(res: Results) -> list[str]:
    rows = res.data.get("agreement", [])
    if not rows:
        return []
    bad = [r for r in rows if not r["ok"]]
    worst = max(rows, key=lambda r: r["error"] / r["tol"])
    lines = [
        "",
        f"Cross-contender agreement: {len(rows) - len(bad)} of {len(rows)} comparisons within "
        f"tolerance (worst: {worst['problem']}/{worst['op']} {worst['contender']} vs "
        f"{worst['reference']}, {worst['error']:.1e} against {worst['tol']:.0e}).",
    ]
    for r in bad:
        lines.append(f"- DISAGREE {r['problem']}/{r['op']}: {r['contender']} vs {r['reference']}, "
                     f"{r['error']:.2e} > {r['tol']:.0e}")  # fmt: skip
    return lines


def markdown(data: dict) -> str:
    """The report as Markdown: set-up, times and ratios, details, targets, agreement."""
    res = Results(data)
    lines = ["## Benchmark results", "", *_header(res), *_time_tables(res), *_target_table(res),
             *_detail_tables(res), *_agreement_lines(res)]  # fmt: skip
    return "\n".join(lines) + "\n"


# --- chart ---------------------------------------------------------------------------------------
def write_chart(data: dict, path: Path) -> bool:
    """Bars of the product ratios to the gradient, and algorithm seconds, per problem."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    res = Results(data)
    n = max(len(res.problems), 1)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 7.5), squeeze=False)
    product_ops = [*PRODUCTS, "matmat16"]
    algo_ops = ["eigsh5", "trace100", "cg"]
    width = 0.8 / max(len(res.contenders), 1)
    for j, problem in enumerate(res.problems):
        for row, ops, value, label in (
            (0, product_ops, res.over_grad, "time / loss+gradient"),
            (1, algo_ops, res.median, "seconds"),
        ):
            ax = axes[row][j]
            positive = False
            for i, key in enumerate(res.contenders):
                heights = [value(problem, op, key) or 0.0 for op in ops]
                positive = positive or any(h > 0 for h in heights)
                xs = [x + (i - (len(res.contenders) - 1) / 2) * width for x in range(len(ops))]
                ax.bar(xs, heights, width, label=SHORT[key])
            ax.set_xticks(range(len(ops)), [OP_LABELS[op] for op in ops], rotation=20,
                          fontsize=8)  # fmt: skip
            ax.set_ylabel(label)
            if positive:
                ax.set_yscale("log")
            ax.set_title(f"{problem}: {'products' if row == 0 else 'algorithms'}", fontsize=10)
    axes[0][0].legend(fontsize=8)
    meta = res.meta
    fig.suptitle(f"curvlinops benchmark, {meta['date']}, {meta['args']['dtype']}, "
                 f"{meta['machine']['cpu_affinity']} CPUs", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(data: dict, out: Path) -> None:
    """``results.md`` and ``results.png`` in ``out``."""
    (out / "results.md").write_text(markdown(data))
    write_chart(data, out / "results.png")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report DIR  (DIR holds results.json)")
        return 2
    out = Path(argv[0])
    write_reports(json.loads((out / "results.json").read_text()), out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
