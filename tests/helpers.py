"""One comparison helper for every test: dtype-scaled tolerances, worst entries on failure."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

# Relative tolerance per dtype; the absolute tolerance is the same number times the
# largest magnitude of the expected array, so entries that cancel to ~0 do not fail.
RTOL = {
    np.dtype(np.float64): 1e-10,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 5e-3,
}


def to_numpy(x: Any) -> np.ndarray:
    """A float64 numpy copy of a numpy, torch or JAX array (or a scalar)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    return np.array(x)


def tolerance(*dtypes: Any) -> float:
    """The relative tolerance of the least precise of ``dtypes``."""
    tols = [RTOL.get(np.dtype(d), RTOL[np.dtype(np.float64)]) for d in dtypes]
    return max(tols)


def _leaves(x: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(x, Mapping):
        return [leaf for key in x for leaf in _leaves(x[key], f"{path}[{key!r}]")]
    if isinstance(x, (list, tuple)):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{path}[{i}]")]
    return [(path, x)]


def _dtype_of(x: Any) -> np.dtype:
    dtype = getattr(x, "dtype", np.float64)
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def assert_close(
    actual: Any, expected: Any, *, rtol: float | None = None, name: str = "", worst: int = 5
) -> None:
    """Assert that ``actual`` matches ``expected`` entry by entry.

    Both may be numpy/torch/JAX arrays or matching nested lists/tuples/dicts of
    them. Entry ``i`` passes when ``|a_i - e_i| <= rtol * (|e_i| + max|e|)``;
    ``rtol`` defaults to the tolerance of the least precise dtype involved.
    On failure, the message lists the ``worst`` entries with their indices.
    """
    actual_leaves, expected_leaves = _leaves(actual), _leaves(expected)
    if [p for p, _ in actual_leaves] != [p for p, _ in expected_leaves]:
        raise AssertionError(
            f"{name}: structures differ: {[p for p, _ in actual_leaves]} vs "
            f"{[p for p, _ in expected_leaves]}"
        )
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        _assert_leaf_close(a, e, rtol, f"{name}{path}", worst)


def _assert_leaf_close(a: Any, e: Any, rtol: float | None, name: str, worst: int) -> None:
    tol = tolerance(_dtype_of(a), _dtype_of(e)) if rtol is None else rtol
    a_np, e_np = to_numpy(a).astype(np.float64), to_numpy(e).astype(np.float64)
    if a_np.shape != e_np.shape:
        raise AssertionError(f"{name}: shape {a_np.shape} != expected shape {e_np.shape}")
    if a_np.size == 0:
        return
    scale = float(np.max(np.abs(e_np)))
    allowed = tol * (np.abs(e_np) + scale)
    error = np.abs(a_np - e_np)
    bad = ~(error <= allowed)  # NaN counts as bad
    if not bad.any():
        return
    excess = np.where(np.isnan(error), np.inf, error - allowed).ravel()
    order = np.argsort(-excess)[:worst]
    lines = [
        f"{name}: {int(bad.sum())} of {a_np.size} entries differ (rtol={tol:g}, "
        f"max |expected|={scale:.3g}, max |error|={np.nanmax(error):.3g}). Worst entries:"
    ]
    for flat in order:
        index = np.unravel_index(flat, a_np.shape)
        lines.append(
            f"  {tuple(int(i) for i in index)}: actual={a_np[index]!r} "
            f"expected={e_np[index]!r} |error|={error[index]:.3g} allowed={allowed[index]:.3g}"
        )
    raise AssertionError("\n".join(lines))


def run_processes(commands: list[list[str]], env: dict, timeout: float, what: str) -> None:
    """Start one process per command, wait at most ``timeout`` s in all; fail with their logs.

    Used by the multi-process tests: every process must exit with status 0.
    """
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    deadline = time.monotonic() + timeout
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[1])
        except subprocess.TimeoutExpired:
            proc.kill()
            logs.append(proc.communicate()[1] + "\n(killed: timeout)")
    failed = [i for i, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        report = "\n".join(
            f"--- process {i} (exit {procs[i].returncode}):\n{logs[i][-3000:]}" for i in failed
        )
        pytest.fail(f"{what}: processes {failed} failed\n{report}")


def fast_compile_xla_flags() -> str:
    """``XLA_FLAGS`` for the tests (conftest) and their worker processes: small problems.

    XLA:CPU then compiles without LLVM's optimisations and without its MLIR fusion
    emitters (where this jaxlib has them): the same results up to rounding, compiled two
    to three times faster, run slower, which the tests' tiny problems do not notice.
    """
    from curvlinops.backends._namespaces import xla_knows

    wanted = {
        "xla_backend_optimization_level": "0",
        "xla_llvm_disable_expensive_passes": "true",
        "xla_cpu_use_fusion_emitters": "false",
    }
    # XLA aborts on a flag it does not know: only those this jaxlib has
    return " ".join(f"--{flag}={value}" for flag, value in wanted.items() if xla_knows(flag))


def run_main(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m curvlinops ARGS`` in a fresh interpreter (``prelude``: code run before)."""
    code = (
        f"{prelude}import sys; from curvlinops.__main__ import main; sys.exit(main({list(args)!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 2, nothing on stdout, one ``curvlinops: error:`` line matching ``pattern``."""
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("curvlinops: error: ")
    assert re.search(pattern, lines[0]), lines[0]


_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_COMPILATIONS = [0, False]  # count, listener registered


def jax_compilations() -> int:
    """XLA compilations so far (``jax.jit`` programs and eager operations' own)."""
    import jax.monitoring

    if not _COMPILATIONS[1]:

        def count(event, _seconds, **_):
            if event == _BACKEND_COMPILE:
                _COMPILATIONS[0] += 1

        jax.monitoring.register_event_duration_secs_listener(count)
        _COMPILATIONS[1] = True
    return _COMPILATIONS[0]
