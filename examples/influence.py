"""Influence functions: which training points matter for the test loss?

    python examples/influence.py

L2-regularised logistic regression, J(w) = sum_i loss_i(w) + lam/2 ||w||^2.
Removing training point i changes the test loss by about -I_i, where
I_i = -grad L_test^T H^-1 grad loss_i (Koh & Liang, 2017). curvlinops
computes all I_i with one CG solve and per-example gradients, without
forming H^-1; here they are checked against actually retraining without
each point (leave-one-out).
"""

import numpy as np
import torch

from curvlinops import HessianLinearOperator, IdentityLinearOperator
from curvlinops.influence import influence_on_test_loss

torch.manual_seed(0)
N, N_TEST, DIM, LAM = 100, 40, 5, 1.0
true_w = torch.randn(DIM, dtype=torch.float64)
X, X_test = torch.randn(N, DIM, dtype=torch.float64), torch.randn(N_TEST, DIM, dtype=torch.float64)
y = torch.bernoulli(torch.sigmoid(X @ true_w))[:, None]
y_test = torch.bernoulli(torch.sigmoid(X_test @ true_w))[:, None]
loss = torch.nn.BCEWithLogitsLoss(reduction="sum")


def model(params, inputs):
    W, b = params
    return inputs @ W.T + b


def unflatten(v):
    return [v[:DIM].reshape(1, DIM), v[DIM:]]


def train(keep: torch.Tensor) -> torch.Tensor:
    """Newton's method on sum_i keep_i loss_i(w) + lam/2 ||w||^2 (a tiny, convex problem)."""

    def objective(v):
        terms = torch.nn.functional.binary_cross_entropy_with_logits(
            model(unflatten(v), X), y, reduction="none"
        )
        return (keep[:, None] * terms).sum() + 0.5 * LAM * (v @ v)

    v = torch.zeros(DIM + 1, dtype=torch.float64)
    for _ in range(50):
        gradient = torch.func.grad(objective)(v)
        if gradient.norm() < 1e-12:
            break
        v = v - torch.linalg.solve(torch.func.hessian(objective)(v), gradient)
    return v


def test_loss(v: torch.Tensor) -> float:
    return loss(model(unflatten(v), X_test), y_test).item() / N_TEST


w = train(torch.ones(N))
params = unflatten(w)
H = HessianLinearOperator(model, loss, params, [(X, y)])
H = H + LAM * IdentityLinearOperator(H)  # the regulariser's Hessian
# I[t, i] for every test point t and training point i: one CG solve, no H^-1
influence = influence_on_test_loss(H, model, loss, params, [(X, y)], (X_test, y_test))
predicted = -influence.mean(dim=0)  # change of the mean test loss when point i is removed

base = test_loss(w)
actual = torch.tensor([test_loss(train(1.0 - torch.eye(N)[i])) - base for i in range(N)])
r = np.corrcoef(predicted.numpy(), actual.numpy())[0, 1]
order = torch.argsort(actual.abs(), descending=True)[:5]
print(f"test loss {base:.5f}; effect of removing each of the {N} training points:")
for i in order.tolist():
    print(f"  point {i:>2}: predicted {predicted[i]:+.2e}, retrained {actual[i]:+.2e}")
print(f"Pearson correlation, predicted vs leave-one-out retraining: r = {r:.4f}")
assert r > 0.99
