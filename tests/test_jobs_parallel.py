"""The jobs' thread plan: each backend's process gets its share of the cores."""

from __future__ import annotations

import importlib.util
import os

import pytest

from curvlinops.jobs import _parallel

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_one_backend_or_no_processes_get_all_cores(monkeypatch):
    monkeypatch.setattr(_parallel, "available_cores", lambda: 4)
    for plan in (
        _parallel.plan_threads(["torch"]),
        _parallel.plan_threads(["torch", "jax"], processes=False),
    ):
        assert not plan.side_by_side and plan.threads == 4 and plan.environment == {}
        assert plan.as_dict()["mode"] == "one after another"


@pytest.mark.parametrize(("cores", "threads"), [(2, 1), (4, 2), (5, 2)])
def test_side_by_side_shares_the_cores(monkeypatch, cores, threads):
    monkeypatch.setattr(_parallel, "available_cores", lambda: cores)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    plan = _parallel.plan_threads(["torch", "jax"])
    assert plan.side_by_side and plan.threads == threads
    for name in _parallel.BLAS_VARIABLES:
        assert plan.environment[name] == str(threads)
    # XLA has no thread count; at one thread each its Eigen pool is switched off
    assert ("--xla_cpu_multi_thread_eigen=false" in plan.environment.get("XLA_FLAGS", "")) == (
        threads == 1 and _parallel.xla_knows("xla_cpu_multi_thread_eigen")
    )
    assert f"{threads} thread(s) each" in plan.describe()


def test_side_by_side_processes_keep_freed_memory(monkeypatch):
    monkeypatch.setattr(_parallel, "available_cores", lambda: 2)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TOP_PAD_", "4096")  # the user's setting wins
    environment = _parallel.plan_threads(["torch", "jax"]).environment
    assert environment["MALLOC_MMAP_MAX_"] == "0" and "MALLOC_TOP_PAD_" not in environment


def test_user_xla_flags_are_kept(monkeypatch):
    monkeypatch.setattr(_parallel, "available_cores", lambda: 2)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    flags = _parallel.plan_threads(["torch", "jax"]).environment.get("XLA_FLAGS", "")
    assert flags.startswith("--xla_backend_optimization_level=0")


def test_no_side_by_side_without_a_core_each(monkeypatch):
    monkeypatch.setattr(_parallel, "available_cores", lambda: 1)
    plan = _parallel.plan_threads(["torch", "jax"])
    assert not plan.side_by_side and plan.threads == 1


def test_environment_is_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with _parallel._environment({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}):
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["OMP_NUM_THREADS"] == "7" and "MKL_NUM_THREADS" not in os.environ


@pytest.mark.skipif(not HAS_TORCH, reason="needs PyTorch")
def test_observed_threads_in_this_process():
    from curvlinops.backends._namespaces import cpu_threads

    with cpu_threads("torch", 1):
        seen = _parallel.observed_threads("torch")
    assert seen["intra_op_threads"] == 1 and seen["pid"] == os.getpid()
    assert seen["xla_flags"] is None


def test_importing_the_jobs_loads_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, curvlinops.jobs.demo, curvlinops.jobs.influence, curvlinops.jobs.spectrum, "
        "curvlinops.demo, curvlinops.influence_study; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_old_import_paths_are_the_jobs_modules():
    import curvlinops.demo
    import curvlinops.influence_study
    from curvlinops.jobs import demo, influence

    assert curvlinops.demo is demo and curvlinops.influence_study is influence
    assert callable(demo.run_demo) and callable(influence.run_influence_study)


def test_format_rows_aligns_columns():
    from curvlinops.jobs._report import format_rows

    text = format_rows(["name", "value"], [["a", "1.5"], ["bbb", "10.25"]], left=1)
    assert text.split("\n") == [
        "name  value",
        "----  -----",
        "a       1.5",
        "bbb   10.25",
    ]
