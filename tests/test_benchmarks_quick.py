"""The benchmark suite: ``python -m benchmarks --quick`` runs every operation, contenders agree.

No timing is asserted: the suite measures speed, the tests check that it runs
and that its numbers are consistent (the same weights give the same products
in PyTorch and JAX, and the hand-written code agrees with this library).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the benchmarks package lives at the repository root
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
OPS = ("grad", "hvp", "ggnvp", "jvp", "vjp", "matmat16", "eigsh5", "trace100", "cg")
KFAC_OPS = ("kfac_ef", "kfac_type2", "kfac_mv")
"""The KFAC operations of ``--quick``: this library's in both frameworks and cfp's."""
PROBLEMS = ("mlp", "cnn", "transformer")


def _required_contenders():
    keys = []
    if HAS_TORCH:
        keys += ["ours-torch", "raw-torch"]
    if HAS_JAX:
        keys += ["ours-jax", "raw-jax"]
    return keys


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    data = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    )
    return proc, data, out


@pytest.mark.skipif(not (HAS_TORCH or HAS_JAX), reason="needs torch or jax")
def test_quick_run_succeeds_and_writes_reports(quick_run):
    proc, data, out = quick_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert data is not None
    assert (out / "results.md").read_text().count("### Targets") == 1
    assert (out / "results.png").stat().st_size > 0
    meta = data["meta"]
    for field in ("date", "machine", "versions", "threads", "threads_set", "args"):
        assert field in meta
    assert meta["threads_set"]["threads"] == 1
    assert meta["args"]["quick"] is True
    assert "### KFAC, JAX: XLA compilations (ours)" in (out / "results.md").read_text()


@pytest.mark.skipif(not (HAS_TORCH or HAS_JAX), reason="needs torch or jax")
def test_quick_run_ran_every_operation(quick_run):
    _, data, _ = quick_run
    status = {(r["problem"], r["op"], r["contender"]): r for r in data["results"]}
    for problem in PROBLEMS:
        for op in OPS:
            for key in _required_contenders():
                rec = status.get((problem, op, key))
                assert rec is not None, f"{problem}/{op}/{key} did not run"
                if op == "grad" and key.startswith("ours") and rec["status"] == "unsupported":
                    continue  # the library's gradient function is optional here
                assert rec["status"] == "ok", f"{problem}/{op}/{key}: {rec.get('error')}"
                assert rec["median"] > 0 and rec["repeats"] == 1
                assert rec["peak_mib"] is not None
    # KFAC: this library in each installed framework; the hand-written code has none
    ours = [k for k in _required_contenders() if k.startswith("ours")]
    for problem in PROBLEMS:
        for op in KFAC_OPS:
            for key in ours:
                rec = status.get((problem, op, key))
                assert rec is not None, f"{problem}/{op}/{key} did not run"
                assert rec["status"] == "ok", f"{problem}/{op}/{key}: {rec.get('error')}"
                assert rec["median"] > 0 and rec["peak_mib"] is not None
                if key == "ours-jax":
                    assert rec["compiles_first"] >= 0
            for key in _required_contenders():
                if key.startswith("raw"):
                    assert status[(problem, op, key)]["status"] == "unsupported"
    # curvlinops-for-pytorch: absent (optional), or it ran what it supports
    if "cfp" not in data["meta"]["absent"]:
        for problem in PROBLEMS:
            for op in OPS + KFAC_OPS:
                rec = status[(problem, op, "cfp")]
                assert rec["status"] in ("ok", "unsupported"), rec.get("error")


@pytest.mark.skipif(not (HAS_TORCH or HAS_JAX), reason="needs torch or jax")
def test_quick_run_algorithms_report_products(quick_run):
    _, data, _ = quick_run
    for rec in data["results"]:
        if rec["status"] != "ok":
            continue
        if rec["op"] == "eigsh5":
            assert rec["products"] >= 5
            assert rec["host_matvec"] > 0 and rec["end_to_end_over_products"] > 0
        if rec["op"] == "cg":
            assert rec["info"] == 0, f"CG did not converge: {rec}"
            assert rec["residual"] < 1e-4
        if rec["op"] == "trace100":
            assert rec["stderr"] > 0 and np.isfinite(rec["estimate"])


@pytest.mark.skipif(not (HAS_TORCH and HAS_JAX), reason="cross-backend check needs both")
def test_quick_run_numbers_agree_across_backends(quick_run):
    _, data, _ = quick_run
    rows = [r for r in data["agreement"] if not r["informational"]]
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    # every operation of every problem is compared between PyTorch and JAX contenders
    for problem in PROBLEMS:
        for op in OPS:
            pairs = {
                (r["reference"], r["contender"])
                for r in rows
                if r["problem"] == problem and r["op"] == op
            }
            assert ("raw-torch", "ours-jax") in pairs and ("raw-torch", "raw-jax") in pairs
            assert ("raw-torch", "ours-torch") in pairs


@pytest.mark.skipif(not (HAS_TORCH and HAS_JAX), reason="cross-backend check needs both")
def test_quick_run_kfac_agrees_across_backends_and_with_cfp(quick_run):
    """Type-2 and empirical factors and the KFAC product: the same in PyTorch, JAX and cfp."""
    _, data, _ = quick_run
    rows = [r for r in data["agreement"] if r["op"] in KFAC_OPS]
    bad = [r for r in rows if not r["ok"]]  # cfp included: its KFAC must agree too
    assert not bad, bad
    with_cfp = "cfp" not in data["meta"]["absent"]
    for problem in PROBLEMS:
        for op in KFAC_OPS:
            pairs = {
                (r["reference"], r["contender"])
                for r in rows
                if r["problem"] == problem and r["op"] == op
            }
            assert ("ours-torch", "ours-jax") in pairs, (problem, op, pairs)
            if with_cfp:
                assert ("ours-torch", "cfp") in pairs, (problem, op, pairs)


@pytest.mark.skipif(not (HAS_TORCH and HAS_JAX), reason="needs torch and jax")
@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("name", PROBLEMS)
def test_problems_have_the_same_model_in_torch_and_jax(name, quick):
    """Same weights, same data, same outputs (float64), at both sizes."""
    import jax
    import jax.numpy as jnp

    from benchmarks.problems import make_problem

    problem = make_problem(name, dtype="float64", quick=quick)
    torch_problem, jax_problem = problem.torch(), problem.jax()
    X_t, y_t = torch_problem.data[0]
    X_j, y_j = jax_problem.data[0]
    out_t = torch_problem.model_func(X_t).detach().numpy()
    # one compiled program: op by op, JAX compiles each of the transformer's ~100 operations
    out_j = np.asarray(jax.jit(jax_problem.model_func)(jax_problem.params, X_j))
    assert out_t.shape == out_j.shape == (len(problem.y), problem.num_classes)
    np.testing.assert_allclose(out_t, out_j, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(y_t.numpy(), np.asarray(y_j))
    flat_t = np.concatenate([p.detach().numpy().ravel() for p in torch_problem.params])
    flat_j = np.concatenate([np.asarray(jnp.ravel(p)) for p in jax_problem.params])
    np.testing.assert_array_equal(flat_t, flat_j)
    assert flat_t.size == problem.num_params


def test_make_problem_rejects_unknown_names():
    from benchmarks.problems import make_problem

    with pytest.raises(ValueError, match="problem: expected one of"):
        make_problem("resnet")
    with pytest.raises(ValueError, match="dtype: expected"):
        make_problem("mlp", dtype="float16")


def _record(problem, op, key, median, **extra):
    return {"problem": problem, "op": op, "contender": key, "status": "ok", "median": median,
            **extra}  # fmt: skip


def test_report_judges_targets():
    from benchmarks.report import Results, markdown, target_rows

    results = [
        _record("mlp", "grad", "raw-torch", 1.0),
        _record("mlp", "grad", "raw-jax", 1.0),
        _record("mlp", "hvp", "ours-torch", 2.0),  # 2.0 <= 2.3: met
        _record("mlp", "hvp", "raw-torch", 1.9),  # overhead 5%: met
        _record("mlp", "hvp", "cfp", 3.0),  # 1.5x faster than cfp: met
        _record("mlp", "hvp", "ours-jax", 2.0),  # 2.0 > 1.7: missed by 18%
        _record("mlp", "hvp", "raw-jax", 1.0),  # overhead 100%: missed
        _record("mlp", "matmat16", "ours-torch", 32.0),  # = 16 matvecs: 1.0 > 0.7
        _record(
            "mlp",
            "eigsh5",
            "ours-torch",
            10.0,
            products=4,
            host_matvec=2.0,
            end_to_end_over_products=1.25,
        ),  # fmt: skip
    ]
    data = _report_data(results, {"description": "MLP", "num_params": 10})
    rows = {r["target"]: r for r in target_rows(Results(data))}
    assert rows["H@v ≤ 2.3× gradient (PyTorch)"]["met"]
    jax_hvp = rows["H@v ≤ 1.7× gradient (JAX)"]
    assert not jax_hvp["met"] and jax_hvp["margin"] == pytest.approx(2.0 / 1.7 - 1)
    cfp = rows["H@v ≥ 1.25× faster than cfp"]
    assert cfp["met"] and cfp["measured"] == pytest.approx(1.5)
    assert rows["H@v ≤ 1.10× hand-written (PyTorch)"]["met"]
    assert not rows["H@v ≤ 1.10× hand-written (JAX)"]["met"]
    assert rows["H@V K=16 ≤ 0.7× 16 matvecs (PyTorch)"]["measured"] == pytest.approx(1.0)
    eigsh = rows["eigsh end-to-end ≤ 1.2× products × H@v (PyTorch)"]
    assert not eigsh["met"] and eigsh["measured"] == pytest.approx(1.25)
    text = markdown(data)
    assert "**missed** by 18%" in text and "| H@v | 2.00 s (2.00×)" in text


def _report_data(results: list, mlp: dict) -> dict:
    """A results file of a quick run on one problem, ``mlp``, holding ``results``."""
    return {
        "meta": {"date": "d", "args": {"dtype": "float32", "device": "cpu", "repeats": 1,
                                       "algo_repeats": 1, "quick": True},
                 "machine": {"cpu_model": "cpu", "cpu_affinity": 2, "cpu_count": 2,
                             "memory_gib": 1, "platform": "p"},
                 "versions": {}, "threads": {}, "absent": {}},
        "problems": {"mlp": mlp},
        "results": results,
        "agreement": [],
    }  # fmt: skip


def test_report_judges_kfac_targets():
    from benchmarks.report import Results, markdown, target_rows

    results = [
        _record("mlp", "grad", "raw-torch", 1.0),
        _record("mlp", "grad", "raw-jax", 1.0),
        _record("mlp", "ggnvp", "ours-torch", 2.0),
        _record("mlp", "kfac_mv", "ours-torch", 0.4),  # 0.2x G@v: met
        _record("mlp", "kfac_ef", "ours-torch", 3.0),  # 3x gradient: missed; 2x cfp: missed
        _record("mlp", "kfac_ef", "cfp", 1.5),
        _record(
            "mlp",
            "kfac_ef",
            "ours-jax",
            1.0,
            compiles_first=1,
            compiles_timed=0,
            compiles_fresh_operator=2,
        ),  # fmt: skip
    ]
    data = _report_data(
        results, {"description": "MLP", "num_params": 10, "kfac_num_params": 10, "kfac_note": ""}
    )
    rows = {r["target"]: r for r in target_rows(Results(data))}
    product = rows["KFAC@v ≤ 0.25× G@v (PyTorch)"]
    assert product["met"] and product["measured"] == pytest.approx(0.2)
    assert not rows["KFAC factors, empirical ≤ 2.5× gradient (PyTorch)"]["met"]
    versus = rows["KFAC factors, empirical ≤ 1.5× cfp (PyTorch)"]
    assert not versus["met"] and versus["measured"] == pytest.approx(2.0)
    assert rows["KFAC factors, empirical ≤ 1.5× cfp (JAX)"]["met"]
    fresh = "KFAC factors, empirical: compilations of a new operator of equal configuration = 0"
    assert not rows[f"{fresh} (JAX)"]["met"]
    assert rows["KFAC factors, empirical: compilations in the timed calls = 0 (JAX)"]["met"]
    text = markdown(data)
    assert f"| {fresh} (JAX) | mlp | 2 | **missed** |" in text
    assert "### KFAC, JAX: XLA compilations (ours)" in text
