"""Stochastic Lanczos quadrature against smoothed histograms of exact eigenvalues."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.sparse.linalg
from cases import build

from curvlinops.spectral import (
    SpectralDensity,
    log_spectral_density,
    plot_spectral_density,
    spectral_density,
)


def operator(problem, kind: str):
    """The problem's operator, with all columns of a product in one vmap pass."""
    return problem.operator(kind, columns_per_pass=64)


def smoothed(eigenvalues: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """The exact Gaussian-smoothed spectral density (1/n) sum_i N(t; lambda_i, sigma^2)."""
    z = (grid[:, None] - eigenvalues[None, :]) / sigma
    return np.exp(-0.5 * z**2).mean(axis=1) / (sigma * math.sqrt(2 * math.pi))


def l1_error(result: SpectralDensity, exact: np.ndarray) -> float:
    return float(np.trapezoid(np.abs(result.density - exact), result.grid))


def test_density_of_a_matrix_with_outliers():
    rng = np.random.default_rng(0)
    n = 120
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([rng.normal(0.0, 1.0, n - 3), [8.0, 10.0, 14.0]])
    A = (Q * eigenvalues) @ Q.T
    grid, density = result = spectral_density(A, num_probes=40, num_steps=60, kernel_width=0.4)
    assert grid.shape == density.shape == (1024,)
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-6
    assert result.nodes.shape == result.weights.shape == (40, 60)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, atol=1e-12)
    # the extreme Ritz values are the extreme eigenvalues
    assert abs(result.nodes.max() - 14.0) < 1e-8
    assert l1_error(result, smoothed(eigenvalues, grid, 0.4)) < 0.06
    assert l1_error(result, smoothed(eigenvalues + 0.5, grid, 0.4)) > 0.3  # what "wrong" is
    # the three outliers carry 3/120 of the mass
    outliers = grid > 6.0
    assert abs(np.trapezoid(density[outliers], grid[outliers]) - 3 / 120) < 0.01


def test_more_probes_give_smaller_errors():
    rng = np.random.default_rng(1)
    n = 100
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = rng.gamma(2.0, 1.0, n)
    A = (Q * eigenvalues) @ Q.T
    grid = np.linspace(-2.0, 15.0, 400)
    exact = smoothed(eigenvalues, grid, 0.3)
    errors = [
        np.mean(
            [
                l1_error(
                    spectral_density(A, num_probes=p, grid=grid, kernel_width=0.3, seed=s), exact
                )
                for s in range(3)
            ]
        )
        for p in (2, 32)
    ]
    assert errors[1] < errors[0] / 2.5  # error ~ 1 / sqrt(num_probes): 4x expected


def test_full_lanczos_nodes_are_the_eigenvalues():
    A = np.diag(np.arange(1.0, 21.0))
    result = spectral_density(A, num_probes=3, num_steps=20, probes="normal")
    for nodes, weights in zip(result.nodes, result.weights):
        np.testing.assert_allclose(np.sort(nodes[weights > 1e-12]), np.arange(1.0, 21.0), atol=1e-9)


