"""How a job shares the machine's cores between its backends.

Side by side, each backend runs in a spawned process of its own, and each gets
its share of the cores: PyTorch's intra-op threads, the BLAS pools (OpenMP,
MKL, OpenBLAS, read from the environment when the library loads) and XLA's
Eigen threads are set before the child starts, so that two processes never run
more threads than there are cores (oversubscribed, their threads spin and
wait on each other and the system time grows). One after the other, each
backend gets all the cores. The plan is printed and recorded in the JSON.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from curvlinops.backends._namespaces import cpu_threads, intra_op_threads, xla_knows

__all__ = [
    "BLAS_VARIABLES",
    "KEEP_FREED_MEMORY",
    "ThreadPlan",
    "available_cores",
    "keep_freed_memory",
    "plan_threads",
    "run_backends",
]

BLAS_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""Environment variables the BLAS and OpenMP runtimes read when they load."""
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(16 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}
"""glibc's malloc keeps freed memory for the next allocation instead of giving it back.

By default every allocation above 32 MB (and smaller ones, as the dynamic threshold
moves) is a fresh ``mmap``: each product's temporaries are new zeroed pages, one page
fault per 4 KB. In the influence job that was 33 million faults and a system CPU time
of 28 % of the user time; with these settings (read by glibc when a process starts)
a PyTorch GGN product with 1,297 columns took 0.74 s less system and 1.8 times less
CPU time in all, and page faults fell ninefold. Other C libraries ignore them."""
_MALLOPT = {"MALLOC_MMAP_MAX_": -4, "MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_TOP_PAD_": -2}
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false"
"""XLA's CPU dots and convolutions on the calling thread only (XLA has no thread-count flag)."""


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not on Linux
        return max(os.cpu_count() or 1, 1)


@dataclass(frozen=True)
class ThreadPlan:
    """Where the backends run and with how many threads each.

    Attributes:
        side_by_side: Whether each backend runs in a process of its own, at the same time.
        cores: Cores available to the job.
        threads: Threads per backend (PyTorch intra-op, BLAS; XLA's Eigen pool
            is switched off at 1).
        environment: The variables set for the backends' processes (side by side only).
    """

    side_by_side: bool
    cores: int
    threads: int
    environment: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The plan for the JSON report."""
        return {
            "mode": "side by side" if self.side_by_side else "one after another",
            "cores": self.cores,
            "threads_per_backend": self.threads,
            "environment": dict(self.environment),
        }

    def describe(self) -> str:
        """One line for the report."""
        if self.side_by_side:
            where = f"side by side, one process each, {self.threads} thread(s) each"
        else:
            where = f"one after another, {self.threads} thread(s) each"
        return f"threads: {self.cores} core(s); backends {where}"


def plan_threads(names: Sequence[str], *, processes: bool = True) -> ThreadPlan:
    """Side by side when allowed and there is a core for each backend; the threads per backend.

    Args:
        names: The backends to run.
        processes: Whether the job may run backends side by side.

    Returns:
        The :class:`ThreadPlan`.

    Example:
        >>> plan = plan_threads(["torch"])
        >>> plan.side_by_side, plan.threads == available_cores()
        (False, True)
    """
    cores = available_cores()
    side_by_side = processes and len(names) > 1 and cores >= len(names)
    if not side_by_side:
        return ThreadPlan(False, cores, cores)
    threads = cores // len(names)
    environment = {name: str(threads) for name in BLAS_VARIABLES}
    environment.update({k: v for k, v in KEEP_FREED_MEMORY.items() if k not in os.environ})
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        if xla_knows(SINGLE_THREAD_XLA[2:].split("=")[0]):
            environment["XLA_FLAGS"] = f"{flags} {SINGLE_THREAD_XLA}".strip()
    return ThreadPlan(True, cores, threads, environment)


def keep_freed_memory() -> bool:
    """Apply :data:`KEEP_FREED_MEMORY` to this running process (glibc's ``mallopt``).

    For a process that is the job (the command line); returns whether it applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = True
    for variable, option in _MALLOPT.items():
        value = int(os.environ.get(variable, KEEP_FREED_MEMORY[variable]))
        done &= bool(mallopt(option, min(value, 2**31 - 1)))
    return done


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Set ``variables`` while processes are spawned (they copy the environment), then restore."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_backends(
    names: Sequence[str],
    plan: ThreadPlan,
    work: Callable[..., Any],
    args: tuple,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, dict]]:
    """``work(name, *args, say)`` for each backend, as ``plan`` says.

    Side by side, ``work`` must be a module-level function (it is pickled) and
    its progress lines are printed when its process ends, one backend after
    the other.

    Returns:
        The results by backend name, and the threads each backend's process
        had when its work ended (:func:`observed_threads`), by name.
    """
    results, observed = {}, {}
    if not plan.side_by_side:
        for name in names:
            with cpu_threads(name, plan.threads):
                results[name] = work(name, *args, say)
                observed[name] = observed_threads(name)
        return results, observed
    # "spawn": a fork would copy a parent's framework thread pools in an unknown state
    context = multiprocessing.get_context("spawn")
    with _environment(plan.environment):
        with ProcessPoolExecutor(len(names), mp_context=context) as pool:
            futures = {
                name: pool.submit(_collecting_lines, work, name, plan.threads, args)
                for name in names
            }
            for name, future in futures.items():
                lines, results[name], observed[name] = future.result()
                for line in lines:
                    say(line)
    return results, observed


def _collecting_lines(
    work: Callable[..., Any], name: str, threads: int, args: tuple
) -> tuple[list[str], Any, dict]:
    """``work`` in a worker process, with ``threads`` PyTorch threads; its lines returned."""
    lines: list[str] = []
    with cpu_threads(name, threads):
        result = work(name, *args, lines.append)
        return lines, result, observed_threads(name)


def observed_threads(name: str) -> dict[str, Any]:
    """The threads this process runs with: PyTorch's, the BLAS/OpenMP pools', ``XLA_FLAGS``.

    ``blas`` maps each loaded pool (threadpoolctl's ``internal_api``, e.g.
    ``openblas``, ``openmp``) to its largest thread count.
    """
    blas: dict[str, int] = {}
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # optional at run time: the report says nothing then
        threadpool_info = list
    for pool in threadpool_info():
        api = pool.get("internal_api", "?")
        blas[api] = max(blas.get(api, 0), int(pool.get("num_threads", 0)))
    return {
        "pid": os.getpid(),
        "intra_op_threads": intra_op_threads(name),
        "blas": blas,
        "xla_flags": os.environ.get("XLA_FLAGS", "") if name == "jax" else None,
        "malloc": {variable: os.environ.get(variable) for variable in KEEP_FREED_MEMORY},
    }
