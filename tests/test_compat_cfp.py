"""Code written for curvlinops-for-pytorch 3.0.1 runs here, and gives its numbers.

The user code below follows 3.0.1's documented API (constructor keywords,
products with tensors and lists of tensors, ``to_scipy()`` into scipy, the
spectrum and estimator functions, ``block_sizes``, ``.device``,
``.gradient_and_loss()``, ``curvlinops.examples``, ``curvlinops.utils``).
Where 3.0.1's outputs are deterministic, they come from 3.0.1 itself, run once
in a subprocess with its folder first on ``sys.path`` (see ``REFERENCE_SCRIPT``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scipy.sparse.linalg import cg, eigsh  # noqa: E402

import curvlinops  # noqa: E402
from curvlinops import (  # noqa: E402
    CGInverseLinearOperator,
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    JacobianLinearOperator,
    LanczosApproximateLogSpectrumCached,
    LanczosApproximateSpectrumCached,
    LSMRInverseLinearOperator,
    NeumannInverseLinearOperator,
    TransposedJacobianLinearOperator,
    hutchinson_diag,
    hutchinson_squared_fro,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_approximate_log_spectrum,
    lanczos_approximate_spectrum,
    xdiag,
    xtrace,
)
from curvlinops.examples import (  # noqa: E402
    IdentityLinearOperator,
    OuterProductLinearOperator,
    TensorLinearOperator,
)
from curvlinops.examples.functorch import (  # noqa: E402
    functorch_empirical_fisher,
    functorch_ggn,
    functorch_gradient_and_loss,
    functorch_hessian,
    functorch_jacobian,
)
from curvlinops.papyan2020traces.spectrum import (  # noqa: E402
    approximate_boundaries,
    fast_lanczos,
    lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
)
from curvlinops.utils import allclose_report  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

DAMPING = 0.1
BLOCKS = [2, 2]
TIGHT = 1e-11  # solver tolerances for which both libraries' solutions agree to ~1e-8


def model_and_data():
    """The model (23 parameters), data and test matrices, in float64."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    f64 = torch.float64
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(f64)
    X, y = torch.randn(12, 4, dtype=f64), torch.randn(12, 2, dtype=f64)
    labels = torch.randint(0, 2, (12,))
    data = [(X[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]
    class_data = [(X[i : i + 4], labels[i : i + 4]) for i in range(0, 12, 4)]
    V, W = torch.randn(23, 3, dtype=f64), torch.randn(24, 3, dtype=f64)
    evals = torch.linspace(-1.0, 2.0, 8, dtype=f64)
    evecs = torch.linalg.qr(torch.randn(8, 8, dtype=f64))[0]
    return model, data, class_data, V, W, (evals, evecs)


def as_list(M, params):
    """3.0.1's list format of a matrix: one ``(*shape, K)`` tensor per parameter."""
    blocks = M.split([p.numel() for p in params])
    return [block.reshape(*p.shape, -1) for block, p in zip(blocks, params)]


REFERENCE_SCRIPT = (
    "import numpy as np, torch\nfrom torch import nn\n\n"
    + inspect.getsource(model_and_data)
    + inspect.getsource(as_list)
    + """
import sys
torch.set_num_threads(1)  # tiny matrices: a second thread only waits
import curvlinops
from curvlinops import (
    CGInverseLinearOperator, EFLinearOperator, GGNLinearOperator, HessianLinearOperator,
    JacobianLinearOperator, LSMRInverseLinearOperator, NeumannInverseLinearOperator,
    TransposedJacobianLinearOperator,
)
from curvlinops.examples import (
    IdentityLinearOperator, OuterProductLinearOperator, TensorLinearOperator,
)
from curvlinops.examples.functorch import (
    functorch_empirical_fisher, functorch_ggn, functorch_gradient_and_loss, functorch_hessian,
    functorch_jacobian,
)
from curvlinops.papyan2020traces.spectrum import (
    approximate_boundaries, lanczos_approximate_log_spectrum_from_iter,
    lanczos_approximate_spectrum_from_iter,
)
from scipy.sparse.linalg import eigsh

DAMPING, BLOCKS, TIGHT, NEUMANN_TERMS = {damping}, {blocks}, {tight}, 20
model, data, class_data, V, W, lanczos_iter = model_and_data()
params = list(model.parameters())
mse, ce = nn.MSELoss(), nn.CrossEntropyLoss()
out = {{"names": np.array(sorted(curvlinops.__all__))}}
fast = dict(check_deterministic=False)  # (the reference numbers do not depend on it)
H = HessianLinearOperator(model, mse, params, data, **fast)
G = GGNLinearOperator(model, mse, params, data, **fast)
out["H"], out["G"] = (H @ V).numpy(), (G @ V).numpy()
out["H list"] = torch.cat([r.flatten(end_dim=-2) for r in H @ as_list(V, params)]).numpy()
out["EF"] = (EFLinearOperator(model, ce, params, class_data, **fast) @ V).numpy()
out["J"] = (JacobianLinearOperator(model, params, data, **fast) @ V).numpy()
out["JT"] = (TransposedJacobianLinearOperator(model, params, data, **fast) @ W).numpy()
H_blocks = HessianLinearOperator(model, mse, params, data, block_sizes=BLOCKS, **fast)
out["H blocks"] = (H_blocks @ V).numpy()
gradient, loss = H.gradient_and_loss()
out["gradient"], out["loss"] = torch.cat([g.flatten() for g in gradient]).numpy(), loss.numpy()
out["eigsh"] = eigsh(H.to_scipy(), k=3, which="LA", tol=1e-12, return_eigenvectors=False)
out["boundaries"] = np.array(approximate_boundaries(H, tol=1e-10))
eye = IdentityLinearOperator([p.shape for p in params], G.device, G.dtype)
damped = G + DAMPING * eye
# GPyTorch's CG stagnates near 1e-5 unless columns keep updating (stop_updating_after)
options = dict(tolerance=TIGHT, max_iter=40, stop_updating_after=1e-12, eps=1e-20)
out["CG"] = (CGInverseLinearOperator(damped, **options) @ V).numpy()
out["LSMR"] = (LSMRInverseLinearOperator(damped, atol=TIGHT, btol=TIGHT, maxiter=100) @ V).numpy()
scale = 1.0 / float(eigsh(damped.to_scipy(), k=1, which="LA", return_eigenvectors=False)[0])
out["Neumann scale"] = np.array(scale)
neumann = NeumannInverseLinearOperator(damped, num_terms=NEUMANN_TERMS, scale=scale)
out["Neumann"] = (neumann @ V).numpy()
density = lanczos_approximate_spectrum_from_iter(lanczos_iter, (-1.2, 2.3), 64, 3.0, 0.05)
out["spectrum"] = np.stack([t.numpy() for t in density])
density = lanczos_approximate_log_spectrum_from_iter(lanczos_iter, (0.1, 2.0), 64, 1.04, 0.05, 1e-5)
out["log spectrum"] = np.stack([t.numpy() for t in density])
out["functorch H"] = functorch_hessian(model, mse, params, data).detach().numpy()
out["functorch G"] = functorch_ggn(model, ce, params, class_data).detach().numpy()
out["functorch EF mse"] = functorch_empirical_fisher(model, mse, params, data).detach().numpy()
out["functorch EF ce"] = functorch_empirical_fisher(model, ce, params, class_data).detach().numpy()
out["functorch J"] = functorch_jacobian(model, params, data).detach().numpy()
g, value = functorch_gradient_and_loss(model, mse, params, data)
out["functorch gradient"] = torch.cat([t.flatten() for t in g]).detach().numpy()
out["functorch loss"] = value.detach().numpy()
A, c = V[:, :2], torch.tensor([0.5, 2.0])
out["tensor op"] = (TensorLinearOperator(W[:5, :]) @ V[:3, :]).numpy()
out["outer op"] = (OuterProductLinearOperator(c, A) @ V).numpy()
import importlib, inspect, json
signatures = {{}}
for module, names in {module_paths}.items():
    for name in names:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        signatures[f"{{module}}.{{name}}"] = [
            [p.name, p.default is inspect.Parameter.empty] for p in parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
out["signatures"] = np.array(json.dumps(signatures))
np.savez(sys.argv[1], **out)
"""
)

# 3.0.1's module paths and the names its code imports from them (functions and classes)
MODULE_PATHS = {
    "curvlinops.ekfac": [
        "EKFACLinearOperator",
        "compute_eigenvalue_correction_linear_weight_sharing",
    ],
    "curvlinops.sampling": ["random_vector", "rademacher", "normal"],
    "curvlinops.utils": [
        "split_list",
        "allclose_report",
        "assert_is_square",
        "assert_matvecs_subseed_dim",
        "assert_divisible_by",
    ],
    "curvlinops.experimental.activation_hessian": [
        "ActivationHessianLinearOperator",
        "store_activation",
    ],
    "curvlinops.gradient_moments": ["EFLinearOperator"],
    "curvlinops.kfac_utils": [
        "loss_hessian_matrix_sqrt",
        "extract_patches",
        "extract_averaged_patches",
    ],
    "curvlinops.trace.hutchinson": ["hutchinson_trace"],
    "curvlinops.trace.meyer2020hutch": ["hutchpp_trace"],
    "curvlinops.trace.epperly2024xtrace": ["xtrace"],
    "curvlinops.diagonal.hutchinson": ["hutchinson_diag"],
    "curvlinops.diagonal.epperly2024xtrace": ["xdiag"],
    "curvlinops.norm.hutchinson": ["hutchinson_squared_fro"],
    "curvlinops._torch_base": ["PyTorchLinearOperator", "CurvatureLinearOperator"],
    "curvlinops.inverse": ["KFACInverseLinearOperator", "CGInverseLinearOperator"],
}


def _reference_path() -> Path:
    default = Path(__file__).resolve().parents[1] / ".venv" / "curvlinops-for-pytorch"
    return Path(os.environ.get("CURVLINOPS_FOR_PYTORCH_PATH", default))


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    """3.0.1's numbers (one subprocess for all of them)."""
    reference = _reference_path()
    if not (reference / "curvlinops").is_dir():
        pytest.skip(f"curvlinops-for-pytorch 3.0.1 is not installed in {reference}")
    folder = tmp_path_factory.mktemp("cfp")
    script, output = folder / "reference.py", folder / "theirs.npz"
    script.write_text(
        REFERENCE_SCRIPT.format(
            damping=DAMPING, blocks=BLOCKS, tight=TIGHT, module_paths=repr(MODULE_PATHS)
        )
    )
    path = os.pathsep.join([str(reference), os.environ.get("PYTHONPATH", "")])
    process = subprocess.run(
        [sys.executable, str(script), str(output)],
        cwd=folder,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if process.returncode != 0 and "ModuleNotFoundError" in process.stderr:
        pytest.skip(f"curvlinops-for-pytorch 3.0.1 lacks a dependency: {process.stderr[-200:]}")
    assert process.returncode == 0, process.stderr
    return dict(np.load(output))


@pytest.fixture(scope="module")
def problem():
    model, data, class_data, V, W, lanczos_iter = model_and_data()
    return model, list(model.parameters()), data, class_data, V, W, lanczos_iter


# --- names and operators -----------------------------------------------------------------------
def test_every_public_name_of_3_0_1_is_here(theirs):
    missing = [name for name in theirs["names"].tolist() if not hasattr(curvlinops, name)]
    assert missing == []
    from curvlinops.papyan2020traces import spectrum

    assert spectrum.lanczos_approximate_spectrum is lanczos_approximate_spectrum


def test_every_module_path_of_3_0_1_has_its_names_and_signatures(theirs):
    """Each name imports from 3.0.1's module path; its arguments, in order, are accepted.

    Ours may take more (keyword) options; a class whose ``__init__`` takes ``**options``
    accepts 3.0.1's keywords through them.
    """
    theirs_signatures = json.loads(str(theirs["signatures"]))
    for module, names in MODULE_PATHS.items():
        for name in names:
            ours = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            required = [n for n, no_default in theirs_signatures[f"{module}.{name}"] if no_default]
            optional = [
                n for n, no_default in theirs_signatures[f"{module}.{name}"] if not no_default
            ]
            assert list(ours)[: len(required)] == required, (module, name)
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
            assert takes_any or set(optional) <= set(ours), (module, name, optional)


def test_operator_products_equal_3_0_1(theirs, problem):
    model, params, data, class_data, V, W, _ = problem
    mse, ce = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss()
    H = HessianLinearOperator(model, mse, params, data)
    assert_close(H @ V, theirs["H"], name="H")
    Y = H @ as_list(V, params)
    assert isinstance(Y, list) and [y.shape[:-1] for y in Y] == [p.shape for p in params]
    assert_close(torch.cat([y.flatten(end_dim=-2) for y in Y]), theirs["H list"], name="H list")
    assert_close(GGNLinearOperator(model, mse, params, data) @ V, theirs["G"], name="G")
    assert_close(EFLinearOperator(model, ce, params, class_data) @ V, theirs["EF"], name="EF")
    assert_close(JacobianLinearOperator(model, params, data) @ V, theirs["J"], name="J")
    JT = TransposedJacobianLinearOperator(model, params, data)
    assert_close(JT @ W, theirs["JT"], name="JT")


def test_block_sizes_equal_3_0_1_and_the_blocks_of_the_hessian(theirs, problem):
    model, params, data, *_ = problem
    V = problem[4]
    H_blocks = HessianLinearOperator(model, torch.nn.MSELoss(), params, data, block_sizes=BLOCKS)
    assert_close(H_blocks @ V, theirs["H blocks"], name="block_sizes")
    full = HessianLinearOperator(model, torch.nn.MSELoss(), params, data).todense()
    cut = sum(p.numel() for p in params[: BLOCKS[0]])
    expected = full.clone()
    expected[:cut, cut:], expected[cut:, :cut] = 0.0, 0.0
    assert_close(H_blocks.todense(), expected, name="block-diagonal Hessian")


@pytest.mark.parametrize(
    ("block_sizes", "error", "match"),
    [
        ([3, 2], ValueError, r"block_sizes: expected positive numbers .* len\(params\) = 4"),
        ([0, 4], ValueError, "block_sizes: expected positive numbers"),
        ("2,2", TypeError, "block_sizes: expected a list of ints"),
    ],
)
def test_bad_block_sizes_are_refused(problem, block_sizes, error, match):
    model, params, data, *_ = problem
    with pytest.raises(error, match=match):
        HessianLinearOperator(model, torch.nn.MSELoss(), params, data, block_sizes=block_sizes)


def test_gradient_and_loss_method_equals_3_0_1(theirs, problem):
    model, params, data, class_data, *_ = problem
    H = HessianLinearOperator(model, torch.nn.MSELoss(), params, data)
    gradient, loss = H.gradient_and_loss()
    assert isinstance(gradient, list) and [g.shape for g in gradient] == [p.shape for p in params]
    assert_close(torch.cat([g.flatten() for g in gradient]), theirs["gradient"], name="gradient")
    assert_close(loss, theirs["loss"], name="loss")
    G = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), params, class_data)
    ref_gradient, ref_loss = functorch_gradient_and_loss(
        model, torch.nn.CrossEntropyLoss(), params, class_data
    )
    assert_close(G.gradient_and_loss(), (ref_gradient, ref_loss), name="GGN gradient_and_loss")
    J = JacobianLinearOperator(model, params, data)
    with pytest.raises(ValueError, match="gradient_and_loss: expected an operator with a loss"):
        J.gradient_and_loss()


def test_device_and_dtype_for_torch_code(problem):
    model, params, data, *_ = problem
    H = HessianLinearOperator(model, torch.nn.MSELoss(), params, data)
    assert H.device == params[0].device
    eye = torch.eye(H.shape[0], dtype=H.torch_dtype, device=H.device)  # 3.0.1: dtype=H.dtype
    assert eye.dtype == torch.float64 and H.dtype == np.float64
    assert (2.0 * H).torch_dtype == torch.float64
    with pytest.raises(TypeError):  # torch does not take numpy dtypes: use torch_dtype
        torch.eye(H.shape[0], dtype=H.dtype)


# --- scipy --------------------------------------------------------------------------------------
def test_to_scipy_into_eigsh_and_cg(theirs, problem):
    model, params, data, _, V, *_ = problem
    H = HessianLinearOperator(model, torch.nn.MSELoss(), params, data)
    top = eigsh(H.to_scipy(), k=3, which="LA", tol=1e-12, return_eigenvectors=False)
    assert top.dtype == np.float64
    assert_close(np.sort(top), np.sort(theirs["eigsh"]), rtol=1e-8, name="eigsh")
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, data)
    damped = G.to_scipy() + DAMPING * IdentityLinearOperator(
        [p.shape for p in params], "cpu", np.float64
    )
    b = V[:, 0].numpy()
    x, info = cg(damped, b, rtol=1e-6)
    assert info == 0 and x.dtype == np.float64
    dense = G.todense().double().numpy() + DAMPING * np.eye(G.shape[0])
    assert_close(x, np.linalg.solve(dense, b), rtol=1e-4, name="scipy cg on to_scipy()")


