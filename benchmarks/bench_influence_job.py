"""What the influence job's slow parts cost, in gradients of the same framework (issue 28).

On the job's own problem (scikit-learn's digits, 1,297 training images, the
64-32-10 tanh MLP at its initial weights, float64), in one framework per
process, interleaved round after round so that background load hits every
contender alike:

* ``gradient``: the loss and its gradient over the whole training set (the unit),
  compiled by the backend as the job's training does;
* ``CG iteration``: one product of the GGN operator with 1,297 columns, as every
  iteration of the MLP's batched self-influence CG asks (``columns_per_pass`` of
  the job; the operator keeps its linearization, as inside CG);
* ``Newton product, graph kept``: one Hessian-vector product of the training
  objective through the gradient's graph kept at ``w`` (what the job's Newton
  steps and leave-one-out retraining use in PyTorch);
* ``Newton product, recomputed``: the same through ``hvp_fn`` (forward-over-reverse
  every time; compiled, what JAX uses).

Medians over rounds of each contender's time and of its ratio to ``gradient`` in
the same round. Run pinned, one thread::

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python -m benchmarks.bench_influence_job \
        --backend torch [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _contenders(framework: str) -> dict[str, Callable[[], Any]]:
    """The timed calls on the job's problem, each returning a framework array."""
    from curvlinops.backends import make_backend
    from curvlinops.backends._jobs_classifiers import tanh_classifier
    from curvlinops.ggn import GGNLinearOperator
    from curvlinops.jobs.influence.problem import (
        LOSS,
        StudyConfig,
        initial_weights,
        make_problem,
    )
    from curvlinops.jobs.influence.training import _Objective

    config = StudyConfig()
    problem = make_problem(0, config)
    like = initial_weights("mlp", config, problem.seed)
    model_func, params = tanh_classifier(framework, like)
    b = make_backend(model_func, params, framework)
    objective = _Objective(b, problem.X_train, problem.y_train, config.l2)
    w = np.concatenate([p.ravel() for p in like])
    weights = objective.example_weights()
    primals = objective.primals(w)
    rng = np.random.default_rng(0)
    v = b.import_array(rng.standard_normal(w.size), "v")[0]
    columns = b.import_array(rng.standard_normal((w.size, len(problem.y_train))), "V")[0]
    data = [(b.import_batch(problem.X_train, 0), b.import_batch(problem.y_train, 0))]
    ggn = GGNLinearOperator(
        model_func, LOSS, params, data, backend=framework, columns_per_pass=config.columns_per_pass
    )
    kept = b.linearize_gradient(objective._objective(objective.X, objective.Y, weights), primals)
    hvp = b.compile(objective._hessian_product_fn)
    return {
        "gradient": lambda: objective._value_and_gradient(
            primals, objective.X, objective.Y, weights
        )[1],
        "CG iteration (1,297 columns)": lambda: ggn @ columns,
        "Newton product, graph kept": lambda: b.flatten(b.linear_jvp(kept, b.unflatten(v))),
        "Newton product, recomputed": lambda: hvp(primals, objective.X, objective.Y, weights, v),
    }


def _timed(call: Callable[[], Any], framework: str, repeats: int) -> float:
    """Seconds per call, the result made ready (JAX dispatches asynchronously)."""
    start = time.perf_counter()
    for _ in range(repeats):
        out = call()
    if framework == "jax":
        out.block_until_ready()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax"), default="torch")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    contenders = _contenders(args.backend)
    repeats = {name: 1 if name.startswith("CG") else 20 for name in contenders}
    for call in contenders.values():  # warm-up: compilation, kept linearizations
        _timed(call, args.backend, 2)
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, call in contenders.items():
            seconds[name].append(_timed(call, args.backend, repeats[name]))
    unit = seconds["gradient"]
    print(
        f"{args.backend}, threads OMP={os.environ.get('OMP_NUM_THREADS')}, "
        f"rounds {args.rounds}, load {os.getloadavg()[0]:.2f}"
    )
    print(f"| {'contender':30s} | median ms | in gradients |")
    print(f"|{'-' * 32}|----------:|-------------:|")
    for name, times in seconds.items():
        ratio = statistics.median(t / g for t, g in zip(times, unit))
        print(f"| {name:30s} | {1e3 * statistics.median(times):9.2f} | {ratio:12.2f} |")


if __name__ == "__main__":
    main()
