"""``python -m benchmarks --tasks``: end-to-end tasks at a stated accuracy, a process each.

A task is what a user runs, judged against a float64 reference:

* ``eigsh5-1e-3`` / ``eigsh5-1e-6``: the top-5 Hessian eigenvalues (largest
  algebraic) to a relative 1e-3 (float32) and 1e-6 (float64);
* ``trace-1%``: the GGN's trace to 1 % with a 95 % confidence interval
  (:mod:`benchmarks.task_defs`);
* ``slq``: the Hessian's spectral density by SLQ, L1 distance 0.05 to the
  exactly smoothed density, on the small problem sizes (:mod:`benchmarks.task_slq`);
* ``cg-1e-6``: ``(G + λ I) x = g`` to a relative residual of 1e-6 (float64).

Each contender runs in a process of its own (1 thread: torch, XLA, BLAS), with
the loosest of its own settings (a ladder: ``tol`` for the solvers with a
residual test, ``max_iter`` for hessian-eigenthings' Lanczos, probe and step
counts for the estimators) whose result meets the accuracy; that setting's
warm run is timed. Times are given in seconds and in gradients of the
contender's own framework (loss and gradient of the whole batch, measured in
the same process before and after the task, so that load on the machine hits
both alike).

Contenders: this library in PyTorch and JAX, hessian-eigenthings 1.0.0a5,
curvlinops-for-pytorch 3.0.1 with scipy where it has no solver of its own (as
its documentation does), and the hand-written floor (PyTorch products by hand,
scipy's solvers on a plain ``LinearOperator``). A contender without the
function gets a row saying so.

Run: ``python -m benchmarks --tasks [--problems mlp cnn transformer] [--task-names ...]
[--contenders ...] [--pin CPU]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.task_defs import CG, TRACE, Task
from benchmarks.task_slq import SLQ

CONTENDERS = ("ours-torch", "ours-jax", "hessian-eigenthings", "cfp", "floor")
FRAMEWORK = {"ours-jax": "jax"}
TOL_LADDER = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
"""Residual tolerances tried, loosest first: an eigenvalue's error is about its residual
squared over the gap, so a looser ``tol`` than the accuracy often meets it."""
ITER_LADDER = (20, 30, 40, 60, 80, 100, 150, 200, 300, 400)
K = 5
GRADIENT_SAMPLES = 10
TIMED_RUNS = 2
LONG_RUN_SECONDS = 30.0
"""A setting whose cold run took longer is timed once (the median of two or more otherwise)."""
SHORT_TASK_SECONDS = 1.0
MAX_TIMED_RUNS = 15
"""A short task is timed about ``SHORT_TASK_SECONDS`` in all (at most ``MAX_TIMED_RUNS``
runs): a median of two runs of 0.06 s moved by 1.5x between runs on a busy machine."""


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


def _ours(framework: str) -> Callable:
    def make(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
        import curvlinops as cl

        fp = problem.torch() if framework == "torch" else problem.jax()
        H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)

        def run(tol: float) -> np.ndarray:
            values = cl.eigsh(H, k=K, which="LA", tol=tol, return_eigenvectors=False)
            return np.asarray(H.backend.to_numpy(values), np.float64)

        return run, TOL_LADDER, "tol"

    return make


def _hessian_eigenthings(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
    import hessian_eigenthings as he

    fp = problem.torch()
    operator = he.HessianOperator(fp.model_func, fp.data, he.supervised_loss(fp.loss_func))

    def run(max_iter: int) -> np.ndarray:
        # full reorthogonalization (its default only up to 50 steps): without it, copies of
        # converged eigenvalues ("ghosts") displace the others past about 50 steps
        result = he.lanczos(operator, k=K, max_iter=max_iter, which="LA", seed=0,
                            reorthogonalize=True)  # fmt: skip
        return np.asarray(result.eigenvalues.detach().cpu().numpy(), np.float64)

    return run, ITER_LADDER, "max_iter"


def _scipy_eigsh(operator: Any, n: int) -> tuple[Callable, tuple, str]:
    import scipy.sparse.linalg

    v0 = np.random.default_rng(0).standard_normal(n)

    def run(tol: float) -> np.ndarray:
        return scipy.sparse.linalg.eigsh(operator, k=K, which="LA", tol=tol, v0=v0,
                                         return_eigenvectors=False)  # fmt: skip

    return run, TOL_LADDER, "tol"


def _cfp(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
    from benchmarks.contenders import load_cfp

    cfp = load_cfp()
    fp = problem.torch()
    H = cfp.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data,
                                  check_deterministic=False)  # fmt: skip
    return _scipy_eigsh(H.to_scipy(), problem.num_params)


def _floor(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
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


def eigsh_reference(problem: Any) -> dict:
    """Top-5 eigenvalues in float64: this library's PyTorch Hessian, ARPACK to machine precision."""
    import scipy.sparse.linalg

    import curvlinops as cl

    fp = problem.torch()
    H = cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
    v0 = np.random.default_rng(1).standard_normal(problem.num_params)
    values = scipy.sparse.linalg.eigsh(H, k=K, which="LA", tol=0, v0=v0, return_eigenvectors=False)
    return {"values": np.sort(values).tolist(), "how": "float64, scipy eigsh tol=0 on our torch H"}


