"""Data-parallel operators over torch.distributed (gloo on 127.0.0.1).

The tests spawn 2 or 3 processes that run this file as a script (``worker``
below): each builds the operators over its own shard of one data set and
saves its products; the tests compare them with one process over all the
data. Worlds of 3 and of 2 processes are formed in turn by one launch of 3
processes (starting one, importing torch, takes longer than its products).
Every spawned process has a timeout, and collectives one too.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from scipy.sparse.linalg import eigsh  # noqa: E402

from curvlinops import (  # noqa: E402
    EKFACLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    KFACLinearOperator,
    TransposedJacobianLinearOperator,
)

ROOT = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 60
N, D_IN, C = 11, 5, 3

# Rows [start, stop) of each batch, per rank: unequal shards, an empty rank,
# and a batch of size 0.
LAYOUTS = {
    2: [[(0, 4), (4, 6)], [(6, 11)]],
    3: [[(0, 3), (3, 7)], [], [(7, 7), (7, 11)]],
}


# --- the problem, identical in every process ------------------------------------------
def make_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D_IN, 4), torch.nn.Tanh(), torch.nn.Linear(4, C)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    X = torch.randn(N, D_IN, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    return model, X, y


def probes(num_params: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameter-space V (P, 2) and data-space U (N C, 2), the same everywhere."""
    rng = np.random.default_rng(1)
    return rng.standard_normal((num_params, 2)), rng.standard_normal((N * C, 2))


def operators(model, X, y, batches, **options) -> dict:
    params = list(model.parameters())
    data = [(X[a:b], y[a:b]) for a, b in batches]
    ce, ce_sum = torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(reduction="sum")
    return {
        "H": HessianLinearOperator(model, ce, params, data, **options),
        "H_sum": HessianLinearOperator(model, ce_sum, params, data, **options),
        "G": GGNLinearOperator(model, ce, params, data, **options),
        "J": JacobianLinearOperator(model, params, data, **options),
        "JT": TransposedJacobianLinearOperator(model, params, data, **options),
        # Kronecker factors: sums over the data, whatever the shards
        "K": KFACLinearOperator(model, ce, params, data, fisher_type="type-2", **options),
        "K_ef": KFACLinearOperator(model, ce_sum, params, data, fisher_type="empirical", **options),
        "E": EKFACLinearOperator(
            model, ce, params, data, fisher_type="type-2", separate_weight_and_bias=False, **options
        ),
    }


def products(ops: dict, rows: slice) -> dict[str, np.ndarray]:
    """Every product checked; ``rows`` are this process's rows of the data space."""
    from curvlinops.estimators import hutchinson_trace
    from curvlinops.inverse import CGInverseLinearOperator

    V, U = probes(ops["H"].shape[0])
    U_local = U[rows]
    HV = ops["H"] @ V  # builds and keeps this process's linearizations (cache="auto")
    return {
        "HV": HV,
        "HV_torch": (ops["H"] @ torch.from_numpy(V)).numpy(),  # from the kept ones
        "H_kept": np.array(ops["H"].cache_info()["batches"]),
        "H_sumV": ops["H_sum"] @ V,
        "GV": ops["G"] @ V,
        "JV": ops["J"] @ V,
        "JtU": ops["J"].rmatmat(U_local),
        "JTU": ops["JT"] @ U_local,
        "JTtV": ops["JT"].rmatmat(V),
        "eig": np.sort(eigsh(ops["H"], k=3, which="LA", rng=0)[0]),
        # the project's algorithms, unchanged: seeded probes are the same everywhere
        "trace": np.array(float(hutchinson_trace(ops["H"], 8, seed=0))),
        "cg": CGInverseLinearOperator(ops["G"], damping=1.0, tol=1e-12) @ V,
        "KV": ops["K"] @ V,
        "K_efV": ops["K_ef"] @ V,
        "EV": ops["E"] @ V,
    }


# --- worker: run as a script by the tests ----------------------------------------------
def worker(scenario: str, rank: int, world: int, ports: list[int], out: Path) -> None:
    """``products``: a world of 3 processes, then ranks 0 and 1 as a world of 2."""
    torch.set_num_threads(1)
    if scenario != "products":
        join_world(scenario, rank, world, ports[0], out)
        return
    for size, port in zip((3, 2), ports):
        if rank < size:
            join_world(scenario, rank, size, port, out / f"world{size}")


