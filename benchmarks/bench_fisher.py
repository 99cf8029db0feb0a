"""Empirical and Monte-Carlo Fisher products against the GGN product (issue 8).

MLP 784-256-256-10, tanh, cross-entropy, batch 1024, float32 (``benchmarks/problems.py``),
on CPU. Rows: matrix-vector products of the GGN, the empirical Fisher (EF),
the Monte-Carlo Fisher with 1 sample (MC-1), and, for comparison, the EF
computed from per-example gradients (``vmap`` of ``grad`` in chunks of 128
examples, written directly in the framework) -- the alternative to the
``Jᵀ (g gᵀ) J`` form the operator uses; then the GGN diagonal (exact and MC-1)
and ``gradient_and_loss`` (one-shot calls: for JAX they include compilation).
Each time is the minimum over repeats of blocks of
calls, interleaved across rows so that background load hits them alike.
Target: EF and MC-1 matvec at most 1.2x the GGN matvec.

Run: ``.venv/bin/python benchmarks/bench_fisher.py [--threads 2] [--repeats 5] [--quick]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.problems import make_problem  # noqa: E402

CHUNK = 128
TARGET = 1.2


def timeit(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def measure(rows: dict[str, Callable], repeats: int, number: int) -> dict[str, float]:
    """Minimum over ``repeats`` of the mean of ``number`` calls (after one warm-up call).

    Rows slower than a second run once per repeat.
    """
    calls = {}
    for name, fn in rows.items():  # warm-up (JAX compiles here)
        calls[name] = number if timeit(fn, 1) < 1.0 else 1
    best = {name: float("inf") for name in rows}
    for repeat in range(repeats):
        for name, fn in rows.items():
            best[name] = min(best[name], timeit(fn, calls[name]))
        print(f"  repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return best


def operators(fp: object, v: object, sync: Callable) -> dict[str, Callable]:
    """The curvlinops rows for one framework problem (``sync`` waits for a result)."""
    from curvlinops import GGNLinearOperator
    from curvlinops.diagonal import GGNDiagonalLinearOperator
    from curvlinops.fisher import EFLinearOperator, FisherMCLinearOperator
    from curvlinops.gradient import gradient_and_loss

    args = (fp.model_func, fp.loss_func, fp.params, fp.data)
    G = GGNLinearOperator(*args)
    EF = EFLinearOperator(*args)
    MC = FisherMCLinearOperator(*args, mc_samples=1, seed=0)
    return {
        "GGN matvec": lambda: sync(G @ v),
        "EF matvec": lambda: sync(EF @ v),
        "MC-Fisher (1 sample) matvec": lambda: sync(MC @ v),
        # the diagonals of existing operators (compiled once per operator)
        "GGN diagonal, exact (G.diagonal())": lambda: sync(G.diagonal()),
        "GGN diagonal, MC-1 (MC.diagonal())": lambda: sync(MC.diagonal()),
        "EF diagonal (EF.diagonal())": lambda: sync(EF.diagonal()),
        # one-shot: builds an operator and, in JAX, compiles on every call
        "GGNDiagonalLinearOperator(...) construction": lambda: sync(
            GGNDiagonalLinearOperator(*args, check_deterministic=False).diagonal()
        ),
        "gradient_and_loss(...)": lambda: sync(gradient_and_loss(*args, flat=True)[0]),
    }


def torch_rows(problem: object, threads: int) -> dict[str, Callable]:
    import torch
    from torch.func import functional_call, grad, vmap

    torch.set_num_threads(threads)
    fp = problem.torch()
    v = torch.randn(problem.num_params, generator=torch.Generator().manual_seed(0))
    rows = operators(fp, v, lambda y: y)
    module, loss_func = fp.model_func, fp.loss_func
    names = [n for n, _ in module.named_parameters()]
    primals = tuple(p.detach() for p in fp.params)
    X, y = fp.data[0]

    def example_loss(p: tuple, x: object, t: object) -> object:
        return loss_func(functional_call(module, dict(zip(names, p)), (x[None],)), t[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def ef_per_example() -> object:
        result = 0.0
        for start in range(0, X.shape[0], CHUNK):
            g = per_example(primals, X[start : start + CHUNK], y[start : start + CHUNK])
            g = torch.cat([gi.reshape(gi.shape[0], -1) for gi in g], dim=1)
            result = result + g.T @ (g @ v)
        return result / X.shape[0]

    rows["EF matvec, per-example gradients (raw)"] = ef_per_example
    return rows


def jax_rows(problem: object) -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp

    fp = problem.jax()
    v = jax.random.normal(jax.random.key(0), (problem.num_params,), dtype=fp.params[0].dtype)
    rows = operators(fp, v, jax.block_until_ready)
    forward, X, y = fp.forward, *fp.data[0]

    def example_loss(p: list, x: object, t: object) -> object:
        logits = forward(p, x[None])[0]
        return -jax.nn.log_softmax(logits)[t]

    @jax.jit
    def chunk_product(p: list, Xc: object, yc: object, v: object) -> object:
        g = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p, Xc, yc)
        g = jnp.concatenate([gi.reshape(gi.shape[0], -1) for gi in g], axis=1)
        return g.T @ (g @ v)

    def ef_per_example() -> object:
        result = sum(
            chunk_product(fp.params, X[s : s + CHUNK], y[s : s + CHUNK], v)
            for s in range(0, X.shape[0], CHUNK)
        )
        return jax.block_until_ready(result / X.shape[0])

    rows["EF matvec, per-example gradients (raw)"] = ef_per_example
    return rows


def table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| backend | operation | time [ms] | / GGN matvec |",
        "|---|---|---:|---:|",
    ]
    for backend, times in results.items():
        ggn = times["GGN matvec"]
        for name, seconds in times.items():
            ratio = seconds / ggn
            mark = ""
            if name in ("EF matvec", "MC-Fisher (1 sample) matvec"):
                mark = " (ok)" if ratio <= TARGET else f" (above {TARGET}x)"
            lines.append(f"| {backend} | {name} | {1e3 * seconds:.2f} | {ratio:.2f}{mark} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=3, help="calls per timed block")
    parser.add_argument("--quick", action="store_true", help="small problem, one repeat")
    parser.add_argument("--backends", nargs="+", default=["torch", "jax"])
    parser.add_argument(
        "--products-only", action="store_true", help="only the matvec rows (fast, more repeats)"
    )
    args = parser.parse_args()
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    problem = make_problem("mlp", quick=args.quick)
    repeats = 1 if args.quick else args.repeats
    results = {}
    for backend in args.backends:
        rows = torch_rows(problem, args.threads) if backend == "torch" else jax_rows(problem)
        if args.products_only:
            rows = {name: fn for name, fn in rows.items() if "matvec" in name}
        results[backend] = measure(rows, repeats, args.number)
    print(f"{problem.description}, float32; P = {problem.num_params}; threads = {args.threads}")
    print(table(results))


if __name__ == "__main__":
    main()
