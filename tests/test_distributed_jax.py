"""Data-parallel JAX operators: batches sharded over a device mesh.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX
is imported, and this test session has imported JAX already: the sharded
runs happen in a subprocess that runs this file as a script (``worker``
below), on meshes of 2 and 4 of its forced host devices, and in two
processes joined by ``jax.distributed``. The test compares their products
with one device over all the data, and with dense references.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("jax.flatten_util")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from scipy.sparse.linalg import eigsh  # noqa: E402

from curvlinops import (  # noqa: E402
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    losses,
)

ROOT = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 90
N, D_IN, C = 11, 5, 3
# Batch sizes 4 and 7: 4 divides over 2 and 4 devices, 7 over none (then
# XLA pads the last shard inside the product).
BATCHES = [(0, 4), (4, N)]
# jax.distributed run: each of 2 processes holds half of every batch.
N_MP = 10
BATCHES_MP = [(0, 4), (4, N_MP)]


# --- the problem, identical in every process ------------------------------------------
def make_problem(n: int = N) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((D_IN, 4)),
        "b1": rng.standard_normal(4),
        "w2": rng.standard_normal((4, C)),
        "b2": rng.standard_normal(C),
    }
    X = rng.standard_normal((N, D_IN))[:n]
    y = rng.integers(0, C, N)[:n]
    return {k: jnp.asarray(v) for k, v in params.items()}, X, y


def mlp(params: dict, X: jax.Array) -> jax.Array:
    return jnp.tanh(X @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def probes(num_params: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """Parameter-space V (P, 1) and data-space U (n C, 1).

    One column: the shape the operators compile at construction (their
    determinism check), so that the test compiles each product once.
    """
    rng = np.random.default_rng(1)
    return rng.standard_normal((num_params, 1)), rng.standard_normal((N * C, 1))[: n * C]


def operators(params, data, **options) -> dict:
    ce = losses.CrossEntropyLoss()
    return {
        "H": HessianLinearOperator(mlp, ce, params, data, **options),
        "G": GGNLinearOperator(mlp, ce, params, data, **options),
        "J": JacobianLinearOperator(mlp, params, data, **options),
        "K": KFACLinearOperator(mlp, ce, params, data, fisher_type="type-2", **options),
    }


def products(ops: dict, n: int = N, to_jax=jnp.asarray) -> dict[str, np.ndarray]:
    V, U = probes(ops["H"].shape[0], n)
    return {
        "HV": ops["H"] @ V,
        "HV_jax": np.asarray(ops["H"] @ to_jax(V)),
        "GV": ops["G"] @ V,
        "JV": ops["J"] @ V,
        "JtU": ops["J"].rmatmat(U),
        "eig": np.sort(eigsh(ops["H"], k=3, which="LA", rng=0)[0]),
        "KV": ops["K"] @ V,
    }


# --- worker: run as a script by the tests ----------------------------------------------
def worker_devices(out: Path) -> None:
    """Products with batches sharded over 2 and over 4 host devices."""
    jax.config.update("jax_enable_x64", True)
    params, X, y = make_problem()
    data = [(X[a:b], y[a:b]) for a, b in BATCHES]
    for count in (2, 4):
        mesh = Mesh(np.array(jax.devices()[:count]), ("batch",))
        ops = operators(params, data, sharding=NamedSharding(mesh, PartitionSpec("batch")))
        results = products(ops)
        results["all_reduce"] = np.array(all_reduce_in_product(ops["H"]))
        np.savez(out / f"devices{count}.npz", **results)


def all_reduce_in_product(H) -> bool:
    """Whether the compiled per-batch product sums over devices (XLA all-reduce)."""
    b = H.backend
    _, X, y, n = next(iter(H._batches()))
    V, _ = b.import_array(np.ones((H.shape[1], 1)), "V")  # replicated on the mesh
    text = H._compiled_matmat.lower(b.primals, X, y, V, n / H.num_data).compile().as_text()
    return "all-reduce" in text


def worker_processes(rank: int, port: int, out: Path) -> None:
    """One of 2 processes of a jax.distributed run, one CPU device each."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=rank,
        initialization_timeout=PROCESS_TIMEOUT_S,
    )
    params, X, y = make_problem(N_MP)
    local = []  # this process's half of every batch
    for a, b in BATCHES_MP:
        half = (b - a) // 2
        rows = slice(a + rank * half, a + (rank + 1) * half)
        local.append((X[rows], y[rows]))
    mesh = jax.make_mesh((2,), ("batch",))
    ops = operators(params, local, sharding=NamedSharding(mesh, PartitionSpec("batch")))
    # a JAX input must be a global array here: replicated on the mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    results = products(ops, N_MP, lambda V: jax.device_put(V, replicated))
    np.savez(out / f"process{rank}.npz", **results)
    jax.distributed.shutdown()