# --- inverses ----------------------------------------------------------------------------------
def test_inverses_with_3_0_1_keywords_equal_3_0_1(theirs, problem):
    model, params, data, _, V, *_ = problem
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, data)
    eye = IdentityLinearOperator([p.shape for p in params], G.device, G.torch_dtype)
    damped = G + DAMPING * eye
    CG = CGInverseLinearOperator(damped, tolerance=TIGHT, max_iter=500)
    assert_close(CG @ V, theirs["CG"], rtol=1e-7, name="CG")
    ours = CGInverseLinearOperator(G, damping=DAMPING, tol=TIGHT)
    assert_close(ours @ V, theirs["CG"], rtol=1e-7, name="CG with damping")
    LSMR = LSMRInverseLinearOperator(damped, atol=TIGHT, btol=TIGHT, maxiter=500)
    assert_close(LSMR @ V, theirs["LSMR"], rtol=1e-7, name="LSMR")
    assert LSMR.info.converged.all()
    # 3.0.1 summed num_terms + 1 terms
    scale = float(theirs["Neumann scale"])
    Neumann = NeumannInverseLinearOperator(damped, 21, scale)
    assert_close(Neumann @ V, theirs["Neumann"], name="Neumann")


def test_lsmr_against_dense_solutions_on_both_backends():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((12, 12)) + 4.0 * np.eye(12)  # not symmetric
    B = rng.standard_normal((12, 3))
    for damp in (0.0, 0.5):
        expected = np.linalg.solve(A.T @ A + damp**2 * np.eye(12), A.T @ B)
        expected_T = np.linalg.solve(A @ A.T + damp**2 * np.eye(12), A @ B)
        matrices = [torch.tensor(A)]
        jnp = pytest.importorskip("jax.numpy")
        matrices.append(jnp.asarray(A.astype(np.float32)))
        for matrix in matrices:
            double = str(matrix.dtype).endswith("float64")
            tol = 1e-12 if double else 1e-6
            inverse = LSMRInverseLinearOperator(matrix, damp=damp, atol=tol, btol=tol, maxiter=60)
            rtol = 1e-9 if double else 1e-4
            assert_close(inverse @ B, expected, rtol=rtol, name=f"LSMR damp={damp}")
            assert_close(inverse.T @ B, expected_T, rtol=rtol, name=f"LSMR adjoint damp={damp}")


