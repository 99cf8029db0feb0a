"""The influence job (``curvlinops influence``) on a reduced size, against dense references.

One run of :func:`run_influence_study` on every installed backend, on 150
training digits with a 64-4-10 MLP (module fixture), gives the report; the
self-influence of the batched CG solves is checked against the dense Hessian
and GGN of the same objective, built here by autodiff in float64:

    J(w) = 1/N Σ_i CE(f(w, x_i), y_i) + λ/2 ||w||²,   s_i = g_iᵀ (H + λI)⁻¹ g_i.
"""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
from helpers import assert_one_line_error, run_main

from curvlinops.backends._namespaces import cpu_threads
from curvlinops.jobs import influence as study

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
INSTALLED = [name for name, ok in (("torch", HAS_TORCH), ("jax", HAS_JAX)) if ok]

pytestmark = pytest.mark.skipif(
    not (INSTALLED and HAS_SKLEARN), reason="needs PyTorch or JAX, and scikit-learn"
)

# small enough for seconds; tight CG so that scores can be compared with dense solves
SMALL = study.StudyConfig(
    n_train=100,
    n_test=40,
    hidden=4,
    l2=0.05,  # better conditioned than the job's 0.01: fewer CG steps
    cg_tol=1e-10,
    block_size=60,
    columns_per_pass=60,
    loo_points=6,
    loo_points_mlp=2,
    grid_test_images=2,
    grid_neighbours=3,
)
N_FLIPPED = 10
CG_METHODS = ("exact", "ggn")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("influence")
    stream = io.StringIO()
    report = study.run_influence_study(
        INSTALLED,
        out_dir=folder / "plots",
        json_path=folder / "report.json",
        seed=3,
        quiet=True,
        stream=stream,
        config=SMALL,
    )
    return report, json.loads((folder / "report.json").read_text()), stream.getvalue()


@pytest.fixture(scope="module")
def report(run):
    return run[1]


@pytest.fixture(scope="module")
def problem():
    return study.make_problem(3, SMALL)


# --- dense reference (PyTorch autodiff, float64) --------------------------------------------
def _dense_self_influence(w, widths, problem, method):
    import torch
    from torch.func import grad, hessian, jacrev, vmap

    X = torch.tensor(problem.X_train)
    y = torch.tensor(problem.y_train)
    shapes = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        shapes += [(fan_out, fan_in), (fan_out,)]
    sizes = [int(np.prod(s)) for s in shapes]

    def logits(v, inputs):
        pieces = [p.reshape(s) for p, s in zip(torch.split(v, sizes), shapes)]
        h = inputs
        for i in range(0, len(pieces), 2):
            h = (torch.tanh(h) if i else h) @ pieces[i].T + pieces[i + 1]
        return h

    def mean_loss(v):
        return torch.nn.functional.cross_entropy(logits(v, X), y)

    v = torch.tensor(w)
    if method == "exact":
        H = hessian(mean_loss)(v)
    else:  # GGN: 1/N Σ J_nᵀ (diag p - p pᵀ) J_n
        J = jacrev(lambda u: logits(u, X))(v)
        p = torch.softmax(logits(v, X), dim=1)
        Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        H = torch.einsum("nap,nab,nbq->pq", J, Lam, J) / len(y)

    def example_loss(u, x, t):
        return torch.nn.functional.cross_entropy(logits(u, x[None]), t[None])

    G = vmap(grad(example_loss), in_dims=(None, 0, 0))(v, X, y).T
    A = H + SMALL.l2 * torch.eye(len(v), dtype=torch.float64)
    return (G * torch.linalg.solve(A, G)).sum(0).numpy()


@pytest.mark.skipif(not HAS_TORCH, reason="the dense reference uses torch.func")
@pytest.mark.parametrize("backend", INSTALLED)
@pytest.mark.parametrize("model", study.MODELS)
def test_self_influence_matches_dense_reference(problem, backend, model):
    with cpu_threads(backend, 1):  # as the job runs side by side on two cores
        trained = study.train_model(model, backend, problem, SMALL)
        results = [study.method_report(trained, method, problem, SMALL) for method in CG_METHODS]
    assert trained.trained.converged, trained.trained.gradient_norm
    widths = study.architecture(model, SMALL)
    for method, (section, scores) in zip(CG_METHODS, results):
        assert section["cg"]["all_converged"]
        assert section["cg"]["columns"] == len(problem.y_train)
        assert section["cg"]["blocks"] == -(-len(problem.y_train) // SMALL.block_size)
        reference = _dense_self_influence(trained.trained.w, widths, problem, method)
        # CG to a relative residual of 1e-10; the condition number of H + λI is below 1e4
        np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=0)