# --- the tests ---------------------------------------------------------------------------
def run(args: list[str], out: Path, world: int = 1, devices: int = 1) -> None:
    """Run ``world`` copies of this file as a script; fail on a timeout or an error."""
    from helpers import fast_compile_xla_flags, run_processes  # importable under pytest only

    # compiling is most of a worker's time: its programs are small, compile them fast
    flags = f"--xla_force_host_platform_device_count={devices} {fast_compile_xla_flags()}"
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    commands = [[__file__, *[a.format(rank=r) for a in args], str(out)] for r in range(world)]
    run_processes(commands, env, PROCESS_TIMEOUT_S, args[0])


@functools.cache
def reference(n: int = N) -> dict[str, np.ndarray]:
    """Products of one device over all ``n`` data points."""
    params, X, y = make_problem(n)
    return products(operators(params, [(X[:4], y[:4]), (X[4:], y[4:])]), n)


def check_against_reference(result: dict, expected: dict, name: str) -> None:
    from helpers import assert_close

    for key in ("HV", "HV_jax", "GV", "JV", "JtU", "eig", "KV"):
        assert_close(result[key], expected[key], rtol=1e-10, name=f"{name} {key}")


def test_reference_is_dense_hessian_and_jacobian():
    """The one-device reference itself, against jax.hessian and jax.jacrev."""
    params, X, y = make_problem()
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def total_loss(theta):
        z = mlp(unravel(theta), jnp.asarray(X))
        return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(N), y])

    from helpers import assert_close

    V, U = probes(flat.size)
    # compiled whole: op by op, JAX would compile each of their ~150 operations on its own
    J = jax.jit(jax.jacrev(lambda theta: mlp(unravel(theta), jnp.asarray(X)).reshape(-1)))(flat)
    dense_hessian = jax.jit(jax.hessian(total_loss))(flat)
    expected = reference()
    # ravel_pytree orders dict leaves like jax.tree_util (sorted keys): the operators' order;
    # relative to the largest entry: an entry that cancels to near zero has no own precision
    assert_close(expected["HV"], dense_hessian @ V, rtol=1e-10, name="HV")
    assert_close(expected["JV"], J @ V, rtol=1e-10, name="JV")
    assert_close(expected["JtU"], J.T @ U, rtol=1e-10, name="JtU")


def test_sharded_over_2_and_4_devices_equals_one_device(tmp_path):
    run(["devices"], tmp_path, devices=4)
    expected = reference()
    for count in (2, 4):
        result = dict(np.load(tmp_path / f"devices{count}.npz"))
        check_against_reference(result, expected, f"{count} devices")
        assert bool(result["all_reduce"])  # XLA sums the shards' parts


def test_two_processes_with_jax_distributed(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(["processes", "{rank}", str(port)], tmp_path, world=2)
    expected = reference(N_MP)
    results = [dict(np.load(tmp_path / f"process{r}.npz")) for r in range(2)]
    for rank, result in enumerate(results):
        check_against_reference(result, expected, f"process {rank}")
        np.testing.assert_array_equal(result["eig"], results[0]["eig"])


def test_sharding_options_are_checked():
    params, X, y = make_problem()
    args = (mlp, losses.CrossEntropyLoss(), params, [(X, y)])
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(TypeError, match="sharding: expected None or a jax.sharding.NamedSharding"):
        HessianLinearOperator(*args, sharding=mesh)
    with pytest.raises(ValueError, match="sharding: expected a partition spec that shards axis 0"):
        HessianLinearOperator(*args, sharding=NamedSharding(mesh, PartitionSpec()))
    with pytest.raises(TypeError, match="process_group: expected None for JAX operators"):
        HessianLinearOperator(*args, process_group=object())
    # a mesh of one device: the same numbers as without sharding (up to XLA's fusion choices)
    from helpers import assert_close

    V = probes(HessianLinearOperator(*args).shape[1])[0]
    sharded = HessianLinearOperator(*args, sharding=NamedSharding(mesh, PartitionSpec("batch")))
    assert_close(sharded @ V, HessianLinearOperator(*args) @ V, rtol=1e-12, name="one device")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "devices":
        worker_devices(Path(rest[0]))
    else:
        worker_processes(int(rest[0]), int(rest[1]), Path(rest[2]))