def test_inverse_keywords_are_checked():
    A = np.diag([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"CGInverseLinearOperator\(x0=...\)"):
        CGInverseLinearOperator(A, x0=np.zeros(3))
    with pytest.raises(ValueError, match="tolerance: expected None when tol is given"):
        CGInverseLinearOperator(A, tol=1e-6, tolerance=1e-6)
    with pytest.raises(TypeError, match=r"LSMRInverseLinearOperator\(x0=...\)"):
        LSMRInverseLinearOperator(A, x0=np.zeros(3))
    with pytest.raises(ValueError, match="damp: expected a number >= 0.0"):
        LSMRInverseLinearOperator(A, damp=-1.0)
    with pytest.raises(TypeError, match="check_nan: expected True or False"):
        NeumannInverseLinearOperator(A, 10, 0.5, "yes")
    diverging = NeumannInverseLinearOperator(torch.tensor(A), 700, 1.5)  # check_nan=True
    with pytest.raises(curvlinops.ConvergenceError, match="NaN or inf"):
        diverging @ torch.ones(3, dtype=torch.float64)


def test_lsmr_reports_non_convergence():
    A = np.diag(np.logspace(0, 6, 20))
    inverse = LSMRInverseLinearOperator(A, maxiter=2, atol=1e-12, btol=1e-12)
    with pytest.warns(curvlinops.ConvergenceWarning, match="did not converge.*maxiter"):
        inverse @ np.ones(20)
    assert inverse.info.stop_reasons.tolist() == ["maxiter"]
    strict = LSMRInverseLinearOperator(A, maxiter=2, on_failure="raise")
    with pytest.raises(curvlinops.ConvergenceError):
        strict @ np.ones(20)


# --- spectra and estimators ----------------------------------------------------------------------
def test_spectrum_pieces_equal_3_0_1(theirs, problem):
    model, params, data, *_ = problem
    lanczos_iter = problem[6]
    grid, density = lanczos_approximate_spectrum_from_iter(lanczos_iter, (-1.2, 2.3), 64, 3.0, 0.05)
    assert_close(torch.stack([grid, density]), theirs["spectrum"], name="spectrum")
    log_result = lanczos_approximate_log_spectrum_from_iter(
        lanczos_iter, (0.1, 2.0), 64, 1.04, 0.05, 1e-5
    )
    assert_close(torch.stack(log_result), theirs["log spectrum"], name="log spectrum")
    H = HessianLinearOperator(model, torch.nn.MSELoss(), params, data)
    bounds = np.array(approximate_boundaries(H, tol=1e-10))
    assert_close(bounds, theirs["boundaries"], rtol=1e-8, name="boundaries")
    assert_close(bounds, torch.linalg.eigvalsh(H.todense())[[0, -1]], rtol=1e-8)


def test_spectrum_functions_with_3_0_1_signatures(problem):
    model, params, data, *_ = problem
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, data)
    grid, density = lanczos_approximate_spectrum(G, 10, 256, 2, 3.0, None, 0.05, 1e-2, seed=0)
    assert isinstance(grid, torch.Tensor) and grid.dtype == torch.float64 and grid.shape == (256,)
    # ncv = 10 gives wide bumps: some mass lies beyond the padded interval
    assert 0.8 < float(torch.trapezoid(density, grid)) < 1.0
    # a full run without reorthogonalisation: the extreme eigenvalues (and ghost copies)
    evals, _ = fast_lanczos(G, 23, seed=0)
    exact = torch.linalg.eigvalsh(G.todense())
    assert_close(evals[-1], exact[-1], rtol=1e-8, name="fast_lanczos")
    assert bool((evals >= exact[0] - 1e-8).all() and (evals <= exact[-1] + 1e-8).all())
    low, high = approximate_boundaries(G)
    assert grid[0] < low and grid[-1] > high
    grid, density = lanczos_approximate_log_spectrum(G, 10, num_points=128, seed=0)
    assert grid.shape == density.shape == (128,) and bool((grid > 0).all())
    cached = LanczosApproximateSpectrumCached(G, 10, seed=0)
    first = cached.approximate_spectrum(num_repeats=2, num_points=64)
    again = cached.approximate_spectrum(num_repeats=2, num_points=64, kappa=3.0)
    assert_close(first, again, name="cached quadratures")
    more = cached.approximate_spectrum(num_repeats=3, num_points=64)[1]
    assert float((more - first[1]).abs().max()) > 0  # a third run was added
    log_cached = LanczosApproximateLogSpectrumCached(G, 10, seed=0)
    assert log_cached.approximate_log_spectrum(num_points=32)[0].shape == (32,)
    with pytest.raises(ValueError, match="ncv: expected at most the operator's size n = 23"):
        lanczos_approximate_spectrum(G, 24)
    with pytest.raises(ValueError, match=r"kappa: expected a number > 1.0"):
        lanczos_approximate_spectrum(G, 5, kappa=1.0)


