"""H@v and G@v of this library against each framework's hand-written products: MLX, PyTorch, JAX.

One framework per process (``--framework``): this library's operator and the
framework's own hand-written product are timed round-robin in that process,
on the benchmark MLP (``benchmarks/problems.py``, the same weights and data in
every framework), with framework arrays in and out. The ratio ours / by hand
is what the table reports; ``--table FILE...`` joins the processes' JSON
lines into one markdown table.

MLX by hand: ``mx.compile``'d functions of the parameters, data and a flat
vector: the Hessian product forward-over-reverse (``mx.jvp`` of ``mx.grad``)
and reverse-over-reverse (``mx.vjp`` of ``mx.grad``; the faster of the two is
the floor), the GGN product as ``mx.jvp`` of the model, the closed-form
cross-entropy Hessian, and ``mx.vjp`` of the model. PyTorch and JAX by hand:
``raw-torch``/``raw-jax`` of ``benchmarks/contenders.py``.

Usage::

    flock /tmp/bench.lock taskset -c 1 python -m benchmarks.bench_mlx --framework mlx \\
        --json out/mlx.json
    python -m benchmarks.bench_mlx --table out/mlx.json out/torch.json out/jax.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.problems import Problem, make_problem

OPERATIONS = ("hvp", "ggnvp")


# --- MLX ------------------------------------------------------------------------------------
def _mlx_contenders(problem: Problem) -> tuple[dict, Callable, Callable]:
    """``{name: {op: v -> Hv}}`` for ours-mlx and by hand, MLX's input and sync functions."""
    import mlx.core as mx
    import mlx.nn as nn

    import curvlinops as cl

    params = [mx.array(w) for w in problem.weights]
    X, y = mx.array(problem.X), mx.array(problem.y.astype(np.int32))
    shapes = [tuple(w.shape) for w in problem.weights]
    splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1].tolist()

    def forward(ps: list, X: Any) -> Any:
        h = X
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i + 2 < len(ps):
                h = mx.tanh(h)
        return h

    def loss(ps: list, X: Any, y: Any) -> Any:
        return nn.losses.cross_entropy(forward(ps, X), y, reduction="mean")

    def unflatten(v: Any) -> list:
        return [p.reshape(s) for p, s in zip(mx.split(v, splits), shapes)]

    def flatten(ts: list) -> Any:
        return mx.concatenate([t.reshape(-1) for t in ts])

    def gradient(ps: list, X: Any, y: Any) -> Callable:
        return mx.grad(lambda *p: loss(list(p), X, y), argnums=list(range(len(ps))))

    def hvp_forward_over_reverse(ps: list, X: Any, y: Any, v: Any) -> Any:
        g = gradient(ps, X, y)
        return flatten(mx.jvp(lambda *p: list(g(*p)), ps, unflatten(v))[1])

    def hvp_reverse_over_reverse(ps: list, X: Any, y: Any, v: Any) -> Any:
        g = gradient(ps, X, y)
        return flatten(mx.vjp(lambda *p: list(g(*p)), ps, unflatten(v))[1])

    def ggnvp(ps: list, X: Any, y: Any, v: Any) -> Any:
        def f(*p: Any) -> Any:
            return forward(list(p), X)

        z, Jv = mx.jvp(f, ps, unflatten(v))
        probs = mx.softmax(z[0], axis=-1)
        HJv = (probs * Jv[0] - probs * mx.sum(probs * Jv[0], -1, keepdims=True)) / z[0].shape[0]
        return flatten(mx.vjp(f, ps, [HJv])[1])

    fwd_rev, rev_rev, ggn = (
        mx.compile(f) for f in (hvp_forward_over_reverse, hvp_reverse_over_reverse, ggnvp)
    )
    args = (forward, cl.losses.CrossEntropyLoss("mean"), params, [(X, y)])
    H = cl.HessianLinearOperator(*args, check_deterministic=False)
    G = cl.GGNLinearOperator(*args, check_deterministic=False)
    contenders = {
        "ours": {"hvp": lambda v: H @ v, "ggnvp": lambda v: G @ v},
        "by hand": {
            "hvp": lambda v: fwd_rev(params, X, y, v),
            "ggnvp": lambda v: ggn(params, X, y, v),
        },
        "by hand (rev-rev)": {"hvp": lambda v: rev_rev(params, X, y, v)},
    }  # fmt: skip

    def sync(a: Any) -> Any:
        mx.eval(a)
        return a

    return contenders, (lambda a: mx.array(a)), sync