def eigsh_error(values: np.ndarray, reference: dict) -> float:
    """Largest relative error of the sorted eigenvalues."""
    values = np.sort(np.asarray(values, np.float64))
    exact = np.asarray(reference["values"])
    return float(np.max(np.abs(values - exact) / np.abs(exact)))


_EIGSH_CONTENDERS = {
    "ours-torch": _ours("torch"),
    "ours-jax": _ours("jax"),
    "hessian-eigenthings": _hessian_eigenthings,
    "cfp": _cfp,
    "floor": _floor,
}
TASKS: dict[str, Task] = {
    "eigsh5-1e-3": Task("float32", 1e-3, "top-5 Hessian eigenvalues, rel. 1e-3",
                        eigsh_reference, eigsh_error, _EIGSH_CONTENDERS),
    "eigsh5-1e-6": Task("float64", 1e-6, "top-5 Hessian eigenvalues, rel. 1e-6",
                        eigsh_reference, eigsh_error, _EIGSH_CONTENDERS),
    "trace-1%": TRACE,
    "slq": SLQ,
    "cg-1e-6": CG,
}  # fmt: skip
DEFAULT_TASKS = ("eigsh5-1e-3", "trace-1%", "slq", "cg-1e-6")
"""What a plain ``--tasks`` runs (``eigsh5-1e-6`` in float64 takes minutes per contender)."""


def _summary(result: Any) -> Any:
    """The result itself where it is short (eigenvalues, an estimate and its error)."""
    array = np.asarray(result, dtype=np.float64)
    return array.tolist() if array.size <= 2 * K else None


