"""Every GPU check of curvlinops in one run, printed as one table.

    python benchmarks/gpu_check.py             # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run   # the same code on the CPU (CI)

For the Hessian and the GGN (symmetric) and the Jacobian (rectangular) of a
small MLP, built by each backend (PyTorch, JAX) on the device, and for each
array library (the framework's own arrays on the device, CuPy on the device,
numpy on the host) it runs the products (matvec, matmat, rmatvec) and the
solvers of ``cupyx.scipy.sparse.linalg`` (eigsh, cg, minres, gmres, lobpcg
through ``to_cupyx``, svds) and of JAX (``jax.jit`` of
``jax.scipy.sparse.linalg.cg``, a ``jax.lax.fori_loop`` power iteration). It
also checks the device rules (an array on another device raises) and the
aliasing hazard (memory shared through DLPack and mutated after the call).
Each row reports:

* ``err``: the largest error against a float64 dense reference computed on
  the CPU, relative to the reference's largest entry (eigenvalues, singular
  values: relative error; solves: relative residual);
* ``time``: per product (median over ``--repeats``, device synchronised), or
  per solve;
* ``D2H``: device-to-host copies during the row, as CUDA records them
  (CUPTI through ``torch.profiler``): count and largest size. Scalars are
  expected (the NaN check, the solvers' convergence tests); a copy as large as
  a vector fails the row, except for numpy inputs, which live on the host.
  For JAX's compiled solvers, ``guard`` means they ran under
  ``jax.transfer_guard("disallow")``.

``--dry-run`` runs the same code on the CPU: numpy stands in for CuPy and
``scipy.sparse.linalg`` for ``cupyx.scipy.sparse.linalg`` (same API), JAX gets
two CPU devices for the wrong-device check, and ``D2H`` reads ``cpu``.
Exit status: 0 if every row passed, 1 if one failed, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IN_FEATURES, OUT_FEATURES, BATCHES, BATCH_SIZE = 8, 3, 2, 32
DAMPING = 0.5
K_EIG, K_BLOCK = 3, 4
TOLERANCES = {  # products, eigen-/singular values, solves (relative residual)
    "float32": {"product": 1e-4, "spectrum": 1e-3, "solve": 1e-3},
    "float64": {"product": 1e-10, "spectrum": 1e-7, "solve": 1e-4},
}


# --- what one row says ------------------------------------------------------------------
@dataclass
class Row:
    operator: str
    backend: str
    arrays: str
    check: str
    err: float | None = None
    tol: float | None = None
    seconds: float | None = None
    per: str = ""
    d2h: str = ""
    ok: bool = True
    note: str = ""

    def cells(self) -> list[str]:
        err = "" if self.err is None else f"{self.err:.1e}"
        tol = "" if self.tol is None else f"{self.tol:.0e}"
        time_ = "" if self.seconds is None else f"{_fmt_time(self.seconds)}{self.per}"
        status = "ok" if self.ok else "FAIL"
        return [self.operator, self.backend, self.arrays, self.check, err, tol, time_, self.d2h,
                status, self.note]  # fmt: skip


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(rows: list[Row], out: Any = sys.stdout) -> None:
    header = ["operator", "backend", "arrays", "check", "err", "tol", "time", "D2H", "status",
              "note"]  # fmt: skip
    table = [header] + [row.cells() for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, cells in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out)
        if i == 0:
            print("-+-".join("-" * w for w in widths), file=out)


# --- the machine ----------------------------------------------------------------------------
@dataclass
class Env:
    """Frameworks and devices this run uses; ``skipped`` says what it could not."""

    dry_run: bool
    dtype: str
    torch: Any = None
    torch_device: Any = None
    jax: Any = None
    jax_device: Any = None
    cupy: Any = None
    cupyx_linalg: Any = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tol(self) -> dict[str, float]:
        return TOLERANCES[self.dtype]

    def backends(self) -> list[str]:
        return [name for name in ("torch", "jax") if getattr(self, f"{name}_device") is not None]

    def synchronize(self, y: Any = None) -> None:
        """Wait for the device: JAX results, PyTorch's stream, CuPy's device."""
        if self.jax is not None and isinstance(y, self.jax.Array):
            y.block_until_ready()
        if self.torch is not None and self.torch_device is not None:
            if self.torch_device.type == "cuda":
                self.torch.cuda.synchronize(self.torch_device)
        if self.cupy is not None:
            self.cupy.cuda.Device().synchronize()


def detect(dry_run: bool, dtype: str) -> Env:
    env = Env(dry_run=dry_run, dtype=dtype)
    _detect_torch(env)
    _detect_jax(env)
    _detect_cupy(env)
    return env


def _detect_torch(env: Env) -> None:
    try:
        import torch
    except ImportError as error:
        env.skipped.append(("torch", f"not installed ({error})"))
        return
    env.torch = torch
    if env.dry_run:
        env.torch_device = torch.device("cpu")
    elif torch.cuda.is_available():
        env.torch_device = torch.device("cuda:0")
    else:
        env.skipped.append(("torch backend", "torch.cuda.is_available() is False"))


def _detect_jax(env: Env) -> None:
    try:
        import jax
    except ImportError as error:
        env.skipped.append(("jax", f"not installed ({error})"))
        return
    jax.config.update("jax_enable_x64", True)  # float64 references; operators set dtypes
    env.jax = jax
    if env.dry_run:
        env.jax_device = jax.devices("cpu")[0]
        return
    try:
        env.jax_device = jax.devices("gpu")[0]
    except RuntimeError as error:
        env.skipped.append(("jax backend", f"no GPU for JAX ({error})"))


def _detect_cupy(env: Env) -> None:
    if env.dry_run:
        env.skipped.append(("cupy", "dry run: numpy and scipy.sparse.linalg stand in"))
        return
    try:
        import cupy

        cupy.zeros(1)  # raises without a usable CUDA driver
    except Exception as error:  # noqa: BLE001 - any failure means: no CuPy rows
        env.skipped.append(("cupy", f"unusable ({type(error).__name__}: {error})"))
        return
    env.cupy = cupy
    try:
        import cupyx.scipy.sparse.linalg as cupyx_linalg
    except Exception as error:  # noqa: BLE001
        env.skipped.append(("cupyx solvers", f"{type(error).__name__}: {error}"))
        return
    env.cupyx_linalg = cupyx_linalg


# --- array libraries ---------------------------------------------------------------------
@dataclass
class Arrays:
    """One array library on one device: how to make, read and wait for its arrays."""

    name: str
    make: Callable[[np.ndarray], Any]
    read: Callable[[Any], np.ndarray]
    on_host: bool
    solvers: Any = None  # a scipy.sparse.linalg-like module for these arrays
    wrap: Callable[[Any], Any] | None = None  # operator -> the solvers' LinearOperator


def array_libraries(env: Env, backend: str) -> list[Arrays]:
    """The framework's own arrays, CuPy (numpy + scipy in a dry run), and numpy on the host."""
    import scipy.sparse.linalg as sla

    from curvlinops.backends._cupy import to_cupyx, wrap_products

    dtype = np.dtype(env.dtype)
    libraries = [_native_arrays(env, backend, dtype)]
    if env.dry_run:
        libraries.append(
            Arrays(
                "numpy",
                lambda a: np.asarray(a, dtype=dtype),
                np.asarray,
                True,
                sla,
                functools.partial(wrap_products, sla.LinearOperator),
            )  # fmt: skip
        )
        return libraries
    if env.cupy is not None:
        cp = env.cupy
        libraries.append(
            Arrays(
                "cupy",
                lambda a: cp.asarray(a, dtype=dtype),
                cp.asnumpy,
                False,
                env.cupyx_linalg,
                to_cupyx,
            )  # fmt: skip
        )
    libraries.append(Arrays("numpy", lambda a: np.asarray(a, dtype=dtype), np.asarray, True))
    return libraries