# --- PyTorch and JAX: the contenders of benchmarks/contenders.py ------------------------------
def _contenders_of(framework: str, problem: Problem) -> tuple[dict, Callable, Callable]:
    from benchmarks.contenders import make_setup

    ours = make_setup(f"ours-{framework}", problem)
    raw = make_setup(f"raw-{framework}", problem)
    contenders = {
        "ours": {op: ours.products[op] for op in OPERATIONS},
        "by hand": {op: raw.products[op] for op in OPERATIONS},
    }
    return contenders, ours.native, ours.sync


# --- timing -------------------------------------------------------------------------------------
def measure(framework: str, problem: Problem, repeats: int) -> dict:
    """Median seconds per product of every contender, timed round-robin."""
    if framework == "mlx":
        contenders, native, sync = _mlx_contenders(problem)
    else:
        contenders, native, sync = _contenders_of(framework, problem)
    v = native(np.random.default_rng(1).standard_normal(problem.num_params).astype(problem.dtype))
    results: dict = {}
    for op in OPERATIONS:
        calls = {name: ops[op] for name, ops in contenders.items() if op in ops}
        outputs = {name: np.asarray(sync(call(v))) for name, call in calls.items()}  # compile
        _check_agreement(op, outputs)
        for call in calls.values():
            sync(call(v))
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                sync(call(v))
                samples[name].append(time.perf_counter() - start)
        results[op] = {name: statistics.median(s) for name, s in samples.items()}
    return results


def _check_agreement(op: str, outputs: dict) -> None:
    reference = outputs["by hand"]
    scale = float(np.abs(reference).max())
    for name, out in outputs.items():
        error = float(np.abs(np.asarray(out, dtype=np.float64) - reference).max())
        if error > 2e-3 * scale:
            raise RuntimeError(
                f"{op}: {name} differs from by hand by {error:.3g} (max {scale:.3g})"
            )


def table(rows: list[dict]) -> str:
    """One markdown table: per framework, ours and by hand, and their ratio, per product."""
    columns = ["H@v ours (ms)", "by hand (ms)", "ratio", "G@v ours (ms)", "by hand (ms)", "ratio"]
    header = "| framework | " + " | ".join(columns) + " |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        cells = [row["framework"]]
        for op in OPERATIONS:
            times = row["results"][op]
            floor = min(t for name, t in times.items() if name.startswith("by hand"))
            cells += [
                f"{1e3 * times['ours']:.2f}",
                f"{1e3 * floor:.2f}",
                f"{times['ours'] / floor:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"{row['framework']}: H@v by hand fwd-rev {1e3 * row['results']['hvp']['by hand']:.2f} ms, "
        f"rev-rev {1e3 * row['results']['hvp']['by hand (rev-rev)']:.2f} ms"
        for row in rows
        if "by hand (rev-rev)" in row["results"]["hvp"]
    ]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("mlx", "torch", "jax"))
    parser.add_argument("--problem", default="mlp")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the small problem, for a smoke test")
    parser.add_argument("--json", help="append the result as one JSON line to this file")
    parser.add_argument("--table", nargs="+", help="JSON files to join into one table")
    args = parser.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for path in args.table for line in open(path) if line.strip()]
        print(table(rows))
        return
    if args.framework == "torch":
        import torch

        torch.set_num_threads(1)
    problem = make_problem(args.problem, quick=args.quick)
    row = {
        "framework": args.framework,
        "problem": problem.description,
        "repeats": args.repeats,
        "load": os.getloadavg()[0],
        "results": measure(args.framework, problem, args.repeats),
    }
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
