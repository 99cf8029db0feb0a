"""Trace and diagonal of a GGN from matrix-vector products, with standard errors.

    python examples/trace.py

Hutchinson, Hutch++ and XTrace estimate the trace from ``m`` products;
Hutchinson and XDiag estimate the diagonal. The exact values come from the
dense matrix (small model) and from the GGN's exact diagonal.
"""

import torch

from curvlinops import GGNLinearOperator
from curvlinops.estimators import (
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xtrace,
)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
model = model.double()
X, y = torch.randn(300, 6, dtype=torch.float64), torch.randint(0, 4, (300,))
G = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])

exact_trace = torch.trace(G.todense()).item()
print(f"P = {G.shape[0]}, exact trace {exact_trace:.5f}")
for name, estimator in (
    ("Hutchinson", hutchinson_trace),
    ("Hutch++", hutchpp_trace),
    ("XTrace", xtrace),
):
    for m in (30, 120):
        estimate, stderr = estimator(G, m, seed=0, return_stderr=True)
        print(f"  {name:<10} m={m:>3}: {estimate.item():.5f} +- {stderr.item():.5f}")

exact_diagonal = G.diagonal()  # exact, without forming G
for name, estimator in (("Hutchinson", hutchinson_diagonal), ("XDiag", xdiag)):
    estimate = estimator(G, 120, seed=0)
    error = (estimate - exact_diagonal).norm() / exact_diagonal.norm()
    print(f"  diagonal, {name:<10} m=120: relative error {error.item():.3f}")

estimate, stderr = xtrace(G, 120, seed=0, return_stderr=True)
assert abs(estimate.item() - exact_trace) < 5 * stderr.item() + 1e-8 * exact_trace