def _native_arrays(env: Env, backend: str, dtype: np.dtype) -> Arrays:
    if backend == "torch":
        torch, device = env.torch, env.torch_device
        torch_dtype = getattr(torch, dtype.name)
        return Arrays(
            "torch",
            lambda a: torch.as_tensor(np.asarray(a), device=device).to(torch_dtype),
            lambda x: x.detach().cpu().numpy(),
            device.type == "cpu",
        )
    jax = env.jax
    return Arrays(
        "jax",
        lambda a: jax.device_put(np.asarray(a, dtype=dtype), env.jax_device),
        np.asarray,
        env.jax_device.platform == "cpu",
    )


# --- the problem ----------------------------------------------------------------------------
def problem_numbers(width: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple]]:
    rng = np.random.default_rng(seed)
    shapes = [(width, IN_FEATURES), (width,), (OUT_FEATURES, width), (OUT_FEATURES,)]
    weights = [rng.normal(size=s) / np.sqrt(s[-1]) for s in shapes]
    data = [
        (rng.normal(size=(BATCH_SIZE, IN_FEATURES)), rng.normal(size=(BATCH_SIZE, OUT_FEATURES)))
        for _ in range(BATCHES)
    ]
    return weights, data


def _jax_model(params: list, X: Any) -> Any:
    import jax.numpy as jnp

    W1, b1, W2, b2 = params
    return jnp.tanh(X @ W1.T + b1) @ W2.T + b2


