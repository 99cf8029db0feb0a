"""The end-to-end tasks of ``python -m benchmarks --tasks``: references, errors, contenders.

A :class:`Task` says what is computed (in which dtype, to which accuracy), how
its float64 reference is computed, how far a result is from it, and, per
contender, a factory ``(problem, reference) -> (run, ladder, setting name)``:
``run(setting)`` returns the contender's result at one of its own settings, the
ladder lists those settings from the cheapest up. A contender without the
function is listed in :attr:`Task.missing` with the reason.

Tasks (the top-5 eigenvalues are in :mod:`benchmarks.tasks`; SLQ in
:mod:`benchmarks.task_slq`):

* ``trace-1%``: trace of the GGN (float32) to 1 %: the error is the larger of
  the estimate's distance to the exact trace and the half-width of its 95 %
  confidence interval (1.96 standard errors, as the estimator reports it), so
  a result counts only when the estimator itself can tell it is within 1 %.
  This library's contenders first try the exact trace (``G.trace()``, setting
  ``exact, 0``: no products) where it is cheap (:data:`EXACT_TRACE_MAX_ENTRIES`).
  The Hessian's trace is not a task: at the benchmark MLP's initial weights its
  Hutchinson terms have a standard deviation 30x the trace (about 4,000 probes
  for 1 %), so every estimator is then a probe count, not an implementation.
* ``cg-1e-6``: ``(G + λ I) x = g`` (GGN, float64, ``g`` the loss gradient, λ of
  the problem) to a relative residual of 1e-6, the residual recomputed in
  float64 with a hand-written GGN product.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CI_FACTOR = 1.96
"""Half-width of a 95 % confidence interval, in standard errors."""
TRACE_LADDER = tuple(
    (method, m)
    for m in (12, 18, 24, 36, 48, 72, 96, 144, 192, 288, 384, 576, 768, 1152, 1536)
    for method in ("hutchinson", "hutch++")
)
"""(estimator, products), cheapest first; at each count both estimators are tried."""
OURS_TRACE_LADDER = tuple(
    (method, m) for m in sorted({m for _, m in TRACE_LADDER})
    for method in ("hutchinson", "hutch++", "xtrace")
)  # fmt: skip
"""This library's: also XTrace (Epperly, Tropp and Webber), whose interval is narrower at
equal products (transformer GGN, 144 products: 95 % half-widths 0.56-0.74 % against
0.91-1.19 % for Hutch++, two seeds each)."""
HUTCHINSON_LADDER = tuple(s for s in TRACE_LADDER if s[0] == "hutchinson" and s[1] <= 384)
"""For contenders with Hutchinson only: where it needs more (the CNN: ~5,000 probes for 1 %
with its standard deviation), Hutch++ is the estimator to use, and the row says "not met"."""
EXACT_TRACE_MAX_ENTRIES = 2**27
"""Ours computes the trace exactly (``G.trace()``: the sum of the exact GGN diagonal, one
VJP per example and output) where one batch's per-example gradients, examples x outputs
x parameters entries, number at most this: the CNN's 6.5e7 took about 13 PyTorch and 16
JAX gradients, the MLP's 2.8e9 about 2,300 (there the estimators are cheaper)."""
CG_LADDER = (1e-6, 5e-7, 2e-7, 1e-7, 1e-8, 1e-9)
TRACE_BLOCK = 32
"""Probes per ``matmat`` where a contender multiplies blocks (ours, the floor)."""


@dataclass(frozen=True)
class Task:
    """One end-to-end task (see the module docstring)."""

    dtype: str
    accuracy: float
    what: str
    reference: Callable[[Any], dict]
    error: Callable[[Any, dict], float]
    contenders: dict[str, Callable[[Any, dict], tuple[Callable, tuple, str]]]
    missing: dict[str, str] = field(default_factory=dict)
    small: bool = False
    """Run on the small (``quick``) problem sizes (where the reference needs dense matrices)."""


# --- trace -------------------------------------------------------------------------------------
EXACT_DIAGONAL_OUTPUTS = 2**15
"""Largest number of outputs (rows x classes) for which the exact GGN diagonal is the
reference: it takes one VJP per output (through its example) and, per example, a
columns x parameters array; the benchmark transformer has 524,288 outputs of 64-token
sequences (about 33,000 full-batch backward passes, and 32,768 x 536,576 numbers per
example)."""
REFERENCE_PRODUCTS = 1152
"""Hutch++ products of the stochastic reference where the exact diagonal is too costly."""
REFERENCE_SEED = 2026
"""Its seed: the contenders use seed 0 (their probes are independent of the reference's)."""