@pytest.mark.skipif(not HAS_TORCH, reason="the dense reference uses torch.func")
@pytest.mark.parametrize("backend", INSTALLED)
def test_objective_hessian_products_follow_the_weights(problem, backend):
    """Newton's products (a kept graph in PyTorch) equal the dense Hessian at every ``w``.

    Also after ``w`` moves and after a point is removed (leave-one-out): a kept
    graph of an earlier ``w`` or of other weights must not be reused.
    """
    import torch
    from torch.func import hessian

    from curvlinops.backends import make_backend
    from curvlinops.backends._jobs_classifiers import tanh_classifier
    from curvlinops.jobs.influence.problem import initial_weights
    from curvlinops.jobs.influence.training import _Objective

    like = initial_weights("mlp", SMALL, 3)
    model_func, params = tanh_classifier(backend, like)
    backend_object = make_backend(model_func, params, backend)
    objective = _Objective(backend_object, problem.X_train, problem.y_train, 0.1)
    X, Y = torch.tensor(problem.X_train), torch.eye(10, dtype=torch.float64)[problem.y_train]
    sizes = [w.size for w in like]

    def dense(w, c):
        def value(v):
            h = X
            pieces = torch.split(v, sizes)
            for i in range(0, len(pieces), 2):
                W = pieces[i].reshape(like[i].shape)
                h = (torch.tanh(h) if i else h) @ W.T + pieces[i + 1]
            terms = torch.logsumexp(h, 1) - (Y * h).sum(1)
            return (torch.tensor(c) * terms).sum() / len(c) + 0.05 * (v * v).sum()

        return hessian(value)(torch.tensor(w)).numpy()

    rng = np.random.default_rng(0)
    w0 = np.concatenate([w.ravel() for w in like])
    v = rng.standard_normal(w0.size)
    c_all, c_loo = np.ones(len(problem.y_train)), np.ones(len(problem.y_train))
    c_loo[4] = 0.0
    w1 = w0 + 0.3 * rng.standard_normal(w0.size)
    for w, removed, c in [(w0, None, c_all), (w0, None, c_all), (w1, None, c_all), (w1, 4, c_loo)]:
        weights = objective.example_weights(removed)
        product = objective.hessian_product(w, v, weights)
        np.testing.assert_allclose(product, dense(w, c) @ v, rtol=1e-10, atol=1e-12)


def test_report_schema(report):
    assert report["schema"] == "curvlinops-influence/1"
    assert report["problem"]["n_train"] == 100
    assert report["problem"]["n_flipped"] == N_FLIPPED
    assert report["problem"]["inspected_at_10pct"] == 10
    assert report["random_recall_at_10pct"] == pytest.approx(0.1)
    for model in study.MODELS:
        for backend in INSTALLED:
            training = report["models"][model][backend]["training"]
            assert training["converged"] and training["gradient_norm"] <= SMALL.train_tol
            loo = report["loo"][model][backend]
            assert len(loo["predicted"]) == len(loo["actual"]) == len(loo["train_indices"])
            assert -1.0 <= loo["pearson_r"] <= 1.0 and loo["cg_converged"]
        for method in study.DEFAULT_PLAN[model]:
            for backend in INSTALLED:
                entry = report["methods"][f"{model}_{method}"][backend]
                curve = np.asarray(entry["recall_curve"])
                assert curve.shape == (study.CURVE_POINTS,)
                assert curve[0] == 0.0 and curve[-1] == 1.0 and np.all(np.diff(curve) >= 0)
                assert entry["recall_at_10pct"] == curve[10]
                assert entry["seconds"] >= 0.0 and len(entry["top_indices"]) == 10
                assert (entry["cg"] is None) == (method not in CG_METHODS)
    assert "mlp_exact" not in report["methods"]  # not in the default plan
    assert set(report["plots"]) == {"recall", "test_influence", "loo"}
    assert report["timings"]["wall_s"] > 0