def build_operators(env: Env, backend: str, dtype: str, device: Any, width: int) -> dict:
    """Hessian, GGN and Jacobian of the MLP (MSE loss), in ``dtype`` on ``device``."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator
    from curvlinops.losses import MSELoss

    weights, data = problem_numbers(width)
    if backend == "torch":
        torch = env.torch
        tdt = getattr(torch, dtype)
        model = torch.nn.Sequential(
            torch.nn.Linear(IN_FEATURES, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, OUT_FEATURES),
        ).to(device=device, dtype=tdt)
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(torch.as_tensor(w))
        params = list(model.parameters())
        batches = [tuple(torch.as_tensor(a, device=device).to(tdt) for a in b) for b in data]
        model_func, loss = model, torch.nn.MSELoss()
    else:
        jax = env.jax
        params = [jax.device_put(np.asarray(w, dtype=dtype), device) for w in weights]
        batches = [tuple(jax.device_put(np.asarray(a, dtype=dtype), device) for a in b)
                   for b in data]  # fmt: skip
        model_func, loss = _jax_model, MSELoss()
    return {
        "hessian": HessianLinearOperator(model_func, loss, params, batches),
        "ggn": GGNLinearOperator(model_func, loss, params, batches),
        "jacobian": JacobianLinearOperator(model_func, params, batches),
    }


def references(env: Env, width: int) -> dict[str, np.ndarray]:
    """float64 dense matrices on the CPU (PyTorch if installed, else JAX)."""
    backend = "torch" if env.torch is not None else "jax"
    device = env.torch.device("cpu") if backend == "torch" else env.jax.devices("cpu")[0]
    ops = build_operators(env, backend, "float64", device, width)
    return {name: _to_numpy(op.todense()) for name, op in ops.items()}


def _to_numpy(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _rel(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


# --- measuring ----------------------------------------------------------------------------
class CudaCopies:
    """Device-to-host copies recorded by CUDA (CUPTI, read through ``torch.profiler``).

    Without CUDA (a dry run, or no PyTorch) the row says ``cpu`` / ``n/a``.
    """

    def __init__(self, env: Env):
        torch = env.torch
        self.active = (
            torch is not None and torch.cuda.is_available() and not env.dry_run
        )  # fmt: skip
        self.count, self.largest = 0, 0
        self.label = "cpu" if env.dry_run else "n/a (needs torch with CUDA)"
        self._profiler = None
        if self.active:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._profiler = torch.profiler.profile(activities=activities)

    def __enter__(self) -> CudaCopies:
        if self._profiler is not None:
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(*exc)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            self._profiler.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        self.count, self.largest = count_device_to_host(events)
        self.label = f"{self.count} (max {self.largest} B)"

    def vector_copied(self, vector_bytes: int) -> bool:
        return self.active and self.largest >= vector_bytes


def count_device_to_host(events: list[dict]) -> tuple[int, int]:
    """Number and largest size (bytes) of the device-to-host memcpy events in a trace."""
    sizes = [
        int(e.get("args", {}).get("bytes", 0))
        for e in events
        if "memcpy" in str(e.get("cat", "")).lower() and "DtoH" in str(e.get("name", ""))
    ]
    return len(sizes), max(sizes, default=0)


def median_time(env: Env, fn: Callable[[], Any], repeats: int) -> float:
    env.synchronize(fn())  # warm-up (and JAX's compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        env.synchronize(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_row(row: Row, env: Env, check: Callable[[], float], vector_bytes: int,
            host_ok: bool) -> Row:  # fmt: skip
    """Run ``check`` (which returns the error) under the copy monitor; fill in ``row``."""
    monitor = CudaCopies(env)
    try:
        with monitor:
            row.err = check()
            env.synchronize()
    except Exception as error:  # noqa: BLE001 - a failing check is a row, not a crash
        row.ok, row.note = False, f"{type(error).__name__}: {error}"[:160]
        traceback.print_exc(file=sys.stderr)
        return row
    row.d2h = row.d2h or monitor.label
    if row.tol is not None and not (row.err is not None and row.err <= row.tol):
        row.ok = False
    if monitor.vector_copied(vector_bytes) and not host_ok:
        row.ok, row.note = False, (row.note + " vector-sized copy to the host").strip()
    return row


# --- the checks ----------------------------------------------------------------------------
def product_rows(env, backend, name, op, dense, arrays, repeats) -> list[Row]:
    rng = np.random.default_rng(1)
    itemsize = np.dtype(env.dtype).itemsize
    vector_bytes = itemsize * min(op.shape)
    products = [
        ("matvec", op.matvec, dense, rng.normal(size=op.shape[1])),
        ("matmat", op.matmat, dense, rng.normal(size=(op.shape[1], K_BLOCK))),
    ]
    if name == "jacobian":
        products.append(("rmatvec", op.rmatvec, dense.T, rng.normal(size=op.shape[0])))
    rows = []
    for check, apply, matrix, v in products:
        x = arrays.make(v)
        row = Row(name, backend, arrays.name, check, tol=env.tol["product"], per="/product")

        def compare(apply=apply, x=x, matrix=matrix, v=v, row=row) -> float:
            out = apply(x)
            _expect_same_library(out, x, row)
            return _rel(arrays.read(out), matrix @ v.astype(env.dtype).astype(np.float64))

        rows.append(run_row(row, env, compare, vector_bytes, arrays.on_host))
        if row.ok:
            row.seconds = median_time(env, functools.partial(apply, x), repeats)
    return rows


def _expect_same_library(out: Any, x: Any, row: Row) -> None:
    if type(out) is not type(x):
        raise TypeError(f"returned {type(out).__name__} for {type(x).__name__}")
    device_in, device_out = getattr(x, "device", None), getattr(out, "device", None)
    if str(device_in) != str(device_out):
        raise ValueError(f"returned an array on {device_out} for one on {device_in}")
    row.note = f"on {device_out}" if device_out is not None else ""


def solver_rows(env, backend, name, op, dense, arrays) -> list[Row]:
    """cupyx.scipy.sparse.linalg (or scipy.sparse.linalg in a dry run) on the operator."""
    from curvlinops import IdentityLinearOperator

    la, rng = arrays.solvers, np.random.default_rng(2)
    vector_bytes = np.dtype(env.dtype).itemsize * min(op.shape)
    tol = env.tol
    checks: list[tuple[str, Callable[[], float], float]] = []
    if name in ("hessian", "ggn"):
        top = np.linalg.eigvalsh(dense)[-K_EIG:]

        def eigsh() -> float:
            w = la.eigsh(op, k=K_EIG, which="LA", return_eigenvectors=False)
            return _rel(np.sort(arrays.read(w)), top)

        checks.append(("eigsh", eigsh, tol["spectrum"]))
    if name == "ggn":
        A = op + DAMPING * IdentityLinearOperator(op)
        A_dense = dense + DAMPING * np.eye(op.shape[0])
        b_host = rng.normal(size=op.shape[0])
        b = arrays.make(b_host)

        def solve(method: str) -> Callable[[], float]:
            def run() -> float:
                x, info = getattr(la, method)(A, b, maxiter=10 * op.shape[0])
                if info != 0:
                    raise RuntimeError(f"{method} did not converge (info={info})")
                residual = A_dense @ arrays.read(x).astype(np.float64) - b_host
                return float(np.linalg.norm(residual) / np.linalg.norm(b_host))

            return run

        for method in ("cg", "minres", "gmres"):
            checks.append((method, solve(method), tol["solve"]))

        def lobpcg() -> float:
            X0 = arrays.make(rng.normal(size=(op.shape[0], K_EIG)))
            residual_tol = 1e-4 if env.dtype == "float32" else 1e-8
            w, _ = la.lobpcg(arrays.wrap(op), X0, largest=True, maxiter=100, tol=residual_tol)
            return _rel(np.sort(arrays.read(w)), top)

        checks.append(("lobpcg(to_cupyx)", lobpcg, tol["spectrum"]))
    if name == "jacobian":
        singular = np.linalg.svd(dense, compute_uv=False)[:K_EIG]

        def svds() -> float:
            s = la.svds(op, k=K_EIG, return_singular_vectors=False)
            return _rel(np.sort(arrays.read(s))[::-1], singular)

        checks.append(("svds", svds, tol["spectrum"]))
    rows = []
    for check, fn, limit in checks:
        row = Row(name, backend, arrays.name, check, tol=limit, per="/solve")
        start = time.perf_counter()
        rows.append(run_row(row, env, fn, vector_bytes, arrays.on_host))
        row.seconds = time.perf_counter() - start
    return rows


def jax_native_rows(env, name, op, dense) -> list[Row]:
    """JAX's own solvers on the operator, compiled; no transfers allowed while they run."""
    import jax
    import jax.numpy as jnp

    from curvlinops import IdentityLinearOperator

    rng = np.random.default_rng(3)
    b_host = rng.normal(size=op.shape[0]).astype(env.dtype)
    b = jax.device_put(b_host, env.jax_device)
    rows = []
    if name == "ggn":
        A = op + DAMPING * IdentityLinearOperator(op)
        A_dense = dense + DAMPING * np.eye(op.shape[0])
        solve = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(A.matvec, b, maxiter=500)[0])

        def cg() -> float:
            x = _guarded(env, solve, b)
            residual = A_dense @ np.asarray(x, dtype=np.float64) - b_host
            return float(np.linalg.norm(residual) / np.linalg.norm(b_host))

        rows.append(_guarded_row(env, Row(name, "jax", "jax", "jit(cg)", tol=env.tol["solve"]),
                                 cg, solve, b))  # fmt: skip
    steps = 10

    def body(_: Any, v: Any) -> Any:
        w = op.matvec(v)
        return w / jnp.linalg.norm(w)

    power = jax.jit(lambda v: jax.lax.fori_loop(0, steps, body, v))

    def power_iteration() -> float:
        expected = b_host.astype(np.float64)
        for _ in range(steps):
            expected = dense @ expected
            expected /= np.linalg.norm(expected)
        return _rel(np.asarray(_guarded(env, power, b)), expected)

    if name in ("hessian", "ggn"):
        row = Row(name, "jax", "jax", "fori_loop power", tol=10 * env.tol["product"])
        rows.append(_guarded_row(env, row, power_iteration, power, b))
    return rows


