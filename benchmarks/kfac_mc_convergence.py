"""MC-Fisher KFAC converges to type-2 KFAC like one over the square root of the samples.

    .venv/bin/python -m benchmarks.kfac_mc_convergence [--out DIR] [--seeds 16]

KFAC with ``fisher_type="mc"`` replaces each example's output Hessian by the
outer products of gradients at ``mc_samples`` targets drawn from the model;
their mean is unbiased, so the mean squared error of the gradient factor, and
with it of KFAC (the input factor is the same), falls like ``1 / mc_samples``
and the root-mean-square error like ``mc_samples^(-1/2)``. This script draws
the relative Frobenius error ``‖K_mc − K_type2‖_F / ‖K_type2‖_F`` of a tanh
MLP (cross-entropy, float64, PyTorch) for ``mc_samples`` = 1, 2, 4, ..., 512
and several seeds on a log-log plot, fits the slope of the root-mean-square
error over the seeds, and prints it (about -0.5). Writes
``kfac_mc_convergence.png`` into ``--out`` (default: the working directory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from curvlinops import KFACLinearOperator

SAMPLES = [2**i for i in range(10)]


def problem() -> tuple:
    """A tanh MLP 6-12-4 with cross-entropy, 256 examples in two batches (float64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4))
    model = model.double()
    X, y = torch.randn(256, 6, dtype=torch.float64), torch.randint(0, 4, (256,))
    data = [(X[:160], y[:160]), (X[160:], y[160:])]
    return model, torch.nn.CrossEntropyLoss(), list(model.parameters()), data


def relative_errors(seeds: int) -> np.ndarray:
    """``errors[i, s]``: the relative Frobenius error at ``SAMPLES[i]`` with seed ``s``."""
    model, loss, params, data = problem()
    P = sum(p.numel() for p in params)
    identity = np.eye(P)

    def dense(**options: object) -> np.ndarray:
        K = KFACLinearOperator(model, loss, params, data, check_deterministic=False, **options)
        return np.asarray(K @ identity)

    exact = dense(fisher_type="type-2")
    errors = np.empty((len(SAMPLES), seeds))
    for i, samples in enumerate(SAMPLES):
        for seed in range(seeds):
            K = dense(fisher_type="mc", mc_samples=samples, seed=seed)
            errors[i, seed] = np.linalg.norm(K - exact) / np.linalg.norm(exact)
    return errors


def fitted_slope(samples: list[int], errors: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of ``log(RMS error over seeds)`` against ``log(samples)``."""
    rms = np.sqrt(np.mean(errors**2, axis=1))
    slope, intercept = np.polyfit(np.log(samples), np.log(rms), 1)
    return float(slope), float(intercept)


def plot(errors: np.ndarray, slope: float, intercept: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = np.asarray(SAMPLES, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 4))
    for seed in range(errors.shape[1]):
        ax.scatter(samples, errors[:, seed], s=6, color="0.7", zorder=1)
    rms = np.sqrt(np.mean(errors**2, axis=1))
    ax.plot(samples, rms, "o-", color="C0", label="RMS over seeds", zorder=2)
    ax.plot(
        samples,
        np.exp(intercept) * samples**slope,
        "--",
        color="C1",
        label=f"fit: slope {slope:.3f}",
    )
    ax.plot(samples, rms[0] * samples**-0.5, ":", color="k", label="slope -1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mc_samples")
    ax.set_ylabel("‖K_mc − K_type-2‖_F / ‖K_type-2‖_F")
    ax.set_title("MC-Fisher KFAC → type-2 KFAC (tanh MLP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="folder of the PNG")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per mc_samples value")
    args = parser.parse_args()
    errors = relative_errors(args.seeds)
    slope, intercept = fitted_slope(SAMPLES, errors)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kfac_mc_convergence.png"
    plot(errors, slope, intercept, path)
    for samples, row in zip(SAMPLES, errors):
        print(f"mc_samples {samples:4d}: RMS relative error {np.sqrt(np.mean(row**2)):.4f}")
    print(f"fitted slope {slope:.3f} (expected -0.5); plot: {path}")


if __name__ == "__main__":
    main()