def test_thread_plan_is_what_the_processes_ran_with(report):
    threads = report["threads"]
    assert set(threads["observed"]) == set(INSTALLED)
    for backend, seen in threads["observed"].items():
        if backend == "torch":
            assert seen["intra_op_threads"] == threads["threads_per_backend"]
        if threads["mode"] == "side by side":
            # the BLAS pools read their size from the environment set for the process
            assert all(n == threads["threads_per_backend"] for n in seen["blas"].values()), seen
            assert seen["malloc"]["MALLOC_MMAP_MAX_"] is not None
    pids = {seen["pid"] for seen in threads["observed"].values()}
    assert len(pids) == (len(INSTALLED) if threads["mode"] == "side by side" else 1)


def test_recall_is_that_of_the_reported_ranking(report, problem):
    for backend in INSTALLED:
        entry = report["methods"]["logreg_exact"][backend]
        found = problem.flipped[entry["top_indices"]].sum() / problem.flipped.sum()
        assert entry["recall_at_10pct"] == pytest.approx(found)


def test_flipped_labels_are_found(report):
    # 10 of 100 labels flipped: self-influence finds most of them in the top 10%
    for backend in INSTALLED:
        assert report["methods"]["logreg_exact"][backend]["recall_at_10pct"] >= 0.5


def test_leave_one_out_matches_influence_on_logistic_regression(report):
    for backend in INSTALLED:
        assert report["loo"]["logreg"][backend]["pearson_r"] >= 0.95


@pytest.mark.skipif(len(INSTALLED) < 2, reason="needs PyTorch and JAX")
def test_backends_agree(report):
    # same initial weights, both trained to |grad| <= 1e-7: the scores agree to ~1e-6
    for key, match in report["agreement"].items():
        assert match["spearman"] >= 0.999, key
        assert match["max_relative_difference"] <= 1e-4, key
    for model in study.MODELS:
        pearson = [report["loo"][model][b]["pearson_r"] for b in INSTALLED]
        assert abs(pearson[0] - pearson[1]) <= 1e-3


def test_pngs_are_written(run):
    report = run[0]
    for path in report["plots"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "recall@10%" in run[2] and "leave-one-out" in run[2]


def test_recall_curve():
    curve = study.recall_curve(np.array([0.3, 0.9, 0.1, 0.5]), np.array([0, 1, 0, 1], bool))
    assert curve.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert study.recall_at(curve, 0.5) == 1.0


def test_problem_flips_a_tenth_of_the_labels_reproducibly():
    a, b = study.make_problem(5, SMALL), study.make_problem(5, SMALL)
    assert np.array_equal(a.y_train, b.y_train) and np.array_equal(a.X_test, b.X_test)
    assert a.flipped.sum() == N_FLIPPED
    assert np.all((a.y_train != a.y_clean) == a.flipped)
    assert a.X_train.min() >= 0.0 and a.X_train.max() <= 1.0
    c = study.make_problem(6, SMALL)
    assert not np.array_equal(a.flipped, c.flipped)


# --- the command line ----------------------------------------------------------------------------
def test_bad_options_exit_2_with_one_line(tmp_path):
    out = ["--out", str(tmp_path)]
    assert_one_line_error(
        run_main("influence", "--method", "exact,hessian", *out),
        r"--method: expected a comma-separated list of exact, ggn, .*got 'exact,hessian'\. "
        r"For example",
    )
    # each job's messages name that job
    assert_one_line_error(
        run_main("influence", "--backend", "numpy", *out),
        r"--backend: expected 'torch', 'jax'.*'curvlinops influence --backend all'",
    )
    assert_one_line_error(
        run_main("influence", "--json", str(tmp_path), *out),
        rf"--json {tmp_path}: is a directory.*{tmp_path}/influence\.json",
    )
    assert_one_line_error(run_main("influence", "--seed", "-3", *out), r"--seed: expected")
    assert_one_line_error(run_main("influence", "--dtype", "float32"), r"unrecognized arguments")
    assert_one_line_error(
        run_main("influence", *out, prelude="import sys; sys.modules['sklearn'] = None; "),
        r"scikit-learn is not installed.*pip install 'curvlinops\[data\]'",
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line_error(run_main("influence", "--out", str(blocker)), r"is a file")


def test_method_option_parsing():
    from curvlinops import __main__ as cli

    assert cli._methods(None) is None
    assert cli._methods("all") == list(study.METHODS)
    assert cli._methods("kfac, loss,kfac") == ["kfac", "loss"]
    assert cli.INFLUENCE_METHODS == study.METHODS
