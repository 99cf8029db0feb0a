"""Top-5 Hessian eigenvalues: scipy's ``eigsh`` on the operator vs ``curvlinops.eigen.eigsh``.

MLP 784-256-256-10, tanh, cross-entropy, batch 1024, float32, CPU, a fixed
number of threads (default 2), the same weights in PyTorch and JAX.

Contenders, for each backend:

* ``scipy eigsh``: ``scipy.sparse.linalg.eigsh(H, k=5)`` with scipy's defaults
  (ARPACK in numpy; every product converts the vector to the framework and
  back). Since ``curvlinops/_blas_guard.py`` landed, products asked for with
  numpy vectors limit numpy's BLAS to one thread while a solver drives them.
  With ``--no-guard`` (``CURVLINOPS_LIMIT_BLAS=0``) that is off, and a second
  contender puts the whole call inside ``threadpoolctl.threadpool_limits(1,
  "blas")`` instead. On 2 cores, ARPACK's multithreaded BLAS calls leave their
  worker threads spinning, and those compete with the framework's threads
  during the products.
* ``curvlinops eigsh``: thick-restart Lanczos in the framework, no host copies
  of vectors (``curvlinops.eigen.eigsh(H, k=5)``, default settings).

Each contender runs ``--repeats`` times, interleaved; the table shows the
median and the minimum in seconds, the number of Hessian-vector products, and
the largest relative difference of the eigenvalues from scipy's.

Run: ``.venv/bin/python -m benchmarks.bench_eigsh [--threads 2] [--repeats 3] [--no-guard]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

K = 5


def hessian(framework: str):
    """The Hessian of the suite's MLP problem (``benchmarks/problems.py``) in one framework."""
    import curvlinops as cl
    from benchmarks.problems import make_problem

    problem = make_problem("mlp")
    fp = problem.torch() if framework == "torch" else problem.jax()
    return cl.HessianLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)


def count_products(H) -> list[int]:
    """Count the columns that go through ``H`` (patches this instance only)."""
    counter = [0]
    native, native_vector = H._native, H._native_vector

    def counted(X, adjoint):
        counter[0] += X.shape[1]
        return native(X, adjoint)

    def counted_vector(x, adjoint):  # scipy's matvec
        counter[0] += 1
        return native_vector(x, adjoint)

    H._native, H._native_vector = counted, counted_vector
    return counter


def contenders(H, guard: bool):
    import scipy.sparse.linalg

    from curvlinops.eigen import eigsh

    def scipy_eigsh():
        return scipy.sparse.linalg.eigsh(H, k=K)[0]

    def scipy_blas1():
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return scipy.sparse.linalg.eigsh(H, k=K)[0]

    def ours():
        return H.backend.to_numpy(eigsh(H, k=K)[0])

    if guard:
        return {"scipy eigsh (BLAS guard on)": scipy_eigsh, "curvlinops eigsh": ours}
    return {
        "scipy eigsh (BLAS guard off)": scipy_eigsh,
        "scipy eigsh in threadpool_limits(1, 'blas')": scipy_blas1,
    }


def run_backend(name: str, H, repeats: int, guard: bool) -> list[tuple]:
    counter = count_products(H)
    runs = contenders(H, guard)
    v = H.backend.random_normal((H.shape[0],), 0)
    H @ v  # warm-up (JAX compiles the product here)
    for fn in runs.values():  # warm-up (JAX compiles the Lanczos steps)
        fn()
    times = {label: [] for label in runs}
    products, values = {}, {}
    for _ in range(repeats):
        for label, fn in runs.items():
            counter[0] = 0
            start = time.perf_counter()
            result = fn()
            times[label].append(time.perf_counter() - start)
            products[label], values[label] = counter[0], np.sort(np.asarray(result))
    reference = values[next(iter(runs))]
    rows = []
    for label in runs:
        difference = np.max(np.abs(values[label] - reference) / np.abs(reference))
        rows.append(
            (
                name,
                label,
                statistics.median(times[label]),
                min(times[label]),
                products[label],
                difference,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="torch,jax")
    parser.add_argument("--no-guard", action="store_true", help="CURVLINOPS_LIMIT_BLAS=0")
    args = parser.parse_args()
    if args.no_guard:
        os.environ["CURVLINOPS_LIMIT_BLAS"] = "0"
    os.environ.setdefault(
        "XLA_FLAGS",
        f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    rows = []
    for name in args.backends.split(","):
        if name == "torch":
            import torch

            torch.set_num_threads(args.threads)
        H = hessian(name)
        rows += run_backend(name, H, args.repeats, guard=not args.no_guard)
    print(f"eigsh(k={K}) of the Hessian, P = {H.shape[0]}, {args.threads} threads\n")
    print("| backend | contender | median s | min s | products | max rel. diff. vs first |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, median, best, count, difference in rows:
        print(f"| {name} | {label} | {median:.2f} | {best:.2f} | {count} | {difference:.1e} |")


if __name__ == "__main__":
    main()
