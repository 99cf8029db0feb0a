"""``python -m benchmarks --tasks``: end-to-end tasks at a stated accuracy, a process each.

A task is what a user runs, judged against a float64 reference: here the top-5
Hessian eigenvalues (largest algebraic) to a relative 1e-3 (float32) and 1e-6
(float64). Each contender runs in a process of its own (1 thread: torch, XLA,
BLAS), with the loosest of its own settings (a ladder: ``tol`` for the solvers
with a residual test, ``max_iter`` for hessian-eigenthings' Lanczos) whose
result meets the accuracy; that setting's warm run is timed. Times are given
in seconds and in gradients of the contender's own framework (loss and
gradient of the whole batch, measured in the same process before and after
the task, so that load on the machine hits both alike).

Contenders: this library in PyTorch and JAX (``curvlinops.eigsh``),
hessian-eigenthings 1.0.0a5 (``lanczos``), curvlinops-for-pytorch 3.0.1 with
scipy's ``eigsh`` on ``H.to_scipy()`` (as its documentation does), and the
hand-written floor (double backward in PyTorch, scipy's ``eigsh`` on a plain
``LinearOperator``).

Run: ``python -m benchmarks --tasks [--problems mlp] [--contenders ...] [--pin CPU]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TASKS = {"eigsh5-1e-3": ("float32", 1e-3), "eigsh5-1e-6": ("float64", 1e-6)}
CONTENDERS = ("ours-torch", "ours-jax", "hessian-eigenthings", "cfp", "floor")
FRAMEWORK = {"ours-jax": "jax"}
TOL_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
"""Residual tolerances tried, loosest first: an eigenvalue's error is about its residual
squared over the gap, so a looser ``tol`` than the accuracy often meets it."""
ITER_LADDER = (20, 30, 40, 60, 80, 100, 150, 200, 300, 400)
K = 5
GRADIENT_SAMPLES = 10
TIMED_RUNS = 2


def _threads_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = "1"
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["CURVLINOPS_BENCH_THREADS"] = "1"
    return env


# --- the worker: one contender, one task, one problem ------------------------------------------
def _gradient_timer(framework: str, problem: Any) -> Callable[[], float]:
    """Seconds of one loss-and-gradient of the whole batch, in ``framework``."""
    if framework == "torch":
        fp = problem.torch()
        X, y = fp.data[0]

        def gradient() -> None:
            for p in fp.params:
                p.grad = None
            fp.loss_func(fp.forward(fp.params, X), y).backward()

    else:
        import jax
        import jax.numpy as jnp

        fp = problem.jax()
        X, y = fp.data[0]

        def loss(ps: Any, X: Any, y: Any) -> Any:
            log_probs = jax.nn.log_softmax(fp.forward(ps, X), axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

        value_and_grad = jax.jit(jax.value_and_grad(loss))

        def gradient() -> None:
            jax.block_until_ready(value_and_grad(fp.params, X, y))

    gradient()
    gradient()

    def timed() -> float:
        start = time.perf_counter()
        gradient()
        return time.perf_counter() - start

    return timed


def _ours(framework: str, problem: Any) -> Callable[[float], np.ndarray]:
    import curvlinops as cl

    fp = problem.torch() if framework == "torch" else problem.jax()
    H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)

    def run(tol: float) -> np.ndarray:
        values = cl.eigsh(H, k=K, which="LA", tol=tol, return_eigenvectors=False)
        return np.asarray(H.backend.to_numpy(values), np.float64)

    return run


def _hessian_eigenthings(problem: Any) -> Callable[[int], np.ndarray]:
    import hessian_eigenthings as he

    fp = problem.torch()
    operator = he.HessianOperator(fp.model_func, fp.data, he.supervised_loss(fp.loss_func))

    def run(max_iter: int) -> np.ndarray:
        # full reorthogonalization (its default only up to 50 steps): without it, copies of
        # converged eigenvalues ("ghosts") displace the others past about 50 steps
        result = he.lanczos(operator, k=K, max_iter=max_iter, which="LA", seed=0,
                            reorthogonalize=True)  # fmt: skip
        return np.asarray(result.eigenvalues.detach().cpu().numpy(), np.float64)

    return run


def _scipy_eigsh(operator: Any, n: int) -> Callable[[float], np.ndarray]:
    import scipy.sparse.linalg

    v0 = np.random.default_rng(0).standard_normal(n)

    def run(tol: float) -> np.ndarray:
        return scipy.sparse.linalg.eigsh(operator, k=K, which="LA", tol=tol, v0=v0,
                                         return_eigenvectors=False)  # fmt: skip

    return run


def _cfp(problem: Any) -> Callable[[float], np.ndarray]:
    from benchmarks.contenders import load_cfp

    cfp = load_cfp()
    fp = problem.torch()
    H = cfp.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data,
                                  check_deterministic=False)  # fmt: skip
    return _scipy_eigsh(H.to_scipy(), problem.num_params)


def _floor(problem: Any) -> Callable[[float], np.ndarray]:
    """Double backward by hand, scipy's ``eigsh`` on a plain ``LinearOperator``."""
    import torch
    from scipy.sparse.linalg import LinearOperator

    fp = problem.torch()
    X, y = fp.data[0]
    params = fp.params
    loss = fp.loss_func(fp.forward(params, X), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    dtype = getattr(torch, problem.dtype)

    def matvec(v: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(v.reshape(-1), dtype=problem.dtype)).to(dtype)
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    n = problem.num_params
    operator = LinearOperator((n, n), matvec=matvec, dtype=np.dtype(problem.dtype))
    return _scipy_eigsh(operator, n)


def _contender(name: str, problem: Any) -> tuple[Callable[[Any], np.ndarray], tuple, str]:
    """The contender's run function, its settings ladder and the setting's name."""
    if name in ("ours-torch", "ours-jax"):
        return _ours(FRAMEWORK.get(name, "torch"), problem), TOL_LADDER, "tol"
    if name == "hessian-eigenthings":
        return _hessian_eigenthings(problem), ITER_LADDER, "max_iter"
    if name == "cfp":
        return _cfp(problem), TOL_LADDER, "tol"
    return _floor(problem), TOL_LADDER, "tol"


def _error(values: np.ndarray, reference: np.ndarray) -> float:
    values = np.sort(np.asarray(values, np.float64))
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one contender on one task and problem; the result as a dict."""
    dtype, accuracy = TASKS[args.task]
    framework = FRAMEWORK.get(args.contender, "torch")
    _set_threads(framework, dtype)
    from benchmarks.problems import make_problem

    problem = make_problem(args.problem, dtype=dtype, quick=args.quick)
    reference = np.sort(np.asarray(json.loads(Path(args.reference).read_text())["values"]))
    gradient = _gradient_timer(framework, problem)
    before = [gradient() for _ in range(GRADIENT_SAMPLES)]
    run, ladder, setting_name = _contender(args.contender, problem)
    tried = []
    for setting in ladder:
        start = time.perf_counter()
        values = run(setting)  # also the warm-up (JAX compiles here)
        cold = time.perf_counter() - start
        error = _error(values, reference)
        tried.append({"setting": setting, "error": error, "cold_seconds": cold})
        if error <= accuracy:
            break
    else:
        return {"met": False, "tried": tried, "setting_name": setting_name}
    seconds = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        values = run(setting)
        seconds.append(time.perf_counter() - start)
    after = [gradient() for _ in range(GRADIENT_SAMPLES)]
    grad_s = statistics.median(before + after)
    return {
        "met": True,
        "setting_name": setting_name,
        "setting": setting,
        "seconds": statistics.median(seconds),
        "gradient_seconds": grad_s,
        "gradients": statistics.median(seconds) / grad_s,
        "error": _error(values, reference),
        "cold_seconds": tried[-1]["cold_seconds"],
        "tried": tried,
        "load": os.getloadavg(),
    }


def _set_threads(framework: str, dtype: str) -> None:
    if framework == "jax":
        import jax

        jax.config.update("jax_enable_x64", dtype == "float64")
    import torch

    torch.set_num_threads(1)


def reference(args: argparse.Namespace) -> dict[str, Any]:
    """Top-5 eigenvalues in float64: this library's PyTorch Hessian, ARPACK to machine precision."""
    import scipy.sparse.linalg
    import torch

    torch.set_num_threads(1)
    import curvlinops as cl
    from benchmarks.problems import make_problem

    problem = make_problem(args.problem, dtype="float64", quick=args.quick)
    fp = problem.torch()
    H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
    v0 = np.random.default_rng(1).standard_normal(problem.num_params)
    values = scipy.sparse.linalg.eigsh(H, k=K, which="LA", tol=0, v0=v0, return_eigenvectors=False)
    return {"values": np.sort(values).tolist(), "how": "float64, scipy eigsh tol=0 on our torch H"}


# --- the driver -----------------------------------------------------------------------------
def _spawn(
    options: list[str], args: argparse.Namespace, out: Path, timed: bool = True
) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.tasks", *options, "--result", str(out)]
    command += ["--quick"] if args.quick else []
    pin = args.pin if timed else None  # the reference is not timed: no lock, no pinning
    if pin is not None:
        command = ["taskset", "-c", pin, *command]
        # one benchmark at a time on a shared machine
        command = command if args.no_lock else ["flock", args.lock, *command]
    completed = subprocess.run(command, env=_threads_env(), capture_output=True, text=True)
    if completed.returncode != 0:
        return {"met": False, "failed": completed.stderr[-2000:]}
    return json.loads(out.read_text())


def drive(args: argparse.Namespace) -> int:
    out = args.out or Path("benchmarks/results") / time.strftime("tasks-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for problem in args.problems:
        ref_file = out / f"reference-{problem}.json"
        if not ref_file.exists():
            ref = _spawn(["--reference-of", problem], args, ref_file, timed=False)
            if "values" not in ref:
                print(ref.get("failed", ref), file=sys.stderr)
                return 1
        for task in args.task_names:
            for contender in args.contenders:
                result_file = out / f"{problem}-{task}-{contender}.json"
                options = ["--worker", "--task", task, "--problem", problem,
                           "--contender", contender, "--reference", str(ref_file)]  # fmt: skip
                result = _spawn(options, args, result_file)
                result.update(problem=problem, task=task, contender=contender)
                result_file.write_text(json.dumps(result, indent=1))
                rows.append(result)
                print(_row(result), flush=True)
    (out / "tasks.md").write_text(table(rows, args.pin))
    print(f"\nwritten to {out}")
    return 0


def _row(r: dict[str, Any]) -> str:
    if not r.get("met"):
        reason = "failed" if "failed" in r else "accuracy not met at any setting"
        return f"| {r['problem']} | {r['task']} | {r['contender']} | {reason} | | | | |"
    return (f"| {r['problem']} | {r['task']} | {r['contender']} | {r['setting_name']}="
            f"{r['setting']:g} | {r['seconds']:.2f} | {r['gradients']:.0f} | "
            f"{1e3 * r['gradient_seconds']:.1f} | {r['error']:.1e} |")  # fmt: skip


def table(rows: list[dict[str, Any]], pin: str | None) -> str:
    loads = [r["load"][0] for r in rows if "load" in r]
    head = (
        f"1 thread (torch, XLA, BLAS), {'pinned to CPU ' + pin if pin else 'not pinned'}, "
        "one contender per process; "
        f"load average during the runs {min(loads, default=0):.1f}-{max(loads, default=0):.1f}.\n\n"
        "| problem | task | contender | setting | seconds | gradients | gradient ms | "
        "rel. error |\n|---|---|---|---|---:|---:|---:|---:|\n"
    )
    return head + "\n".join(_row(r) for r in rows) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --tasks", description=__doc__)
    parser.add_argument("--problems", nargs="+", default=["mlp"])
    parser.add_argument("--task-names", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--quick", action="store_true", help="small problems (a smoke test)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--pin", default=None, help="CPU to pin each process to (with flock)")
    parser.add_argument("--lock", default="/tmp/bench.lock", help="flock file of pinned runs")
    parser.add_argument("--no-lock", action="store_true", help="pin without the lock")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--reference-of", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker or args.reference_of:
        if args.reference_of:
            args.problem = args.reference_of
            result = reference(args)
        else:
            result = worker(args)
        args.result.write_text(json.dumps(result, indent=1))
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