def trace_reference(problem: Any) -> dict:
    """The GGN trace: exact (sum of the exact GGN diagonal, float64) where affordable.

    Otherwise (see :data:`EXACT_DIAGONAL_OUTPUTS`) a float64 Hutch++ estimate with
    :data:`REFERENCE_PRODUCTS` products and its own 95 % half-width (``ci``), which
    says how far from the exact trace the reference itself may be.
    """
    import curvlinops as cl

    fp = problem.torch()
    if problem.num_outputs <= EXACT_DIAGONAL_OUTPUTS:
        D = cl.GGNDiagonalLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
        return {"value": float(D.diagonal().sum()), "ci": 0.0,
                "how": "sum of the exact GGN diagonal, float64"}  # fmt: skip
    G = cl.GGNLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
    value, stderr = cl.hutchpp_trace(G, REFERENCE_PRODUCTS, seed=REFERENCE_SEED,
                                     return_stderr=True)  # fmt: skip
    value, ci = float(value), CI_FACTOR * float(stderr) / abs(float(value))
    how = (f"float64 Hutch++, {REFERENCE_PRODUCTS} products, seed {REFERENCE_SEED}: "
           f"95 % half-width {ci:.1e} relative (the exact diagonal needs "
           f"{problem.num_outputs:,} VJPs)")  # fmt: skip
    return {"value": value, "ci": ci, "how": how}


def trace_error(result: tuple[float, float], reference: dict) -> float:
    """The larger of the relative error and the relative 95 % half-width."""
    estimate, stderr = result
    relative = abs(estimate - reference["value"]) / abs(reference["value"])
    return max(relative, CI_FACTOR * stderr / abs(estimate))


