"""Repeated products at fixed parameters: kept linearizations against recomputation (issue 15).

For each problem (``benchmarks/problems.py``: MLP, CNN, transformer; float32,
CPU, a fixed number of threads) and framework, the Hessian and GGN operators
with ``cache=False`` (every product recomputes the forward pass and the
gradient's graph) and with the default ``cache="auto"`` (each batch's
linearization is built by the first product and kept):

* ``grad``: one loss and gradient of the same framework (the unit);
* ``product``: ``A @ v`` alone, with a framework vector, after warm-up, and
  (kept only) with a numpy vector, the way scipy's solvers ask (conversions,
  the BLAS guard of ``curvlinops/_blas_guard.py``);
* ``in eigsh``: time per product inside ``scipy.sparse.linalg.eigsh(A, k=5,
  which="LA", tol=1e-4)`` (the solve's time over its number of products;
  ARPACK's own work included), and the solve end to end;
* ``by hand``: ``H v`` through a linearization kept by hand in the framework
  alone (:func:`_handwritten_kept_hvp`), the floor of a kept Hessian product;
* ``ours``: the same per-product time inside this library's own
  ``curvlinops.eigsh`` (thick-restart Lanczos in the framework; kept only);
* ``ARPACK alone``: scipy's ``eigsh`` on a diagonal operator of the same size
  (a product costs nothing), in the same number of products: the solver's own
  work per product, the floor that ``in eigsh`` cannot go below;
* ``first``: the product that builds the linearization (after ``clear_cache``);
  the break-even number of products is ``(first - kept) / (recomputed - kept)``
  plus one: from there on, keeping paid for its building;
* memory: bytes kept (``cache_info``) and the peak RSS growth of the solve.

All contenders of a problem run interleaved, round after round, in one
process; the table gives medians of ratios to ``grad`` taken in the same
round, so that background load hits them alike. The load average is printed.

Run: ``.venv/bin/python -m benchmarks.bench_reuse [--problems mlp cnn transformer]
[--frameworks torch jax] [--rounds 5] [--threads 2] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

K, TOL = 5, 1e-4


def _native_gradient(fp: Any) -> Callable[[], Any]:
    """One loss and gradient on the problem's batch, in its framework (no curvlinops)."""
    X, y = fp.data[0]
    if fp.framework == "torch":
        import torch
        from torch.func import functional_call

        names = [n for n, _ in fp.model_func.named_parameters()]
        leaves = [p.detach().requires_grad_(True) for p in fp.params]

        def torch_grad() -> Any:
            z = functional_call(fp.model_func, dict(zip(names, leaves)), (X,))
            return torch.autograd.grad(fp.loss_func(z, y), leaves)

        return torch_grad
    import jax
    import jax.numpy as jnp

    def loss(params: Any, X: Any, y: Any) -> Any:  # the problems' mean cross-entropy
        z = fp.model_func(params, X)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    @jax.jit
    def jax_grad(params: Any, X: Any, y: Any) -> Any:
        return jax.grad(loss)(params, X, y)

    return lambda: jax.block_until_ready(jax_grad(fp.params, X, y))


def _handwritten_kept_hvp(fp: Any) -> Callable[[], Any]:
    """``H v`` through a linearization built once by hand, in the framework alone.

    PyTorch: the gradient's graph (``create_graph=True``) kept, one backward pass
    through it per product; JAX: ``jax.linearize`` of ``jax.grad``, its linear
    function jitted. The floor a kept product of ours can approach.
    """
    X, y = fp.data[0]
    if fp.framework == "torch":
        import torch
        from torch.func import functional_call

        names = [n for n, _ in fp.model_func.named_parameters()]
        leaves = [p.detach().requires_grad_(True) for p in fp.params]
        z = functional_call(fp.model_func, dict(zip(names, leaves)), (X,))
        g = torch.autograd.grad(fp.loss_func(z, y), leaves, create_graph=True)
        vs = [torch.randn_like(p) for p in leaves]
        return lambda: torch.autograd.grad(g, leaves, vs, retain_graph=True)
    import jax
    import jax.numpy as jnp

    def loss(params: Any) -> Any:
        z = fp.model_func(params, X)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    _, linear = jax.linearize(jax.grad(loss), fp.params)
    linear = jax.jit(linear)
    tangent = jax.tree_util.tree_map(jnp.ones_like, fp.params)
    return lambda: jax.block_until_ready(linear(tangent))


