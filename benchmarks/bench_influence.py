"""EK-FAC influence, this library against kronfluence 1.0.1: factors, pairwise and self scores.

    python -m benchmarks.bench_influence                 # every contender, both problems
    python -m benchmarks.bench_influence --contender ours --problem gpt2 --out x.json

Each contender runs in a process of its own, one thread, pinned to one core
and serialised with the other benchmarks (``flock /tmp/bench.lock taskset -c
1``). Equal settings: EK-FAC, empirical Fisher (the data's targets, so that
both see the same gradients), kronfluence's heuristic damping, the same
weights, data, batch size and dtype. Ours computes the factors with
``fit_ekfac`` keeping the factor pass's layer captures within ``CACHE_MEMORY``
bytes for the correction pass and the training gradients of the pairwise
scores (``ours``: empirical Fisher of a summed loss, so the captured output
gradients are each example's own), or none (``ours-no-cache``); per-example
gradients not kept come from KFAC's layer capture. Problems:

* ``gpt2``: the model of ``examples/influence_gpt2.py`` (a 2-layer, width-64
  Hugging Face GPT-2, random weights from a seed), passages of 64 characters
  of ``pydoc_data.topics``, the transformer blocks' eight linear layers
  (``Conv1D``; kronfluence gets the same model with ``nn.Linear`` layers, as
  it does not know ``Conv1D``), each passage's loss summed over its tokens;
* ``digits``: the 64-32-10 tanh MLP on scikit-learn's digits (1,297 training
  and 8 query images), cross-entropy.

Each contender runs twice in its process; the second run's times are reported
(the first, with the warm-up of PyTorch and of the library, is kept as
``cold_times_s``), in wall and in CPU seconds (the process's CPU time, which
the load changes least). Each process also times one forward and backward
pass over the training data with plain PyTorch (the same model, summed loss):
the ratios to it are what compare across loaded machines. Peak memory is the
process's maximum resident set, beside the one before the contender ran (the
problem and the plain gradient passes). The contenders' scores are saved;
the driver prints their agreement (largest difference over the largest score).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64
CACHE_MEMORY = 300e6
"""Bytes ours may keep of the factor pass's layer inputs and output gradients for the
correction pass and the pairwise scores (``fit_ekfac``'s ``cache_memory``): the GPT-2's
512 passages take 268 MB."""
CONTENDERS = ("ours", "ours-no-cache", "kronfluence")
"""``ours-no-cache``: ours without kept captures (``cache_memory=0``), the memory of
``compute_eigenvalue_correction``."""


# --- problems -------------------------------------------------------------------------
def _gpt2_problem(n_train: int, n_query: int, dtype: torch.dtype) -> dict[str, Any]:
    from pydoc_data.topics import topics

    sys.path.insert(0, str(ROOT / "examples"))
    from influence_gpt2 import CharTokenizer, LanguageModel, corpus_passages, influence_parameters

    texts = [topics[key] for key in sorted(topics)]
    tokenizer = CharTokenizer(texts)
    passages, _ = corpus_passages(tokenizer, texts)
    order = torch.randperm(len(passages), generator=torch.Generator().manual_seed(0))
    train, query = passages[order[:n_train]], passages[order[n_train : n_train + n_query]]
    model = LanguageModel(len(tokenizer.alphabet)).to(dtype).eval()
    return {
        "model": model,
        "params": influence_parameters(model),
        "kind": "lm",
        "train": (train[:, :-1], train[:, 1:]),
        "query": (query[:, :-1], query[:, 1:]),
    }


def _digits_problem(n_query: int, dtype: torch.dtype) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X = torch.tensor(X[order] / 16.0, dtype=dtype)
    y = torch.tensor(y[order])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(dtype).eval()
    return {
        "model": model,
        "params": dict(model.named_parameters()),
        "kind": "classifier",
        "train": (X[:1297], y[:1297]),
        "query": (X[1297 : 1297 + n_query], y[1297 : 1297 + n_query]),
    }


def linear_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each Hugging Face ``Conv1D`` replaced by the same ``nn.Linear``."""
    from curvlinops.backends._kfac_torch import is_hf_conv1d

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not is_hf_conv1d(module):
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out).to(module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, linear)
    return twin


