"""The spectrum job (``curvlinops spectrum``) on a reduced size.

One run of :func:`run_spectrum` on every installed backend (a 3-channel ResNet
with one block, 120 digits, checkpoints 0 and 8) gives the report (module
fixture). The network of each framework is checked against the other's
(logits, training steps), and the built-in validation against the dense
Hessian of the reduced network.
"""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from helpers import assert_one_line_error, run_main

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
INSTALLED = [name for name, ok in (("torch", HAS_TORCH), ("jax", HAS_JAX)) if ok]

pytestmark = pytest.mark.skipif(
    not (INSTALLED and HAS_SKLEARN), reason="needs PyTorch or JAX, and scikit-learn"
)

if INSTALLED and HAS_SKLEARN:
    from curvlinops.jobs import _parallel, spectrum
    from curvlinops.jobs.spectrum import problem, study

    SMALL = spectrum.SpectrumConfig(
        channels=3,
        blocks=1,
        n_train=120,
        n_test=40,
        batch_size=32,
        steps=(0, 4, 8),  # the second backend, the twin, measures 0 and 8 only
        slq_probes=2,
        slq_steps=16,
        top_k=2,
        validation_n=30,
    )
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spectrum")
    stream = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:  # one thread: the tests share the machine
        patch.setattr(_parallel, "available_cores", lambda: 1)
        report = spectrum.run_spectrum(
            INSTALLED,
            out_dir=folder / "plots",
            json_path=folder / "report.json",
            seed=1,
            quiet=True,
            stream=stream,
            config=SMALL,
            processes=False,  # two spawned interpreters cost more than this small run
        )
    return report, json.loads((folder / "report.json").read_text()), stream.getvalue()


def test_report_schema_and_measurements(run):
    report = run[1]
    assert report["schema"] == "curvlinops-spectrum/1"
    assert report["problem"]["n_train"] == 120 and report["problem"]["steps"] == [0, 4, 8]
    for name in INSTALLED:
        entries = report["backends"][name]["checkpoints"]
        twin = name != INSTALLED[0]
        assert [e["step"] for e in entries] == ([0, 8] if twin else [0, 4, 8])
        for e in entries:
            top = e["top_eigenvalues"]
            assert len(top) == 2 and top[0] >= top[1] > 0
            assert e["smallest_eigenvalue"] <= top[1]
            assert e["ratio_smallest_to_largest"] == pytest.approx(
                e["smallest_eigenvalue"] / top[0]
            )
            assert 0.0 <= e["negative_mass_clear"] <= e["negative_mass"] <= 1.0
            # each probe's quadrature weights sum to 1; the GGN's Ritz values are >= 0
            for kind in ("hessian", "ggn"):
                weights = np.asarray(e[kind]["weights"])
                np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
            ggn_nodes = np.asarray(e["ggn"]["nodes"])
            assert ggn_nodes.min() >= -1e3 * FLOAT32_EPS * ggn_nodes.max()
            # Lanczos's extreme Ritz values lie inside the spectrum that eigsh bounds
            nodes = np.asarray(e["hessian"]["nodes"])
            slack = 1e2 * FLOAT32_EPS * top[0]
            assert nodes.max() <= top[0] + slack and nodes.min() >= e["smallest_eigenvalue"] - slack
    finding = report["finding"]
    assert finding["steps"] == [0, 8]
    assert report["threads"]["mode"] == "one after another"


def test_validation_against_dense_hessian(run):
    for name in INSTALLED:
        v = run[1]["backends"][name]["validation"]
        assert v["eigsh_converged"]
        # eigsh's tolerance is 1e-4 on the residual; the eigenvalue error is about its square
        assert v["top_max_relative_error"] <= 1e-3
        # 2 probes x 16 Lanczos steps on ~60 parameters: a coarse but faithful density
        assert v["slq_l1_to_exact"] <= 0.5
        assert abs(v["negative_mass_slq"] - v["negative_mass_exact"]) <= 0.25


@pytest.mark.skipif(len(INSTALLED) < 2, reason="needs PyTorch and JAX")
def test_backends_agree_at_step_zero(run):
    checkpoints = run[1]["agreement"]["checkpoints"]
    assert [c["step"] for c in checkpoints] == [0, 8]  # those the twin measured
    first = checkpoints[0]
    # same float32 weights and statistics: eigsh to 1e-4 residual, eigenvalues closer
    assert first["top_max_relative_difference"] <= 1e-4
    assert first["density_l1"] <= 0.2


