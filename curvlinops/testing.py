"""The conformance kit: checks a backend author runs against a backend.

The author gives a small problem of the framework (a tiny model, a standard
loss, a few batches) through :class:`ConformanceProblem`; each check in
:data:`CHECKS` builds this library's operators on it and compares them with
references built here from the model's outputs alone: the Jacobian by
central differences of forward passes in float64, the loss derivatives by
closed forms in numpy, the Hessian by central differences of the gradient
(itself checked against the Jacobian). Nothing here imports a framework.

With pytest::

    import pytest
    from curvlinops.testing import CHECKS, ConformanceProblem

    PROBLEM = ConformanceProblem("mlx", build=my_problem, loss_func=losses.CrossEntropyLoss())

    @pytest.mark.parametrize("check", sorted(CHECKS))
    def test_conformance(check):
        CHECKS[check](PROBLEM)

or all at once: :func:`run_conformance` (it raises an ``AssertionError``
listing every failed check).

What is checked: registration and detection (:func:`check_registration`);
dense Jacobian and its transpose, gradient, Hessian, GGN, empirical Fisher
and Monte-Carlo Fisher against the references, symmetry and adjoints
(:func:`check_jacobian` ... :func:`check_mc_fisher`); products with many
columns equal the products column by column (:func:`check_batched_columns`);
array formats, dtypes and devices (:func:`check_formats`,
:func:`check_float32`); scipy's ``eigsh`` and ``cg`` on the operators
(:func:`check_scipy_solvers`); this library's Krylov algorithms
(:func:`check_krylov`); the error messages for bad input
(:func:`check_errors`); and that ``import curvlinops`` imports none of the
backend's modules (:func:`check_import_is_lazy`).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CHECKS", "ConformanceProblem", "float64_precision", "run_conformance"]

_FD_TOL = 1e-6
"""Relative accuracy of the float64 central-difference references (their error is ~1e-9)."""


@dataclass(frozen=True, eq=False)
class ConformanceProblem:
    """A small problem of the backend's framework.

    Attributes:
        backend: The registered backend name.
        build: ``dtype -> (model_func, params, data)`` for ``dtype`` ``"float64"``
            and ``"float32"``: the same weights and data in that dtype; ``data``
            a list of ``(X, y)`` batches (two batches of unequal size are
            best). Outputs must have shape ``(N, C)``; for cross-entropy ``y``
            holds integer class indices.
        loss_func: ``curvlinops.losses.MSELoss``, ``CrossEntropyLoss`` or
            ``BCEWithLogitsLoss`` (any reduction), or a framework loss the
            backend translates to one of them.
        dtypes: The dtypes to check products in (float64 is always the reference).
    """

    backend: str
    build: Callable[[str], tuple[Any, Any, list]]
    loss_func: Any
    dtypes: tuple[str, ...] = ("float64", "float32")
    _cache: dict = field(default_factory=dict, repr=False)


# --- references ---------------------------------------------------------------------------
class _References:
    """Dense float64 references of one problem, computed once."""

    def __init__(self, problem: ConformanceProblem) -> None:
        from curvlinops.backends import make_backend

        self.problem = problem
        model_func, _, params, data = _build(problem)
        self.args = (model_func, problem.loss_func, params, data)
        self.b = b = make_backend(model_func, params, problem.backend)
        self.loss = b.loss(problem.loss_func)
        self.batches = [
            (b.import_batch(X, i), b.import_batch(y, i)) for i, (X, y) in enumerate(data)
        ]
        self.theta = b.to_numpy(b.flatten(b.primals)).astype(np.float64)
        self.N = sum(b.batch_size(X) for X, _ in self.batches)
        self.targets = [b.to_numpy(y) for _, y in self.batches]
        self.outputs = [self._outputs(self.theta, X) for X, _ in self.batches]
        self.J = [self._fd_jacobian(X, z) for (X, _), z in zip(self.batches, self.outputs)]

    def _outputs(self, theta: np.ndarray, X: Any) -> np.ndarray:
        b = self.b
        z = b.to_numpy(b.model_fn(b.unflatten(b.import_array(theta, "theta")[0]), X))
        if z.ndim != 2:
            raise ValueError(f"conformance kit: outputs of shape (N, C) needed, got {z.shape}")
        return z.astype(np.float64)

    def _fd_jacobian(self, X: Any, z: np.ndarray) -> np.ndarray:
        """``∂ vec(z) / ∂θ`` by central differences, shape ``(N*C, P)``."""
        columns = []
        for i in range(self.theta.size):
            h = 1e-5 * max(1.0, abs(self.theta[i]))
            e = np.zeros_like(self.theta)
            e[i] = h
            diff = self._outputs(self.theta + e, X) - self._outputs(self.theta - e, X)
            columns.append(diff.reshape(-1) / (2 * h))
        return np.stack(columns, axis=1)

    # closed forms of the loss, per example term, with outputs (n, C)
    def _per_term(self) -> int:
        return 1 if type(self.loss).__name__ == "CrossEntropyLoss" else self.outputs[0].shape[1]

    def scale(self) -> float:
        """The factor of the un-normalised terms in the total loss."""
        return 1.0 / (self.N * self._per_term()) if self.loss.reduction == "mean" else 1.0

    def term_gradients(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        kind = type(self.loss).__name__
        if kind == "MSELoss":
            return 2.0 * (z - y)
        if kind == "BCEWithLogitsLoss":
            return 1.0 / (1.0 + np.exp(-z)) - y
        if kind == "CrossEntropyLoss":
            return _softmax(z) - (y if y.ndim == 2 else np.eye(z.shape[1])[y.astype(int)])
        raise TypeError(f"conformance kit: loss {kind} has no closed form here")

    def term_hessians(self, z: np.ndarray) -> np.ndarray:
        n, C = z.shape
        kind = type(self.loss).__name__
        if kind == "MSELoss":
            return np.broadcast_to(2.0 * np.eye(C), (n, C, C))
        if kind == "BCEWithLogitsLoss":
            s = 1.0 / (1.0 + np.exp(-z))
            return np.einsum("nc,cd->ncd", s * (1 - s), np.eye(C))
        p = _softmax(z)
        return np.einsum("nc,cd->ncd", p, np.eye(C)) - np.einsum("nc,nd->ncd", p, p)

    def per_example_jacobians(self, k: int) -> np.ndarray:
        n, C = self.outputs[k].shape
        return self.J[k].reshape(n, C, -1)

    @functools.cached_property
    def gradient(self) -> np.ndarray:
        g = sum(
            np.einsum("ncp,nc->p", self.per_example_jacobians(k), self.term_gradients(z, y))
            for k, (z, y) in enumerate(zip(self.outputs, self.targets))
        )
        return self.scale() * g

    @functools.cached_property
    def ggn(self) -> np.ndarray:
        G = sum(
            np.einsum("ncp,ncd,ndq->pq", Jn, self.term_hessians(z), Jn)
            for Jn, z in ((self.per_example_jacobians(k), z) for k, z in enumerate(self.outputs))
        )
        return self.scale() * G

    def gradient_moment(self, targets: list[np.ndarray]) -> np.ndarray:
        """``c Σ_n g_n g_nᵀ`` with per-example gradients at ``targets`` (one array per batch)."""
        total = 0.0
        for k, (z, y) in enumerate(zip(self.outputs, targets)):
            g = np.einsum("ncp,nc->np", self.per_example_jacobians(k), self.term_gradients(z, y))
            total = total + g.T @ g
        return self.scale() * total

    @functools.cached_property
    def hessian(self) -> np.ndarray:
        """The GGN plus ``Σ ∂ℓ/∂z ∇²z``, the latter by central differences of ``Jᵀ(θ) u``.

        ``u`` (the loss's output gradients) is held fixed, so that the differences
        see the model only: the loss's closed form stays exact.
        """
        cotangents = [
            self.scale() * self.term_gradients(z, y) for z, y in zip(self.outputs, self.targets)
        ]
        columns = []
        for i in range(self.theta.size):
            h = 1e-5 * max(1.0, abs(self.theta[i]))
            e = np.zeros_like(self.theta)
            e[i] = h
            difference = self._pulled_back(self.theta + e, cotangents) - self._pulled_back(
                self.theta - e, cotangents
            )
            columns.append(difference / (2 * h))
        R = np.stack(columns, axis=1)
        return self.ggn + 0.5 * (R + R.T)

    def _pulled_back(self, theta: np.ndarray, cotangents: list[np.ndarray]) -> np.ndarray:
        """``Σ_batches J(θ)ᵀ u`` through the backend's ``vjp`` of the model."""
        b = self.b
        primals = b.unflatten(b.import_array(theta, "theta")[0])
        total = 0.0
        for (X, _), u in zip(self.batches, cotangents):
            _, pullback = b.vjp(functools.partial(_apply_model, b.model_fn, X=X), primals)
            total = total + b.to_numpy(b.flatten(pullback(b.import_array(u, "u")[0])))
        return total

    def backend_gradient(self) -> np.ndarray:
        """The loss's gradient by the backend's ``vjp`` (loss formulas of curvlinops.losses)."""
        b, loss = self.b, self.loss
        total = 0.0
        for X, y in self.batches:
            weight = b.batch_size(X) / self.N if loss.reduction == "mean" else 1.0

            def batch_loss(p: Any, X: Any = X, y: Any = y) -> Any:
                return loss.value(b, b.model_fn(p, X), y)

            value, pullback = b.vjp(batch_loss, b.primals)
            total = total + weight * b.to_numpy(b.flatten(pullback(b.xp.ones_like(value))))
        return total

    @functools.cached_property
    def precision(self) -> float:
        """The backend's measured float64 accuracy (:func:`float64_precision`)."""
        return float64_precision(self.b)

    def tolerance(self) -> float:
        """Relative tolerance of float64 comparisons: the references' or the backend's accuracy."""
        return max(_FD_TOL, 100 * self.precision)


def float64_precision(backend: Any) -> float:
    """The relative accuracy of a float64 backend's ``exp``, ``log`` and ``tanh``, measured.

    Against numpy's, on a grid; at least float64's machine epsilon. MLX's CPU
    computes float64 ``exp`` to about 3e-7 (single precision), for example:
    comparisons of its float64 results need tolerances to match.
    """
    b, x = backend, np.linspace(-3.0, 3.0, 101)
    worst = float(np.finfo(np.float64).eps)
    for name, points in (("exp", x), ("tanh", x), ("log", np.abs(x) + 0.1)):
        exact = getattr(np, name)(points)
        ours = b.to_numpy(getattr(b.xp, name)(b.import_array(points, "x")[0]))
        worst = max(worst, float(np.abs(ours - exact).max() / np.abs(exact).max()))
    return worst


def _apply_model(model_fn: Callable, p: Any, X: Any) -> Any:
    return model_fn(p, X)


def _float64_tolerance(problem: ConformanceProblem) -> float:
    """Relative tolerance of float64 comparisons (see :meth:`_References.tolerance`)."""
    return _references(problem).tolerance()


def _references(problem: ConformanceProblem) -> _References:
    if "references" not in problem._cache:
        problem._cache["references"] = _References(problem)
    return problem._cache["references"]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- comparisons ------------------------------------------------------------------------------
def _tolerance(dtype: Any) -> float:
    """Relative to the largest entry: the references' accuracy, or float32's rounding."""
    return max(_FD_TOL, 1000 * float(np.finfo(np.dtype(dtype)).eps))


def _assert_close(actual: Any, expected: np.ndarray, tol: float, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape}, expected {expected.shape}")
    scale = max(float(np.abs(expected).max(initial=0.0)), np.finfo(np.float64).tiny)
    error = np.abs(actual - expected)
    worst = float(error.max(initial=0.0))
    if worst > tol * scale:
        index = np.unravel_index(int(np.argmax(error)), error.shape)
        raise AssertionError(
            f"{what}: largest difference {worst:.3g} at {index} (got {actual[index]:.6g}, "
            f"expected {expected[index]:.6g}), more than {tol:.1g} x max |expected| "
            f"= {tol * scale:.3g}"
        )


def _build(problem: ConformanceProblem, dtype: str = "float64") -> tuple:
    """The problem's arguments, built once per dtype.

    Operators of one configuration then share their compiled products (the
    model function is the same object).
    """
    key = ("build", dtype)
    if key not in problem._cache:
        problem._cache[key] = problem.build(dtype)
    model_func, params, data = problem._cache[key]
    return model_func, problem.loss_func, params, data


def _operator(cls: Any, problem: ConformanceProblem, dtype: str = "float64", **options: Any) -> Any:
    """An operator on the problem: one column block, and no determinism check (but in errors)."""
    options = {"columns_per_pass": 64, "check_deterministic": False, **options}
    model_func, loss_func, params, data = _build(problem, dtype)
    if "Jacobian" in cls.__name__:
        return cls(model_func, params, data, backend=problem.backend, **options)
    return cls(model_func, loss_func, params, data, backend=problem.backend, **options)


def _dense(A: Any) -> np.ndarray:
    return np.asarray(A @ np.eye(A.shape[1], dtype=A.dtype), dtype=np.float64)


# --- checks ---------------------------------------------------------------------------------------
def check_registration(problem: ConformanceProblem) -> None:
    """Registered, detected from the parameters' types, and complete (every interface member)."""
    from curvlinops.backends import check_backend, detect_backend, make_backend, registered

    if problem.backend not in registered():
        raise AssertionError(
            f"backend {problem.backend!r} is not registered: {sorted(registered())}"
        )
    model_func, _, params, _ = _build(problem)
    detected = detect_backend(model_func, params)
    if detected != problem.backend:
        raise AssertionError(f"detection from params picked {detected!r}, not {problem.backend!r}")
    b = check_backend(make_backend(model_func, params), problem.backend)
    if len(b.param_names) != len(b.param_shapes) or b.name != problem.backend:
        raise AssertionError("param_names and param_shapes differ in length, or the name differs")
    native = b.random_normal((3,), seed=0)
    if not b.owns(native) or b.to_numpy(native).shape != (3,):
        raise AssertionError("random_normal made no native (3,) array, or to_numpy lost its shape")


def check_jacobian(problem: ConformanceProblem) -> None:
    """Jacobian and transposed Jacobian against central differences; one the other's adjoint."""
    from curvlinops import JacobianLinearOperator, TransposedJacobianLinearOperator

    tol = _float64_tolerance(problem)

    ref = _references(problem)
    expected = np.concatenate(ref.J, axis=0)
    J = _operator(JacobianLinearOperator, problem)
    _assert_close(_dense(J), expected, tol, "J @ I")
    JT = _operator(TransposedJacobianLinearOperator, problem)
    _assert_close(_dense(JT), expected.T, tol, "Jᵀ @ I")
    u = np.random.default_rng(1).standard_normal(J.shape[0])
    _assert_close(J.rmatvec(u), expected.T @ u, tol, "J.rmatvec(u) (the adjoint)")


def check_gradient(problem: ConformanceProblem) -> None:
    """``gradient_and_loss`` against the Jacobian and the loss's closed form."""
    from curvlinops import GGNLinearOperator

    tol = _float64_tolerance(problem)

    ref = _references(problem)
    G = _operator(GGNLinearOperator, problem)
    gradient, _ = G.gradient_and_loss()
    leaves, _ = G.backend.tree_flatten(gradient)
    flat = np.concatenate([G.backend.to_numpy(leaf).reshape(-1) for leaf in leaves])
    _assert_close(flat, ref.gradient, tol, "gradient_and_loss")
    _assert_close(ref.backend_gradient(), ref.gradient, ref.tolerance(), "backend.vjp gradient")


def check_hessian(problem: ConformanceProblem) -> None:
    """Hessian against central differences of the gradient; symmetric."""
    from curvlinops import HessianLinearOperator

    tol = _float64_tolerance(problem)

    H = _dense(_operator(HessianLinearOperator, problem))
    _assert_close(H, _references(problem).hessian, tol, "H @ I")
    _assert_close(H, H.T, tol, "H symmetric")


def check_ggn(problem: ConformanceProblem) -> None:
    """GGN against ``Jᵀ ∇²ℓ J``; symmetric, positive semi-definite."""
    from curvlinops import GGNLinearOperator

    tol = _float64_tolerance(problem)

    G = _dense(_operator(GGNLinearOperator, problem))
    _assert_close(G, _references(problem).ggn, tol, "G @ I")
    _assert_close(G, G.T, tol, "G symmetric")
    if np.linalg.eigvalsh(G).min() < -tol * np.abs(G).max():
        raise AssertionError("the GGN has a negative eigenvalue")


def check_empirical_fisher(problem: ConformanceProblem) -> None:
    """Empirical Fisher against the per-example gradients' second moment."""
    from curvlinops import EFLinearOperator

    tol = _float64_tolerance(problem)

    ref = _references(problem)
    F = _dense(_operator(EFLinearOperator, problem))
    _assert_close(F, ref.gradient_moment(ref.targets), tol, "EF @ I")


def check_mc_fisher(problem: ConformanceProblem) -> None:
    """Monte-Carlo Fisher against the gradients at the targets it drew; seeded, reproducible."""
    from curvlinops import FisherMCLinearOperator

    tol = _float64_tolerance(problem)

    ref = _references(problem)
    F = _operator(FisherMCLinearOperator, problem, mc_samples=3, seed=5)
    draws = [F.backend.to_numpy(t).astype(np.float64) for t in F.sampled_targets()]
    expected = np.mean(
        [ref.gradient_moment([d[s] for d in draws]) for s in range(F.mc_samples)], axis=0
    )
    dense = _dense(F)
    _assert_close(dense, expected, tol, "MC Fisher @ I")
    again = _dense(_operator(FisherMCLinearOperator, problem, mc_samples=3, seed=5))
    _assert_close(again, dense, tol, "MC Fisher, same seed")


def check_batched_columns(problem: ConformanceProblem) -> None:
    """``A @ V`` (several column blocks) equals ``A @ v`` column by column, for H, G and J."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator, JacobianLinearOperator

    tol = _float64_tolerance(problem)

    for cls in (HessianLinearOperator, GGNLinearOperator, JacobianLinearOperator):
        A = _operator(cls, problem, columns_per_pass=2)
        V = np.random.default_rng(2).standard_normal((A.shape[1], 4))  # two column blocks
        columns = np.stack([A @ V[:, k] for k in range(4)], axis=1)
        _assert_close(A @ V, columns, tol, f"{cls.__name__} @ V vs column by column")


def check_formats(problem: ConformanceProblem) -> None:
    """Numpy arrays in and out; native in and out (same device); parameter structures too."""
    from curvlinops import GGNLinearOperator

    tol = _float64_tolerance(problem)

    G = _operator(GGNLinearOperator, problem)
    b = G.backend
    v = np.random.default_rng(3).standard_normal(G.shape[1])
    expected = G @ v
    if not isinstance(expected, np.ndarray) or expected.dtype != np.float64:
        raise AssertionError(f"numpy in: expected a float64 numpy array out, got {type(expected)}")
    native = b.import_array(v, "v")[0]
    out = G @ native
    if not b.owns(out):
        raise AssertionError(f"native in: expected a native array out, got {type(out).__name__}")
    _assert_close(b.to_numpy(out), expected, tol, "native product")
    tree = b.unflatten(native)
    out_tree = G @ tree
    leaves, _ = b.tree_flatten(out_tree)
    flat = np.concatenate([b.to_numpy(leaf).reshape(-1) for leaf in leaves])
    _assert_close(flat, expected, tol, "product with a parameter structure")
    _assert_close(G @ v[:, None], expected[:, None], tol, "a (P, 1) matrix")
    if G.device != b.device:
        raise AssertionError(f"operator device {G.device} differs from the backend's {b.device}")


def check_float32(problem: ConformanceProblem) -> None:
    """Float32 parameters: float32 operators and results, accurate to float32's rounding."""
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    if "float32" not in problem.dtypes:
        return
    ref = _references(problem)
    for cls, expected in ((HessianLinearOperator, ref.hessian), (GGNLinearOperator, ref.ggn)):
        A = _operator(cls, problem, "float32")
        if A.dtype != np.float32:
            raise AssertionError(f"{cls.__name__}: dtype {A.dtype} for float32 parameters")
        out = A @ np.eye(A.shape[1], dtype=np.float32)
        if out.dtype != np.float32:
            raise AssertionError(f"{cls.__name__}: float32 in gave {out.dtype} out")
        _assert_close(out, expected, _tolerance(np.float32), f"float32 {cls.__name__} @ I")
        wide = A @ np.eye(A.shape[1])  # float64 in: float64 out (the wider dtype)
        if wide.dtype != np.float64:
            raise AssertionError(f"{cls.__name__}: float64 in gave {wide.dtype} out")


def check_scipy_solvers(problem: ConformanceProblem) -> None:
    """The operators go into scipy's ``eigsh`` and ``cg`` as they are."""
    from scipy.sparse.linalg import cg, eigsh

    tol = _float64_tolerance(problem)

    from curvlinops import GGNLinearOperator

    G = _operator(GGNLinearOperator, problem)
    dense = _dense(G)
    expected = np.linalg.eigvalsh(dense)[-2:]
    values = np.sort(eigsh(G, k=2, which="LA", v0=np.ones(G.shape[0]))[0])
    _assert_close(values, expected, tol, "scipy eigsh")
    damping = 0.1 * expected[-1]
    rhs = np.random.default_rng(4).standard_normal(G.shape[0])
    x, info = cg(G + damping * _identity(G), rhs, rtol=1e-10, maxiter=10 * G.shape[0])
    if info != 0:
        raise AssertionError(f"scipy cg did not converge (info={info})")
    _assert_close(x, np.linalg.solve(dense + damping * np.eye(G.shape[0]), rhs), 1e-6, "scipy cg")


def check_krylov(problem: ConformanceProblem) -> None:
    """The library's own eigsh, CG inverse and trace estimator on the operators."""
    from curvlinops import CGInverseLinearOperator, GGNLinearOperator, eigsh, hutchpp_trace

    tol = _float64_tolerance(problem)

    G = _operator(GGNLinearOperator, problem)
    dense = _dense(G)
    values = np.sort(np.asarray(eigsh(G, k=2, which="LA", return_eigenvectors=False)))
    _assert_close(values, np.linalg.eigvalsh(dense)[-2:], tol, "curvlinops.eigsh")
    damping = 0.1 * float(values[-1])
    inverse = CGInverseLinearOperator(G, damping=damping, tol=1e-10, on_failure="raise")
    rhs = np.random.default_rng(5).standard_normal(G.shape[0])
    solution = np.linalg.solve(dense + damping * np.eye(G.shape[0]), rhs)
    _assert_close(inverse @ rhs, solution, 1e-6, "CGInverseLinearOperator")
    # with a sketch of P probes, Hutch++ captures the whole range: the exact trace
    trace = float(hutchpp_trace(G, num_matvecs=3 * G.shape[0], seed=0))
    _assert_close(np.array(trace), np.array(np.trace(dense)), tol, "hutchpp_trace")


def check_errors(problem: ConformanceProblem) -> None:
    """Bad input raises errors that name the argument, expected and received."""
    from curvlinops import HessianLinearOperator

    H = _operator(HessianLinearOperator, problem, check_deterministic=True)  # passes it
    expectations = [
        (lambda: H @ np.ones(H.shape[1] + 1), ValueError, "x: expected"),
        (lambda: H @ "a string", TypeError, "x: expected"),
        (lambda: _operator(HessianLinearOperator, problem, columns_per_pass=0), ValueError,
         "columns_per_pass: expected a positive int"),
        (lambda: HessianLinearOperator(*_build(problem)[:3], iter([])), TypeError,
         "data: expected"),
    ]  # fmt: skip
    for call, kind, text in expectations:
        try:
            call()
        except kind as error:
            if text not in str(error):
                raise AssertionError(f"message {str(error)!r} lacks {text!r}") from error
        else:
            raise AssertionError(f"no {kind.__name__} ({text!r})")


def check_import_is_lazy(problem: ConformanceProblem) -> None:
    """``import curvlinops`` (and looking up the registry) imports none of the backend's modules."""
    from curvlinops.backends import registered

    modules = registered()[problem.backend].modules
    code = (
        "import sys, curvlinops, curvlinops.backends as b; b.registered(); "
        f"print(sorted(m for m in {modules!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if out.stdout.strip() != "[]":
        raise AssertionError(f"import curvlinops imported {out.stdout.strip()}")


def _identity(like: Any) -> Any:
    from curvlinops import IdentityLinearOperator

    return IdentityLinearOperator(like)


CHECKS: dict[str, Callable[[ConformanceProblem], None]] = {
    check.__name__.removeprefix("check_"): check
    for check in (
        check_registration,
        check_jacobian,
        check_gradient,
        check_hessian,
        check_ggn,
        check_empirical_fisher,
        check_mc_fisher,
        check_batched_columns,
        check_formats,
        check_float32,
        check_scipy_solvers,
        check_krylov,
        check_errors,
        check_import_is_lazy,
    )
}
"""Every check of the kit by name (for ``pytest.mark.parametrize``)."""


def run_conformance(problem: ConformanceProblem, only: tuple[str, ...] | None = None) -> None:
    """Run the checks (all, or those named in ``only``) and raise one error listing the failures.

    Raises:
        AssertionError: Some checks failed; each is named with its message.
    """
    failures = []
    for name in only or tuple(CHECKS):
        try:
            CHECKS[name](problem)
        except Exception as error:  # every failure is reported, not just the first
            failures.append(f"{name}: {type(error).__name__}: {error}")
    if failures:
        raise AssertionError(
            f"backend {problem.backend!r} failed {len(failures)} checks:\n" + "\n".join(failures)
        )
