"""Top eigenvalues of a Hessian and a GGN, and the largest stable step size.

    python examples/eigenvalues.py

A small MLP in PyTorch. ``curvlinops.eigen.eigsh`` runs Lanczos in PyTorch
(on the parameters' device); ``scipy.sparse.linalg.eigsh`` takes the same
operator through numpy; both agree with the dense matrix. ``2 / lambda_max``
is the step size above which gradient descent diverges near this point.
"""

import numpy as np
import scipy.sparse.linalg
import torch

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.eigen import eigsh, max_stable_learning_rate, sharpness

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
model = model.double()
X, y = torch.randn(512, 8, dtype=torch.float64), torch.randint(0, 3, (512,))
data = [(X[:256], y[:256]), (X[256:], y[256:])]  # batches; the loss is their mean
params = list(model.parameters())
loss = torch.nn.CrossEntropyLoss()

H = HessianLinearOperator(model, loss, params, data)
G = GGNLinearOperator(model, loss, params, data)

native = eigsh(H, k=5, which="LA", return_eigenvectors=False)  # a torch.Tensor
through_scipy = scipy.sparse.linalg.eigsh(H, k=5, which="LA", return_eigenvectors=False)
dense = torch.linalg.eigvalsh(H.todense())[-5:]
print("Hessian, top 5 (curvlinops eigsh):", np.round(native.numpy(), 6))
print("Hessian, top 5 (scipy eigsh):     ", np.round(np.sort(through_scipy), 6))
print("Hessian, top 5 (dense eigvalsh):  ", np.round(dense.numpy(), 6))
print("GGN,     top 5 (curvlinops eigsh):", np.round(eigsh(G, k=5, which="LA")[0].numpy(), 6))
print(f"sharpness lambda_max = {sharpness(H):.6f}")
print(f"largest stable gradient-descent step 2 / lambda_max = {max_stable_learning_rate(H):.6f}")

assert torch.allclose(native, dense, rtol=1e-8)
assert np.allclose(np.sort(through_scipy), dense.numpy(), rtol=1e-8)
