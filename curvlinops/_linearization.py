"""Per-batch linearizations kept for repeated products at fixed parameters.

Solvers (``eigsh``, Lanczos, CG, trace estimators) ask an operator for tens to
thousands of products with the same parameters and data. Each product used to
run the model forward and build the gradient's graph again. An operator now
keeps, per batch, what a product needs once that is built (PyTorch: the
autograd graphs; JAX: the residuals of ``jax.vjp`` / ``jax.linearize``), and
later products only apply it: about one backward pass each.

:class:`LinearizationCache` decides what is kept. ``cache="auto"`` (the
default) and ``cache=True`` keep linearizations while their total stays
within the budget (``cache_memory`` bytes; default for ``"auto"``: a quarter
of the memory available where the arrays live when the first one is kept,
none for ``True``); batches past it are recomputed on every product, as
without a cache. ``cache=False`` keeps nothing.

Kept linearizations are dropped when the parameters change in place (an
optimizer step, ``load_state_dict``, ``p.data.copy_``; PyTorch), detected
before every product from the backend's :meth:`parameters_token`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from curvlinops._checks import type_error, value_error
from curvlinops._memory import available_memory

__all__ = [
    "CACHE_BUDGET_FRACTION",
    "LinearizationCache",
    "SolverTrace",
    "active_solver_trace",
    "check_cache_options",
    "solver_trace",
]

CACHE_BUDGET_FRACTION = 0.25
"""Share of the available memory that ``cache="auto"`` may keep (the solvers' own
default budget is half of it; the rest stays for the products)."""


def check_cache_options(cache: Any, cache_memory: Any) -> tuple[bool | str, int | None]:
    """The checked ``cache`` and ``cache_memory`` options of an operator.

    Raises:
        TypeError: ``cache`` is not a bool or ``"auto"``; ``cache_memory`` not a number.
        ValueError: ``cache`` is another string; ``cache_memory`` is negative.
    """
    if isinstance(cache, str):
        if cache != "auto":
            raise value_error("cache", '"auto", True or False', repr(cache))
    elif not isinstance(cache, bool):
        raise type_error("cache", '"auto", True or False', cache)
    if cache_memory is None:
        return cache, None
    if isinstance(cache_memory, bool) or not isinstance(cache_memory, (int, float)):
        raise type_error("cache_memory", "a number of bytes (e.g. 2e9) or None", cache_memory)
    if not cache_memory >= 0:
        raise value_error(
            "cache_memory",
            "a non-negative number of bytes",
            repr(cache_memory),
            "Pass cache=False to keep nothing.",
        )
    return cache, int(cache_memory)


class LinearizationCache:
    """The linearizations an operator keeps, one per batch index, within a budget.

    Args:
        mode: ``"auto"``, ``True`` or ``False`` (see the module docstring).
        budget: ``cache_memory``: the bytes it may keep (``None``: the default).
        device: Where the arrays live (for the default budget).
    """

    def __init__(self, mode: bool | str, budget: int | None, device: Any) -> None:
        self.mode = mode
        self._budget_option, self._device = budget, device
        self._budget: int | None = None
        self._entries: dict[int, Any] = {}
        self._sizes: dict[int, int] = {}
        self._refused: set[int] = set()
        self._offered: dict[int, int] = {}
        self._token: Any = None
        self._paused = 0
        self.builds = 0
        self.invalidations = 0

    @property
    def enabled(self) -> bool:
        """Whether products may keep and use linearizations now."""
        return self.mode is not False and not self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Products inside recompute everything and keep nothing (the determinism check)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def check_fresh(self, token: Any) -> None:
        """Drop everything kept when the parameters changed since it was built."""
        if token != self._token:
            if self._entries or self._refused:
                self.invalidations += 1
            self.clear()
            self._token = token

    def nbytes_of(self, index: int) -> int:
        """Bytes of batch ``index``'s linearization when it was last offered (0: unknown)."""
        return self._offered.get(index, 0)

    def get(self, index: int) -> Any:
        """The linearization of batch ``index``, or ``None``."""
        return self._entries.get(index)

    def holds_all(self, indices: list[int]) -> bool:
        """Whether every batch in ``indices`` is kept (then no data needs to be read)."""
        return bool(indices) and all(i in self._entries for i in indices)

    def wants(self, index: int) -> bool:
        """Whether to build batch ``index``'s linearization (not refused for its size)."""
        return index not in self._refused

    def offer(self, index: int, state: Any, nbytes: int) -> None:
        """Keep ``state`` for batch ``index`` if it fits the budget; else recompute it later."""
        self.builds += 1
        self._offered[index] = int(nbytes)
        budget = self.budget()
        if budget is not None and self.nbytes + nbytes > budget:
            self._refused.add(index)
            return
        self._entries[index] = state
        self._sizes[index] = int(nbytes)

    def budget(self) -> int | None:
        """The bytes it may keep; ``None``: no limit."""
        if self._budget_option is not None:
            return self._budget_option
        if self.mode is True:
            return None
        if self._budget is None:  # read once per filling: the cache itself takes memory
            free = available_memory(self._device)
            self._budget = None if free is None else int(CACHE_BUDGET_FRACTION * free)
        return self._budget

    @property
    def nbytes(self) -> int:
        """Bytes kept now."""
        return int(sum(self._sizes.values()))

    def clear(self) -> None:
        """Forget everything kept (and which batches did not fit)."""
        self._entries.clear()
        self._sizes.clear()
        self._refused.clear()
        self._offered.clear()
        self._budget = None

    def info(self) -> dict[str, Any]:
        """What is kept: see :meth:`~curvlinops._curvature.CurvatureOperator.cache_info`."""
        return {
            "mode": self.mode,
            "batches": sorted(self._entries),
            "nbytes": self.nbytes,
            "nbytes_per_batch": dict(sorted(self._sizes.items())),
            "budget": self.budget() if self.mode is not False else 0,
            "recomputed": sorted(self._refused),
            "builds": self.builds,
            "invalidations": self.invalidations,
        }


class SolverTrace:
    """What a solver saw while it traced an operator's product into its compiled loop.

    Attributes:
        streamed: A product read its data from an iterable that is not a list or
            tuple (a data loader): its batches would become constants of the
            program, all in memory at once, so the solver steps eagerly instead.
    """

    def __init__(self) -> None:
        self.streamed = False


_SOLVER_TRACE: contextvars.ContextVar[SolverTrace | None] = contextvars.ContextVar(
    "curvlinops_solver_trace", default=None
)


@contextlib.contextmanager
def solver_trace() -> Iterator[SolverTrace]:
    """Products traced inside read the linearizations kept so far (they build none).

    A solver that compiles its whole loop (JAX) traces the product once: kept
    linearizations then enter its program as arguments, as they would enter
    each eager product, instead of the product being recomputed from the data.
    """
    record = SolverTrace()
    token = _SOLVER_TRACE.set(record)
    try:
        yield record
    finally:
        _SOLVER_TRACE.reset(token)


def active_solver_trace() -> SolverTrace | None:
    """The :class:`SolverTrace` of the solver tracing now, or ``None``."""
    return _SOLVER_TRACE.get()
