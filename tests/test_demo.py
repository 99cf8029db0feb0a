"""The demo (``curvlinops demo``) end to end, against dense references computed here.

One run of the console script with ``--backend all --quiet --json`` (module
fixture) gives the report; every curvature number in it is checked against
the dense Hessian / GGN of the same objective, built here by autodiff at the
trained weights the report records:

    J(W1, W2) = 1/(2N) Σ ||W2 W1 x - x||² + ½||Λ^½ W1||² + ½||W2 Λ^½||².
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_one_line_error, run_main

from curvlinops.jobs import demo
from curvlinops.jobs.demo import report as demo_report

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
INSTALLED = [name for name, ok in (("torch", HAS_TORCH), ("jax", HAS_JAX)) if ok]
P = 2 * demo.K * demo.D

pytestmark = pytest.mark.skipif(not INSTALLED, reason="needs PyTorch or JAX")


def _command() -> list[str]:
    """The console script next to this Python (as installed by pip), else ``-m``."""
    script = shutil.which("curvlinops", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "curvlinops"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One end-to-end run: ``curvlinops demo --backend all --quiet --json FILE --out DIR``."""
    folder = tmp_path_factory.mktemp("demo")
    json_path, out_dir = folder / "report.json", folder / "plots"
    result = subprocess.run(
        [*_command(), "demo", "--backend", "all", "--quiet", "--json", str(json_path)]
        + ["--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(json_path.read_text()), result.stdout, result.stderr


@pytest.fixture(scope="module")
def report(run):
    return run[0]


# --- dense references ------------------------------------------------------------------------
def _unflatten(w):
    return w[: demo.K * demo.D].reshape(demo.K, demo.D), w[demo.K * demo.D :].reshape(
        demo.D, demo.K
    )


def _objective(w, X, lam):
    W1, W2 = _unflatten(w)
    R = X @ W1.T @ W2.T - X
    return (
        (R * R).sum() / (2 * X.shape[0])
        + 0.5 * (lam[:, None] * W1 * W1).sum()
        + 0.5 * (W2 * W2 * lam).sum()
    )


def _data_term(w, X):
    W1, W2 = _unflatten(w)
    R = X @ W1.T @ W2.T - X
    return (R * R).sum() / (2 * X.shape[0])


def _outputs(w, X):
    W1, W2 = _unflatten(w)
    return (X @ W1.T @ W2.T).reshape(-1)


@functools.cache
def _problem(seed: int = 0):
    return demo.make_problem(seed)


def dense_reference(weights: dict) -> dict:
    """Dense Hessian, GGN and held-out gradient at ``weights``, float64, by autodiff."""
    problem = _problem()
    w = np.concatenate([np.asarray(weights["W1"]).ravel(), np.asarray(weights["W2"]).ravel()])
    if HAS_TORCH:
        from curvlinops.backends._namespaces import cpu_threads

        with cpu_threads("torch", 1):
            return _torch_reference(w, problem)
    import jax

    jax.config.update("jax_enable_x64", True)
    lam, X, X_test = problem.penalties, problem.X, problem.X_test
    H = np.asarray(jax.hessian(lambda v: _objective(v, X, lam))(w))
    jacobians = [
        np.asarray(jax.jacrev(lambda v, Xb=Xb: _outputs(v, Xb))(w))
        for Xb in np.split(X, len(X) // demo.BATCH_SIZE)
    ]
    g = np.asarray(jax.grad(lambda v: _data_term(v, X_test))(w))
    return _assemble(w, H, jacobians, g, problem)


def _torch_reference(w, problem) -> dict:
    import torch

    tw, lam = torch.from_numpy(w), torch.from_numpy(problem.penalties)
    X, X_test = torch.from_numpy(problem.X), torch.from_numpy(problem.X_test)
    H = torch.func.hessian(lambda v: _objective(v, X, lam))(tw).numpy()
    jacobians = [
        torch.func.jacrev(lambda v, Xb=Xb: _outputs(v, Xb))(tw).numpy()
        for Xb in X.split(demo.BATCH_SIZE)
    ]
    g = torch.func.grad(lambda v: _data_term(v, X_test))(tw).numpy()
    return _assemble(w, H, jacobians, g, problem)


def _assemble(w, H, jacobians, g, problem) -> dict:
    # data term: output Hessian I / N per point; the regulariser is exactly quadratic
    G = sum(J.T @ J for J in jacobians) / demo.N + np.diag(demo.regulariser_diagonal(problem))
    return {"w": w, "H": H, "G": G, "g": g}


@pytest.fixture(scope="module")
def references(report):
    """The dense references at each backend's trained weights."""
    return {
        name: dense_reference(section["weights"]) for name, section in report["backends"].items()
    }


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


backend_param = pytest.mark.parametrize("backend", INSTALLED)


# --- the JSON report -------------------------------------------------------------------------
def test_report_schema(report):
    assert report["schema"] == "curvlinops-demo/1"
    assert report["dtype"] == "float64"
    assert report["command"][1:3] == ["demo", "--backend"]
    assert set(report) >= {"problem", "versions", "backends", "comparison", "timings"}
    problem = report["problem"]
    assert (problem["D"], problem["K"], problem["N"], problem["seed"]) == (20, 5, 2000, 0)
    assert problem["penalties"] == list(demo.PENALTIES)
    assert all(lam < s2 for lam, s2 in zip(problem["penalties"], problem["variances"]))
    assert list(report["backends"]) == INSTALLED
    for name in INSTALLED:
        assert report["versions"][name] == importlib.metadata.version(name)
    for key in ("python", "curvlinops", "numpy", "scipy"):
        assert isinstance(report["versions"][key], str)
    timings = report["timings"]
    assert timings["wall_s"] > 0 and timings["cpu_user_s"] > 0
    for section in report["backends"].values():
        assert set(section) == {
            "dtype", "device", "training", "weights", "rayleigh_quotients", "eigenvalues",
            "spectral_density", "cg", "timings_s",
        }  # fmt: skip
        assert np.shape(section["weights"]["W1"]) == (5, 20)
        assert np.shape(section["weights"]["W2"]) == (20, 5)
        eig = section["eigenvalues"]
        for key in ("hessian_top", "ggn_top", "hessian_dense_top", "ggn_dense_top"):
            assert len(eig[key]) == eig["k"] == 5
            assert eig[key] == sorted(eig[key], reverse=True)
        assert set(section["timings_s"]) == {"setup", *demo.PHASES, "total"}
        assert isinstance(section["cg"]["iterations"], int)
        png = Path(section["spectral_density"]["png"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_is_printed(run):
    report, stdout, stderr = run
    assert stderr == ""  # --quiet: no progress bars, no notes
    lines = stdout.splitlines()
    header = lines[0].split()
    assert header[0] == "quantity" and header[1 : 1 + len(INSTALLED)] == INSTALLED
    for row in report["comparison"]["rows"]:
        assert any(line.startswith(row["quantity"]) for line in lines), row["quantity"]
    assert "spectral density plots:" in stdout and "JSON report:" in stdout


# --- the numbers, against dense references -------------------------------------------------
@backend_param
def test_training_reaches_the_closed_form(report, backend):
    problem = _problem()
    training = report["backends"][backend]["training"]
    assert training["converged"] and training["gradient_norm"] <= 1e-10
    W1_star, W2_star = demo.closed_form_optimum(problem)
    optimum = demo.objective(problem, W1_star, W2_star)
    assert math.isclose(report["problem"]["optimal_objective"], optimum, rel_tol=1e-12)
    assert math.isclose(training["final_objective"], optimum, rel_tol=1e-12)
    assert training["distance_to_closed_form"] < 1e-8
    assert max(training["angles_deg"]) < 1e-6 and max(training["decoder_angles_deg"]) < 1e-6
    # recompute the distance from the recorded weights and signs
    weights = report["backends"][backend]["weights"]
    signs = np.asarray(training["signs"])
    assert set(signs.tolist()) <= {-1.0, 1.0}
    distance = np.sqrt(
        np.sum((np.asarray(weights["W1"]) - signs[:, None] * W1_star) ** 2)
        + np.sum((np.asarray(weights["W2"]) - W2_star * signs) ** 2)
    )
    assert math.isclose(distance, training["distance_to_closed_form"], rel_tol=1e-6, abs_tol=1e-11)


@backend_param
def test_rayleigh_quotients_match_the_dense_hessian(report, references, backend):
    ref = references[backend]
    W1, W2 = _unflatten(ref["w"])
    generator = np.zeros((demo.K, demo.K))
    generator[0, 1], generator[1, 0] = -1.0, 1.0  # d/dθ of the Givens rotation at θ = 0
    tangents = {
        "scaling": ref["w"],
        "rotation": np.concatenate([(generator @ W1).ravel(), (W2 @ generator.T).ravel()]),
    }
    quotients = report["backends"][backend]["rayleigh_quotients"]
    for name, v in tangents.items():
        expected = v @ ref["H"] @ v / (v @ v)
        assert relative_error(quotients[name], expected) < 1e-6, name
    assert math.isclose(
        quotients["ratio"], quotients["scaling"] / quotients["rotation"], rel_tol=1e-12
    )
    assert quotients["ratio"] > 100  # the lecture: rotations are a flat direction


@backend_param
def test_eigenvalues_match_the_dense_matrices(report, references, backend):
    ref = references[backend]
    eig = report["backends"][backend]["eigenvalues"]
    hessian = np.linalg.eigvalsh(ref["H"])[::-1]
    ggn = np.linalg.eigvalsh(ref["G"])[::-1]
    assert np.max(np.abs(np.asarray(eig["hessian_top"]) - hessian[:5])) < 1e-6
    assert np.max(np.abs(np.asarray(eig["ggn_top"]) - ggn[:5])) < 1e-6
    assert np.max(np.abs(np.asarray(eig["hessian_dense_top"]) - hessian[:5])) < 1e-6
    assert abs(eig["hessian_min_dense"] - hessian[-1]) < 1e-6
    assert hessian[-1] > 0  # a strict minimum: the symmetry is broken by the regulariser
    assert math.isclose(eig["lambda_max"], hessian[0], rel_tol=1e-6)
    assert math.isclose(eig["max_stable_learning_rate"], 2 / hessian[0], rel_tol=1e-6)
    assert eig["eigsh_max_abs_error"] < 1e-6
    # the training step size was inside the stability region of momentum GD
    assert demo.LEARNING_RATE < 2 * (1 + demo.MOMENTUM) / hessian[0]


@backend_param
def test_spectral_density_matches_the_exact_eigenvalues(report, references, backend):
    ref = references[backend]
    density = report["backends"][backend]["spectral_density"]
    exact = np.linalg.eigvalsh(ref["H"])
    assert math.isclose(density["mean_eigenvalue_exact"], exact.mean(), rel_tol=1e-8)
    # SLQ with 16 probes: the mean (trace / P) to a few percent, the density close in L1
    assert math.isclose(density["mean_eigenvalue_slq"], exact.mean(), rel_tol=0.05)
    assert 0 <= density["l1_distance_to_exact"] < 0.25
    assert density["num_probes"] == demo.SLQ_PROBES and density["num_steps"] == demo.SLQ_STEPS


@backend_param
def test_cg_solve_matches_a_dense_solve(report, references, backend):
    ref = references[backend]
    cg = report["backends"][backend]["cg"]
    assert cg["converged"] and 1 <= cg["iterations"] <= 10 * P
    assert cg["true_relative_residual"] <= 10 * cg["tol"]
    assert math.isclose(cg["rhs_norm"], np.linalg.norm(ref["g"]), rel_tol=1e-8)
    x = np.linalg.solve(ref["H"] + cg["damping"] * np.eye(P), ref["g"])
    assert math.isclose(cg["rhs_dot_solution"], ref["g"] @ x, rel_tol=1e-6)
    assert math.isclose(cg["solution_norm"], np.linalg.norm(x), rel_tol=1e-6)


@pytest.mark.skipif(len(INSTALLED) < 2, reason="needs both PyTorch and JAX")
def test_backends_agree(report):
    """PyTorch and JAX agree to what two float64 pipelines can promise, not bit for bit.

    The two frameworks train on their own (their weights agree to the training
    tolerance, not to rounding) and reduce in different orders with different
    kernels, so a curvature number is compared on the scale of the operator
    (λ_max) to half the float64 digits, √eps · λ_max; ``gᵀx`` from CG is compared
    within the bound its residuals give, |gᵀ(x_a - x_b)| ≤ ‖x‖ (‖r_a‖ + ‖r_b‖); CG's
    iteration counts, which rounding may shift, within a few percent.
    """
    rows = {row["quantity"]: row for row in report["comparison"]["rows"]}
    curvature = {row.label for row in demo_report._rows() if row.curvature}
    assert len(curvature) >= 15 and curvature <= set(rows)
    sections = [report["backends"][name] for name in INSTALLED]
    eps = np.finfo(np.float64).eps
    scale = max(s["eigenvalues"]["lambda_max"] for s in sections)
    cg = [s["cg"] for s in sections]
    quotients = [s["rayleigh_quotients"] for s in sections]
    tolerances = {label: math.sqrt(eps) * scale for label in curvature} | {
        # a ratio's relative error is at most the sum of its parts' relative errors
        "ratio scaling / rotation": math.sqrt(eps)
        * scale
        * max(q["ratio"] * (1 / q["scaling"] + 1 / q["rotation"]) for q in quotients),
        "2 / lambda_max": math.sqrt(eps)
        * max(2 / s["eigenvalues"]["lambda_max"] for s in sections),
        "g^T (H + 1e-3 I)^-1 g": max(c["solution_norm"] for c in cg)
        * sum(c["true_relative_residual"] * c["rhs_norm"] for c in cg)
        + math.sqrt(eps) * max(abs(c["rhs_dot_solution"]) for c in cg),
        "objective at the optimum": math.sqrt(eps)
        * max(s["training"]["final_objective"] for s in sections),
    }
    for quantity, tolerance in tolerances.items():
        values = list(rows[quantity]["values"].values())
        assert rows[quantity]["max_abs_difference"] == pytest.approx(max(values) - min(values))
        assert abs(values[0] - values[1]) <= tolerance, (quantity, values, tolerance)
    relative = {
        q: rows[q]["max_abs_difference"] / max(abs(v) for v in rows[q]["values"].values())
        for q in curvature
    }
    worst = report["comparison"]["largest_relative_difference"]
    assert worst["quantity"] == max(relative, key=relative.get)
    assert worst["value"] == pytest.approx(max(relative.values()))
    # CG: both converged to the requested residual, iteration counts within a few percent
    assert all(c["converged"] and c["true_relative_residual"] <= 10 * c["tol"] for c in cg)
    iterations = [c["iterations"] for c in cg]
    assert max(iterations) - min(iterations) <= max(3, 0.05 * max(iterations)), iterations
    assert rows["time (s)"]["max_abs_difference"] is None


# --- pieces, in process ------------------------------------------------------------------------
def test_problem_is_reproducible_and_centred():
    a, b = demo.make_problem(3), demo.make_problem(3)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.W1_init, b.W1_init)
    assert not np.array_equal(a.X, demo.make_problem(4).X)
    assert np.abs(a.X.mean(axis=0)).max() < 1e-12
    assert np.all(np.diff(a.variances) < 0) and np.all(a.penalties < a.variances)


def test_closed_form_is_a_stationary_point():
    """The gradient of J vanishes at the closed form (so training can be checked against it)."""
    problem = _problem()
    W1, W2 = demo.closed_form_optimum(problem)
    C, lam = problem.X.T @ problem.X / demo.N, problem.penalties
    residual = (W2 @ W1 - np.eye(demo.D)) @ C
    assert np.abs(W2.T @ residual + lam[:, None] * W1).max() < 1e-12
    assert np.abs(residual @ W1.T + W2 * lam).max() < 1e-12


def test_regulariser_diagonal_is_the_regulariser_hessian():
    problem = _problem()
    w = np.zeros(P)
    H_reg = np.zeros((P, P))
    for i in range(P):  # the regulariser is quadratic: H e_i = grad(e_i)
        e = w.copy()
        e[i] = 1.0
        W1, W2 = _unflatten(e)
        grad = np.concatenate(
            [(problem.penalties[:, None] * W1).ravel(), (W2 * problem.penalties).ravel()]
        )
        H_reg[:, i] = grad
    assert np.array_equal(np.diag(demo.regulariser_diagonal(problem)), H_reg)


def test_angles_and_sign_alignment():
    problem = _problem()
    W1, W2 = demo.closed_form_optimum(problem)
    flips = np.array([1.0, -1.0, 1.0, -1.0, -1.0])
    signs, distance, relative = demo.align_signs(flips[:, None] * W1, W2 * flips, W1, W2)
    assert np.array_equal(signs, flips) and distance < 1e-12 and relative < 1e-12
    assert np.abs(demo.angles_to_components(-W1, problem.components)).max() < 1e-6
    theta = 0.01
    tilted = W1.copy()
    tilted[0] = np.cos(theta) * W1[0] / np.linalg.norm(W1[0]) + np.sin(theta) * W1[
        1
    ] / np.linalg.norm(W1[1])
    assert math.isclose(
        demo.angles_to_components(tilted, problem.components)[0], np.degrees(theta), rel_tol=1e-9
    )


def test_single_backend_table_has_no_difference_column():
    fake = {
        "training": {"steps": 10, "gradient_norm": 1e-12, "distance_to_closed_form": 1e-11,
                     "angles_deg": [0.0], "final_objective": 1.0},
        "rayleigh_quotients": {"scaling": 2.0, "rotation": 0.001, "ratio": 2000.0},
        "eigenvalues": {"hessian_top": [5, 4, 3, 2, 1], "ggn_top": [5, 4, 3, 2, 1],
                        "eigsh_max_abs_error": 0.0, "hessian_min_dense": 0.1,
                        "max_stable_learning_rate": 0.4},
        "spectral_density": {"l1_distance_to_exact": 0.1},
        "cg": {"iterations": 3, "true_relative_residual": 1e-11, "rhs_dot_solution": 0.5},
        "timings_s": {"total": 1.0},
    }  # fmt: skip
    table = demo.comparison({"torch": fake})
    text = demo.format_table(table, ["torch"])
    assert "max |diff|" not in text and "largest relative difference" not in text
    assert all(row["max_abs_difference"] is None for row in table["rows"])
    assert "2000.00" in text


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_float32_run(tmp_path):
    """float32: the same study, to float32 accuracy, with the plot written."""
    section = demo.run_backend("torch", "float32", _problem(), out_dir=tmp_path)
    assert section["dtype"] == "float32" and section["training"]["converged"]
    ref = dense_reference(section["weights"])
    v = ref["w"]
    expected = v @ ref["H"] @ v / (v @ v)
    assert relative_error(section["rayleigh_quotients"]["scaling"], expected) < 1e-4
    assert section["rayleigh_quotients"]["ratio"] > 100
    top = np.linalg.eigvalsh(ref["H"])[::-1][:5]
    assert np.max(np.abs(np.asarray(section["eigenvalues"]["hessian_top"]) - top)) < 1e-4
    assert section["cg"]["converged"]
    assert (tmp_path / "hessian_spectrum_torch.png").exists()


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_training_progress_bar():
    import io

    from curvlinops.backends._namespaces import cpu_threads

    fw, streams = demo.Framework("torch", "float64"), [io.StringIO(), io.StringIO()]
    with cpu_threads("torch", 1):
        result = demo.train(fw, _problem(), demo.Progress(True, streams[0]))
        demo.train(fw, _problem(), demo.Progress(False, streams[1]))
    text = streams[0].getvalue()
    assert "torch: training" in text and "step/s" in text and "|grad|" in text
    assert result.converged and result.steps % demo.CHECK_EVERY == 0
    assert streams[1].getvalue() == ""


# --- the command line ----------------------------------------------------------------------------
def test_importing_the_command_line_loads_no_framework():
    code = (
        "import sys, curvlinops.demo, curvlinops.__main__; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_script_is_declared():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="curvlinops")
    assert entry.value == "curvlinops.__main__:main"


def test_unknown_backend():
    assert_one_line_error(
        run_main("demo", "--backend", "tensorflow"),
        r"--backend: expected 'torch', 'jax' or 'all', got 'tensorflow'",
    )


@pytest.mark.parametrize("name, extra", [("jax", "JAX"), ("torch", "PyTorch")])
def test_backend_not_installed(name, extra):
    result = run_main(
        "demo", "--backend", name, prelude=f"import sys; sys.modules[{name!r}] = None; "
    )
    assert_one_line_error(
        result,
        rf"--backend {name}: {extra} is not installed\. .*pip install 'curvlinops\[{name}\]'",
    )


def test_no_backend_installed():
    prelude = "import sys; sys.modules['torch'] = None; sys.modules['jax'] = None; "
    assert_one_line_error(
        run_main("demo", prelude=prelude),
        r"neither PyTorch nor JAX is installed.*curvlinops\[torch\]",
    )


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(
        run_main("demo", "--out", str(blocker / "plots")), r"--out .*plots: cannot write there"
    )
    assert_one_line_error(run_main("demo", "--out", str(blocker)), r"is a file, not a directory")
    assert_one_line_error(
        run_main("demo", "--json", str(blocker / "report.json"), "--out", str(tmp_path)),
        r"--json: the directory .*a-file: is a file, not a directory",
    )
    assert_one_line_error(run_main("demo", "--json", str(tmp_path)), r"--json .*: is a directory")


def test_other_bad_options(tmp_path):
    out = ["--out", str(tmp_path)]
    assert_one_line_error(run_main("demo", "--dtype", "float16", *out), r"--dtype: expected")
    assert_one_line_error(
        run_main("demo", "--seed", "-1", *out), r"--seed: expected a non-negative"
    )
    assert_one_line_error(run_main("demo", "--seed", "x", *out), r"--seed: expected a non-negative")
    assert_one_line_error(run_main("demo", "--frobnicate"), r"unrecognized arguments")
    assert_one_line_error(run_main(), r"choose a command: 'demo'")


def test_all_runs_what_is_installed(monkeypatch):
    from curvlinops import __main__ as cli

    monkeypatch.setattr(cli, "is_installed", lambda name: name == "torch")
    assert cli._backends("all", "demo") == ["torch"]
    monkeypatch.setattr(cli, "is_installed", lambda name: True)
    assert cli._backends("all", "demo") == ["torch", "jax"]
    assert cli._backends("jax", "demo") == ["jax"]