def _problem(args: argparse.Namespace, task: Task, dtype: str) -> Any:
    from benchmarks.problems import make_problem

    return make_problem(args.problem, dtype=dtype, quick=args.quick or task.small)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run one contender on one task and problem; the result as a dict."""
    task = TASKS[args.task]
    framework = FRAMEWORK.get(args.contender, "torch")
    _set_threads(framework, task.dtype)
    problem = _problem(args, task, task.dtype)
    reference = json.loads(Path(args.reference).read_text())
    gradient = _gradient_timer(framework, problem)
    before = [gradient() for _ in range(GRADIENT_SAMPLES)]
    run, ladder, setting_name = task.contenders[args.contender](problem, reference)
    tried = []
    for setting in ladder:
        start = time.perf_counter()
        result = run(setting)  # also the warm-up (JAX compiles here)
        cold = time.perf_counter() - start
        error = task.error(result, reference)
        tried.append({"setting": setting, "error": error, "cold_seconds": cold})
        if error <= task.accuracy:
            break
    else:
        return {"met": False, "tried": tried, "setting_name": setting_name}
    seconds = []
    for _ in range(_timed_runs(tried[-1]["cold_seconds"])):
        start = time.perf_counter()
        result = run(setting)
        seconds.append(time.perf_counter() - start)
    after = [gradient() for _ in range(GRADIENT_SAMPLES)]
    grad_s = statistics.median(before + after)
    return {
        "met": True,
        "setting_name": setting_name,
        "setting": setting,
        "seconds": statistics.median(seconds),
        "timed_runs": len(seconds),
        "gradient_seconds": grad_s,
        "gradients": statistics.median(seconds) / grad_s,
        "error": task.error(result, reference),
        "result": _summary(result),
        "cold_seconds": tried[-1]["cold_seconds"],
        "tried": tried,
        "load": os.getloadavg(),
        "num_params": problem.num_params,
    }


def _timed_runs(cold_seconds: float) -> int:
    """Warm runs to time: one for a long task, enough for a stable median of a short one."""
    if cold_seconds >= LONG_RUN_SECONDS:
        return 1
    return max(TIMED_RUNS, min(MAX_TIMED_RUNS, math.ceil(SHORT_TASK_SECONDS / cold_seconds)))


def _set_threads(framework: str, dtype: str) -> None:
    if framework == "jax":
        import jax

        jax.config.update("jax_enable_x64", dtype == "float64")
    import torch

    torch.set_num_threads(1)


def reference(args: argparse.Namespace) -> dict[str, Any]:
    """The float64 reference of ``args.task`` on ``args.problem``."""
    import torch

    torch.set_num_threads(1)
    task = TASKS[args.task]
    return task.reference(_problem(args, task, "float64"))


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


def _reference_file(args: argparse.Namespace, out: Path, problem: str, task: str) -> Path | None:
    """The reference of ``task`` on ``problem`` (computed once, shared by tasks that share it)."""
    ref_file = out / f"reference-{problem}-{TASKS[task].reference.__name__}.json"
    if not ref_file.exists():
        options = ["--reference-of", problem, "--task", task]
        ref = _spawn(options, args, ref_file, timed=False)
        if "how" not in ref:
            print(ref.get("failed", ref), file=sys.stderr)
            return None
    return ref_file


def _run_one(args: argparse.Namespace, out: Path, problem: str, task: str, contender: str,
             ref_file: Path) -> dict[str, Any]:  # fmt: skip
    result_file = out / f"{problem}-{task}-{contender}.json"
    if contender in TASKS[task].missing:
        result = {"met": False, "missing": TASKS[task].missing[contender]}
    else:
        options = ["--worker", "--task", task, "--problem", problem,
                   "--contender", contender, "--reference", str(ref_file)]  # fmt: skip
        result = _spawn(options, args, result_file)
    result.update(problem=problem, task=task, contender=contender)
    result_file.write_text(json.dumps(result, indent=1))
    return result


def drive(args: argparse.Namespace) -> int:
    """Every (problem, task, contender), one process each; the table in ``out/tasks.md``."""
    out = args.out or Path("benchmarks/results") / time.strftime("tasks-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for problem in args.problems:
        for task in args.task_names:
            ref_file = _reference_file(args, out, problem, task)
            if ref_file is None:
                return 1
            for contender in args.contenders:
                rows.append(_run_one(args, out, problem, task, contender, ref_file))
                print(_row(rows[-1]), flush=True)
    (out / "tasks.md").write_text(table(rows, args.pin))
    print(f"\nwritten to {out}")
    return 0


def _setting(r: dict[str, Any]) -> str:
    setting = r["setting"]
    text = ", ".join(map(str, setting)) if isinstance(setting, list) else f"{setting:g}"
    return f"{r['setting_name']}={text}"


def _row(r: dict[str, Any]) -> str:
    start = f"| {r['problem']} | {r['task']} | {r['contender']} |"
    if not r.get("met"):
        if "missing" in r:
            return f"{start} {r['missing']} | | | | |"
        reason = "failed" if "failed" in r else "accuracy not met at any setting"
        return f"{start} {reason} | | | | |"
    return (f"{start} {_setting(r)} | {r['seconds']:.2f} | {r['gradients']:.0f} | "
            f"{1e3 * r['gradient_seconds']:.1f} | {r['error']:.1e} |")  # fmt: skip


def table(rows: list[dict[str, Any]], pin: str | None) -> str:
    """The Markdown table of ``rows``, with the conditions it was measured under."""
    loads = [r["load"][0] for r in rows if "load" in r]
    head = (
        f"1 thread (torch, XLA, BLAS), {'pinned to CPU ' + pin if pin else 'not pinned'}, "
        "one contender per process; "
        f"load average during the runs {min(loads, default=0):.1f}-{max(loads, default=0):.1f}.\n\n"
        "| problem | task | contender | setting | seconds | gradients | gradient ms | "
        "error |\n|---|---|---|---|---:|---:|---:|---:|\n"
    )
    return head + "\n".join(_row(r) for r in rows) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks --tasks", description=__doc__)
    parser.add_argument("--problems", nargs="+", default=["mlp"])
    parser.add_argument("--task-names", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
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
