"""Data-parallel curvature in JAX: batches sharded over a device mesh.

    python examples/distributed_jax.py

On a machine with several GPUs the mesh spans them. On CPU this script asks
XLA for 4 host devices (``XLA_FLAGS`` must be set before JAX is imported).

With ``sharding=NamedSharding(mesh, PartitionSpec("batch"))`` the operator
splits axis 0 of every batch over the mesh axis ``"batch"`` and keeps the
parameters and vectors replicated; the jit-compiled product runs on all
devices, each on its rows, and XLA inserts the sum over devices. Products
are the same numbers as on one device (up to the order of the sums), so
scipy's solvers run unchanged.

Several processes (``jax.distributed``): start one process per host (or per
GPU), call ``jax.distributed.initialize(...)`` first in each, build the mesh
over ``jax.devices()`` (all processes' devices), and pass each process's own
rows of every batch as ``data``: the operator joins them into global arrays
with ``jax.make_array_from_process_local_data``. Every process needs the
same number of batches with the same local batch sizes, and calls the same
products in the same order (SPMD: seed solvers, e.g. ``eigsh(..., rng=0)``).
Results of ``H @ v`` for a numpy ``v`` are numpy arrays on every process; a
JAX ``v`` must be a global array, e.g. ``jax.device_put(v,
NamedSharding(mesh, PartitionSpec()))``.
"""

import os

if "XLA_FLAGS" not in os.environ:  # CPU demo: 4 devices on this host
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from scipy.sparse.linalg import eigsh  # noqa: E402

import curvlinops as cl  # noqa: E402

jax.config.update("jax_enable_x64", True)


def mlp(params, x):
    (w1, b1), (w2, b2) = params
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


rng = np.random.default_rng(0)
params = [
    (jnp.asarray(rng.standard_normal((10, 16)) / np.sqrt(10)), jnp.zeros(16)),
    (jnp.asarray(rng.standard_normal((16, 3)) / 4), jnp.zeros(3)),
]
X = rng.standard_normal((1000, 10))
y = rng.integers(0, 3, size=1000)
# Batches of 128 rows and a last one of 104: both are split over the devices
# (a size the devices do not divide is padded by XLA inside the product).
data = [(X[i : i + 128], y[i : i + 128]) for i in range(0, 1000, 128)]

devices = jax.devices()
mesh = jax.make_mesh((len(devices),), ("batch",))
sharding = NamedSharding(mesh, PartitionSpec("batch"))

loss_func = cl.losses.CrossEntropyLoss()
H = cl.HessianLinearOperator(mlp, loss_func, params, data, sharding=sharding)
H_one = cl.HessianLinearOperator(mlp, loss_func, params, data)  # one device

top = np.sort(eigsh(H, k=3, which="LA", rng=0, return_eigenvectors=False))[::-1]
top_one = np.sort(eigsh(H_one, k=3, which="LA", rng=0, return_eigenvectors=False))[::-1]
v = rng.standard_normal(H.shape[1])
print(f"{len(devices)} devices: {devices}")
print("top Hessian eigenvalues:", top)
differences = {
    "eigenvalues": np.abs(top - top_one).max(),
    "H @ v": np.abs(H @ v - H_one @ v).max(),
}
print("largest difference to one device:")
for name, difference in differences.items():
    print(f"  {name:<12}{difference:.1e}")
if max(differences.values()) > 1e-8:  # float64: only the order of the sums differs
    raise SystemExit("FAILED: the sharded results differ from one device")
