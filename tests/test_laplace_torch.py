"""Downstream: laplace-torch gives the same Laplace approximations on this library as on 3.0.1.

laplace-torch 0.3's curvlinops backend (``laplace/curvature/curvlinops.py``)
imports ``FisherType``, ``KFACLinearOperator``, ``GGNLinearOperator``, ... from
``curvlinops`` at import time, builds ``KFACLinearOperator`` per batch, calls
``compute_kronecker_factors()`` and reads ``_mapping``, ``_input_covariances``
and ``_gradient_covariances``; its ``"full"`` structure multiplies
``GGNLinearOperator``/``EFLinearOperator`` with ``torch.eye``. This library and
curvlinops-for-pytorch 3.0.1 are both imported as ``curvlinops``, so one
subprocess runs laplace-torch on each (the reference from its own folder first on
``sys.path``), and the test compares the Kronecker factors, the posterior
precision's Hessian part ``H``, the loss and the log marginal likelihood.

laplace-torch and backpack-for-pytorch are installed with ``--no-deps`` (their
torchvision requirement is not needed and does not import next to the CPU torch);
``bash scripts/setup.sh`` installs them, their runtime dependencies and 3.0.1.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_close, run_processes

ROOT = Path(__file__).resolve().parents[1]

LAPLACE_SCRIPT = """
import sys

sys.path.insert(0, sys.argv[2])  # the curvlinops to use, ahead of any installed one
import warnings
from collections import UserDict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvlinops
from laplace import Laplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

assert Path(curvlinops.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve()), (
    curvlinops.__file__
)
assert "torchvision" not in sys.modules
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # tiny matrices: a second thread only waits (for long, on a busy machine)


class MappingInput(nn.Module):  # a classifier of mappings, as in laplace-torch's HF path
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, batch):
        return self.net(batch["input_ids"])


def userdict_batches(items):
    # the mapping type of Hugging Face's BatchEncoding (a UserDict), not a dict
    return UserDict({key: torch.stack([item[key] for item in items]) for key in items[0]})


def problem(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":  # a classifier, as in laplace-torch's examples
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        X, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3))
        X, y = torch.randn(12, 2, 5, 5, generator=g), torch.randint(0, 3, (12,), generator=g)
    elif kind == "reg":  # with a layer without bias (laplace-torch's weight-only branch)
        model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2))
        X, y = torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g)
    else:  # batches are mappings {"input_ids": X, "labels": y}: laplace-torch passes batch_size_fn
        X, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
        items = [{"input_ids": X[n], "labels": y[n]} for n in range(len(y))]
        collate = userdict_batches if kind == "userdict" else None
        return MappingInput(), DataLoader(items, batch_size=8, collate_fn=collate)
    # batches of unequal size: laplace-torch rescales each batch's factors by M / N
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


cases = [
    ("mlp", "classification", "kron", CurvlinopsGGN),
    ("mlp", "classification", "kron", CurvlinopsEF),
    ("mlp", "classification", "full", CurvlinopsGGN),
    ("cnn", "classification", "kron", CurvlinopsGGN),
    ("reg", "regression", "kron", CurvlinopsGGN),
    ("dict", "classification", "kron", CurvlinopsGGN),
    ("userdict", "classification", "kron", CurvlinopsGGN),
]
results = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for kind, likelihood, structure, backend in cases:
        key = f"{kind} {likelihood} {structure} {backend.__name__}"
        model, loader = problem(kind)
        la = Laplace(
            model, likelihood, subset_of_weights="all", hessian_structure=structure,
            backend=backend,
        )
        try:
            la.fit(loader)
        except Exception as error:
            results[f"{key} error"] = np.array(f"{type(error).__name__}: {error}")
            continue
        if structure == "kron":
            for i, block in enumerate(la.H_facs.kfacs):
                for j, factor in enumerate(block):
                    results[f"{key} factor {i}.{j}"] = factor.detach().numpy()
            results[f"{key} H"] = la.H.to_matrix().detach().numpy()
        else:
            results[f"{key} H"] = la.H.detach().numpy()
        results[f"{key} loss"] = np.asarray(float(la.loss))
        for prior_precision in (0.5, 2.0):
            lml = la.log_marginal_likelihood(torch.tensor(prior_precision))
            results[f"{key} log marginal likelihood {prior_precision}"] = lml.detach().numpy()
results["warnings"] = np.array(
    "\\n".join(sorted({f"{w.category.__name__}: {w.message}" for w in caught}))
)
np.savez(sys.argv[1], **results)
"""


def _reference_path() -> Path:
    default = ROOT / ".venv" / "curvlinops-for-pytorch"
    return Path(os.environ.get("CURVLINOPS_FOR_PYTORCH_PATH", default))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """laplace-torch's results on this library and on 3.0.1: ``(ours, theirs)`` npz files."""
    if importlib.util.find_spec("laplace") is None:
        pytest.skip("laplace-torch is not installed (bash scripts/setup.sh installs it)")
    reference = _reference_path()
    if not (reference / "curvlinops").is_dir():
        pytest.skip(f"curvlinops-for-pytorch 3.0.1 is not installed in {reference}")
    folder = tmp_path_factory.mktemp("laplace")
    script = folder / "laplace_cases.py"
    script.write_text(LAPLACE_SCRIPT)
    ours, theirs = folder / "ours.npz", folder / "theirs.npz"
    run_processes(
        [[str(script), str(ours), str(ROOT)], [str(script), str(theirs), str(reference)]],
        env={**os.environ, "PYTHONPATH": ""},
        timeout=600,
        what="laplace-torch on this library (process 0) and on curvlinops-for-pytorch (1)",
    )
    return np.load(ours), np.load(theirs)


def _errors(results) -> dict[str, str]:
    return {
        key.removesuffix(" error"): str(results[key]) for key in results.files if "error" in key
    }


def test_laplace_torch_same_numbers_as_with_curvlinops_for_pytorch(runs):
    """KronLaplace/FullLaplace fit by laplace-torch: factors, H, loss, marginal likelihood."""
    actual, expected = runs
    assert not _errors(expected)
    added = set(str(actual["warnings"]).splitlines()) - set(str(expected["warnings"]).splitlines())
    assert not added, f"warnings that only this library adds: {sorted(added)}"
    assert not _errors(actual)
    compared = list(expected.files)
    assert sorted(compared) == sorted(actual.files)
    # Kronecker factors: [G, A] and [G_bias] per layer with a bias, [G, A] without one
    assert sum(" factor " in key for key in compared) == 6 + 6 + 6 + 5 + 6 + 6
    for key in compared:
        if key != "warnings":
            assert_close(actual[key], expected[key], name=key)
