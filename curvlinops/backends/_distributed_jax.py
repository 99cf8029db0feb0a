"""JAX data parallelism: batches sharded over a device mesh.

With ``sharding=NamedSharding(mesh, PartitionSpec("batch"))`` the operator
places every batch with axis 0 split over the mesh axis ``"batch"``, and the
parameters and parameter-space vectors replicated on the mesh. The
jit-compiled per-batch product then runs on all devices of the mesh, each on
its rows, and XLA inserts the sums over devices (GSPMD): no communicator is
needed. Batches whose size the number of shards does not divide are placed
whole on every device and split inside the compiled product by a sharding
constraint (XLA pads the last shard), so they run in parallel too.

In a multi-process run (``jax.distributed.initialize``), each process passes
its own rows of every batch; they are joined into global arrays with
``jax.make_array_from_process_local_data``, so all processes must have the
same number of batches, and equal local batch sizes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from curvlinops._checks import type_error, value_error

__all__ = ["BatchSharding", "gather_global"]


class BatchSharding:
    """Where batches, parameters and vectors go on a device mesh.

    Args:
        sharding: A ``NamedSharding`` whose partition spec shards axis 0
            (e.g. ``PartitionSpec("batch")``); other axes of the spec are
            ignored (data leaves are sharded along axis 0 only).
    """

    def __init__(self, sharding: Any) -> None:
        if not isinstance(sharding, NamedSharding):
            raise type_error(
                "sharding",
                "None or a jax.sharding.NamedSharding over the batch axis",
                sharding,
                "E.g. sharding=NamedSharding(jax.make_mesh((n,), ('batch',)), "
                "PartitionSpec('batch')).",
            )
        spec = tuple(sharding.spec)
        if not spec or spec[0] is None:
            raise value_error(
                "sharding",
                "a partition spec that shards axis 0 (the batch axis)",
                f"spec {sharding.spec}",
                "Use PartitionSpec('batch') with 'batch' a mesh axis name.",
            )
        self.mesh = _auto_mesh(sharding.mesh)
        self.batch_axes = spec[0]
        names = self.batch_axes if isinstance(self.batch_axes, tuple) else (self.batch_axes,)
        self.num_shards = int(np.prod([self.mesh.shape[name] for name in names], dtype=int))
        self.devices = set(self.mesh.devices.flat)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.multi_process = jax.process_count() > 1

    def __repr__(self) -> str:
        return f"BatchSharding(axes={self.batch_axes!r}, shards={self.num_shards})"

    def _rows(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.batch_axes, *([None] * (ndim - 1))))

    def place_batch(self, batch: Any) -> Any:
        """Put the leaves of a batch on the mesh, axis 0 sharded where it divides."""
        return jax.tree_util.tree_map(self._place_leaf, batch)

    def _place_leaf(self, leaf: jax.Array) -> jax.Array:
        if leaf.ndim == 0:
            return jax.device_put(leaf, self.replicated)
        rows = self._rows(leaf.ndim)
        if self.multi_process:
            if not leaf.is_fully_addressable:  # already a global array
                return leaf
            return jax.make_array_from_process_local_data(rows, np.asarray(leaf))
        if leaf.shape[0] % self.num_shards == 0:
            return jax.device_put(leaf, rows)
        return jax.device_put(leaf, self.replicated)

    def constrain_batch(self, batch: Any) -> Any:
        """Inside jit: ask XLA to split the leaves' axis 0 over the mesh."""

        def constrain(leaf: Any) -> Any:
            if getattr(leaf, "ndim", 0) == 0:
                return leaf
            return jax.lax.with_sharding_constraint(leaf, self._rows(leaf.ndim))

        return jax.tree_util.tree_map(constrain, batch)

    def replicate(self, x: Any) -> Any:
        """Copy ``x`` (an array or a pytree) to every device of the mesh.

        Across processes, each process puts its own copy from host memory
        (JAX does not move arrays between hosts); the values must agree.
        """
        if self.multi_process:
            x = jax.tree_util.tree_map(_host_copy, x)
        return jax.device_put(x, self.replicated)


def _auto_mesh(mesh: Mesh) -> Mesh:
    """The same mesh with every axis of type Auto, so that XLA chooses the collectives.

    ``jax.make_mesh`` makes Explicit axes by default in recent JAX; sharding
    constraints inside the product (for batch sizes the shards do not
    divide) need Auto axes.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # older JAX: every axis is Auto
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * mesh.devices.ndim)


def _host_copy(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and leaf.is_fully_addressable and not _traced(leaf):
        return np.asarray(leaf)
    return leaf


def _traced(leaf: Any) -> bool:
    return isinstance(leaf, jax.core.Tracer)


def gather_global(x: Any) -> Any:
    """``x`` with all its entries on this process (a global array of several processes).

    Arrays that this process holds whole (all in one process, or replicated)
    are returned as they are.
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return x