def _ours_trace(framework: str) -> Callable:
    def make(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
        import curvlinops as cl

        fp = problem.torch() if framework == "torch" else problem.jax()
        G = cl.GGNLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
        estimators = {"hutchinson": cl.hutchinson_trace, "hutch++": cl.hutchpp_trace,
                      "xtrace": cl.xtrace}  # fmt: skip

        def run(setting: tuple[str, int]) -> tuple[float, float]:
            method, m = setting
            if method == "exact":  # no probes: no standard error
                return float(G.trace()), 0.0
            estimate, stderr = estimators[method](G, m, seed=0, return_stderr=True)
            return float(estimate), float(stderr)

        entries = problem.num_outputs * problem.num_params
        exact = (("exact", 0),) if entries <= EXACT_TRACE_MAX_ENTRIES else ()
        return run, exact + OURS_TRACE_LADDER, "estimator, products"

    return make


def _he_trace(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
    import hessian_eigenthings as he

    operator = _he_ggn(problem)

    def run(setting: tuple[str, int]) -> tuple[float, float]:
        method, m = setting
        result = he.trace(operator, num_matvecs=m, method=method, seed=0)
        return result.estimate, result.stderr

    return run, TRACE_LADDER, "estimator, products"


def _he_ggn(problem: Any) -> Any:
    import hessian_eigenthings as he

    fp = problem.torch()
    return he.GGNOperator(fp.model_func, fp.data, he.supervised_forward,
                          he.supervised_loss_of_output(fp.loss_func))  # fmt: skip


def _cfp_trace(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
    """3.0.1's estimators return the estimate only: the standard error of Hutchinson's
    terms is computed from its own calls of one probe each (as a user would)."""
    import torch

    from benchmarks.contenders import load_cfp

    cfp = load_cfp()
    fp = problem.torch()
    G = cfp.GGNLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data,
                              check_deterministic=False)  # fmt: skip
    ladder = HUTCHINSON_LADDER

    def run(setting: tuple[str, int]) -> tuple[float, float]:
        torch.manual_seed(0)
        terms = np.array([float(cfp.hutchinson_trace(G, 1)) for _ in range(setting[1])])
        return float(terms.mean()), float(terms.std(ddof=1) / np.sqrt(terms.size))

    return run, ladder, "estimator, products"


def _floor_trace(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
    """Hutchinson by hand: Rademacher blocks through a ``vmap``-ped GGN product."""
    import torch

    from benchmarks.contenders import make_setup

    ggn = make_setup("raw-torch", problem).products["ggnvp"]
    dtype, n = getattr(torch, problem.dtype), problem.num_params
    ladder = HUTCHINSON_LADDER

    def run(setting: tuple[str, int]) -> tuple[float, float]:
        generator, terms = torch.Generator().manual_seed(0), []
        for start in range(0, setting[1], TRACE_BLOCK):
            k = min(TRACE_BLOCK, setting[1] - start)
            W = torch.randint(0, 2, (n, k), generator=generator).to(dtype) * 2 - 1
            terms.append((W * ggn(W)).sum(0))
        terms = torch.cat(terms).double().numpy()
        return float(terms.mean()), float(terms.std(ddof=1) / np.sqrt(terms.size))

    return run, ladder, "estimator, products"


# --- CG ----------------------------------------------------------------------------------------
def cg_reference(problem: Any) -> dict:
    return {"damping": problem.damping, "how": "residual recomputed by a hand-written GGN"}


class _Residual:
    """The relative residual of ``(G + λ I) x = g`` in float64, by a hand-written GGN product."""

    def __init__(self, problem: Any) -> None:
        import torch

        from benchmarks.contenders import make_setup

        if problem.dtype != "float64":
            raise ValueError(f"cg: expected a float64 problem, got {problem.dtype}")
        raw = make_setup("raw-torch", problem)
        self.ggn, self.damping = raw.products["ggnvp"], problem.damping
        self.rhs = raw.products["grad"]().detach().numpy()
        self.torch = torch

    def __call__(self, x: np.ndarray) -> float:
        v = self.torch.from_numpy(np.asarray(x, np.float64).reshape(-1))
        r = self.ggn(v).numpy() + self.damping * v.numpy() - self.rhs
        return float(np.linalg.norm(r) / np.linalg.norm(self.rhs))


_RESIDUALS: dict[int, _Residual] = {}


def cg_error(result: np.ndarray, reference: dict) -> float:
    return _RESIDUALS[reference["problem_id"]](result)


def _with_residual(make: Callable) -> Callable:
    """Set the residual check up (untimed) before the contender's factory runs."""

    def wrapped(problem: Any, reference: dict) -> tuple[Callable, tuple, str]:
        residual = _Residual(problem)
        reference["problem_id"] = id(residual)
        _RESIDUALS[id(residual)] = residual
        return make(problem, residual.rhs)

    return wrapped


def _ours_cg(framework: str) -> Callable:
    def make(problem: Any, rhs: np.ndarray) -> tuple[Callable, tuple, str]:
        import curvlinops as cl

        fp = problem.torch() if framework == "torch" else problem.jax()
        G = cl.GGNLinearOperator(fp.model_func, fp.loss_func, fp.params, fp.data)
        b = _native(framework, rhs)

        def run(tol: float) -> np.ndarray:
            Ginv = cl.CGInverseLinearOperator(G, damping=problem.damping, tol=tol)
            return np.asarray(G.backend.to_numpy(Ginv @ b), np.float64)

        return run, CG_LADDER, "tol"

    return make


def _native(framework: str, x: np.ndarray) -> Any:
    """``x`` as an array of ``framework`` (the right-hand side a user of it holds)."""
    if framework == "torch":
        import torch

        return torch.from_numpy(x)
    import jax.numpy as jnp

    return jnp.asarray(x)


def _scipy_cg(operator: Any, rhs: np.ndarray) -> tuple[Callable, tuple, str]:
    import scipy.sparse.linalg

    def run(tol: float) -> np.ndarray:
        x, info = scipy.sparse.linalg.cg(operator, rhs, rtol=tol, maxiter=10 * rhs.size)
        if info != 0:
            raise RuntimeError(f"scipy cg did not converge (info={info})")
        return x

    return run, CG_LADDER, "rtol"


def _cfp_cg(problem: Any, rhs: np.ndarray) -> tuple[Callable, tuple, str]:
    from benchmarks.contenders import make_setup

    return _scipy_cg(make_setup("cfp", problem).damped_ggn_scipy(problem.damping), rhs)


def _floor_cg(problem: Any, rhs: np.ndarray) -> tuple[Callable, tuple, str]:
    from benchmarks.contenders import make_setup

    return _scipy_cg(make_setup("raw-torch", problem).damped_ggn_scipy(problem.damping), rhs)


TRACE = Task(
    "float32", 1e-2, "GGN trace, 1 % (error and 95 % CI half-width)",
    trace_reference, trace_error,
    {"ours-torch": _ours_trace("torch"), "ours-jax": _ours_trace("jax"),
     "hessian-eigenthings": _he_trace, "cfp": _cfp_trace, "floor": _floor_trace},
)  # fmt: skip
CG = Task(
    "float64", 1e-6, "CG on G + λI, relative residual 1e-6",
    cg_reference, cg_error,
    {"ours-torch": _with_residual(_ours_cg("torch")), "ours-jax": _with_residual(_ours_cg("jax")),
     "cfp": _with_residual(_cfp_cg), "floor": _with_residual(_floor_cg)},
    missing={"hessian-eigenthings": "—, no linear solver in 1.0.0a5"},
)  # fmt: skip