def test_spectrum_same_on_torch_and_jax_arrays():
    jnp = pytest.importorskip("jax.numpy")
    A = np.diag(np.linspace(-1.0, 3.0, 30))
    ours_torch = lanczos_approximate_spectrum(torch.tensor(A), 12, 128, 3, seed=1)
    ours_jax = lanczos_approximate_spectrum(jnp.asarray(A.astype(np.float32)), 12, 128, 3, seed=1)
    assert isinstance(ours_torch[0], torch.Tensor) and "jax" in type(ours_jax[0]).__module__
    assert_close(ours_jax, ours_torch, rtol=1e-3, name="torch vs jax")


def test_estimators_with_3_0_1_signatures(problem):
    model, params, data, *_ = problem
    G = GGNLinearOperator(model, torch.nn.MSELoss(), params, data)
    dense = G.todense()
    for estimate in (hutchinson_trace(G, 300), hutchpp_trace(G, 30), xtrace(G, 22)):
        assert isinstance(estimate, torch.Tensor) and estimate.ndim == 0
    assert hutchinson_diag(G, 10).shape == xdiag(G, 10).shape == (23,)
    assert hutchinson_squared_fro(G, 10, "normal").ndim == 0
    assert hutchinson_trace(dense, 10).ndim == 0  # a tensor as A, as 3.0.1 allows


