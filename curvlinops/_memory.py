"""Memory budgets: what a call will allocate, what is free, and a clear refusal.

The Krylov methods (:func:`~curvlinops.eigen.eigsh`, :func:`~curvlinops.eigen.lanczos`,
:func:`~curvlinops.spectral.spectral_density`) keep vectors of the operator's size
``n``; for a model of 100 M parameters each vector takes 400 MB in float32, so the
basis, not the model, decides whether a call fits. Before they allocate anything,
these functions add up what they will keep (a :class:`MemoryEstimate`), pick the
largest basis that fits their ``memory_budget``, and raise a
:class:`MemoryBudgetError` -- what is needed, what is available, which option
lowers it -- when even the smallest one does not, rather than being killed by the
operating system half-way.

The default budget is half of the memory available where the operator's arrays
live when the call starts: host memory (``psutil`` if installed, else
``/proc/meminfo``, else ``os.sysconf``) or the free memory of the GPU. The other
half stays for the products (the model's activations) and for the caller.

What a product needs counts against the available memory as well: curvature
operators estimate it themselves (``A.memory_estimate``, :func:`operator_memory`:
columns, intermediates, the model's activations on the largest batch, the kept
linearizations), other operators by their input and output columns.

No framework is imported here: device memory is read through the device object
of an array (JAX) or the already loaded library (PyTorch, CuPy).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "MemoryBudgetError",
    "MemoryEstimate",
    "available_memory",
    "default_memory_budget",
    "format_bytes",
    "operator_memory",
    "product_memory",
    "resolve_budget",
]

DEFAULT_BUDGET_FRACTION = 0.5
"""Share of the available memory a call may take when no ``memory_budget`` is given."""


class MemoryBudgetError(MemoryError):
    """A call would need more memory than its budget or than is available.

    Attributes:
        estimate: The :class:`MemoryEstimate` that did not fit (``None`` if unknown).
    """

    def __init__(self, message: str, estimate: MemoryEstimate | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate


def format_bytes(num_bytes: float) -> str:
    """``1.23 GB`` style (decimal units, as the budgets are given in bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


@dataclass
class MemoryEstimate:
    """Bytes a call will allocate, part by part, against its budget.

    Attributes:
        what: The call, for messages (``"eigsh"``).
        parts: Bytes per part (``"basis (12 vectors)"``, ``"work vectors"``, ...).
        budget: The bytes the call may use.
        available: The bytes available where the arrays live (``None``: unknown).
        where: ``"host"`` or the device (``"cuda:0"``).
    """

    what: str
    parts: dict[str, int]
    budget: int | None
    available: int | None = None
    where: str = "host"
    fixes: list[str] = field(default_factory=list)
    outside_budget: dict[str, int] = field(default_factory=dict)
    """Parts that count against the available memory only (the operator's products)."""
    held: tuple[str, ...] = ()
    """Parts allocated already (parameters, kept linearizations): in :attr:`total`,
    but not in what the call still takes from the available memory."""

    @property
    def needed(self) -> int:
        """The parts still to be allocated (the total less the :attr:`held` parts)."""
        return int(sum(b for name, b in self.parts.items() if name not in self.held))

    @property
    def total(self) -> int:
        """The sum of the parts."""
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        """The parts and their sum, one line."""
        parts = ", ".join(f"{name} {format_bytes(b)}" for name, b in self.parts.items())
        return f"{format_bytes(self.total)} ({parts})"

    def fits(self) -> bool:
        """Whether the total is within the budget and, with the products, within what is free."""
        if self.budget is not None and self.total > self.budget:
            return False
        outside = sum(self.outside_budget.values())
        return self.available is None or self.needed + outside <= self.available

    def check(self) -> None:
        """Raise :class:`MemoryBudgetError` when the total exceeds the budget or what is free.

        Raises:
            MemoryBudgetError: Needed, the budget and the available memory, and the
                options that lower the need.
        """
        fixes = " ".join(self.fixes)
        if self.budget is not None and self.total > self.budget:
            raise MemoryBudgetError(
                f"{self.what}: needs {self.describe()}, more than memory_budget = "
                f"{format_bytes(self.budget)}. {fixes}".rstrip(),
                self,
            )
        outside = sum(self.outside_budget.values())
        if self.available is not None and self.needed + outside > self.available:
            products = ", ".join(
                f"{name} {format_bytes(b)}" for name, b in self.outside_budget.items()
            )
            if any(name.startswith("activations") for name in self.outside_budget):
                fixes += (
                    " Smaller data batches lower the activations; cache_memory= or "
                    "cache=False bounds the kept linearizations."
                )
            raise MemoryBudgetError(
                f"{self.what}: needs {self.describe()}"
                + (f" plus {products}" if products else "")
                + f", more than the {format_bytes(self.available)} of {self.where} memory "
                f"available now. {fixes}".rstrip(),
                self,
            )

    def as_dict(self) -> dict[str, Any]:
        """The estimate for a result's ``info``."""
        return {
            "estimated_bytes": self.total,
            "parts": dict(self.parts),
            "memory_budget": self.budget,
            "outside_budget": dict(self.outside_budget),
            "available": self.available,
            "where": self.where,
            "held": list(self.held),
        }


# --- what is available ------------------------------------------------------------------
def available_memory(device: Any = None) -> int | None:
    """Bytes available for new arrays on ``device`` (host memory for ``None`` or a CPU).

    Host: ``psutil.virtual_memory().available``, else ``MemAvailable`` of
    ``/proc/meminfo``, else the free pages from ``os.sysconf``. GPUs: the free
    memory the framework reports (JAX ``memory_stats``, ``torch.cuda.mem_get_info``,
    CuPy's ``mem_info``). ``None`` when nothing can be read.
    """
    if device is not None and not _is_host(device):
        return _device_free(device)
    return _host_available()


def _is_host(device: Any) -> bool:
    kind = getattr(device, "platform", None) or getattr(device, "type", None)
    if kind is None:
        kind = str(device)
    return str(kind).split(":")[0].lower() in ("cpu", "host", "numpy")


def _host_available() -> int | None:
    try:
        import psutil  # optional: the most portable reading
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _device_free(device: Any) -> int | None:
    stats = getattr(device, "memory_stats", None)
    if callable(stats):  # a JAX device
        numbers = stats() or {}
        if "bytes_limit" in numbers:
            return int(numbers["bytes_limit"] - numbers.get("bytes_in_use", 0))
        return None
    torch = sys.modules.get("torch")  # loaded, as the operator's arrays are torch's
    if torch is not None and isinstance(device, torch.device) and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    cupy = sys.modules.get("cupy")
    if cupy is not None and hasattr(device, "mem_info"):
        return int(device.mem_info[0])
    return None


def default_memory_budget(device: Any = None) -> int | None:
    """:data:`DEFAULT_BUDGET_FRACTION` of :func:`available_memory` (``None``: unknown)."""
    free = available_memory(device)
    return None if free is None else int(DEFAULT_BUDGET_FRACTION * free)


def resolve_budget(memory_budget: Any, device: Any = None) -> tuple[int | None, int | None]:
    """The checked budget (default: from the available memory) and the available memory.

    Raises:
        TypeError: ``memory_budget`` is not a number.
        ValueError: ``memory_budget`` is not positive.
    """
    available = available_memory(device)
    if memory_budget is None:
        budget = None if available is None else int(DEFAULT_BUDGET_FRACTION * available)
        return budget, available
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
        raise type_error("memory_budget", "a number of bytes (e.g. 4e9)", memory_budget)
    if not memory_budget > 0:
        raise value_error(
            "memory_budget", "a positive number of bytes", repr(memory_budget), "E.g. 4e9."
        )
    return int(memory_budget), available


def where(device: Any) -> str:
    """``"host"`` for host memory, else the device's name."""
    return "host" if device is None or _is_host(device) else str(device)


# --- what a product needs ------------------------------------------------------------------
PARAMETERS = "parameters"
CACHE_HELD = "kept linearizations (held)"
CACHE_MORE = "kept linearizations (may still keep)"

# A product's activations, per operator kind (``_activation_factors`` of the
# operator classes: Hessian (3.0, 0.6), GGN, EF and MC Fisher (2.5, 0.6), Jacobian
# (1.0, 0.6)), as multiples (first column, each further column of a pass) of the
# bytes autograd saves in a forward pass of the loss on the largest batch.
# Measured (PyTorch, float32, benchmarks/problems.py, peak RSS growth of a repeated
# product without cache, less its input, output and intermediates): Hessian 1.4 (MLP)
# and 3.0 (transformer) forward passes for one column, 4.6 and 15 for 16; GGN/EF 0.9
# and 2.3 for one, 9.3 and 19 for 16; Jacobian 1.0 and 0.7 for one, 9.6 and 5.7 for
# 16. The factors over-estimate the MLP's wide passes by up to 2.6x and under-estimate
# the transformer's GGN by 0.6x; the kept linearization of a batch (``graph_bytes``)
# was 1.6-2.3 forward passes.

LINEARIZATION_FACTOR = 2.0
"""Bytes a batch's kept linearization takes, in forward passes, until one is kept
(measured 1.6-2.3, see the measurements above)."""


def product_memory(A: Any, num_columns: int = 1) -> dict[str, int]:
    """Bytes a product ``A @ X`` with ``num_columns`` columns allocates, as far as known.

    Curvature operators say it themselves (``A.memory_estimate``): columns,
    intermediates, the model's activations on the largest batch, and what the
    cache of linearizations may still keep; the parts already allocated
    (parameters, linearizations kept now) are left out. Other operators: the input
    and output columns only.

    Args:
        A: An operator of this library, a scipy operator or a matrix.
        num_columns: Columns of ``X``.

    Returns:
        Bytes per part.
    """
    estimate = _operator_estimate(A, num_columns)
    if estimate is not None:
        return {name: b for name, b in estimate.parts.items() if name not in estimate.held}
    rows, columns = A.shape
    return _column_parts(A, rows, columns, num_columns)


def _operator_estimate(A: Any, num_columns: int) -> MemoryEstimate | None:
    """``A.memory_estimate(num_columns)``; a transposed Jacobian asks its Jacobian."""
    if callable(getattr(A, "_forward_saved_bytes", None)):
        return operator_memory(A, num_columns, compiled=False)
    jacobian = getattr(A, "jacobian", None)  # TransposedJacobianLinearOperator
    if callable(getattr(jacobian, "_forward_saved_bytes", None)):
        return operator_memory(jacobian, num_columns, adjoint=True, compiled=False)
    return None


def _column_parts(A: Any, rows: int, columns: int, num_columns: int) -> dict[str, int]:
    """Input and output columns, and the intermediates of curvature operators.

    Three ``(P,)`` vectors (tangents, gradients, the product) per column of a pass
    of ``columns_per_pass``.
    """
    itemsize = _itemsize(A)
    parts = {"product input and output": int((rows + columns) * num_columns * itemsize)}
    per_pass = getattr(A, "columns_per_pass", None)
    if isinstance(per_pass, int) and getattr(A, "backend", None) is not None:
        together = min(per_pass, num_columns)
        parts["product intermediates"] = int(3 * together * columns * itemsize)
    return parts


def operator_memory(
    op: Any, num_columns: int, adjoint: bool = False, compiled: bool = True
) -> MemoryEstimate:
    """What one product of a curvature operator with ``num_columns`` columns needs.

    ``op`` is a :class:`~curvlinops._curvature.CurvatureOperator`. Activations:
    XLA's temporary bytes of the compiled product (``op._compiled_product_bytes``;
    JAX, when ``compiled``), which hold the intermediates too, else the bytes a
    forward pass saves (``op._forward_saved_bytes``) scaled by
    the operator's ``_activation_factors``. The solvers ask without ``compiled``: the analysis
    costs a compilation of the product (seconds for a transformer) in every new
    operator, the forward pass's bytes an abstract trace.
    """
    rows, columns = op.shape[::-1] if adjoint else op.shape
    together = min(op.columns_per_pass, num_columns)
    parts = {PARAMETERS: int(op.num_params * _itemsize(op))}
    parts.update(_column_parts(op, rows, columns, num_columns))
    forward, batch, batches = op._forward_saved_bytes()
    compiled = op._compiled_product_bytes(together, adjoint) if compiled else None
    label = f"activations (batch of {batch}, {together} column(s) per pass"
    if compiled is not None:
        del parts["product intermediates"]
        parts[f"{label}, with intermediates: compiled)"] = compiled
    else:
        first, further = op._activation_factors
        parts[f"{label})"] = int(forward * (first + further * (together - 1)))
    parts[CACHE_HELD], parts[CACHE_MORE] = _cache_parts(op.cache_info(), forward, batches)
    device = op.backend.device
    return MemoryEstimate(
        f"{type(op).__name__} product",
        parts,
        None,
        available_memory(device),
        where(device),
        held=(PARAMETERS, CACHE_HELD),
    )


def _cache_parts(info: dict[str, Any], forward_bytes: int, batches: int) -> tuple[int, int]:
    """Bytes kept now, and the bytes the cache may still keep.

    The latter: ``min(budget - kept, per-batch size x batches not yet seen)``, the
    per-batch size that of the largest batch kept, else :data:`LINEARIZATION_FACTOR`
    forward passes of the largest batch.
    """
    kept = int(info["nbytes"])
    if info["mode"] is False:
        return kept, 0
    sizes = info["nbytes_per_batch"].values()
    per_batch = max(sizes) if sizes else int(LINEARIZATION_FACTOR * forward_bytes)
    unseen = max(0, batches - len(info["batches"]) - len(info["recomputed"]))
    more = per_batch * unseen
    if info["budget"] is not None:
        more = min(more, int(info["budget"]) - kept)
    return kept, max(0, more)


def _itemsize(A: Any) -> int:
    try:
        return int(np.dtype(str(A.dtype).rsplit(".", 1)[-1]).itemsize)
    except TypeError:
        return 8