def _operators(fp: Any, kinds: list[str]) -> dict[str, Any]:
    import curvlinops as cl

    classes = {"H": cl.HessianLinearOperator, "G": cl.GGNLinearOperator}
    args = (fp.model_func, fp.loss_func, fp.params, fp.data)
    return {
        f"{kind} {label}": classes[kind](*args, cache=cache, check_deterministic=False)
        for kind in kinds
        for label, cache in (("recomputed", False), ("kept", "auto"))
    }


def _count_products(op: Any) -> list[int]:
    """Count the columns through ``op`` (patches this instance only)."""
    counter = [0]
    native, native_vector = op._native, op._native_vector

    def counted(X: Any, adjoint: bool) -> Any:
        counter[0] += X.shape[1]
        return native(X, adjoint)

    def counted_vector(x: Any, adjoint: bool) -> Any:
        counter[0] += 1
        return native_vector(x, adjoint)

    op._native, op._native_vector = counted, counted_vector
    return counter


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn: Callable[[], Any], calls: int = 7) -> float:
    """Median of ``calls`` timings: one product is too short to time once."""
    return statistics.median(_timed(fn) for _ in range(calls))


def run_problem(name: str, framework: str, rounds: int, quick: bool, memory: bool) -> list[dict]:
    """Rows of the table for one problem and framework."""
    import scipy.sparse.linalg

    from benchmarks.measure import MemoryProbe
    from benchmarks.problems import make_problem

    problem = make_problem(name, quick=quick)
    fp = problem.torch() if framework == "torch" else problem.jax()
    gradient = _native_gradient(fp)
    handwritten = _handwritten_kept_hvp(fp)
    ops = _operators(fp, ["H", "G"])
    counters = {label: _count_products(op) for label, op in ops.items()}
    b = next(iter(ops.values())).backend
    v = b.random_normal((problem.num_params,), seed=0)
    v_numpy = b.to_numpy(v)

    def product(op: Any, vector: Any = v) -> Callable[[], Any]:
        if vector is v_numpy:  # comes back on the host, computed
            return lambda: op @ vector
        return lambda: b.block_until_ready(op @ vector)

    def solve(op: Any) -> Callable[[], Any]:
        return lambda: scipy.sparse.linalg.eigsh(op, k=K, which="LA", tol=TOL)

    def native_solve(op: Any, **options: Any) -> Callable[[], Any]:
        import curvlinops as cl

        return lambda: cl.eigsh(op, k=K, which="LA", tol=TOL, **options)

    def first(op: Any) -> Callable[[], Any]:
        def build() -> Any:
            op.clear_cache()
            return product(op)()

        return build

    for label, op in ops.items():  # warm-up: compilations, the kept linearizations
        product(op)()
        product(op)()
        if label.endswith("kept"):  # the native solver's compiled steps (JAX)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one restart: not converged
                native_solve(op, maxiter=1)()
    gradient()
    samples: dict[str, list[float]] = {}
    solve_products: dict[str, int] = {}
    for _ in range(rounds):
        unit = min(_timed(gradient) for _ in range(3))
        samples.setdefault("grad", []).append(unit)
        samples.setdefault("handwritten", []).append(_median_time(handwritten) / unit)
        for label, op in ops.items():
            samples.setdefault(f"{label} product", []).append(_median_time(product(op)) / unit)
            if label.endswith("kept"):
                numpy_product = _median_time(product(op, v_numpy)) / unit
                samples.setdefault(f"{label} numpy", []).append(numpy_product)
                samples.setdefault(f"{label} first", []).append(_timed(first(op)) / unit)
            counters[label][0] = 0
            seconds = _timed(solve(op))
            solve_products[label] = counters[label][0]
            samples.setdefault(f"{label} solve", []).append(seconds)
            samples.setdefault(f"{label} in eigsh", []).append(
                seconds / max(1, counters[label][0]) / unit
            )
            if label.endswith("kept"):
                counters[label][0] = 0
                seconds = _timed(native_solve(op))
                samples.setdefault(f"{label} in ours", []).append(
                    seconds / max(1, counters[label][0]) / unit
                )
                floor = _arpack_alone(problem.num_params, solve_products[label])
                samples.setdefault(f"{label} arpack", []).append(floor / unit)
    median = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    probe = MemoryProbe("cpu", framework)
    for kind in ("H", "G"):
        row: dict[str, Any] = {
            "problem": name,
            "framework": framework,
            "op": kind,
            "grad_ms": 1e3 * median["grad"],
        }
        for label in ("recomputed", "kept"):
            key = f"{kind} {label}"
            row[f"{label}_product"] = median[f"{key} product"]
            row[f"{label}_in_eigsh"] = median[f"{key} in eigsh"]
            row[f"{label}_solve_s"] = median[f"{key} solve"]
            row[f"{label}_products"] = solve_products[key]
            if memory:
                ops[key].clear_cache()
                row[f"{label}_peak_mib"] = probe.measure(solve(ops[key]))
        kept = row["kept_product"]
        row["first"] = median[f"{kind} kept first"]
        row["kept_numpy"] = median[f"{kind} kept numpy"]
        row["kept_in_ours"] = median[f"{kind} kept in ours"]
        row["handwritten"] = median["handwritten"] if kind == "H" else None
        row["arpack_alone"] = median[f"{kind} kept arpack"]
        saved = row["recomputed_product"] - kept
        row["break_even"] = 1 + max(0.0, row["first"] - kept) / saved if saved > 0 else None
        row["kept_mib"] = ops[f"{kind} kept"].cache_info()["nbytes"] / 2**20
        rows.append(row)
    return rows


