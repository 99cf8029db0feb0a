"""Top Hessian eigenvalues of a small MLP, on every installed backend.

The same weights and data go to PyTorch and to JAX; scipy's ``eigsh``
runs on both operators unchanged and the eigenvalues agree.
"""

import importlib.util

import numpy as np
from scipy.sparse.linalg import eigsh

import curvlinops as cl

rng = np.random.default_rng(0)
X = rng.standard_normal((256, 10)).astype(np.float32)
y = rng.integers(0, 3, size=256)
W1 = (rng.standard_normal((16, 10)) / np.sqrt(10)).astype(np.float32)
b1 = np.zeros(16, np.float32)
W2 = (rng.standard_normal((3, 16)) / 4).astype(np.float32)
b2 = np.zeros(3, np.float32)
batches = [(X[:128], y[:128]), (X[128:], y[128:])]

results = {}
if importlib.util.find_spec("torch"):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p, value in zip(model.parameters(), (W1, b1, W2, b2)):
            p.copy_(torch.from_numpy(value))
    data = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in batches]
    H = cl.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data)
    results["torch"] = np.sort(eigsh(H, k=5, which="LA")[0])[::-1]

if importlib.util.find_spec("jax"):
    import jax.numpy as jnp

    def mlp(params, x):
        (w1, c1), (w2, c2) = params
        return jnp.tanh(x @ w1.T + c1) @ w2.T + c2

    params = [(jnp.asarray(W1), jnp.asarray(b1)), (jnp.asarray(W2), jnp.asarray(b2))]
    H = cl.HessianLinearOperator(mlp, cl.losses.CrossEntropyLoss(), params, batches)
    results["jax"] = np.sort(eigsh(H, k=5, which="LA")[0])[::-1]

for name, values in results.items():
    print(f"{name:>6}: top-5 Hessian eigenvalues", np.array2string(values, precision=5))
if len(results) == 2:
    difference = np.abs(results["torch"] - results["jax"]).max()
    print(f"largest difference between backends: {difference:.2e}")