def test_pngs_and_table(run):
    report, _, text = run
    for path in report["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "neg. mass" in text and "validation" in text


def test_twin_steps_must_be_ends_or_all():
    with pytest.raises(ValueError, match=r"twin_steps: expected 'ends' or 'all', got 'some'"):
        spectrum.run_spectrum(["torch"], config=replace(SMALL, twin_steps="some"), quiet=True)


@pytest.mark.skipif(not (HAS_TORCH and HAS_JAX), reason="needs PyTorch and JAX")
def test_networks_agree_across_frameworks():
    from curvlinops.backends import _jobs_resnet as nets

    digits = problem.make_digits(2, SMALL)
    weights, stats = problem.initial_state(2, 3, 1)
    X = digits.X_train[:20]
    stats = nets.population_stats("torch", weights, stats, digits.X_train)
    stats_jax = nets.population_stats("jax", weights, stats, digits.X_train)
    for a, b in zip(stats, stats_jax):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    torch_net, jax_net = nets.resnet("torch", weights, stats), nets.resnet("jax", weights, stats)
    import torch

    logits_torch = torch_net.model_func(torch.from_numpy(X)).detach().numpy()
    logits_jax = np.asarray(jax_net.model_func(jax_net.params, jax_net.inputs(X)))
    np.testing.assert_allclose(logits_torch, logits_jax, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in torch_net.params) == problem.num_params(3, 1)
    # a few SGD steps with BN in training mode: the same weights and running statistics
    batches = problem.minibatches(2, len(digits.y_train), 16, 3)
    options = {"lr": 0.05, "momentum": 0.9}
    a = nets.train_resnet(
        "torch", weights, stats, digits.X_train, digits.y_train, batches, [3], **options
    )[3]
    b = nets.train_resnet(
        "jax", weights, stats, digits.X_train, digits.y_train, batches, [3], **options
    )[3]
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    assert not np.allclose(a[0][0], weights[0])  # it trained


def test_negative_mass_and_mixture():
    assert study.negative_mass(
        [[-2.0, 0.5, 3.0], [-1.0, 1.0, 2.0]], [[0.25, 0.5, 0.25]] * 2, 0.5
    ) == pytest.approx(0.25)
    grid = np.linspace(-10, 10, 4001)
    density = study.gaussian_mixture(grid, [[-1.0, 2.0]], [[0.3, 0.7]], 0.5)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(grid * density, grid) == pytest.approx(-0.3 + 1.4, abs=1e-6)


def test_minibatches_are_seeded_epochs():
    a, b = problem.minibatches(4, 10, 3, 7), problem.minibatches(4, 10, 3, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 7
    assert len(set(np.concatenate(a[:3]).tolist())) == 9  # no repeats within an epoch


# --- the command line ----------------------------------------------------------------------------
def test_bad_options_exit_2_with_one_line(tmp_path):
    out = ["--out", str(tmp_path)]
    assert_one_line_error(
        run_main("spectrum", "--steps", "0,ten", *out),
        r"--steps: expected a comma-separated list of SGD steps .*got '0,ten'\. For example",
    )
    assert_one_line_error(run_main("spectrum", "--steps", "-5", *out), r"--steps: expected")
    assert_one_line_error(
        run_main("spectrum", "--twin-steps", "both", *out),
        r"--twin-steps: invalid choice: 'both' \(choose from 'ends', 'all'\)",
    )
    assert_one_line_error(
        run_main("spectrum", "--backend", "numpy", *out),
        r"--backend: expected 'torch', 'jax'.*'curvlinops spectrum --backend all'",
    )
    assert_one_line_error(
        run_main("spectrum", "--json", str(tmp_path), *out),
        rf"--json {tmp_path}: is a directory.*{tmp_path}/spectrum\.json",
    )
    assert_one_line_error(
        run_main("spectrum", *out, prelude="import sys; sys.modules['sklearn'] = None; "),
        r"spectrum: scikit-learn is not installed.*pip install 'curvlinops\[data\]'",
    )