# --- helper modules ----------------------------------------------------------------------------
def test_functorch_references_equal_3_0_1_and_the_operators(theirs, problem):
    model, params, data, class_data, *_ = problem
    mse, ce = torch.nn.MSELoss(), torch.nn.CrossEntropyLoss()
    H = functorch_hessian(model, mse, params, data)
    assert_close(H, theirs["functorch H"], name="functorch_hessian")
    assert_close(functorch_ggn(model, ce, params, class_data), theirs["functorch G"], name="ggn")
    ef_mse = functorch_empirical_fisher(model, mse, params, data)
    assert_close(ef_mse, theirs["functorch EF mse"], name="EF mse")
    ef_ce = functorch_empirical_fisher(model, ce, params, class_data)
    assert_close(ef_ce, theirs["functorch EF ce"], name="EF ce")
    assert_close(functorch_jacobian(model, params, data), theirs["functorch J"], name="jacobian")
    gradient, loss = functorch_gradient_and_loss(model, mse, params, data)
    assert_close(torch.cat([g.flatten() for g in gradient]), theirs["functorch gradient"])
    assert_close(loss, theirs["functorch loss"], name="loss")
    assert_close(HessianLinearOperator(model, mse, params, data).todense(), H, name="H dense")
    assert_close(EFLinearOperator(model, ce, params, class_data).todense(), ef_ce, name="EF")
    with pytest.raises(TypeError, match="loss_func: expected torch.nn.MSELoss"):
        functorch_empirical_fisher(model, torch.nn.L1Loss(), params, data)