def _arpack_alone(n: int, products: int) -> float:
    """Seconds per product of scipy's ``eigsh`` where products cost nothing.

    A diagonal operator of size ``n`` whose spectrum (five values above a bulk
    with a slowly decaying edge) makes ARPACK restart about as often; the solve is
    stopped after ``products`` products, the number the real solve took.
    """
    import numpy as np
    import scipy.sparse.linalg

    d = np.random.default_rng(0).random(n).astype(np.float32)
    d[:K] += 1.0
    count = [0]

    class Stop(Exception):
        pass

    def matvec(x: Any) -> Any:
        count[0] += 1
        if count[0] > products:
            raise Stop
        return d * x.ravel()

    A = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float32)
    start = time.perf_counter()
    try:
        scipy.sparse.linalg.eigsh(A, k=K, which="LA", tol=1e-30, maxiter=10**6)
    except Stop:
        pass
    return (time.perf_counter() - start) / max(1, min(count[0], products))


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (ratios to one gradient of the same framework)."""
    head = (
        "| problem | fw | op | grad ms | product recomputed / kept (numpy v) | by hand "
        "| in eigsh recomputed / kept | ARPACK alone | in ours (kept) "
        "| eigsh s recomputed / kept (products) | first product | break-even | kept MiB "
        "| eigsh peak MiB recomputed / kept |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        peak = (
            f"{r['recomputed_peak_mib']:.0f} / {r['kept_peak_mib']:.0f}"
            if r.get("kept_peak_mib") is not None
            else "-"
        )
        even = "-" if r["break_even"] is None else f"{r['break_even']:.1f}"
        lines.append(
            f"| {r['problem']} | {r['framework']} | {r['op']} | {r['grad_ms']:.1f} "
            f"| {r['recomputed_product']:.2f} / {r['kept_product']:.2f} ({r['kept_numpy']:.2f}) "
            f"| {'-' if r['handwritten'] is None else format(r['handwritten'], '.2f')} "
            f"| {r['recomputed_in_eigsh']:.2f} / {r['kept_in_eigsh']:.2f} "
            f"| {r['arpack_alone']:.2f} | {r['kept_in_ours']:.2f} "
            f"| {r['recomputed_solve_s']:.2f} / {r['kept_solve_s']:.2f} "
            f"({r['recomputed_products']}/{r['kept_products']}) "
            f"| {r['first']:.2f} | {even} | {r['kept_mib']:.1f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_reuse")
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--frameworks", nargs="+", default=["torch", "jax"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small problems, one round")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    if "torch" in args.frameworks:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for name in args.problems:
        for framework in args.frameworks:
            rows += run_problem(
                name, framework, 1 if args.quick else args.rounds, args.quick, not args.no_memory
            )
            print(format_table(rows[-2:]).split("\n", 2)[-1], flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    table = format_table(rows)
    print(f"\n{table}\n\nload average at the end: {load}, threads {args.threads}")
    return table


if __name__ == "__main__":
    main()
