"""Shared fixtures: every backend that is installed, float64 enabled in JAX."""

import importlib.util

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None

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