def test_functorch_references_take_dict_inputs(problem):
    model, params, data, *_ = problem

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, X):
            return self.net(X["x"])

    wrapped = DictModel()
    dict_data = [({"x": X}, y) for X, y in data]
    H = functorch_hessian(wrapped, torch.nn.MSELoss(), params, dict_data, input_key="x")
    assert_close(H, functorch_hessian(model, torch.nn.MSELoss(), params, data), name="dict X")


def test_example_operators_equal_3_0_1(theirs, problem):
    *_, V, W, _ = problem
    assert_close(TensorLinearOperator(W[:5, :]) @ V[:3, :], theirs["tensor op"], name="tensor")
    c, A = torch.tensor([0.5, 2.0]), V[:, :2]
    outer = OuterProductLinearOperator(c, A)
    assert_close(outer @ V, theirs["outer op"], name="outer product")
    assert outer.is_symmetric and outer.device == A.device
    eye = IdentityLinearOperator([(2, 3), (4,)], torch.device("cpu"), torch.float32)
    assert eye.shape == (10, 10) and eye.torch_dtype == torch.float32
    assert torch.equal(eye @ torch.arange(10.0), torch.arange(10.0))
    with pytest.raises(ValueError, match="A: expected a 2-d array"):
        TensorLinearOperator(torch.ones(3))
    with pytest.raises(ValueError, match=r"c: expected shape \(2,\)"):
        OuterProductLinearOperator(torch.ones(3), A)