def join_world(scenario: str, rank: int, world: int, port: int, out: Path) -> None:
    timeout = datetime.timedelta(seconds=3 if scenario == "stall" else PROCESS_TIMEOUT_S)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )
    model, X, y = make_problem()
    if scenario in ("die", "stall"):
        peer_fails(scenario, rank, model, X, y, out)
        return
    batches = LAYOUTS[world][rank]
    ops = operators(model, X, y, batches)
    start = batches[0][0] if batches else 0
    stop = batches[-1][1] if batches else 0
    results = products(ops, slice(C * start, C * stop))
    results["errors"] = np.array(expected_errors(model, X, y, batches, rank))
    if world == 3:
        results.update(subgroup(model, X, y, batches, rank))
    np.savez(out / f"rank{rank}.npz", **results)
    # Rank 0 hosts the TCP store: tearing down before the others are done aborted
    # it now and then ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


def expected_errors(model, X, y, batches, rank: int) -> list[str]:
    """Misuse that every process must report in the same way (no hang)."""
    messages = []
    params, data = list(model.parameters()), [(X[a:b], y[a:b]) for a, b in batches]
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data)
    try:  # a vector that differs between processes
        H @ np.full(H.shape[1], float(rank))
    except RuntimeError as error:
        messages.append(str(error))
    try:
        HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, data, num_data=N + 1)
    except ValueError as error:
        messages.append(str(error))
    return messages


def subgroup(model, X, y, batches, rank: int) -> dict[str, np.ndarray]:
    """A group of ranks 0 and 2 (rank 1's shard is empty: they hold all data)."""
    group = dist.new_group([0, 2])  # called on every rank
    params, data = list(model.parameters()), [(X[a:b], y[a:b]) for a, b in batches]
    try:
        H = HessianLinearOperator(
            model, torch.nn.CrossEntropyLoss(), params, data, process_group=group
        )
    except ValueError as error:
        return {"subgroup_error": np.array(str(error))}
    return {"subgroup_HV": H @ probes(H.shape[1])[0]}


def peer_fails(scenario: str, rank: int, model, X, y, out: Path) -> None:
    """Rank 1 exits (die) or hangs (stall) after construction; rank 0 must get an error."""
    half = [(0, 5)] if rank == 0 else [(5, N)]
    data = [(X[a:b], y[a:b]) for a, b in half]
    H = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data)
    if rank == 1:
        if scenario == "stall":  # alive and silent until rank 0 has timed out and reported
            deadline = time.monotonic() + PROCESS_TIMEOUT_S
            while not (out / "rank0.txt").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        os._exit(0)
    begin = time.monotonic()
    try:
        H @ np.ones(H.shape[1])
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    (out / "rank0.txt").write_text(f"{time.monotonic() - begin:.1f}\n{message}")
    os._exit(0)


# --- the tests ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held together while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def spawn(scenario: str, world: int, out: Path) -> None:
    """Run ``world`` worker processes; fail on a timeout or an error, showing their logs."""
    ports = ",".join(map(str, free_ports(2)))  # products: one per world formed
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    from helpers import run_processes  # tests/ is importable under pytest only

    command = [__file__, scenario, "{rank}", str(world), ports, str(out)]
    commands = [[arg.format(rank=rank) for arg in command] for rank in range(world)]
    run_processes(commands, env, PROCESS_TIMEOUT_S, f"{scenario} with {world} processes")


@functools.cache
def reference() -> dict[str, np.ndarray]:
    model, X, y = make_problem()
    ops = operators(model, X, y, [(0, 4), (4, N)], process_group="local")
    return products(ops, slice(0, N * C))


def test_reference_is_dense_hessian_and_jacobian():
    """The one-process reference itself, against torch.func.hessian and jacrev."""
    from torch.func import functional_call, hessian, jacrev

    model, X, y = make_problem()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(theta):
        pieces = torch.split(theta, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)}
        return functional_call(model, params, (X,))

    def loss(theta):
        return torch.nn.functional.cross_entropy(outputs(theta), y)

    from helpers import assert_close

    V, U = probes(flat.numel())
    J = jacrev(lambda theta: outputs(theta).reshape(-1))(flat).numpy()
    expected = reference()
    # relative to the largest entry: an entry that cancels to near zero has no own precision
    assert_close(expected["HV"], hessian(loss)(flat).numpy() @ V, rtol=1e-10, name="HV")
    assert_close(expected["JV"], J @ V, rtol=1e-10, name="JV")
    assert_close(expected["JtU"], J.T @ U, rtol=1e-10, name="JtU")


