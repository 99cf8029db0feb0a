"""``python -m benchmarks``: every contender, problem and operation in one process.

Writes ``results.json`` (every figure, versions, thread counts, machine),
``results.md`` (tables, targets met or missed) and ``results.png`` into
``--out``. Exits with status 1 when an operation failed or two contenders
disagree on a result. ``--quick`` runs small problems once (the CI check).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops.backends._namespaces import xla_knows

KFAC_OPS = ("kfac_mc", "kfac_ef", "kfac_type2", "ekfac", "kfac_mv", "ekfac_mv", "kfac_inv",
            "ekfac_inv")  # fmt: skip
OPS = ("grad", "hvp", "ggnvp", "jvp", "vjp", "matmat16", "eigsh5", "trace100", "cg", *KFAC_OPS)
PRODUCT_OPS = ("grad", "hvp", "ggnvp", "jvp", "vjp", "matmat16", *KFAC_OPS)
NO_ARGUMENT_OPS = ("grad", "kfac_mc", "kfac_ef", "kfac_type2", "ekfac")
QUICK_OPS = tuple(op for op in OPS if op not in ("kfac_mc", "ekfac", "ekfac_mv", "kfac_inv",
                                                  "ekfac_inv"))  # fmt: skip
"""``--quick``'s default: the deterministic KFAC factors and product (the EKFAC and inverse
operations each add compilations of their own in JAX; left out to keep the quick run short)."""
RANDOM_OPS = ("kfac_mc",)
"""Results drawn differently by each contender (MC targets): timed, not compared."""
ALGORITHM_OPS = ("eigsh5", "trace100", "cg")
PROBLEM_NAMES = ("mlp", "cnn", "transformer")
LARGE_PROBLEM = "gpt2-small"
"""Not in the default set nor in CI: ``benchmarks/bench_large.py``, in processes of its own."""
CONTENDER_KEYS = ("ours-torch", "ours-jax", "raw-torch", "raw-jax", "cfp")
REFERENCE_ORDER = ("raw-torch", "raw-jax", "ours-torch", "ours-jax", "cfp")
INFORMATIONAL = ("cfp",)
"""Contenders whose failures and disagreements are reported but do not fail the run."""
EIGSH_K, TRACE_PROBES, CG_RTOL, MATMAT_K = 5, 100, 1e-6, 16
QUICK_EMITTER_FLAG = "xla_cpu_use_fusion_emitters"
"""Off with ``--quick`` where XLA has it: XLA:CPU compiles in a third of the time."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Cross-backend benchmark of curvature products and algorithms.",
    )
    parser.add_argument("--problems", nargs="+", choices=(*PROBLEM_NAMES, LARGE_PROBLEM),
                        default=PROBLEM_NAMES)  # fmt: skip
    parser.add_argument("--ops", nargs="+", choices=OPS, default=None,
                        help="operations (default: all; with --quick all but the MC factors "
                        "and the EKFAC and inverse operations)")  # fmt: skip
    parser.add_argument(
        "--backends", nargs="+", default=None, metavar="CONTENDER",
        help="contenders: ours-torch ours-jax raw-torch raw-jax cfp, or 'torch'/'jax' for all "
        "of one framework (default: all whose framework is installed)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per product (default 5; 1 with --quick)")  # fmt: skip
    parser.add_argument("--algo-repeats", type=int, default=1,
                        help="timed runs of eigsh, trace and CG (default 1)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/<timestamp>)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small problems, one repeat")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and XLA threads (default: the CPUs this process may use; "
        "1 with --quick, which checks results rather than speed)",
    )
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="limit scipy/numpy BLAS pools for the whole run (default: untouched)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory calls")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="also time kept linearizations against recomputation (benchmarks/bench_reuse.py): "
        "products inside eigsh(k=5) in gradients, eigsh end to end, memory, break-even",
    )
    args = parser.parse_args(argv)
    if LARGE_PROBLEM in args.problems and len(args.problems) > 1:
        parser.error(f"--problems {LARGE_PROBLEM} runs alone (one process per contender)")
    args.missing = {}
    if args.backends is None:
        args.backends = list(CONTENDER_KEYS)
        for key in CONTENDER_KEYS:
            if importlib.util.find_spec(_framework(key)) is None:
                args.missing[key] = f"{_framework(key)} is not installed"
        args.backends = [k for k in args.backends if k not in args.missing]
    args.backends = _expand_backends(parser, args.backends)
    if args.ops is None:
        args.ops = list(QUICK_OPS if args.quick else OPS)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.repeats < 1 or args.algo_repeats < 1:
        parser.error("--repeats and --algo-repeats must be at least 1")
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)  # fmt: skip
    return args


