"""The top-5 task's PyTorch contenders in one process, in turns: ratios that drift cannot move.

``python -m benchmarks --tasks`` runs each contender in a process of its own, as
issue 25 asks. On a shared 2-core machine the same run then moved by up to 50 %
from one process to the next (hessian-eigenthings' transformer top-5: 9.2 s, then
6.2-7.2 s), and even the gradient each process measures for its unit moved by 30 %.
Here the contenders of :data:`benchmarks.tasks.TASKS` ``"eigsh5-1e-3"`` that run
in PyTorch share one process and one thread, each run in turn with a gradient
between them, at the settings the ladder of ``--tasks`` chose (arguments), so
that a slow minute slows all of them alike. Prints a Markdown table.

Run: ``taskset -c 1 python -m benchmarks.eigsh_alternating mlp --ours-tol 0.003
--he-steps 100 --cfp-tol 0.003 [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

K = 5


def contenders(problem_name: str, args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """The runs to time, by name (each returns its eigenvalues), plus ``"gradient"``."""
    import hessian_eigenthings as he
    import scipy.sparse.linalg
    import torch

    import curvlinops as cl
    from benchmarks.contenders import load_cfp
    from benchmarks.problems import make_problem

    torch.set_num_threads(1)
    problem = make_problem(problem_name, dtype="float32", quick=args.quick)
    fp = problem.torch()
    X, y = fp.data[0]
    ours = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
    theirs = he.HessianOperator(fp.model_func, fp.data, he.supervised_loss(fp.loss_func))
    cfp = load_cfp().HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data,
                                           check_deterministic=False).to_scipy()  # fmt: skip
    v0 = np.random.default_rng(0).standard_normal(problem.num_params)

    def gradient() -> None:
        for p in fp.params:
            p.grad = None
        fp.loss_func(fp.forward(fp.params, X), y).backward()

    return {
        f"ours (tol={args.ours_tol:g})": lambda: cl.eigsh(
            ours, k=K, which="LA", tol=args.ours_tol, return_eigenvectors=False
        ).numpy(),
        f"hessian-eigenthings (max_iter={args.he_steps})": lambda: (
            he.lanczos(
                theirs, k=K, max_iter=args.he_steps, which="LA", seed=0, reorthogonalize=True
            )
            .eigenvalues.detach()
            .numpy()
        ),
        f"cfp + ARPACK (tol={args.cfp_tol:g})": lambda: scipy.sparse.linalg.eigsh(
            cfp, k=K, which="LA", tol=args.cfp_tol, v0=v0, return_eigenvectors=False
        ),
        "gradient": gradient,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=("mlp", "cnn", "transformer"))
    parser.add_argument("--ours-tol", type=float, required=True)
    parser.add_argument("--he-steps", type=int, required=True)
    parser.add_argument("--cfp-tol", type=float, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the small problem sizes (a check)")
    args = parser.parse_args(argv)
    runs = contenders(args.problem, args)
    values = {name: run() for name, run in runs.items()}  # also the warm-up
    ours = next(name for name in runs if name.startswith("ours"))
    mine = np.sort(np.asarray(values[ours], np.float64))
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(3 if name == "gradient" else 1):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(f"| {args.problem} | contender | seconds (median of {args.rounds}) | runs | gradients "
          "| ours faster by | largest rel. difference to ours |\n"
          "|---|---|---:|---|---:|---:|---:|")  # fmt: skip
    for name in runs:
        if name == "gradient":
            continue
        each = ", ".join(f"{s:.2f}" for s in seconds[name])
        theirs = np.sort(np.asarray(values[name], np.float64))
        difference = float(np.max(np.abs(theirs - mine) / np.abs(mine)))
        print(f"| | {name} | {median[name]:.2f} | {each} | {median[name] / median['gradient']:.0f} "
              f"| {median[name] / median[ours]:.2f} | {difference:.1e} |")  # fmt: skip
    print(f"| | gradient | {median['gradient'] * 1e3:.1f} ms | | 1 | | |")


if __name__ == "__main__":
    main()
