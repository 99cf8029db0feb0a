"""Curvature on a GPU: products, eigsh and CG run where the parameters live.

    python examples/gpu.py             # needs a CUDA GPU
    python examples/gpu.py --dry-run   # the same code on the CPU

The operators compute in the framework of the parameters, on their device:
a CUDA tensor in gives a CUDA tensor out, and ``curvlinops.eigen.eigsh`` and
``CGInverseLinearOperator`` iterate on the device, moving only scalars to
the host. With JAX installed, the same runs on JAX's default device.
"""

import argparse
import importlib.util
import sys

import torch

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.eigen import eigsh
from curvlinops.inverse import CGInverseLinearOperator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--dry-run", action="store_true", help="run on the CPU (no GPU needed)")
args = parser.parse_args()
if not args.dry_run and not torch.cuda.is_available():
    sys.exit("gpu.py: no CUDA GPU found. Run 'python examples/gpu.py --dry-run' to try it on CPU.")
device = torch.device("cpu" if args.dry_run else "cuda")

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
model = model.to(device)
X = torch.randn(1024, 32, device=device)
y = torch.randint(0, 10, (1024,), device=device)
data = [(X[:512], y[:512]), (X[512:], y[512:])]
params = list(model.parameters())
loss = torch.nn.CrossEntropyLoss()
H = HessianLinearOperator(model, loss, params, data)
G = GGNLinearOperator(model, loss, params, data)
print(f"PyTorch on {device}: {H}")

v = torch.randn(H.shape[1], device=device)
Hv = H @ v
assert Hv.device == v.device and Hv.dtype == torch.float32
top = eigsh(H, k=3, which="LA", return_eigenvectors=False)  # Lanczos on the device
assert top.device.type == device.type
print("  top-3 Hessian eigenvalues:", top.cpu().numpy())
inverse = CGInverseLinearOperator(G, damping=1e-2, tol=1e-4)
x = inverse @ v  # CG on the device, columns batched
assert x.device == v.device
print(" ", inverse.info)

if importlib.util.find_spec("jax"):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from curvlinops.losses import CrossEntropyLoss

    jax_device = jax.devices("cpu" if args.dry_run else None)[0]
    with jax.default_device(jax_device):
        jparams = [jnp.asarray(p.detach().cpu().numpy()) for p in params]

        def mlp(p, inputs):
            return jnp.tanh(inputs @ p[0].T + p[1]) @ p[2].T + p[3]

        jdata = [(jnp.asarray(a.cpu().numpy()), jnp.asarray(b.cpu().numpy())) for a, b in data]
        HJ = HessianLinearOperator(mlp, CrossEntropyLoss(), jparams, jdata)
        jtop = eigsh(HJ, k=3, which="LA", return_eigenvectors=False)
    print(f"JAX on {jax_device}: top-3 Hessian eigenvalues", np.asarray(jtop))
    assert np.allclose(np.asarray(jtop), top.cpu().numpy(), rtol=1e-3)
