r"""Data parallelism: one operator over data spread across processes or devices.

Curvature products are sums over the data. When the data are split into
shards, each held by one process (PyTorch, ``torch.distributed``) or one
device (JAX, a device mesh), each shard's part of a product is computed
where the shard lives and the parts are summed:

.. math::
    H v = \sum_{r} \sum_{b \in \text{shard } r} w_b \nabla^2 \ell_b \, v,
    \qquad w_b = N_b / N \text{ with the global } N.

Vectors of the parameter space are *replicated*: every process passes the
same ``v`` and receives the same ``H v``. Vectors of the data space (rows of
a Jacobian) are *sharded*: each process holds the rows of its own data.

This module holds the framework-free part: the :class:`Communicator`
protocol that the operators call, and the single-process communicator. The
PyTorch communicator is in ``_distributed_torch.py``; the JAX mesh placement
in ``_distributed_jax.py`` (XLA inserts the reductions there, so JAX needs no
communicator).
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["LOCAL", "Communicator", "SingleProcess"]

LOCAL = "local"
"""``process_group=LOCAL``: no communication, the curvature of this process's data only."""


class Communicator(Protocol):
    """Sums over the processes that hold the data shards."""

    world_size: int
    """Number of processes taking part."""

    rank: int
    """This process's index among them (``0 .. world_size - 1``)."""

    def all_reduce_sum(self, x: Any, check: Any = None) -> Any:
        """The sum of ``x`` over all processes, returned on every process.

        Args:
            x: This process's part of a product (native array).
            check: The product's input when it must be the same on every
                process (a replicated vector); the sum raises a
                ``RuntimeError`` on every process when it differs.

        Returns:
            The sum (native array of the shape of ``x``).
        """

    def global_count(self, n: int) -> int:
        """The sum of the integer ``n`` over all processes."""


class SingleProcess:
    """The communicator of one process: sums are the identity.

    Example:
        >>> SingleProcess().global_count(7)
        7
    """

    world_size = 1
    rank = 0

    def all_reduce_sum(self, x: Any, check: Any = None) -> Any:
        return x

    def global_count(self, n: int) -> int:
        return n

    def __repr__(self) -> str:
        return "SingleProcess()"
