"""``benchmarks/gpu_check.py``: its CPU dry run passes, and its pieces work on CPU."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = [  # rows of both backends
    "matvec",
    "matmat",
    "rmatvec",
    "eigsh",
    "cg",
    "minres",
    "gmres",
    "lobpcg(to_cupyx)",
    "svds",
    "other device -> ValueError",
    "mutate input after call",
]
JAX_CHECKS = ["jit(cg)", "fori_loop power"]  # JAX's own solvers, compiled


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_passes():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=600
    )
    out = result.stdout
    assert result.returncode == 0, out[-5000:] + result.stderr[-3000:]
    assert "FAIL" not in out
    rows = [line.split("|") for line in out.splitlines() if line.count("|") >= 8]
    cells = {tuple(c.strip() for c in row[:4]) for row in rows}
    for backend in ("torch", "jax"):
        for operator in ("hessian", "ggn", "jacobian"):
            assert (operator, backend, "numpy", "matvec") in cells
        for check in CHECKS + (JAX_CHECKS if backend == "jax" else []):
            assert any(c[1] == backend and c[3] == check for c in cells), (backend, check)
    match = re.search(r"(\d+) of (\d+) rows passed", out)
    assert match and match.group(1) == match.group(2) and int(match.group(2)) >= 50


def test_device_to_host_copies_are_read_from_a_cuda_trace():
    """The GPU run reads CUDA's memcpy records from a torch.profiler trace like this one."""
    gpu_check = _load_script()
    events = [
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pageable)",
         "args": {"bytes": 1}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)",
         "args": {"bytes": 3084}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pageable -> Device)",
         "args": {"bytes": 9000}},
        {"ph": "X", "cat": "kernel", "name": "void at::native::DtoH_like_kernel", "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "args": {}},
    ]  # fmt: skip
    assert gpu_check.count_device_to_host(events) == (2, 3084)
    assert gpu_check.count_device_to_host([]) == (0, 0)


def test_rows_fail_on_error_or_exception():
    gpu_check = _load_script()
    env = gpu_check.Env(dry_run=True, dtype="float32")
    ok = gpu_check.run_row(gpu_check.Row("g", "b", "a", "c", tol=1e-3), env, lambda: 1e-4, 8, False)
    assert ok.ok and ok.d2h == "cpu"
    bad = gpu_check.run_row(gpu_check.Row("g", "b", "a", "c", tol=1e-3), env, lambda: 1.0, 8, False)
    assert not bad.ok

    def boom() -> float:
        raise ValueError("no luck")

    crashed = gpu_check.run_row(gpu_check.Row("g", "b", "a", "c"), env, boom, 8, False)
    assert not crashed.ok and "ValueError: no luck" in crashed.note
    lines = []

    class Out:
        def write(self, text):
            lines.append(text)

    gpu_check.print_table([ok, bad, crashed], out=Out())
    text = "".join(lines)
    assert text.count("FAIL") == 2 and "operator" in text.splitlines()[0]