@pytest.fixture(scope="module")
def products_run(tmp_path_factory) -> Path:
    """One launch of 3 processes: a world of 3, then of 2; their results in world{2,3}/."""
    out = tmp_path_factory.mktemp("products")
    for world in (2, 3):
        (out / f"world{world}").mkdir()
    spawn("products", 3, out)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_products_equal_one_process_over_all_data(world, products_run):
    from helpers import assert_close

    results = [dict(np.load(products_run / f"world{world}" / f"rank{r}.npz")) for r in range(world)]
    expected = reference()
    for rank, result in enumerate(results):
        for key in (
            *("HV", "HV_torch", "H_sumV", "GV", "JtU", "JTU", "eig", "trace", "cg"),
            *("KV", "K_efV", "EV"),
        ):
            assert_close(result[key], expected[key], rtol=1e-10, name=f"rank {rank} {key}")
        # each process keeps the linearizations of its own non-empty batches
        own = [i for i, (a, b) in enumerate(LAYOUTS[world][rank]) if b > a]
        assert result["H_kept"].tolist() == own, (rank, result["H_kept"])
        # parameter-space results are bitwise identical on every process
        for key in ("HV", "GV", "JtU", "eig", "trace", "cg", "KV", "EV"):
            np.testing.assert_array_equal(result[key], results[0][key])
    # J @ v is sharded: each rank has its own rows, in rank order
    for key in ("JV", "JTtV"):
        assert_close(np.concatenate([r[key] for r in results]), expected[key], rtol=1e-10, name=key)
    assert results[1]["JV"].shape == ((0, 2) if world == 3 else (15, 2))
    if world == 3:  # a group of ranks 0 and 2; rank 1 is not in it
        for rank in (0, 2):
            assert_close(results[rank]["subgroup_HV"], expected["HV"], rtol=1e-10, name="group")
        assert "a group this process belongs to" in str(results[1]["subgroup_error"])
    # misuse is reported in the same way on every process, none hangs
    for result in results:
        mismatch, count = result["errors"]
        assert "the vector multiplied differs between processes" in mismatch
        assert f"({N}, summed over {world} processes), got {N + 1}" in count


@pytest.mark.parametrize("scenario", ["die", "stall"])
def test_failing_peer_raises_instead_of_hanging(scenario, tmp_path):
    spawn(scenario, 2, tmp_path)
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "curvlinops: all_reduce failed while summing a product" in message
    assert "rank 0 of 2" in message and "init_process_group(timeout=...)" in message
    assert float(seconds) < 30


def test_operator_options_are_checked():
    model, X, y = make_problem()
    args = (model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    with pytest.raises(ValueError, match="process_group: expected None .* got 'world'"):
        HessianLinearOperator(*args, process_group="world")
    with pytest.raises(TypeError, match="process_group: expected None .* got int 3"):
        HessianLinearOperator(*args, process_group=3)
    with pytest.raises(TypeError, match="sharding: expected None for PyTorch operators"):
        HessianLinearOperator(*args, sharding="batch")
    with pytest.raises(ValueError, match="data: expected at least one batch"):
        HessianLinearOperator(*args[:3], [])
    with pytest.raises(ValueError, match="data: expected at least one data point, got batches of"):
        HessianLinearOperator(*args[:3], [(X[:0], y[:0])])


def test_group_of_one_process_and_destroyed_group():
    """A world of one needs no communication; a destroyed group is reported."""
    V = probes(sum(p.numel() for p in make_problem()[0].parameters()))[0]
    model, X, y = make_problem()
    args = (model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    expected = HessianLinearOperator(*args, process_group="local") @ V
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        group = dist.group.WORLD
        np.testing.assert_array_equal(HessianLinearOperator(*args) @ V, expected)
        np.testing.assert_array_equal(
            HessianLinearOperator(*args, process_group=group) @ V, expected
        )
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        HessianLinearOperator(*args, process_group=group)


if __name__ == "__main__":
    scenario, rank, world, ports, out = sys.argv[1:]
    worker(scenario, int(rank), int(world), [int(p) for p in ports.split(",")], Path(out))
