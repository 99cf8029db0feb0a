"""Sums over the processes of a ``torch.distributed`` process group.

Each process builds the operator over its own shard of the data; products
in the parameter space are summed with one ``all_reduce`` per product, and
the number of data points is summed once, at construction. All processes
must build the operator and call its products in the same order with the
same parameter-space vectors (SPMD). A collective waits at most the
``timeout`` given to ``torch.distributed.init_process_group``; when a peer
fails or hangs, the collective raises here with a message saying so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from curvlinops._checks import type_error, value_error
from curvlinops.backends._distributed import LOCAL, Communicator, SingleProcess

__all__ = ["TorchProcessGroup", "torch_communicator"]

_EXPECTED = "None (the default group if torch.distributed is running), 'local' or a ProcessGroup"


def torch_communicator(process_group: Any, device: torch.device) -> Communicator:
    """The communicator for the ``process_group=`` option of an operator.

    Args:
        process_group: ``None``: the default group if ``torch.distributed``
            is initialised, else this process alone; ``"local"``: this
            process alone; a ``torch.distributed.ProcessGroup``: that group.
        device: The parameters' device (where collectives run for NCCL).

    Returns:
        A :class:`~curvlinops.backends._distributed.SingleProcess` for one
        process, else a :class:`TorchProcessGroup`.

    Example:
        >>> torch_communicator(None, torch.device("cpu"))  # not initialised here
        SingleProcess()
    """
    if isinstance(process_group, str):
        if process_group != LOCAL:
            raise value_error("process_group", _EXPECTED, repr(process_group))
        return SingleProcess()
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is None:
        if not initialised:
            return SingleProcess()
        process_group = dist.group.WORLD
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise value_error(
            "process_group",
            "a group this process belongs to",
            "a group without this process (new_group(ranks) without its rank)",
            "Build the operator only on the ranks of the group, or pass process_group='local'.",
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise type_error("process_group", _EXPECTED, process_group)
    if not initialised:
        raise value_error(
            "process_group",
            "a group of an initialised torch.distributed",
            "a ProcessGroup while torch.distributed is not initialised (destroyed?)",
            "Call torch.distributed.init_process_group(...) first (torchrun sets it up).",
        )
    if dist.get_world_size(process_group) == 1:
        return SingleProcess()
    return TorchProcessGroup(process_group, device)


class TorchProcessGroup:
    """Sums over the processes of a ``torch.distributed`` group (``all_reduce``).

    Args:
        group: The process group.
        device: Device of the count tensors (the parameters' device).
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        self.group = group
        self.device = device
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._backend = str(dist.get_backend(group))
        self._weights: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"TorchProcessGroup(backend={self._backend!r}, rank={self.rank}, "
            f"world_size={self.world_size})"
        )

    def all_reduce_sum(self, x: torch.Tensor, check: torch.Tensor | None = None) -> torch.Tensor:
        """Sum ``x`` over the group; with ``check``, assert it is the same everywhere.

        The check rides along in the same ``all_reduce``: two extra rows with
        a fingerprint ``f`` of ``check`` per column and its square. Summed
        over ``W`` processes, ``W Σf² - (Σf)²`` is ``W²`` times the variance of
        ``f`` across processes: zero (up to rounding) only if they agree.
        """
        if check is None:
            payload = x.contiguous()
            self._all_reduce(payload, "summing a product over the processes")
            return payload
        fingerprint = self._fingerprint(check)
        payload = torch.cat([x, fingerprint, fingerprint * fingerprint]).contiguous()
        self._all_reduce(payload, "summing a product over the processes")
        self._check_same_input(payload[-2], payload[-1])
        return payload[:-2]

    def global_count(self, n: int) -> int:
        count = torch.tensor([n], dtype=torch.int64, device=self.device)
        self._all_reduce(count, "counting the data points of all processes")
        return int(count.item())

    # --- helpers ---------------------------------------------------------------
    def _all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as error:  # DistBackendError is a RuntimeError
            raise RuntimeError(
                f"curvlinops: all_reduce failed while {what}, on rank {self.rank} of "
                f"{self.world_size} ({self._backend}): {error}\n"
                "Another process has probably failed, exited, or not called the same "
                "operation: every process must build the operator and call its products in "
                "the same order (SPMD). See the other processes' logs. A collective waits at "
                "most the timeout of torch.distributed.init_process_group(timeout=...); to use "
                "only this process's data, pass process_group='local'."
            ) from error

    def _fingerprint(self, V: torch.Tensor) -> torch.Tensor:
        """One number per column: ``w @ V`` with fixed pseudo-random weights ``w``."""
        rows = V.shape[0]
        if self._weights is None or self._weights.shape[0] != rows:
            gen = torch.Generator(device="cpu").manual_seed(rows)
            weights = torch.randn(rows, generator=gen, dtype=torch.float64)
            self._weights = weights.to(device=V.device, dtype=V.dtype)
        return (self._weights @ V)[None, :]

    def _check_same_input(self, sums: torch.Tensor, squares: torch.Tensor) -> None:
        W = self.world_size
        spread = W * squares - sums * sums
        eps = float(np.finfo(str(squares.dtype).removeprefix("torch.")).eps)
        bound = 64 * eps * W * W * squares.abs() + torch.finfo(squares.dtype).tiny
        if bool((spread > bound).any()):
            raise RuntimeError(
                f"curvlinops: rank {self.rank} of {W}: the vector multiplied differs between "
                "processes. Parameter-space vectors must be the same on every process "
                "(SPMD): build them from the same seed (e.g. scipy's eigsh(..., rng=0) or "
                "v0=np.random.default_rng(0).standard_normal(P)), not per-process randomness."
            )