def _expand_backends(parser: argparse.ArgumentParser, names: list[str]) -> list[str]:
    from benchmarks.contenders import CONTENDERS

    keys: list[str] = []
    for name in names:
        matches = [k for k, (_, fw) in CONTENDERS.items() if name in (k, fw)]
        if not matches:
            parser.error(f"--backends: unknown {name!r}; choose from {list(CONTENDERS)}")
        keys += [k for k in matches if k not in keys]
    return [k for k in CONTENDER_KEYS if k in keys]


def configure_threads(args: argparse.Namespace) -> dict:
    """Set thread counts before the frameworks start their pools; say what was set."""
    flags = os.environ.get("XLA_FLAGS", "")
    if args.threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        flags = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    if args.quick and "xla_backend_optimization_level" not in flags:
        # --quick checks results: compile fast rather than well (halves XLA's compile time)
        flags = (
            f"{flags} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        )
        if xla_knows(QUICK_EMITTER_FLAG):
            # the MLIR fusion emitters are then two thirds of what is left (jaxlib 0.10)
            flags = f"{flags} --{QUICK_EMITTER_FLAG}=false"
        flags = flags.strip()
    if flags:
        os.environ["XLA_FLAGS"] = flags
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    applied = {"threads": args.threads}
    frameworks = {fw for k in args.backends for fw in [_framework(k)]}
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(args.threads)
        applied["torch.set_num_threads"] = args.threads
    if "jax" in frameworks:
        import jax

        jax.config.update("jax_enable_x64", args.dtype == "float64")
        applied["xla"] = (
            "XLA's CPU pool has one thread per usable CPU (no flag sets its size); "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        )
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        applied["blas_limit"] = args.blas_threads
        args._blas_limiter = threadpool_limits(args.blas_threads, user_api="blas")
    return applied


def _framework(key: str) -> str:
    from benchmarks.contenders import CONTENDERS

    return CONTENDERS[key][1]


# --- inputs shared by all contenders -------------------------------------------------------------
def make_inputs(problem: Any) -> dict:
    """Vectors drawn once from fixed seeds: every contender multiplies the same ones."""
    rng = np.random.default_rng(1234)
    n, m = problem.num_params, problem.num_outputs
    dtype = problem.dtype
    return {
        "v": rng.standard_normal(n).astype(dtype),
        "u": rng.standard_normal(m).astype(dtype),
        "V": rng.standard_normal((n, MATMAT_K)).astype(dtype),
        "v0": rng.standard_normal(n),
        "b": rng.standard_normal(n),
        # the parameters KFAC approximates (all but the transformer's embeddings and norms)
        "vk": np.random.default_rng(4321).standard_normal(problem.kfac_num_params).astype(dtype),
    }


def product_call(setup: Any, op: str, inputs: dict) -> Any:
    """A no-argument call of product ``op`` with native inputs made once, outside timing."""
    fn = setup.products[op]
    if op in NO_ARGUMENT_OPS:
        return fn
    arg = {"hvp": "v", "ggnvp": "v", "jvp": "v", "vjp": "u", "matmat16": "V"}.get(op, "vk")
    x = setup.sync(setup.native(inputs[arg]))
    return lambda: fn(x)


# --- running -------------------------------------------------------------------------------------
class Suite:
    """Runs the operations of one problem over its contenders and collects records."""

    def __init__(self, args: argparse.Namespace, problem: Any, setups: dict) -> None:
        from benchmarks.measure import MemoryProbe

        self.args, self.problem, self.setups = args, problem, setups
        self.inputs = make_inputs(problem)
        self.records: list[dict] = []
        self.values: dict[tuple[str, str], Any] = {}
        self.memory = {k: MemoryProbe(args.device, s.framework) for k, s in setups.items()}

    def record(self, op: str, key: str, **fields: Any) -> dict:
        rec = {"problem": self.problem.name, "op": op, "contender": key, **fields}
        self.records.append(rec)
        return rec

    def _memory(self, key: str, call: Any) -> float | None:
        """Run ``call()`` once; its peak memory growth in MiB (None with --no-memory)."""
        if self.args.no_memory:
            call()
            return None
        peak = self.memory[key].measure(call)
        if self.args.quick:
            # each memory call starts with a full garbage collection, which would walk the
            # ~300k objects of torch, JAX and scipy every time (0.2 s, half of a quick run):
            # what is alive now is set aside, the next collection walks only what is new
            gc.freeze()
        return peak

    def run(self, ops: list[str]) -> None:
        for op in ops:
            start, cpu = time.perf_counter(), time.process_time()
            if op in PRODUCT_OPS:
                self.run_product(op)
            else:
                getattr(self, f"run_{op}")()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(f"  {op:9s} {wall:6.1f} s (CPU {cpu:.1f} s)", flush=True)

    # --- products: warm-up, then repeats round-robin over contenders ------------------------
    def run_product(self, op: str) -> None:
        from benchmarks.measure import summarize, timed

        calls, firsts, extra = {}, {}, {}
        for key, setup in self.setups.items():
            if op in self.problem.skip_ops:
                self.record(op, key, status="skipped", error=self.problem.skip_ops[op])
                continue
            if op not in setup.products:
                reason = setup.notes.get("unsupported", "not offered")
                self.record(op, key, status="unsupported", error=reason)
                continue
            try:
                if op in setup.prepare:
                    setup.prepare[op]()  # untimed: e.g. the factors a KFAC product needs
                call = product_call(setup, op, self.inputs)
                counter = _compile_counter(setup)
                if self.args.quick:
                    # one call: timed, memory sampled, result kept (a check, not a timing)
                    box: list = []
                    peak = self._memory(key, lambda c=call, s=setup.sync, b=box:
                                        b.append(timed(c, s)))  # fmt: skip
                    first, result = box[0]
                    self._keep(op, key, setup, result)
                    more = {} if counter is None else {"compiles_first": counter.take()}
                    self.record(op, key, status="ok", first=first, compile=0.0, peak_mib=peak,
                                **summarize([first]), **more)  # fmt: skip
                    continue
                firsts[key], result = timed(call, setup.sync)
                self._keep(op, key, setup, result)
                extra[key] = {} if counter is None else {"compiles_first": counter.take()}
                timed(call, setup.sync)  # second warm-up
                calls[key] = call
            except Exception as error:  # noqa: BLE001 - reported, the suite goes on
                self.record(op, key, status="error", error=_describe(error))
        counters = {key: _compile_counter(self.setups[key]) for key in calls}
        times: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(self.args.repeats):
            for key, call in calls.items():
                before = counters[key] and counters[key].count
                times[key].append(timed(call, self.setups[key].sync)[0])
                if counters[key] is not None:  # only this contender's compilations
                    counters[key].timed += counters[key].count - before
        for key, call in calls.items():
            stats = summarize(times[key])
            sync = self.setups[key].sync
            if counters[key] is not None:
                extra[key]["compiles_timed"] = counters[key].timed
            peak = self._memory(key, lambda c=call, s=sync: s(c()))
            self.record(op, key, status="ok", first=firsts[key],
                        compile=max(firsts[key] - stats["median"], 0.0), peak_mib=peak,
                        **stats, **extra[key])  # fmt: skip
        self._fresh(op)

    def _keep(self, op: str, key: str, setup: Any, result: Any) -> None:
        """The result as numpy for the agreement check (lists: concatenated)."""
        if op in RANDOM_OPS:
            return
        if isinstance(result, (list, tuple)):
            parts = [np.ravel(setup.to_numpy(r)) for r in result]
            self.values[(op, key)] = np.concatenate(parts) if parts else np.zeros(0)
        else:
            self.values[(op, key)] = setup.to_numpy(result)

    def _fresh(self, op: str) -> None:
        """JAX: an operator built anew with the same configuration; how often it compiles."""
        from benchmarks.measure import timed

        for key, setup in self.setups.items():
            counter = _compile_counter(setup)
            rec = next((r for r in self.records[::-1] if (r["op"], r["contender"]) == (op, key)),
                       None)  # fmt: skip
            if counter is None or op not in setup.fresh or rec is None or rec["status"] != "ok":
                continue
            if self.args.quick:
                continue  # a check of results, not of compilations
            try:
                rec["fresh_operator"], _ = timed(setup.fresh[op], setup.sync)
                rec["compiles_fresh_operator"] = counter.take()
            except Exception as error:  # noqa: BLE001
                rec["fresh_operator_error"] = _describe(error)

    # --- algorithms: one contender after the other ----------------------------------------------
    def _algorithm(self, op: str, key: str, run: Any, warmup: Any = None) -> dict | None:
        """Time ``run()`` (returns (value, extra)) ``algo_repeats`` times; memory on the first."""
        from benchmarks.measure import summarize

        _release_blas_guard()  # each contender starts with the BLAS pools as the user has them
        try:
            if warmup is not None:
                warmup()
            times: list[float] = []
            peak, out = None, None
            for i in range(self.args.algo_repeats):

                def call() -> None:
                    nonlocal out
                    start = time.perf_counter()
                    out = run()
                    times.append(time.perf_counter() - start)

                if i == 0:
                    peak = self._memory(key, call)
                else:
                    call()
            value, extra = out
            self.values[(op, key)] = value
            return self.record(op, key, status="ok", peak_mib=peak, **summarize(times), **extra)
        except Exception as error:  # noqa: BLE001 - reported, the suite goes on
            self.record(op, key, status="error", error=_describe(error))
            return None

    def run_eigsh5(self) -> None:
        from scipy.sparse.linalg import eigsh

        for key, setup in self.setups.items():
            op = setup.hessian_scipy
            v0 = self.inputs["v0"].astype(op.dtype)

            def run(op: Any = op, v0: Any = v0) -> tuple:
                counted = Counting(op)
                values = eigsh(counted, k=EIGSH_K, v0=v0, return_eigenvectors=False)
                return np.sort(values), {"products": counted.count}

            # warm-up: one product through the same scipy path (JAX compiles here)
            rec = self._algorithm("eigsh5", key, run, warmup=lambda op=op, v0=v0: op.matvec(v0))
            if rec is not None:
                self._add_host_matvec(rec, op, v0)

    def _add_host_matvec(self, rec: dict, op: Any, x: np.ndarray) -> None:
        """The scipy-path matvec (numpy in and out) time, to set against eigsh's time."""
        times = []
        for _ in range(3 if self.args.quick else 5):
            start = time.perf_counter()
            op.matvec(x)
            times.append(time.perf_counter() - start)
        host = float(np.median(times))
        rec["host_matvec"] = host
        rec["end_to_end_over_products"] = rec["median"] / (rec["products"] * host)

    def run_trace100(self) -> None:
        from benchmarks.contenders import TRACE_BLOCK

        # quick: 32 probes in blocks of 16, the shapes that matmat16 compiled already
        probes, block = (2 * MATMAT_K, MATMAT_K) if self.args.quick else (TRACE_PROBES, TRACE_BLOCK)
        for key, setup in self.setups.items():

            def run(setup: Any = setup) -> tuple:
                estimate, stderr = setup.trace(probes, 0, block)
                method = f"{setup.trace_method}, {probes} probes in blocks of {block}"
                extra = {"method": method, "products": probes, "estimate": estimate,
                         "stderr": stderr}  # fmt: skip
                return np.array([estimate, stderr]), extra

            def warmup(setup: Any = setup) -> None:
                if setup.framework == "jax" and not self.args.quick:
                    setup.trace(block + probes % block, 1, block)  # compiles both block widths

            self._algorithm("trace100", key, run, warmup)

    def run_cg(self) -> None:
        from scipy.sparse.linalg import cg

        lam = self.problem.damping
        b = self.inputs["b"]
        maxiter = 200 if self.args.quick else 1000
        for key, setup in self.setups.items():
            try:
                A = setup.damped_ggn_scipy(lam)
            except Exception as error:  # noqa: BLE001
                self.record("cg", key, status="error", error=_describe(error))
                continue

            def run(A: Any = A) -> tuple:
                counted = Counting(A)
                x, info = cg(counted, b, rtol=CG_RTOL, maxiter=maxiter)
                x = np.asarray(x, dtype=np.float64)
                residual = np.linalg.norm(A.matvec(x) - b) / np.linalg.norm(b)
                return x, {"products": counted.count, "info": int(info),
                           "residual": float(residual), "damping": lam}  # fmt: skip

            self._algorithm("cg", key, run, warmup=lambda A=A: A.matvec(b))


def _compile_counter(setup: Any) -> Any:
    """A fresh count of XLA compilations for a JAX contender (None for PyTorch)."""
    if setup.framework != "jax":
        return None
    from benchmarks.measure import CompileCounter

    return CompileCounter()


def _release_blas_guard() -> None:
    """End a BLAS limit that this library's guard may still hold from the previous run."""
    try:
        from curvlinops import _blas_guard
    except ImportError:
        return
    _blas_guard.release()


class Counting:
    """A scipy operator that counts the columns it multiplies, then hands them on."""

    def __new__(cls, op: Any) -> Any:
        from scipy.sparse.linalg import LinearOperator

        class _Counting(LinearOperator):
            def __init__(self, op: Any) -> None:
                self.op, self.count = op, 0
                super().__init__(op.dtype, op.shape)

            def _matvec(self, x: Any) -> Any:
                self.count += 1
                return self.op.matvec(x)

            def _matmat(self, X: Any) -> Any:
                self.count += X.shape[1]
                return self.op.matmat(X)

            def _adjoint(self) -> Any:
                return self

        return _Counting(op)


def _describe(error: BaseException) -> str:
    tb = traceback.extract_tb(error.__traceback__)[-1:]
    where = f" ({tb[0].filename.rsplit('/', 1)[-1]}:{tb[0].lineno})" if tb else ""
    return f"{type(error).__name__}: {error}"[:500] + where


# --- agreement -----------------------------------------------------------------------------------
def tolerance(op: str, dtype: str) -> float:
    """Relative tolerance of a cross-contender comparison."""
    single = dtype == "float32"
    if op == "cg":
        return 2e-2 if single else 1e-4
    if op == "eigsh5":
        return 2e-3 if single else 1e-7
    return 2e-3 if single else 1e-8


def agreement(problem: str, values: dict, dtype: str) -> list[dict]:
    """Each contender's result against the reference contender's, per operation."""
    rows = []
    ops = sorted({op for op, _ in values})
    for op in ops:
        keys = [k for k in REFERENCE_ORDER if (op, k) in values]
        if len(keys) < 2:
            continue
        ref = keys[0]
        a = np.asarray(values[(op, ref)], dtype=np.float64)
        for key in keys[1:]:
            b = np.asarray(values[(op, key)], dtype=np.float64)
            if op == "trace100":
                # different probes: agree within the estimators' standard errors
                error = abs(a[0] - b[0]) / max(np.hypot(a[1], b[1]), 1e-30)
                tol = 5.0
            else:
                error = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
                tol = tolerance(op, dtype)
            rows.append({"problem": problem, "op": op, "contender": key, "reference": ref,
                         "error": float(error), "tol": tol, "ok": bool(error <= tol),
                         "informational": key in INFORMATIONAL})  # fmt: skip
    return rows


# --- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--tasks" in argv[:1]:  # end-to-end tasks, one contender per process (benchmarks/tasks.py)
        from benchmarks import tasks

        return tasks.main(argv[1:])
    args = parse_args(argv)
    if args.problems == [LARGE_PROBLEM]:
        from benchmarks import bench_large

        large = ["--threads", str(args.threads)] + (["--out", str(args.out)] if args.out else [])
        return bench_large.main(large)
    started = time.perf_counter()
    applied = configure_threads(args)

    from benchmarks import measure
    from benchmarks.contenders import CONTENDERS, cfp_status, make_setup
    from benchmarks.problems import make_problem
    from benchmarks.report import write_reports

    stamp = dt.datetime.now().astimezone()
    out = args.out or Path(__file__).parent / "results" / stamp.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    absent: dict[str, str] = dict(args.missing)
    if "cfp" in args.backends:
        ok, why = cfp_status()
        if not ok:
            absent["cfp"] = why
    contenders = [k for k in args.backends if k not in absent]
    meta = {
        "date": stamp.isoformat(timespec="seconds"),
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("_") and k != "missing"
        },  # fmt: skip
        "machine": measure.machine_info(),
        "versions": measure.versions(),
        "threads_set": applied,
        "threads": measure.thread_info(),
        "memory_method": measure.rss_method() if args.device == "cpu" else "framework counters",
        "contenders": {k: CONTENDERS[k][0] for k in args.backends},
        "absent": absent,
    }
    data: dict = {"meta": meta, "problems": {}, "results": [], "agreement": [], "setup": []}
    for name in args.problems:
        problem = make_problem(name, dtype=args.dtype, quick=args.quick)
        print(f"{problem.description} ({problem.num_params} parameters)", flush=True)
        data["problems"][name] = {
            "description": problem.description, "num_params": problem.num_params,
            "batch_size": problem.batch_size, "num_outputs": problem.num_outputs,
            "damping": problem.damping, "sizes": problem.sizes,
            "kfac_num_params": problem.kfac_num_params, "kfac_note": problem.kfac_note,
        }  # fmt: skip
        setups = {}
        for key in contenders:
            try:
                setups[key] = make_setup(key, problem, args.device)
                data["setup"].append({"problem": name, "contender": key, "status": "ok",
                                      "seconds": setups[key].setup_seconds})  # fmt: skip
            except Exception as error:  # noqa: BLE001
                data["setup"].append({"problem": name, "contender": key, "status": "error",
                                      "error": _describe(error)})  # fmt: skip
                print(f"  {key}: set-up failed: {_describe(error)}", flush=True)
        suite = Suite(args, problem, setups)
        suite.run([op for op in OPS if op in args.ops])
        data["results"] += suite.records
        data["agreement"] += agreement(name, suite.values, args.dtype)
        del suite, setups
        gc.unfreeze()  # what Suite._memory set aside (--quick)
        gc.collect()
        # after each problem, so that a long run that is stopped keeps what it measured
        (out / "results.json").write_text(json.dumps(data, indent=1, default=_json_default))
    meta["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["seconds"] = time.perf_counter() - started
    meta["threads_end"] = measure.thread_info()
    (out / "results.json").write_text(json.dumps(data, indent=1, default=_json_default))
    write_reports(data, out)
    if args.reuse:
        from benchmarks import bench_reuse

        reuse_args = ["--problems", *args.problems, "--threads", str(args.threads)]
        reuse_args += ["--quick"] * args.quick + ["--no-memory"] * args.no_memory
        (out / "reuse.md").write_text(bench_reuse.main(reuse_args) + "\n")
    failures = [r for r in data["results"] + data["setup"] if r["status"] == "error"]
    disagreements = [r for r in data["agreement"] if not r["ok"]]
    for r in failures:
        print(f"FAILED {r.get('problem')}/{r.get('op', 'setup')}/{r['contender']}: {r['error']}")
    for r in disagreements:
        print(f"DISAGREE {r['problem']}/{r['op']}: {r['contender']} vs {r['reference']} "
              f"error {r['error']:.2e} > {r['tol']:.0e}")  # fmt: skip
    print(f"wrote {out}/results.json, results.md, results.png in {meta['seconds']:.0f} s")
    fatal = [r for r in failures + disagreements if r["contender"] not in INFORMATIONAL]
    return 1 if fatal else 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
