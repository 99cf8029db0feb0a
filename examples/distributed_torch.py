"""Data-parallel curvature with torch.distributed: one shard of the data per process.

Run on CPU with 2 processes (gloo), or on a machine with several GPUs (NCCL,
one GPU per process):

    torchrun --nproc_per_node=2 examples/distributed_torch.py

Run without ``torchrun`` it uses one process and all the data.

Every process builds the same model and the operator over its own shard of
the data; ``H @ v`` is the Hessian of the loss over *all* data, the same on
every process. scipy's ``eigsh`` then runs on every process with identical
vectors (SPMD): seed its start (``rng=0``), or the processes would start from
different random vectors and their products would no longer match.
"""

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse.linalg import eigsh

import curvlinops as cl

if "RANK" in os.environ:  # started by torchrun
    use_gpu = torch.cuda.is_available()
    dist.init_process_group(
        "nccl" if use_gpu else "gloo",
        # a process that fails makes the others fail after this long, not hang
        timeout=datetime.timedelta(seconds=60),
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
else:
    rank, world, device = 0, 1, torch.device("cpu")

# The same model and data set on every process (same seed).
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
    device, torch.float64
)
X = torch.randn(1000, 10, dtype=torch.float64, device=device)
y = torch.randint(0, 3, (1000,), device=device)

# This process's shard: contiguous rows, in batches of 128. Shards may have
# different sizes, and may be empty.
start, stop = 1000 * rank // world, 1000 * (rank + 1) // world
shard = [(X[i : min(i + 128, stop)], y[i : min(i + 128, stop)]) for i in range(start, stop, 128)]

params = list(model.parameters())
loss_func = torch.nn.CrossEntropyLoss()
H = cl.HessianLinearOperator(model, loss_func, params, shard)  # default process group
G = cl.GGNLinearOperator(model, loss_func, params, shard)
J = cl.JacobianLinearOperator(model, params, shard)

# SPMD: every process runs the same solver with the same seed.
top = eigsh(H, k=3, which="LA", rng=0, return_eigenvectors=False)
v = np.random.default_rng(0).standard_normal(H.shape[1])
Gv = G @ v
# J is sharded by rows: this process has the rows of its own data.
print(f"rank {rank}/{world}: {len(shard)} batches, J has shape {J.shape} here")

if rank == 0:
    print("top Hessian eigenvalues:", np.sort(top)[::-1])
    # Compare with one process over all the data (no communication).
    H_all = cl.HessianLinearOperator(model, loss_func, params, [(X, y)], process_group="local")
    G_all = cl.GGNLinearOperator(model, loss_func, params, [(X, y)], process_group="local")
    top_all = eigsh(H_all, k=3, which="LA", rng=0, return_eigenvectors=False)
    differences = {
        "eigenvalues": np.abs(np.sort(top) - np.sort(top_all)).max(),
        "G @ v": np.abs(Gv - G_all @ v).max(),
    }
    print("largest difference to one process:")
    for name, difference in differences.items():
        print(f"  {name:<12}{difference:.1e}")
    if max(differences.values()) > 1e-8:  # float64: only the order of the sums differs
        raise SystemExit("FAILED: the distributed results differ from one process")

if world > 1:
    dist.destroy_process_group()