def test_allclose_report_prints_the_differences(capsys):
    assert allclose_report(torch.ones(3), np.ones(3))
    assert not allclose_report(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]))
    printed = capsys.readouterr().out
    assert "at index (1,): 2.00000e+00 vs 3.00000e+00" in printed
    assert "1 of 2 entries differ" in printed


# --- 3.0.1's own test suite ---------------------------------------------------------------------
# A small, representative part of it (base classes, lists through the Jacobian, an EF
# product check, KFAC closed forms and state dicts, the helper modules), run as 3.0.1 runs it: from
# a copy of its folder, with this package importable as curvlinops.
CFP_SUITE_SAMPLE = [
    "test/test__torch_base.py::test_input_formatting",
    "test/test__torch_base.py::test_output_formatting",
    "test/test__torch_base.py::test_preserve_input_format",
    "test/test__torch_base.py::test_ChainPyTorchLinearOperator[adjoint-matmat]",
    "test/test_utils.py",
    "test/test_jacobian.py::test_JacobianLinearOperator[case0--matmat]",
    "test/test_jacobian.py::test_TransposedJacobianLinearOperator[case0-adjoint-matvec]",
    "test/test_gradient_moments.py::test_EFLinearOperator[case0--matmat]",
    "test/test_kfac.py::test_trace[case0--all-joint_bias-check_deterministic]",
    "test/test_inverse.py::test_KFAC_inverse_from_state_dict[-separate_bias-all-cached--exact_damping]",
    "test/test_ekfac.py::test_save_and_load_state_dict",
    "test/test_ekfac.py::test_compute_eigenvalue_correction_linear_weight_sharing",
    "test/experimental/test_activation_hessian.py::test_store_activation[dev=cpu]",
    "test/experimental/test_activation_hessian.py::test_ActivationHessianLinearOperator[dev=cpu]",
]
# 3.0.1's dtype is a torch.dtype; its two test helpers hand op.dtype to torch.eye / torch.rand.
# Given .torch_dtype (this package's name for it) they run as written; nothing else is changed.
DTYPE_HELPER_EDITS = [
    (
        "    return eye(dim, dtype=A.dtype, device=A.device)",
        '    return eye(dim, dtype=getattr(A, "torch_dtype", A.dtype), device=A.device)',
    ),
    (  # an operator's numpy dtype -> the torch.dtype of that name (torch dtypes stay)
        "    num_vecs = 1 if is_vec else num_vecs\n\n    M_tensor_list",
        "    num_vecs = 1 if is_vec else num_vecs\n"
        '    dtype = getattr(__import__("torch"), str(dtype), dtype)\n\n    M_tensor_list',
    ),
]


def _cfp_suite() -> Path | None:
    """3.0.1's test suite: ``$CFP301_TESTS``, or ``../shared/compat/cfp301-tests``."""
    root = Path(__file__).resolve().parents[1]
    default = root.parent / "shared" / "compat" / "cfp301-tests"
    folder = Path(os.environ.get("CFP301_TESTS", default))
    return folder if (folder / "test" / "conftest.py").is_file() else None


def test_part_of_3_0_1s_own_test_suite_passes(tmp_path):
    pytest.importorskip("einops")  # 3.0.1's tests import it
    suite = _cfp_suite()
    if suite is None:
        pytest.skip(
            "curvlinops-for-pytorch 3.0.1's test suite (../shared/compat/cfp301-tests) is absent"
        )
    copy = tmp_path / "cfp301"
    shutil.copytree(suite, copy, ignore=shutil.ignore_patterns("__pycache__"))
    helpers = copy / "test" / "utils.py"
    helpers.chmod(0o644)
    text = helpers.read_text()
    for before, after in DTYPE_HELPER_EDITS:
        assert text.count(before) == 1, before
        text = text.replace(before, after)
    helpers.write_text(text)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CFP_SUITE_SAMPLE]
    result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
