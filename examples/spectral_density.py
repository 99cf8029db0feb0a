"""The spectral density of a Hessian by stochastic Lanczos quadrature (SLQ), in JAX.

    python examples/spectral_density.py [--out DIR]

SLQ needs only Hessian-vector products (here 20 probes x 40 Lanczos steps,
the probes batched into one product per step). The model is small enough
to check the estimate against the exact eigenvalues. Writes two PNG files.
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from curvlinops import GGNLinearOperator, HessianLinearOperator
from curvlinops.losses import CrossEntropyLoss
from curvlinops.spectral import log_spectral_density, plot_spectral_density, spectral_density

jax.config.update("jax_enable_x64", True)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default=".", help="directory for the PNG files")
out = Path(parser.parse_args().out)
out.mkdir(parents=True, exist_ok=True)


def mlp(params, x):
    (w1, b1), (w2, b2) = params
    return jnp.tanh(x @ w1 + b1) @ w2 + b2


rng = np.random.default_rng(0)
params = [
    (jnp.asarray(rng.standard_normal((10, 12)) / 3), jnp.zeros(12)),
    (jnp.asarray(rng.standard_normal((12, 4)) / 3), jnp.zeros(4)),
]
X, y = rng.standard_normal((400, 10)), rng.integers(0, 4, 400)
data = [(X[:200], y[:200]), (X[200:], y[200:])]
H = HessianLinearOperator(mlp, CrossEntropyLoss(), params, data)
G = GGNLinearOperator(mlp, CrossEntropyLoss(), params, data)

result = spectral_density(H, num_probes=20, num_steps=40, seed=0)
exact = np.linalg.eigvalsh(np.asarray(H.todense()))
slq_mean = np.sum(result.weights * result.nodes) / result.nodes.shape[0]
total = np.trapezoid(result.density, result.grid)
print(f"P = {H.shape[0]} parameters; the density integrates to {total:.6f}")
print(f"mean eigenvalue: SLQ {slq_mean:.6f}, exact {exact.mean():.6f}")
print(
    f"extreme Ritz values {result.nodes.min():.4f} .. {result.nodes.max():.4f}, "
    f"exact eigenvalues {exact.min():.4f} .. {exact.max():.4f}"
)
print("wrote", plot_spectral_density(result, out / "hessian_density.png", title="Hessian (SLQ)"))

# the GGN is positive semi-definite: look at its eigenvalues on a log scale
log_result = log_spectral_density(G, num_probes=20, num_steps=40, seed=0)
print(f"GGN: {log_result.mass_below_floor:.1%} of the spectrum below {log_result.floor:.1e}")
print("wrote", plot_spectral_density(log_result, out / "ggn_log_density.png", title="GGN (SLQ)"))

assert abs(slq_mean - exact.mean()) < 0.1 * abs(exact).max()
assert result.nodes.max() <= exact.max() + 1e-8 and result.nodes.min() >= exact.min() - 1e-8
