"""Trace estimation speed (issue 4): 100 probes through matmat vs 100 separate matvecs.

Hessian of the MLP 784-256-256-10, tanh, cross-entropy, batch 1024, float32
(``benchmarks.problems``), on CPU with a fixed thread count, for the PyTorch and
JAX backends. Contenders, each estimating tr(H) from 100 Rademacher probes:

* ``hutchinson_trace``: ``curvlinops.estimators.hutchinson_trace`` (probes in
  blocks of 32 columns, one ``matmat`` per block);
* ``100 x matvec``: a loop drawing one probe at a time and computing ``v @ (H @ v)``;
* ``hutchpp_trace`` and ``xtrace`` with the same budget of 100 products, for reference.

Each timing is taken ``--repeats`` times, interleaved across contenders so that
background load hits them alike, after one warm-up call (JAX compiles there);
the table shows the median and the minimum.

Run: ``.venv/bin/python -m benchmarks.bench_trace [--threads 2] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NUM_PROBES = 100


def contenders(framework: str, quick: bool = False) -> tuple[dict[str, Callable[[], Any]], int]:
    """The timed calls on one backend, and the number of parameters."""
    from benchmarks.problems import make_problem
    from curvlinops import HessianLinearOperator
    from curvlinops.estimators import hutchinson_trace, hutchpp_trace, xtrace

    problem = make_problem("mlp", dtype="float32", quick=quick)
    fp = problem.torch() if framework == "torch" else problem.jax()
    H = HessianLinearOperator(
        fp.model_func, fp.loss_func, fp.params, fp.data, check_deterministic=False
    )
    b, P = H.backend, H.shape[0]

    def separate_matvecs() -> float:
        total = 0.0
        for i in range(NUM_PROBES):
            v = b.random_rademacher((P,), i)
            total += float((v * (H @ v)).sum())
        return total / NUM_PROBES

    calls = {
        "hutchinson_trace (blocks of 32)": lambda: float(hutchinson_trace(H, NUM_PROBES)),
        f"{NUM_PROBES} x matvec": separate_matvecs,
        "hutchpp_trace": lambda: float(hutchpp_trace(H, NUM_PROBES)),
        "xtrace": lambda: float(xtrace(H, NUM_PROBES)),
    }
    return calls, P


def measure(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    for call in calls.values():  # warm-up (JAX compiles each new shape here)
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()  # float(...) waits for the result
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument("--quick", action="store_true", help="small MLP, to check the script")
    args = parser.parse_args()
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    size = "64-32-32-10, batch 64" if args.quick else "784-256-256-10, batch 1024"
    print(
        f"Hessian of MLP {size}, tanh, cross-entropy, float32; "
        f"{NUM_PROBES} products each; {args.threads} threads; median (min) of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| backend | method | seconds | speed-up vs separate matvecs |")
    print("|---|---|---:|---:|")
    for framework in args.backends.split(","):
        if framework == "torch":
            import torch

            torch.set_num_threads(args.threads)
        calls, _ = contenders(framework, args.quick)
        times = measure(calls, args.repeats)
        baseline = statistics.median(times[f"{NUM_PROBES} x matvec"])
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"| {framework} | {name} | {median:.2f} ({min(values):.2f}) | "
                f"{baseline / median:.2f} |"
            )


if __name__ == "__main__":
    main()
