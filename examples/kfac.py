"""KFAC and EKFAC against the exact GGN, their top eigenvalues and a damped inverse.

    python examples/kfac.py

A small tanh MLP in PyTorch with cross-entropy. KFAC approximates each
parameter's block of the GGN by a Kronecker product of two small factors;
EKFAC (eigenvalue-corrected KFAC) keeps KFAC's eigenvectors and refits the
eigenvalues to the data, so it is at least as close to the GGN's block
diagonal in Frobenius norm. The table has, for the exact GGN, its block
diagonal, KFAC (type-2 Fisher) and EKFAC: the relative Frobenius error
against the block diagonal, the top eigenvalues by ``curvlinops.eigsh``,
and the cosine between the damped inverse applied to the gradient (a
natural-gradient step) and the exact GGN's step. If JAX is installed, the
same weights as a plain JAX function give the same Kronecker factors (its
dense layers are found by tracing).
"""

import importlib.util

import numpy as np
import torch

from curvlinops import (
    CGInverseLinearOperator,
    EKFACLinearOperator,
    GGNLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    eigsh,
    gradient_and_loss,
)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
model = model.double()
X, y = torch.randn(256, 6, dtype=torch.float64), torch.randint(0, 4, (256,))
data = [(X[:160], y[:160]), (X[160:], y[160:])]
params = list(model.parameters())
loss = torch.nn.CrossEntropyLoss()
DAMPING = 1e-3

G = GGNLinearOperator(model, loss, params, data)
K = KFACLinearOperator(model, loss, params, data, fisher_type="type-2")
E = EKFACLinearOperator(model, loss, params, data, fisher_type="type-2")
print("PyTorch layers (name: parameter positions):", K._mapping)

# the exact GGN's blocks, one per parameter (KFAC's blocks: separate_weight_and_bias=True)
G_dense = G.todense()
blocks = torch.zeros_like(G_dense)
offsets = np.cumsum([0, *(p.numel() for p in params)])
for start, stop in zip(offsets[:-1], offsets[1:]):
    blocks[start:stop, start:stop] = G_dense[start:stop, start:stop]


def relative_error(A: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.norm(A - reference) / torch.linalg.norm(reference))


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


# a damped natural-gradient step (C + λI)⁻¹ g for each curvature C
gradient, _ = gradient_and_loss(model, loss, params, data, flat=True)
eye = torch.eye(G.shape[0], dtype=torch.float64)
steps = {
    "GGN": CGInverseLinearOperator(G, damping=DAMPING, tol=1e-12) @ gradient,
    "GGN blocks": torch.linalg.solve(blocks + DAMPING * eye, gradient),
    "KFAC": KFACInverseLinearOperator(K, damping=DAMPING, use_exact_damping=True) @ gradient,
    "EKFAC": KFACInverseLinearOperator(E, damping=DAMPING, use_exact_damping=True) @ gradient,
}
operators = {"GGN": G, "GGN blocks": blocks, "KFAC": K, "EKFAC": E}

print(
    f"\n{'operator':<12}{'err vs GGN':>12}{'err vs blocks':>15}   "
    f"{'top 3 eigenvalues (eigsh)':<28}{'cos(step, GGN step)':>20}"
)
errors = {}
for name, operator in operators.items():
    dense = operator if isinstance(operator, torch.Tensor) else operator.todense()
    top = eigsh(operator, k=3, which="LA", return_eigenvectors=False).flip(0)
    assert torch.allclose(top, torch.linalg.eigvalsh(dense)[-3:].flip(0), rtol=1e-8)
    # the inverses from the factors are the dense damped inverses
    assert torch.allclose(steps[name], torch.linalg.solve(dense + DAMPING * eye, gradient))
    errors[name] = relative_error(dense, blocks)
    print(
        f"{name:<12}{relative_error(dense, G_dense):>12.4f}{errors[name]:>15.4f}   "
        f"{' '.join(f'{v:.5f}' for v in top.tolist()):<28}"
        f"{cosine(steps[name], steps['GGN']):>20.4f}"
    )
assert errors["EKFAC"] <= errors["KFAC"]  # EKFAC's eigenvalues fit the blocks best
dense_K = K.todense()
print(
    f"\nKFAC in closed form: trace {float(K.trace):.6f} (dense {float(dense_K.trace()):.6f}), "
    f"Frobenius norm {float(K.frobenius_norm):.6f} (dense {float(dense_K.norm()):.6f})"
)

if importlib.util.find_spec("jax") is not None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from curvlinops.losses import CrossEntropyLoss

    def mlp(p, x):  # the same network as a plain function: its dense layers are found by tracing
        W1, b1, W2, b2 = p
        return jnp.tanh(x @ W1.T + b1) @ W2.T + b2

    jax_params = [jnp.asarray(p.detach().numpy()) for p in params]
    jax_data = [(jnp.asarray(Xb.numpy()), jnp.asarray(yb.numpy())) for Xb, yb in data]
    K_jax = KFACLinearOperator(mlp, CrossEntropyLoss(), jax_params, jax_data, fisher_type="type-2")
    K_jax.compute_kronecker_factors()
    difference = max(
        np.abs(np.asarray(ours[jax_name]) - theirs[name].numpy()).max()
        for ours, theirs in [
            (K_jax._input_covariances, K._input_covariances),
            (K_jax._gradient_covariances, K._gradient_covariances),
        ]
        for jax_name, name in zip(K_jax._mapping, K._mapping)
    )
    print(f"JAX layers {K_jax._mapping}: max |factor_jax - factor_torch| = {difference:.1e}")
    assert difference < 1e-10