def _summed_loss(problem: dict, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if problem["kind"] == "lm":
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def _gradient_pass(problem: dict) -> dict[str, float]:
    """Wall and CPU seconds of one forward and backward pass over the training data (PyTorch)."""
    model, (X, y) = problem["model"], problem["train"]
    clock = Clock()
    for Xb, yb in zip(torch.split(X, BATCH), torch.split(y, BATCH)):
        grads = torch.autograd.grad(
            _summed_loss(problem, model(Xb), yb), list(problem["params"].values())
        )
    del grads
    clock.lap("pass")
    return clock.times


# --- contenders ---------------------------------------------------------------------
class Clock:
    """Wall and CPU seconds of consecutive phases: ``times[phase]``, ``times["cpu_" + phase]``.

    The process's CPU time is what a loaded machine changes least (a pinned
    process waits for its core while others run there: wall time grows, CPU
    time does not).
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.times[phase], self.times[f"cpu_{phase}"] = wall - self._wall, cpu - self._cpu
        self._wall, self._cpu = wall, cpu


def run_ours(
    problem: dict, cache_memory: float = CACHE_MEMORY
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from curvlinops import EKFACLinearOperator, losses
    from curvlinops.influence_factors import fit_ekfac
    from curvlinops.influence_scores import InfluenceScorer

    model, params = problem["model"], problem["params"]
    X, y = problem["train"]
    data = list(zip(torch.split(X, BATCH), torch.split(y, BATCH)))
    loss = losses.CrossEntropyLoss(reduction="sum", class_axis=-1)
    clock = Clock()
    E = EKFACLinearOperator(
        model,
        loss,
        params,
        data,
        fisher_type="empirical",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    kept = fit_ekfac(E, cache_memory=cache_memory, keep_captures=cache_memory > 0)
    clock.lap("factors")
    scorer = InfluenceScorer(
        E,
        model,
        loss,
        params,
        damping="heuristic",
        curvature_scale=1 / len(X),
        examples_per_pass=BATCH,
    )
    pairwise = scorer.pairwise_scores([problem["query"]], data, train_captures=kept)
    del kept  # the kept captures: cache_memory up to here
    clock.lap("pairwise")
    self_scores = scorer.self_scores(data)
    clock.lap("self")
    return clock.times, {
        "pairwise": pairwise.detach().numpy(),
        "self": self_scores.detach().numpy(),
    }


def run_kronfluence(problem: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    from benchmarks.kronfluence_runner import KronfluenceContender, tensor_dataset

    dtype = next(problem["model"].parameters()).dtype
    with tempfile.TemporaryDirectory() as folder:
        modules = sorted({name.rpartition(".")[0] for name in problem["params"]})
        contender = KronfluenceContender(
            linear_twin(problem["model"]),
            folder,
            kind=problem["kind"],
            dtype=dtype,
            modules=modules,
        )
        train, query = tensor_dataset(*problem["train"]), tensor_dataset(*problem["query"])
        clock = Clock()
        contender.fit_factors(train, BATCH)
        clock.lap("factors")
        pairwise = contender.pairwise_scores(query, train, BATCH, None)["all_modules"]
        clock.lap("pairwise")
        self_scores = contender.self_scores(train, BATCH, None)["all_modules"]
        clock.lap("self")
    return clock.times, {"pairwise": pairwise.numpy(), "self": self_scores.numpy()}


def run_one(args: argparse.Namespace) -> None:
    """One contender on one problem, in this process: times and scores to ``args.out``."""
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    if args.problem == "gpt2":
        problem = _gpt2_problem(args.n_train, args.n_query, dtype)
    else:
        problem = _digits_problem(args.n_query, dtype)
    _gradient_pass(problem)  # warm-up
    reference = _gradient_pass(problem)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runners = {
        "ours": run_ours,
        "ours-no-cache": lambda problem: run_ours(problem, cache_memory=0),
        "kronfluence": run_kronfluence,
    }
    runner = runners[args.contender]
    cold, _ = runner(problem)  # first calls: PyTorch's and the libraries' warm-up
    times, scores = runner(problem)
    result = {
        "contender": args.contender,
        "problem": args.problem,
        "dtype": args.dtype,
        "n_train": len(problem["train"][0]),
        "n_query": len(problem["query"][0]),
        "parameters": sum(p.numel() for p in problem["params"].values()),
        "gradient_pass_s": reference["pass"],
        "gradient_pass_cpu_s": reference["cpu_pass"],
        "times_s": times,
        "cold_times_s": cold,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "baseline_rss_mb": baseline_rss,  # the problem and plain PyTorch's gradient passes
        "loadavg": os.getloadavg()[0],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    np.savez(Path(args.out).with_suffix(".npz"), **scores)


# --- driver ---------------------------------------------------------------------------
def _command(contender: str, problem: str, dtype: str, n_train: int, out: Path) -> list[str]:
    return [
        "flock", "/tmp/bench.lock", "taskset", "-c", "1",
        sys.executable, "-m", "benchmarks.bench_influence",
        "--contender", contender, "--problem", problem, "--dtype", dtype,
        "--n-train", str(n_train), "--out", str(out),
    ]  # fmt: skip


def drive(args: argparse.Namespace) -> None:
    """Every contender on every problem, one process each, then the tables."""
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    for problem in args.problems:
        for dtype in args.dtypes:
            results = {}
            for contender in CONTENDERS:
                out = folder / f"{problem}_{dtype}_{contender}.json"
                command = _command(contender, problem, dtype, args.n_train, out)
                subprocess.run(command, check=True, env=env, cwd=ROOT)
                results[contender] = json.loads(out.read_text())
                results[contender]["scores"] = dict(np.load(out.with_suffix(".npz")))
            rows.append(results)
    print(format_tables(rows))


def format_tables(rows: list[dict]) -> str:
    """Markdown tables: times (and ratios to the gradient pass), memory, agreement."""
    lines = [
        "| problem | dtype | contender | factors s | pairwise s | self s | "
        "factors+pairwise / grad pass | kronfluence's factors+pairwise / this | "
        "CPU s: factors, pairwise | CPU: factors+pairwise / grad pass | "
        "CPU: kronfluence's / this | cold factors+pairwise s | peak RSS MB (before) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    agreement = [
        "| problem | dtype | pairwise: max diff / max score | self: max diff / max score |",
        "|---|---|---|---|",
    ]
    for results in rows:
        kronfluence = results["kronfluence"]["times_s"]
        for contender, r in results.items():
            t = r["times_s"]
            ratio = (t["factors"] + t["pairwise"]) / r["gradient_pass_s"]
            speedup = (kronfluence["factors"] + kronfluence["pairwise"]) / (
                t["factors"] + t["pairwise"]
            )
            cpu = t.get("cpu_factors", np.nan) + t.get("cpu_pairwise", np.nan)
            cpu_ratio = cpu / r.get("gradient_pass_cpu_s", np.nan)
            cpu_speedup = (
                kronfluence.get("cpu_factors", np.nan) + kronfluence.get("cpu_pairwise", np.nan)
            ) / cpu
            lines.append(
                f"| {r['problem']} (N={r['n_train']}, T={r['n_query']}, P={r['parameters']:,}) "
                f"| {r['dtype']} | {contender} | {t['factors']:.2f} | {t['pairwise']:.2f} | "
                f"{t['self']:.2f} | {ratio:.1f} | {speedup:.2f} | "
                f"{t.get('cpu_factors', np.nan):.2f}, {t.get('cpu_pairwise', np.nan):.2f} | "
                f"{cpu_ratio:.1f} | {cpu_speedup:.2f} | "
                f"{r['cold_times_s']['factors'] + r['cold_times_s']['pairwise']:.2f} | "
                f"{r['peak_rss_mb']:.0f} ({r.get('baseline_rss_mb', np.nan):.0f}) | "
                f"{r['loadavg']:.1f} |"
            )
        ours, theirs = results["ours"]["scores"], results["kronfluence"]["scores"]
        differences = [
            float(np.abs(ours[key] - theirs[key]).max() / np.abs(theirs[key]).max())
            for key in ("pairwise", "self")
        ]
        r = results["ours"]
        agreement.append(
            f"| {r['problem']} | {r['dtype']} | {differences[0]:.1e} | {differences[1]:.1e} |"
        )
    return "\n".join(lines) + "\n\n" + "\n".join(agreement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", choices=CONTENDERS)
    parser.add_argument("--problem", choices=["gpt2", "digits"], default="gpt2")
    parser.add_argument("--problems", nargs="+", default=["digits", "gpt2"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-query", type=int, default=8)
    parser.add_argument("--out", help="result file of one contender")
    parser.add_argument("--folder", default=str(ROOT / "benchmarks" / "latest" / "influence"))
    args = parser.parse_args()
    if args.contender is None:
        drive(args)
    else:
        run_one(args)


if __name__ == "__main__":
    main()
