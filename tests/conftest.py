"""Shared fixtures: every backend that is installed, float64 enabled in JAX."""

import importlib.util
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, set before any framework starts
    # (oversubscribed threads made products 16x slower on this kind of machine).
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None


def _jax_has_only_its_cpu() -> bool:
    """Whether JAX can run on nothing but the CPU (no accelerator plugin installed)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {p.strip() for p in platforms.split(",")} == {"cpu"}
    import pkgutil

    plugins = ("jax_plugins", "jax_cuda", "jax_rocm", "libtpu")
    return not any(module.name.startswith(plugins) for module in pkgutil.iter_modules())


if HAS_JAX and "XLA_FLAGS" not in os.environ and _jax_has_only_its_cpu():
    # The tests' programs are tiny: compiling them is most of a JAX test's time, and XLA's
    # optimisations buy nothing there (half the time of the JAX tests). Set before JAX starts
    # its CPU client. `XLA_FLAGS= pytest` keeps XLA's defaults; accelerators keep theirs.
    from helpers import fast_compile_xla_flags

    os.environ["XLA_FLAGS"] = fast_compile_xla_flags()

if HAS_JAX:
    import jax

    # Dense references are float64; JAX needs this switch for it.
    jax.config.update("jax_enable_x64", True)

BACKENDS = [
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")),
    pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax not installed")),
]


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """Run the test once per installed backend."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """Skip tests marked gpu when no CUDA device is present, saying why."""
    has_gpu = False
    if HAS_TORCH:
        import torch

        has_gpu = torch.cuda.is_available()
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
