"""Timing, peak memory, thread settings and machine facts.

Peak memory on the CPU is the growth of the process's resident set size (RSS)
during one call. On Linux the kernel keeps the peak itself: writing ``5`` to
``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` of
``/proc/self/status`` to the current RSS, and ``VmHWM`` after the call is the
exact peak, with nothing running beside the call. Elsewhere a background
thread samples the RSS every 2 ms (psutil, else ``/proc/self/statm``), else
the ``ru_maxrss`` high-water mark of ``resource.getrusage`` is used; a
sampler wakes beside the timed run and can take a core from the framework's
thread team on a 2-core machine. ``tracemalloc`` is blind to the frameworks'
allocators; RSS is not. Allocators keep freed memory for reuse, so a repeated
call would show no growth: before the baseline is read, garbage is collected
and glibc returns its free pages to the system (``malloc_trim(0)``); the
allocator's settings are not changed. Products get one extra, untimed call for
memory; eigsh, trace and CG are measured during their first timed run, which
is why that needs the kernel's peak rather than a sampler. On CUDA the
frameworks' own peak counters are used instead.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

__all__ = [
    "CompileCounter",
    "MemoryProbe",
    "machine_info",
    "rss_bytes",
    "summarize",
    "thread_info",
    "versions",
]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

try:
    import psutil

    _PROCESS = psutil.Process()
except ImportError:  # pragma: no cover - psutil is in the bench extra
    psutil, _PROCESS = None, None


def rss_bytes() -> int:
    """The resident set size of this process now (0 when it cannot be read)."""
    if _PROCESS is not None:
        return int(_PROCESS.memory_info().rss)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _high_water_mark_bytes() -> int | None:
    """The kernel's peak RSS since the last reset (``VmHWM``), None where not offered."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Set ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


_KERNEL_PEAK = _high_water_mark_bytes() is not None and _reset_high_water_mark()


def rss_method() -> str:
    if _KERNEL_PEAK:
        return "kernel RSS high-water mark (VmHWM reset through /proc/self/clear_refs)"
    if _PROCESS is not None:
        return "psutil RSS sampled every 2 ms"
    if os.path.exists("/proc/self/statm"):
        return "/proc/self/statm RSS sampled every 2 ms"
    return "resource.getrusage ru_maxrss delta (high-water mark only)"


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# --- glibc: hand freed memory back before a memory call ----------------------------------
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def release_free_memory() -> None:
    """Collect garbage and return the allocator's free pages to the system (glibc)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MemoryProbe:
    """Peak memory growth of one call, in MiB.

    CPU: RSS growth (see the module docstring). CUDA: PyTorch's
    ``max_memory_allocated`` or JAX's ``peak_bytes_in_use`` growth.
    """

    def __init__(self, device: str, framework: str, interval: float = 0.002) -> None:
        self.device, self.framework, self.interval = device, framework, interval

    def measure(self, call: Callable[[], Any]) -> float | None:
        """Run ``call()`` once and return its peak memory growth in MiB."""
        release_free_memory()
        if self.device.startswith("cuda"):
            return self._cuda(call)
        return self._cpu(call)

    def _cpu(self, call: Callable[[], Any]) -> float | None:
        if _KERNEL_PEAK:
            return self._kernel_peak(call)
        if _PROCESS is None and not os.path.exists("/proc/self/statm"):
            before = _maxrss_bytes()
            call()
            return (_maxrss_bytes() - before) / 2**20
        baseline = rss_bytes()
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes())
                stop.wait(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            call()
        finally:
            stop.set()
            thread.join()
        peak[0] = max(peak[0], rss_bytes())
        return (peak[0] - baseline) / 2**20

    @staticmethod
    def _kernel_peak(call: Callable[[], Any]) -> float | None:
        baseline = rss_bytes()
        _reset_high_water_mark()
        call()
        peak = _high_water_mark_bytes()
        return None if peak is None else (max(peak, baseline) - baseline) / 2**20

    def _cuda(self, call: Callable[[], Any]) -> float | None:
        if self.framework == "torch":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        before = stats.get("bytes_in_use", 0)
        call()
        after = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" not in after:
            return None
        return (after["peak_bytes_in_use"] - before) / 2**20


_COMPILES = [0]
_LISTENING = [False]
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def _on_event(event: str, _seconds: float, **_: Any) -> None:
    if event == _BACKEND_COMPILE:
        _COMPILES[0] += 1


class CompileCounter:
    """XLA compilations (``jax.jit`` programs and the eager operations' own) from now on.

    Counted with a ``jax.monitoring`` listener on the backend-compile event: one per
    program that XLA compiles, whether from ``jax.jit`` or from an operation run eagerly
    for the first time with its shapes.
    """

    def __init__(self) -> None:
        if not _LISTENING[0]:
            import jax.monitoring

            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _LISTENING[0] = True
        self._mark = _COMPILES[0]
        self.timed = 0

    @property
    def count(self) -> int:
        """Compilations since this counter was made or last taken."""
        return _COMPILES[0] - self._mark

    def take(self) -> int:
        """The count so far; counting starts again from zero."""
        value = self.count
        self._mark = _COMPILES[0]
        return value


def summarize(times: list[float]) -> dict:
    """Median, min and max of a list of durations (seconds)."""
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "repeats": len(times),
        "times": times,
    }


def timed(call: Callable[[], Any], sync: Callable[[Any], Any]) -> tuple[float, Any]:
    """Seconds for ``sync(call())``, and the result."""
    start = time.perf_counter()
    result = sync(call())
    return time.perf_counter() - start, result


# --- the environment ------------------------------------------------------------------------
def versions() -> dict:
    """Versions of Python and the packages that matter for the numbers."""
    out = {"python": platform.python_version()}
    for name in ("curvlinops", "torch", "jax", "jaxlib", "numpy", "scipy", "threadpoolctl",
                 "psutil", "array-api-compat", "matplotlib"):  # fmt: skip
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    """CPU model, core counts, memory, OS and the load average now."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "node": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    if psutil is not None:
        return round(psutil.virtual_memory().total / 2**30, 1)
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def thread_info() -> dict:
    """Thread counts as the process sees them: torch, XLA flags, BLAS/OpenMP pools."""
    info: dict = {
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                "MKL_NUM_THREADS", "XLA_FLAGS")},
    }  # fmt: skip
    if "torch" in sys.modules:
        import torch

        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_num_interop_threads"] = torch.get_num_interop_threads()
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: pool.get(k) for k in ("user_api", "internal_api", "prefix", "num_threads",
                                       "version")}
            for pool in threadpool_info()
        ]  # fmt: skip
    except ImportError:
        info["threadpools"] = None
    return info
