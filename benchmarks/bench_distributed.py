"""Data-parallel speed-up of H @ v (issue 7): 2 processes against 1.

MLP 784-256-256-10, tanh, cross-entropy, float32, N = 4096 points in batches
of 512, on CPU. PyTorch runs

* 1 process with 1 thread, and 1 process with 2 threads (the baselines),
* 2 processes with 1 thread each, each holding half of the data, joined by
  ``torch.distributed`` (gloo on 127.0.0.1); every product ends with one
  ``all_reduce`` of the P-vector.

JAX (``--jax``) runs one process with 2 forced host devices: the data on one
device, and the data sharded over both (``sharding=``).

Every timing is the minimum over repeats of the mean of a block of calls.
The machine's other load affects all rows; the load average is printed.

What to expect elsewhere: on a machine with one GPU per process (NCCL), each
process computes on its own GPU and the only extra work is one all_reduce
of P numbers per product (about 1 MB here, microseconds over NVLink), so the
speed-up approaches the number of GPUs once a process's shard keeps its GPU
busy (large batches); small models or small shards are latency-bound and
gain less. On CPU, 2 processes on 2 cores compete with 1 process that
already uses both cores through intra-op threads, so expect at most a
modest gain there.

Run: ``.venv/bin/python benchmarks/bench_distributed.py [--repeats 5] [--jax]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = [784, 256, 256, 10]
N, BATCH = 4096, 512


def build_data(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        weights.append(
            (rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
        )
        weights.append((0.1 * rng.standard_normal(fan_out)).astype(np.float32))
    X = rng.standard_normal((N, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=N)
    return weights, X, y


def best_time(fn, repeats: int, number: int, sync=lambda: None) -> tuple[float, float]:
    """Minimum wall time per call over the repeats, and this process's mean CPU time per call."""
    fn()
    fn()  # warm-up
    best, cpu = float("inf"), time.process_time()
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best, (time.process_time() - cpu) / (repeats * number)


# --- PyTorch worker ----------------------------------------------------------------------
def torch_worker(rank: int, world: int, threads: int, port: int, args, out: Path) -> None:
    import torch
    import torch.distributed as dist

    import curvlinops as cl

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
    weights, X, y = build_data()
    layers = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(torch.from_numpy(w))
    start, stop = N * rank // world, N * (rank + 1) // world  # this process's shard
    data = [
        (
            torch.from_numpy(X[i : min(i + BATCH, stop)]),
            torch.from_numpy(y[i : min(i + BATCH, stop)]),
        )
        for i in range(start, stop, BATCH)
    ]
    H = cl.HessianLinearOperator(
        model,
        torch.nn.CrossEntropyLoss(),
        list(model.parameters()),
        data,
        check_deterministic=False,
    )
    v = np.random.default_rng(1).standard_normal(H.shape[1]).astype(np.float32)
    sync = dist.barrier if world > 1 else (lambda: None)
    seconds, cpu = best_time(lambda: H @ v, args.repeats, args.number, sync)
    result = H @ v  # on every process: products are collective (SPMD)
    if rank == 0:
        np.save(out / f"torch_{world}x{threads}.npy", result)
    times = {"seconds": seconds, "cpu": cpu}
    (out / f"torch_{world}x{threads}_{rank}.json").write_text(json.dumps(times))
    if world > 1:
        dist.destroy_process_group()


def run_torch(world: int, threads: int, args, out: Path) -> tuple[float, float]:
    """Wall seconds per H @ v (rank 0), and CPU seconds per H @ v summed over processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                f"torch,{rank},{world},{threads},{port}",
                str(out),
            ]
            + ["--repeats", str(args.repeats), "--number", str(args.number)],
            env=env,
        )
        for rank in range(world)
    ]
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise RuntimeError(f"torch worker failed with exit code {proc.returncode}")
    times = [
        json.loads((out / f"torch_{world}x{threads}_{r}.json").read_text()) for r in range(world)
    ]
    return times[0]["seconds"], sum(t["cpu"] for t in times)


# --- JAX worker --------------------------------------------------------------------------
def jax_worker(args, out: Path) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import curvlinops as cl

    weights, X, y = build_data()
    params = [(jnp.asarray(weights[i]), jnp.asarray(weights[i + 1])) for i in range(0, 6, 2)]

    def mlp(params, x):
        for i, (w, b) in enumerate(params):
            x = x @ w.T + b
            x = jnp.tanh(x) if i < len(params) - 1 else x
        return x

    data = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    mesh = jax.make_mesh((2,), ("batch",))
    v = np.random.default_rng(1).standard_normal(sum(w.size for w in weights)).astype(np.float32)
    results = {}
    for name, options in (
        ("1 device", {}),
        ("2 devices", {"sharding": NamedSharding(mesh, PartitionSpec("batch"))}),
    ):
        H = cl.HessianLinearOperator(
            mlp, cl.losses.CrossEntropyLoss(), params, data, check_deterministic=False, **options
        )
        results[name] = best_time(lambda H=H: H @ v, args.repeats, args.number)[0]
        np.save(out / f"jax_{name[0]}.npy", H @ v)
    (out / "jax.json").write_text(json.dumps(results))


def run_jax(args, out: Path) -> dict[str, float]:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    command = [sys.executable, __file__, "--worker", "jax", str(out)]
    command += ["--repeats", str(args.repeats), "--number", str(args.number)]
    subprocess.run(command, env=env, check=True, timeout=900)
    return json.loads((out / "jax.json").read_text())


# --- report ------------------------------------------------------------------------------
def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--jax", action="store_true", help="also time JAX with 2 host devices")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec, out = args.worker
        if spec == "jax":
            jax_worker(args, Path(out))
        else:
            _, rank, world, threads, port = spec.split(",")
            torch_worker(int(rank), int(world), int(threads), int(port), args, Path(out))
        return

    print(f"H @ v, MLP {'-'.join(map(str, SIZES))}, N={N}, batch {BATCH}, float32, CPU")
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows = {
            "1 process x 1 thread": run_torch(1, 1, args, out),
            "1 process x 2 threads": run_torch(1, 2, args, out),
            "2 processes x 1 thread (gloo)": run_torch(2, 1, args, out),
        }
        base1, base2 = rows["1 process x 1 thread"][0], rows["1 process x 2 threads"][0]
        print("| PyTorch | ms per H@v | speed-up vs 1x1 | speed-up vs 1x2 | CPU ms per H@v |")
        print("|---|---:|---:|---:|---:|")
        for name, (seconds, cpu) in rows.items():
            print(
                f"| {name} | {1e3 * seconds:.1f} | {base1 / seconds:.2f} | "
                f"{base2 / seconds:.2f} | {1e3 * cpu:.1f} |"
            )
        print("(CPU ms: summed over processes; equal CPU at half the wall time is a 2x speed-up)")
        diff = relative_difference(np.load(out / "torch_2x1.npy"), np.load(out / "torch_1x1.npy"))
        print(f"\nmax relative difference, 2 processes vs 1: {diff:.1e} (float32)")
        if args.jax:
            times = run_jax(args, out)
            print("\n| JAX, 2 forced host devices | ms per H@v | speed-up |")
            print("|---|---:|---:|")
            for name, seconds in times.items():
                print(f"| {name} | {1e3 * seconds:.1f} | {times['1 device'] / seconds:.2f} |")
            diff = relative_difference(np.load(out / "jax_2.npy"), np.load(out / "jax_1.npy"))
            print(f"\nmax relative difference, 2 devices vs 1: {diff:.1e} (float32)")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
