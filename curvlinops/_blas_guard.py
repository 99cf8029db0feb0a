"""Keep the BLAS thread pool out of the way while a host-side solver drives our products.

scipy's solvers (``eigsh``'s ARPACK, ``cg``, ``lobpcg``, ...) do their vector
work with a multithreaded BLAS (OpenBLAS) between calls to our products. After
each BLAS call, OpenBLAS's worker threads keep spinning for a while; on a
machine with few cores they take cores from the PyTorch or XLA threads of the
next product, whose parallel regions then wait on a descheduled thread. With
2 CPU threads this made ``eigsh`` on an MLP Hessian about twice as slow as its
products (benchmarks/README.md has the measurement). Limiting BLAS to one
thread *during* our products does not help (the workers are already
spinning); limiting it for the whole solve does, and costs nothing: the
solver's vector work is small next to the products.

So, when a product is asked for with a numpy array (the scipy path) and the
operator computes on the CPU, :func:`holding` limits the BLAS pools to one
thread and keeps them there while products keep coming; a watcher thread gives
the original limits back once no such product has run during
:data:`IDLE_SECONDS` (numpy code of the caller in that half second runs with
single-threaded BLAS). The idle time counts from the end of the last product,
and never during one: a product slower than :data:`IDLE_SECONDS` (a large
model, a busy machine) used to give the limits back while it ran, and every
next product paid for a hand-off to the worker thread to set them again.
Set the environment variable ``CURVLINOPS_LIMIT_BLAS=0`` to switch this off.
It needs ``threadpoolctl``; without it nothing happens.
One worker thread of the guard sets and restores the limits, so that both
happen on the same thread: OpenBLAS (0.3.30 here) ignores a thread count set
from another thread than the one that set it last. For the same reason the
guard has no effect (and does no harm) in a process whose main thread has set
the BLAS thread count itself, e.g. with ``threadpoolctl.threadpool_limits``;
such a process already controls its threads. OpenBLAS reads its thread count
when a call starts, so a call running at the moment of a change keeps its count.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["IDLE_SECONDS", "enabled", "hold", "holding", "is_holding", "on_cpu", "release"]

IDLE_SECONDS = 0.5
"""How long after the last host-path product the BLAS pools get their threads back."""

_lock = threading.Lock()
_requests: queue.SimpleQueue = queue.SimpleQueue()
_state: dict[str, Any] = {"limiter": None, "last": 0.0, "worker": None, "running": 0}


def enabled() -> bool:
    """Whether the guard is on (``CURVLINOPS_LIMIT_BLAS`` is not ``0``)."""
    return os.environ.get("CURVLINOPS_LIMIT_BLAS", "1").strip().lower() not in ("0", "false", "no")


def on_cpu(backend: Any) -> bool:
    """Whether a backend computes on the CPU (torch device type / JAX platform ``cpu``)."""
    device = getattr(backend, "device", None)
    kind = getattr(device, "type", None) or getattr(device, "platform", None)
    return kind == "cpu"


def hold() -> None:
    """Limit the BLAS pools to one thread until products stop coming (see module docs)."""
    _state["last"] = time.monotonic()
    if _state["limiter"] is not None or not enabled():
        return
    with _lock:
        if _state["limiter"] is None:
            _ask("limit")


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """:func:`hold` around one product: the idle time starts when it ends."""
    hold()
    with _lock:
        _state["running"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["running"] -= 1
        _state["last"] = time.monotonic()


def release() -> None:
    """Give the BLAS pools their original thread counts back now."""
    with _lock:
        if _state["limiter"] is not None:
            _ask("release")


def is_holding() -> bool:
    """Whether the BLAS pools are limited by the guard right now."""
    return _state["limiter"] not in (None, _NOTHING)


def _ask(request: str) -> None:
    """Have the worker thread do ``request`` and wait for it (at most a second)."""
    if _state["worker"] is None:
        _state["worker"] = threading.Thread(target=_work, name="curvlinops-blas-guard", daemon=True)
        _state["worker"].start()
    done = threading.Event()
    _requests.put((request, done))
    done.wait(timeout=1.0)


def _work() -> None:
    while True:
        try:
            request, done = _requests.get(timeout=IDLE_SECONDS / 5)
        except queue.Empty:
            request, done = None, None
        idle = not _state["running"] and time.monotonic() - _state["last"] > IDLE_SECONDS
        if _state["limiter"] is not None and (request == "release" or idle):
            _state["limiter"].restore_original_limits()
            _state["limiter"] = None
        if request == "limit" and _state["limiter"] is None:
            # _NOTHING until the next idle spell: no pool to limit, do not look again
            _state["limiter"] = _limit_blas() or _NOTHING
        if done is not None:
            done.set()


class _Nothing:
    def restore_original_limits(self) -> None:
        pass


_NOTHING = _Nothing()


def _limit_blas() -> Any:
    """Limit every multithreaded BLAS pool to one thread; None when there is none."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    blas = ThreadpoolController().select(user_api="blas")
    if not any(lib.num_threads > 1 for lib in blas.lib_controllers):
        return None
    return blas.limit(limits=1)