def _guarded(env: Env, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` compiled first, then run with every transfer disallowed."""
    jax = env.jax
    jax.block_until_ready(fn(*args))
    with jax.transfer_guard("disallow"):
        return jax.block_until_ready(fn(*args))


def _guarded_row(env: Env, row: Row, check: Callable[[], float], fn: Callable, arg: Any) -> Row:
    row.d2h = "guard: none"
    run_row(row, env, check, 0, True)
    if row.ok:
        row.seconds, row.per = median_time(env, functools.partial(fn, arg), 3), "/solve"
    return row


def device_rule_rows(env: Env, backend: str, ops: dict) -> list[Row]:
    """An array on another device raises a ValueError naming both devices."""
    op = ops["ggn"]
    wrong = _array_on_another_device(env, backend, op.shape[1])
    if wrong is None:
        reason = "needs two GPUs" if not env.dry_run else "no second device"
        return [Row("ggn", backend, "-", "other device -> ValueError", note=f"skipped: {reason}")]
    label, x = wrong
    row = Row("ggn", backend, label, "other device -> ValueError")

    def check() -> float:
        try:
            op @ x
        except ValueError as error:
            if str(op.backend.device) not in str(error):
                raise AssertionError(f"the message does not name {op.backend.device}") from error
            row.note = str(error)[:90]
            return 0.0
        raise AssertionError("no ValueError")

    return [run_row(row, env, check, 0, True)]


def _array_on_another_device(env: Env, backend: str, n: int) -> tuple[str, Any] | None:
    if backend == "torch":
        torch = env.torch
        if not env.dry_run and torch.cuda.device_count() > 1:
            return "torch cuda:1", torch.ones(n, device="cuda:1", dtype=getattr(torch, env.dtype))
        return "torch meta", torch.ones(n, device="meta")
    jax = env.jax
    platform = env.jax_device.platform
    others = [d for d in jax.devices(platform) if d != env.jax_device]
    if not others:
        return None
    return f"jax {others[0]}", jax.device_put(np.ones(n, dtype=env.dtype), others[0])


def aliasing_rows(env: Env, backend: str, ops: dict, dense: np.ndarray) -> list[Row]:
    """Memory shared with another library and changed in place after the call."""
    torch = env.torch
    if torch is None or env.jax is None:
        return [Row("ggn", backend, "-", "aliasing", note="skipped: needs torch and jax")]
    op = ops["ggn"]
    jnp = env.jax.numpy
    rows = []
    t_device = env.torch_device if env.torch_device is not None else torch.device("cpu")
    if backend == "jax" and t_device.type != env.jax_device.platform.replace("gpu", "cuda"):
        return [Row("ggn", backend, "-", "aliasing", note="skipped: torch and jax devices differ")]
    sources = {"torch": lambda t: t}
    if env.jax_device is not None:  # a JAX array sharing the tensor's memory
        sources["torch->jax dlpack"] = lambda t: jnp.from_dlpack(t)
    for label, convert in sources.items():
        row = Row("ggn", backend, label, "mutate input after call", tol=env.tol["product"])

        def check(convert=convert) -> float:
            v = np.random.default_rng(4).normal(size=op.shape[1]).astype(env.dtype)
            t = torch.tensor(v, device=t_device)  # a copy: v stays the reference input
            out = op @ convert(t)
            t.add_(1.0)  # in place, on PyTorch's stream, after the call returned
            return _rel(_to_numpy(out), dense @ v.astype(np.float64))

        rows.append(run_row(row, env, check, 0, True))
    return rows


# --- the run -------------------------------------------------------------------------------
def run(env: Env, width: int, repeats: int) -> list[Row]:
    refs = references(env, width)
    rows: list[Row] = []
    for backend in env.backends():
        device = env.torch_device if backend == "torch" else env.jax_device
        ops = build_operators(env, backend, env.dtype, device, width)
        for arrays in array_libraries(env, backend):
            for name, op in ops.items():
                rows += product_rows(env, backend, name, op, refs[name], arrays, repeats)
                if arrays.solvers is not None:
                    rows += solver_rows(env, backend, name, op, refs[name], arrays)
        if backend == "jax":
            for name in ("ggn", "hessian"):
                rows += jax_native_rows(env, name, ops[name], refs[name])
        rows += device_rule_rows(env, backend, ops)
        rows += aliasing_rows(env, backend, ops, refs["ggn"])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU (CI)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32")
    parser.add_argument("--width", type=int, default=None, help="hidden units (P = 12 w + 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed products per row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # two CPU devices for JAX: set before JAX is imported
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU
    env = detect(args.dry_run, args.dtype)
    if args.dry_run and env.torch is not None:
        env.torch.set_num_threads(1)  # small problems; CI machines are shared
    if not env.backends():
        print("No backend has a GPU here:", env.skipped, "- use --dry-run on the CPU.")
        return 2
    width = args.width or (16 if args.dry_run else 64)
    repeats = args.repeats or (3 if args.dry_run else 20)
    start = time.perf_counter()
    rows = run(env, width, repeats)
    print(f"curvlinops GPU check ({'dry run on the CPU' if args.dry_run else 'GPU'}), "
          f"{env.dtype}, P = {12 * width + 3}, {time.perf_counter() - start:.1f} s")  # fmt: skip
    print_table(rows)
    for what, reason in env.skipped:
        print(f"skipped {what}: {reason}")
    failed = [row for row in rows if not row.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