def test_density_on_curvature_operators(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    for kind in ("H", "G"):
        eigenvalues = np.linalg.eigvalsh(problem.dense[kind])
        sigma = 0.05
        result = spectral_density(
            operator(problem, kind), num_probes=20, num_steps=30, kernel_width=sigma, seed=2
        )
        assert abs(np.trapezoid(result.density, result.grid) - 1.0) < 1e-6
        assert l1_error(result, smoothed(eigenvalues, result.grid, sigma)) < 0.12
        assert abs(result.nodes.max() - eigenvalues.max()) < 1e-8


def test_backends_agree_on_the_quadrature():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    results = [
        spectral_density(operator(build("mlp-ce-mean", b), "G"), num_probes=4, num_steps=10)
        for b in ("torch", "jax")
    ]
    # both draw their probes from their own generators: compare the densities, not the nodes
    assert abs(np.trapezoid(np.abs(results[0].density - results[1].density), results[0].grid)) < 1.0
    np.testing.assert_allclose(results[0].nodes.max(), results[1].nodes.max(), rtol=1e-8)


def test_seeded_and_independent_of_probes_per_pass(backend_name):
    G = operator(build("mlp-ce-mean", backend_name), "G")
    options = dict(num_probes=4, num_steps=8, num_points=64)
    first = spectral_density(G, seed=3, **options)
    again = spectral_density(G, seed=3, probes_per_pass=2, **options)
    other = spectral_density(G, seed=4, **options)
    np.testing.assert_allclose(first.nodes, again.nodes, atol=1e-12)
    np.testing.assert_allclose(first.density, again.density, atol=1e-12)
    assert not np.allclose(first.nodes, other.nodes)


def test_probes_run_as_columns_of_one_product():
    A = np.diag(np.linspace(0.0, 1.0, 30))
    calls = []

    def matmat(X):
        calls.append(X.shape[1])
        return A @ X

    op = scipy.sparse.linalg.LinearOperator(A.shape, matvec=lambda x: A @ x, matmat=matmat)
    spectral_density(op, num_probes=6, num_steps=5, probes_per_pass=4)
    assert calls == [4] * 5 + [2] * 5


def test_without_reorthogonalisation_the_density_stays_accurate():
    rng = np.random.default_rng(2)
    n = 80
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.concatenate([rng.uniform(0.0, 1.0, n - 2), [5.0, 6.0]])
    A = (Q * eigenvalues) @ Q.T
    grid = np.linspace(-1.0, 7.0, 300)
    options = dict(num_probes=16, num_steps=60, grid=grid, kernel_width=0.1)
    plain = spectral_density(A, reorthogonalize=False, **options)
    full = spectral_density(A, **options)
    exact = smoothed(eigenvalues, grid, 0.1)
    assert l1_error(plain, exact) < 0.2
    assert abs(l1_error(plain, exact) - l1_error(full, exact)) < 0.05


def test_log_density_of_a_psd_operator(backend_name):
    problem = build("mlp-ce-mean", backend_name)
    eigenvalues = np.linalg.eigvalsh(problem.dense["G"])
    result = log_spectral_density(operator(problem, "G"), num_probes=30, num_steps=30, seed=1)
    assert result.scale == "log10"
    assert abs(np.trapezoid(result.density, result.grid) - 1.0) < 1e-6
    # the GGN has rank 14 of 51: about 37/51 of the spectrum is (numerically) zero
    zero_fraction = np.mean(eigenvalues <= result.floor)
    assert abs(result.mass_below_floor - zero_fraction) < 0.05
    exact = smoothed(
        np.log10(np.maximum(eigenvalues, result.floor)), result.grid, result.kernel_width
    )
    assert l1_error(result, exact) < 0.1


def test_log_density_refuses_indefinite_matrices():
    with pytest.raises(ValueError, match="A: expected a positive semi-definite operator"):
        log_spectral_density(np.diag([-2.0, 1.0, 3.0]), num_probes=2)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    result = spectral_density(np.diag(np.linspace(0.0, 1.0, 20)), num_probes=2, num_steps=10)
    path = plot_spectral_density(result, tmp_path / "density.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log_result = log_spectral_density(np.diag(np.logspace(-2, 1, 20)), num_probes=2)
    path = plot_spectral_density(log_result, tmp_path / "log.png", yscale="linear")
    assert path.stat().st_size > 1000


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    result = spectral_density(np.diag([1.0, 2.0, 3.0]), num_probes=1, num_steps=3)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'curvlinops\[plot\]'"):
        plot_spectral_density(result, tmp_path / "x.png")


def test_nan_products_are_reported():
    A = np.diag([1.0, np.nan, 3.0])
    with pytest.raises(FloatingPointError, match="spectral_density: the products with A contain"):
        spectral_density(A, num_probes=2)


def test_errors():
    A = np.diag([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="num_points: expected None when a grid is given"):
        spectral_density(A, grid=np.linspace(0, 1, 5), num_points=5)
    with pytest.raises(ValueError, match=r"grid: expected a 1-d array of at least 2 points"):
        spectral_density(A, grid=np.ones((2, 2)))
    with pytest.raises(ValueError, match="kernel_width: expected a number > 0.0, got 0.0"):
        spectral_density(A, kernel_width=0.0)
    with pytest.raises(ValueError, match="num_probes: expected an integer >= 1, got 0"):
        spectral_density(A, num_probes=0)
    with pytest.raises(ValueError, match="probes: expected 'rademacher' or 'normal', got 'sobol'"):
        spectral_density(A, probes="sobol")
    with pytest.raises(ValueError, match="yscale: expected 'log' or 'linear'"):
        plot_spectral_density(spectral_density(A, num_probes=1), "x.png", yscale="symlog")
    with pytest.raises(ValueError, match="floor: expected a number > 0.0, got -1.0"):
        log_spectral_density(A, floor=-1.0, num_probes=1)
    with pytest.raises(TypeError, match="result: expected a SpectralDensity"):
        plot_spectral_density((np.ones(3), np.ones(3)), "x.png")
