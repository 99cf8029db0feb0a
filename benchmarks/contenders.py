"""The contenders: the same operations, written by each way a user could get them.

* ``ours-torch``: this library, PyTorch backend.
* ``ours-jax``: this library, JAX backend.
* ``raw-torch``: hand-written ``torch.func`` code (the floor to beat for PyTorch).
* ``raw-jax``: hand-written, jit-compiled JAX code (the floor to beat for JAX).
* ``cfp``: curvlinops-for-pytorch 3.0.1, when installed (see :func:`load_cfp`).

Every contender is set up on one :class:`~benchmarks.problems.Problem` and
returns a :class:`Setup`: products on native arrays (flat vectors in the
problem's parameter order), the operator scipy's ``eigsh`` gets, the damped
GGN that ``cg`` gets, and a Hutchinson trace estimate. The hand-written code
does what a careful user would: the same mathematics as this library (PyTorch
Hessian products reverse-over-reverse, JAX forward-over-reverse; GGN as JVP,
closed-form cross-entropy Hessian, VJP), one linearisation per product shared
by the columns of a ``vmap``, JAX functions jit-compiled with parameters and
data as arguments.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from benchmarks.problems import Problem

__all__ = [
    "CFP_VERSION",
    "CONTENDERS",
    "Setup",
    "cfp_status",
    "load_cfp",
    "make_setup",
]

CFP_VERSION = "3.0.1"
TRACE_BLOCK = 32
"""Probes per ``matmat`` call in the Hutchinson trace (the library's default block)."""
MATMAT_TRACE = "Rademacher probes through matmat"
KFAC_DAMPING = 1e-2
"""Damping of the KFAC and EKFAC inverses (both factors, or the eigenvalues)."""
KFAC_FACTOR_OPS = {"kfac_mc": "mc", "kfac_ef": "empirical", "kfac_type2": "type-2"}
EKFAC_FISHER = "empirical"
"""EKFAC's output gradients: deterministic, and the correction of type-2 or MC would form
per-example gradients for each of the C columns (C = 512 on the transformer)."""

CONTENDERS: dict[str, tuple[str, str]] = {
    "ours-torch": ("curvlinops (torch backend)", "torch"),
    "ours-jax": ("curvlinops (JAX backend)", "jax"),
    "raw-torch": ("torch.func by hand", "torch"),
    "raw-jax": ("JAX by hand (jit)", "jax"),
    "cfp": (f"curvlinops-for-pytorch {CFP_VERSION}", "torch"),
}


@dataclass
class Setup:
    """One contender on one problem.

    Attributes:
        key: Contender key (see :data:`CONTENDERS`).
        framework: ``"torch"`` or ``"jax"``.
        native: numpy array -> the contender's array on its device.
        to_numpy: Back to numpy.
        sync: Wait until an array is computed (JAX dispatch, CUDA streams).
        products: ``"grad"`` () -> flat gradient; ``"hvp"``, ``"ggnvp"``, ``"jvp"`` (v);
            ``"vjp"`` (u); ``"matmat16"`` (V of 16 columns).
        hessian_scipy: What ``scipy.sparse.linalg.eigsh`` gets.
        damped_ggn_scipy: ``λ -> G + λ I`` as ``scipy.sparse.linalg.cg`` gets it.
        trace: ``(num_probes, seed, block) -> (estimate, stderr)``, ``block`` probes per
            ``matmat`` call.
            KFAC (this library and curvlinops-for-pytorch, see :func:`_kfac_products`):
            ``"kfac_mc"``, ``"kfac_ef"``, ``"kfac_type2"`` () -> the Kronecker factors;
            ``"ekfac"`` () -> per-block sums of the corrected eigenvalues; ``"kfac_mv"``,
            ``"ekfac_mv"``, ``"kfac_inv"``, ``"ekfac_inv"`` (v of the KFAC parameters).
        trace_method: How the trace is computed (for the report).
        setup_seconds: Time to build the operators (not in the op timings).
    """

    key: str
    framework: str
    native: Callable[[np.ndarray], Any]
    to_numpy: Callable[[Any], np.ndarray]
    sync: Callable[[Any], Any]
    products: dict[str, Callable[..., Any]]
    hessian_scipy: Any
    damped_ggn_scipy: Callable[[float], Any]
    trace: Callable[[int, int, int], tuple[float, float]]
    trace_method: str
    setup_seconds: float = 0.0
    notes: dict = field(default_factory=dict)
    prepare: dict[str, Callable[[], Any]] = field(default_factory=dict)
    """Per operation, untimed work before its first call (KFAC products: the factors)."""
    fresh: dict[str, Callable[[], Any]] = field(default_factory=dict)
    """Per operation, the call on a newly built operator of the same configuration."""


def make_setup(key: str, problem: Problem, device: str = "cpu") -> Setup:
    """Set contender ``key`` up on ``problem`` (raises if it is not available)."""
    builders = {
        "ours-torch": _ours_torch,
        "ours-jax": _ours_jax,
        "raw-torch": _raw_torch,
        "raw-jax": _raw_jax,
        "cfp": _cfp,
    }
    start = time.perf_counter()
    setup = builders[key](problem, device)
    setup.setup_seconds = time.perf_counter() - start
    return setup


# --- shared pieces ------------------------------------------------------------------------
def _torch_io(device: str, dtype: str) -> tuple[Callable, Callable, Callable]:
    import torch

    torch_dtype = getattr(torch, dtype)

    def native(a: np.ndarray) -> Any:
        return torch.as_tensor(np.asarray(a, dtype=dtype), dtype=torch_dtype, device=device)

    def to_numpy(t: Any) -> np.ndarray:
        return t.detach().cpu().numpy()

    def sync(t: Any) -> Any:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return t

    return native, to_numpy, sync


def _jax_io(device: Any, dtype: str) -> tuple[Callable, Callable, Callable]:
    import jax
    import jax.numpy as jnp

    def native(a: np.ndarray) -> Any:
        return jax.device_put(jnp.asarray(np.asarray(a, dtype=dtype)), device)

    return native, np.asarray, jax.block_until_ready


def _stats(samples: np.ndarray) -> tuple[float, float]:
    """Mean of the per-probe terms and its standard error."""
    samples = np.asarray(samples, dtype=np.float64)
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(samples.size))


class _HostOperator(ScipyLinearOperator):
    """A hand-written scipy operator: numpy in, a framework product, numpy out."""

    def __init__(self, shape: tuple[int, int], dtype: str, native: Callable, to_numpy: Callable,
                 matmat: Callable, shift: float = 0.0) -> None:  # fmt: skip
        super().__init__(np.dtype(dtype), shape)
        self._native, self._to_numpy, self._product, self._shift = native, to_numpy, matmat, shift

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        V = self._native(X)
        Y = self._product(V)
        if self._shift:
            Y = Y + self._shift * V
        return self._to_numpy(Y)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, -1))  # the products take vectors as they are

    def _adjoint(self) -> _HostOperator:
        return self


def _columns(vmap: Callable, column: Callable, V: Any) -> Any:
    """``column`` of a vector ``V`` (no ``vmap`` wrappers), or mapped over the columns of ``V``."""
    if V.ndim == 1:
        return column(V)
    return vmap(column, 1, 1)(V)


def _jax_columns(column: Callable, V: Any) -> Any:
    """``column`` mapped over the columns of ``V`` inside ``jit``; a vector as one column.

    XLA compiles the one-column ``vmap`` of this take-along-axis loss's HVP to a
    faster program than the plain vector function (7.3 against 13 ms, MLP).
    """
    import jax

    if V.ndim == 1:
        return jax.vmap(column, 1, 1)(V[:, None])[:, 0]
    return jax.vmap(column, 1, 1)(V)


def _scipy_identity(n: int, dtype: Any) -> ScipyLinearOperator:
    return ScipyLinearOperator((n, n), matvec=lambda x: x, matmat=lambda X: X, dtype=dtype)


# --- this library ---------------------------------------------------------------------------
def _library_trace() -> tuple[Callable | None, str]:
    try:
        from curvlinops.estimators import hutchinson_trace
    except ImportError:
        return None, MATMAT_TRACE
    return hutchinson_trace, "curvlinops.estimators.hutchinson_trace (Rademacher)"


def _library_gradient() -> Callable | None:
    try:
        from curvlinops.gradient import gradient_and_loss
    except ImportError:
        return None
    return gradient_and_loss


def _ours(problem: Problem, fp: Any, key: str, native: Callable, to_numpy: Callable,
          sync: Callable, random_block: Callable) -> Setup:  # fmt: skip
    import curvlinops as cl

    args = (fp.model_func, fp.loss_func, fp.params, fp.data)
    options = {"check_deterministic": False}
    H = cl.HessianLinearOperator(*args, **options)
    G = cl.GGNLinearOperator(*args, **options)
    J = cl.JacobianLinearOperator(fp.model_func, fp.params, fp.data, **options)
    JT = cl.TransposedJacobianLinearOperator(fp.model_func, fp.params, fp.data, **options)
    products: dict[str, Callable] = {
        "hvp": lambda v: H @ v,
        "ggnvp": lambda v: G @ v,
        "jvp": lambda v: J @ v,
        "vjp": lambda u: JT @ u,
        "matmat16": lambda V: H @ V,
    }
    gradient_and_loss = _library_gradient()
    if gradient_and_loss is not None:
        products["grad"] = lambda: gradient_and_loss(*args, flat=True)[0]
    estimator, method = _library_trace()
    if estimator is not None:

        def trace(num: int, seed: int, block: int) -> tuple[float, float]:
            value, stderr = estimator(H, num, seed=seed, block_size=block, return_stderr=True)
            return float(value), float(stderr)
    else:
        trace = _matmat_trace(lambda V: H @ V, random_block, to_numpy, H.shape[0])
    setup = Setup(
        key, fp.framework, native, to_numpy, sync, products, H,
        lambda lam: G + lam * cl.IdentityLinearOperator(G), trace, method,
    )  # fmt: skip
    _add_kfac(setup, cl, _kfac_args(problem, fp), problem)
    return setup


def _matmat_trace(matmat: Callable, random_block: Callable, to_numpy: Callable,
                  n: int) -> Callable:  # fmt: skip
    """Hutchinson's estimate with natively drawn Rademacher probes, ``block`` at a time."""

    def trace(num: int, seed: int, block: int) -> tuple[float, float]:
        terms = []
        for index, start in enumerate(range(0, num, block)):
            V = random_block(n, min(block, num - start), seed * 1000 + index)
            terms.append(to_numpy((V * matmat(V)).sum(0)))
        return _stats(np.concatenate(terms))

    return trace


def _torch_rademacher(device: str, dtype: str) -> Callable:
    import torch

    def block(n: int, k: int, seed: int) -> Any:
        gen = torch.Generator(device=device).manual_seed(seed)
        bits = torch.randint(0, 2, (n, k), generator=gen, device=device)
        return (2 * bits - 1).to(getattr(torch, dtype))

    return block


def _jax_rademacher(dtype: str) -> Callable:
    import jax

    def block(n: int, k: int, seed: int) -> Any:
        return jax.random.rademacher(jax.random.key(seed), (n, k), dtype=dtype)

    return block


def _ours_torch(problem: Problem, device: str) -> Setup:
    fp = problem.torch(device)
    io = _torch_io(device, problem.dtype)
    return _ours(problem, fp, "ours-torch", *io, _torch_rademacher(device, problem.dtype))


def _ours_jax(problem: Problem, device: str) -> Setup:
    fp = problem.jax(device)
    io = _jax_io(fp.device, problem.dtype)
    return _ours(problem, fp, "ours-jax", *io, _jax_rademacher(problem.dtype))


# --- hand-written PyTorch ---------------------------------------------------------------------
def _raw_torch(problem: Problem, device: str) -> Setup:
    import torch
    from torch.func import grad, grad_and_value, jvp, vjp, vmap
    from torch.nn import functional as F

    fp = problem.torch(device)
    native, to_numpy, sync = _torch_io(device, problem.dtype)
    params = tuple(p.detach() for p in fp.params)
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    X, y = fp.data[0]

    def unflatten(v: Any) -> tuple:
        return tuple(t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))

    def flatten(ts: Any) -> Any:
        return torch.cat([t.reshape(-1) for t in ts])

    def outputs(ps: tuple) -> Any:
        return fp.forward(ps, X)

    def loss(ps: tuple) -> Any:
        return F.cross_entropy(outputs(ps), y)

    def gradient() -> Any:
        g, _ = grad_and_value(loss)(params)
        return flatten(g)

    def hvp_matmat(V: Any) -> Any:
        _, pullback = vjp(grad(loss), params)  # reverse-over-reverse, linearised once
        return _columns(vmap, lambda v: flatten(pullback(unflatten(v))[0]), V)

    def ggn_matmat(V: Any) -> Any:
        z, pullback = vjp(outputs, params)
        probs = torch.softmax(z, dim=-1)

        def column(v: Any) -> Any:
            _, Jv = jvp(outputs, (params,), (unflatten(v),))
            HJv = (probs * Jv - probs * (probs * Jv).sum(-1, keepdim=True)) / z.shape[0]
            return flatten(pullback(HJv)[0])

        return _columns(vmap, column, V)

    def jvp_vec(v: Any) -> Any:
        return jvp(outputs, (params,), (unflatten(v),))[1].reshape(-1)

    def vjp_vec(u: Any) -> Any:
        z, pullback = vjp(outputs, params)
        return flatten(pullback(u.reshape(z.shape))[0])

    products = {
        "grad": gradient,
        "hvp": hvp_matmat,
        "ggnvp": ggn_matmat,
        "jvp": jvp_vec,
        "vjp": vjp_vec,
        "matmat16": hvp_matmat,
    }
    n, dtype = problem.num_params, problem.dtype
    H = _HostOperator((n, n), dtype, native, to_numpy, hvp_matmat)
    return Setup(
        "raw-torch", "torch", native, to_numpy, sync, products, H,
        lambda lam: _HostOperator((n, n), dtype, native, to_numpy, ggn_matmat, lam),
        _matmat_trace(hvp_matmat, _torch_rademacher(device, dtype), to_numpy, n),
        MATMAT_TRACE,
    )  # fmt: skip


# --- hand-written JAX ----------------------------------------------------------------------------
def _raw_jax(problem: Problem, device: str) -> Setup:
    import jax
    import jax.numpy as jnp

    fp = problem.jax(device)
    native, to_numpy, sync = _jax_io(fp.device, problem.dtype)
    params, (X, y) = fp.params, fp.data[0]
    shapes = [tuple(p.shape) for p in params]
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0, *sizes])
    forward = problem.jax_forward

    def unflatten(v: Any) -> list:
        return [jnp.reshape(v[a:b], s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes)]

    def flatten(ts: Any) -> Any:
        return jnp.concatenate([jnp.ravel(t) for t in ts])

    def loss(ps: list, X: Any, y: Any) -> Any:
        log_probs = jax.nn.log_softmax(forward(ps, X), axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=-1))

    @jax.jit
    def gradient(ps: list, X: Any, y: Any) -> Any:
        value, g = jax.value_and_grad(loss)(ps, X, y)
        return value, flatten(g)

    @jax.jit
    def hvp_matmat(ps: list, X: Any, y: Any, V: Any) -> Any:
        grad_fn = jax.grad(lambda p: loss(p, X, y))  # forward-over-reverse

        def column(v: Any) -> Any:
            return flatten(jax.jvp(grad_fn, (ps,), (unflatten(v),))[1])

        return _jax_columns(column, V)

    @jax.jit
    def ggn_matmat(ps: list, X: Any, y: Any, V: Any) -> Any:
        def f(p: list) -> Any:
            return forward(p, X)

        z, pullback = jax.vjp(f, ps)
        probs = jax.nn.softmax(z, axis=-1)

        def column(v: Any) -> Any:
            _, Jv = jax.jvp(f, (ps,), (unflatten(v),))
            HJv = (probs * Jv - probs * jnp.sum(probs * Jv, -1, keepdims=True)) / z.shape[0]
            return flatten(pullback(HJv)[0])

        return _jax_columns(column, V)

    @jax.jit
    def jvp_vec(ps: list, X: Any, v: Any) -> Any:
        return jnp.ravel(jax.jvp(lambda p: forward(p, X), (ps,), (unflatten(v),))[1])

    @jax.jit
    def vjp_vec(ps: list, X: Any, u: Any) -> Any:
        z, pullback = jax.vjp(lambda p: forward(p, X), ps)
        return flatten(pullback(jnp.reshape(u, z.shape))[0])

    def H_mm(V: Any) -> Any:
        return hvp_matmat(params, X, y, V)

    def G_mm(V: Any) -> Any:
        return ggn_matmat(params, X, y, V)

    products = {
        "grad": lambda: gradient(params, X, y)[1],
        "hvp": H_mm,
        "ggnvp": G_mm,
        "jvp": lambda v: jvp_vec(params, X, v),
        "vjp": lambda u: vjp_vec(params, X, u),
        "matmat16": H_mm,
    }
    n, dtype = problem.num_params, problem.dtype
    return Setup(
        "raw-jax", "jax", native, to_numpy, sync, products,
        _HostOperator((n, n), dtype, native, to_numpy, H_mm),
        lambda lam: _HostOperator((n, n), dtype, native, to_numpy, G_mm, lam),
        _matmat_trace(H_mm, _jax_rademacher(dtype), to_numpy, n),
        MATMAT_TRACE,
    )  # fmt: skip


# --- curvlinops-for-pytorch -----------------------------------------------------------------------
def cfp_path() -> Path:
    """Where curvlinops-for-pytorch is installed (``pip install --target``).

    ``$CURVLINOPS_FOR_PYTORCH_PATH``, else ``.venv/curvlinops-for-pytorch`` at the
    repository root. Its top-level package is also called ``curvlinops``, so it
    cannot live in the same site-packages as this library.
    """
    env = os.environ.get("CURVLINOPS_FOR_PYTORCH_PATH")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / ".venv" / "curvlinops-for-pytorch"


_CFP_MODULE: Any = None


def load_cfp() -> Any:
    """Import curvlinops-for-pytorch next to this library, under no global name.

    Both distributions have the top-level package ``curvlinops``. This imports
    the other one from :func:`cfp_path` with this library's modules set aside,
    then moves its modules out of ``sys.modules`` and puts ours back. Its
    modules import each other at module level only, so the loaded objects keep
    working.

    Raises:
        ImportError: When it is not installed there, or is not version 3.0.1.
    """
    global _CFP_MODULE
    if _CFP_MODULE is not None:
        return _CFP_MODULE
    path = cfp_path()
    if not (path / "curvlinops" / "__init__.py").exists():
        raise ImportError(f"curvlinops-for-pytorch is not installed in {path}")
    versions = sorted(path.glob("curvlinops_for_pytorch-*.dist-info"))
    if not versions or not versions[0].name.startswith(f"curvlinops_for_pytorch-{CFP_VERSION}"):
        raise ImportError(f"curvlinops-for-pytorch {CFP_VERSION} expected in {path}")

    def is_ours(name: str) -> bool:
        return name == "curvlinops" or name.startswith("curvlinops.")

    ours = {k: sys.modules.pop(k) for k in [k for k in sys.modules if is_ours(k)]}
    sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("curvlinops")
    finally:
        sys.path.remove(str(path))
        for k in [k for k in sys.modules if is_ours(k)]:
            del sys.modules[k]
        sys.modules.update(ours)
    _CFP_MODULE = module
    return module


def cfp_status() -> tuple[bool, str]:
    """Whether curvlinops-for-pytorch can be used, and why not."""
    try:
        load_cfp()
    except ImportError as error:
        return False, str(error)
    return True, f"loaded from {cfp_path()}"


def _cfp(problem: Problem, device: str) -> Setup:
    cfp = load_cfp()
    fp = problem.torch(device)
    native, to_numpy, sync = _torch_io(device, problem.dtype)
    args = (fp.model_func, fp.loss_func, fp.params, fp.data)
    H = cfp.HessianLinearOperator(*args, check_deterministic=False)
    G = cfp.GGNLinearOperator(*args, check_deterministic=False)
    J = cfp.JacobianLinearOperator(fp.model_func, fp.params, fp.data, check_deterministic=False)
    JT = J.adjoint()

    def gradient() -> Any:
        g, _ = H.gradient_and_loss()
        return _torch_flatten(g)

    products = {
        "grad": gradient,
        "hvp": lambda v: H @ v,
        "ggnvp": lambda v: G @ v,
        "jvp": lambda v: J @ v,
        "vjp": lambda u: JT @ u,
        "matmat16": lambda V: H @ V,
    }
    notes = {}
    if problem.y.shape[0] != problem.X.shape[0]:
        # its Jacobian takes the outputs' leading axis to be the batch (B*T rows here)
        del products["jvp"], products["vjp"]
        notes["unsupported"] = "J@v, Jᵀ@u: outputs whose leading axis is not the batch"
    n = problem.num_params

    def damped(lam: float) -> Any:
        # what its documentation does: export to scipy (float64 by default), add λ I there
        return G.to_scipy() + lam * _scipy_identity(n, np.float64)

    setup = Setup(
        "cfp", "torch", native, to_numpy, sync, products, H.to_scipy(), damped,
        _matmat_trace(lambda V: H @ V, _torch_rademacher(device, problem.dtype), to_numpy, n),
        MATMAT_TRACE, notes=notes,
    )  # fmt: skip
    _add_kfac(setup, cfp, _kfac_args(problem, fp), problem)
    return setup


def _torch_flatten(ts: Any) -> Any:
    import torch

    return torch.cat([t.reshape(-1) for t in ts])


# --- KFAC and EKFAC (this library and curvlinops-for-pytorch: the same API) -----------------------
def _kfac_args(problem: Problem, fp: Any) -> tuple:
    """``(model_func, loss_func, params, data)`` restricted to the KFAC-supported parameters.

    PyTorch: the model as it is, the parameters of its Linear/Conv2d layers. JAX: a function
    of those parameters that closes over the others (a plain function, as a JAX user writes
    it; the operator finds its dense layers by tracing).
    """
    keep = problem.kfac_positions
    params = [fp.params[i] for i in keep]
    if fp.framework == "torch" or len(keep) == len(fp.params):
        return fp.model_func, fp.loss_func, params, fp.data
    fixed, forward = list(fp.params), fp.forward

    def model(sub: list, X: Any) -> Any:
        full = list(fixed)
        for i, p in zip(keep, sub):
            full[i] = p
        return forward(full, X)

    return model, fp.loss_func, params, fp.data


def _factor_list(K: Any) -> list:
    """Input and gradient covariances, layer by layer in parameter order (A before G)."""
    names = sorted(K._mapping, key=lambda name: min(K._mapping[name].values()))
    out = [K._input_covariances[n] for n in names if n in K._input_covariances]
    return out + [K._gradient_covariances[n] for n in names]


def _eigenvalue_sums(E: Any) -> list:
    """Per block, the sum of EKFAC's corrected eigenvalues (the block's trace).

    The eigenvalues themselves depend on the basis chosen within (nearly) repeated
    eigenvalues of the factors, which float32 ``eigh`` does not fix; their sums do not.
    """
    names = sorted(E._mapping, key=lambda name: min(E._mapping[name].values()))
    sums = []
    for name in names:
        entry = E._corrected_eigenvalues[name]
        for values in entry.values() if isinstance(entry, dict) else [entry]:
            sums.append(values.sum())
    return sums


def _add_kfac(setup: Setup, lib: Any, args: tuple, problem: Problem) -> None:
    """KFAC/EKFAC factor computations, products and inverse products on ``setup``.

    A set-up that fails (e.g. a layer the operator does not find) fails these operations
    only: each of them raises the error when called.
    """
    try:
        _kfac_operations(setup, lib, args, problem)
    except Exception as error:  # noqa: BLE001 - reported by each KFAC operation

        def fail(*_: Any, error: Exception = error) -> Any:
            raise error

        for op in (*KFAC_FACTOR_OPS, "ekfac", "kfac_mv", "ekfac_mv", "kfac_inv", "ekfac_inv"):
            setup.products[op] = fail


def _kfac_operations(setup: Setup, lib: Any, args: tuple, problem: Problem) -> None:
    options = {"check_deterministic": False}

    def kfac(fisher: str) -> Any:
        return lib.KFACLinearOperator(*args, fisher_type=fisher, **options)

    def factors(K: Any) -> Callable[[], list]:
        def compute() -> list:
            # curvlinops-for-pytorch adds to factors it holds: start from none, as a new
            # operator does (ours replaces them; clearing costs nothing)
            K._input_covariances.clear()
            K._gradient_covariances.clear()
            K.compute_kronecker_factors()
            return _factor_list(K)

        return compute

    def ekfac_factors(E: Any) -> Callable[[], list]:
        def compute() -> list:
            factors(E)()
            # curvlinops-for-pytorch keeps eigenvectors and adds to corrected eigenvalues
            for name in ("_input_covariances_eigenvectors", "_gradient_covariances_eigenvectors",
                         "_corrected_eigenvalues"):  # fmt: skip
                getattr(E, name).clear()
            E.compute_eigenvalue_correction()
            return _eigenvalue_sums(E)

        return compute

    for op, fisher in KFAC_FACTOR_OPS.items():
        setup.products[op] = factors(kfac(fisher))
        setup.fresh[op] = lambda fisher=fisher: factors(kfac(fisher))()
    E = lib.EKFACLinearOperator(*args, fisher_type=EKFAC_FISHER, **options)
    setup.products["ekfac"] = ekfac_factors(E)
    setup.fresh["ekfac"] = lambda: ekfac_factors(
        lib.EKFACLinearOperator(*args, fisher_type=EKFAC_FISHER, **options)
    )()
    # products with the empirical factors (deterministic: every contender has the same)
    K, E2 = kfac(EKFAC_FISHER), lib.EKFACLinearOperator(*args, fisher_type=EKFAC_FISHER, **options)
    K_inv = lib.KFACInverseLinearOperator(K, damping=KFAC_DAMPING)
    E_inv = lib.KFACInverseLinearOperator(E2, damping=KFAC_DAMPING, use_exact_damping=True)
    setup.products.update({
        "kfac_mv": lambda v: K @ v,
        "ekfac_mv": lambda v: E2 @ v,
        "kfac_inv": lambda v: K_inv @ v,
        "ekfac_inv": lambda v: E_inv @ v,
    })  # fmt: skip
    prepare_K, prepare_E = _once(factors(K)), _once(ekfac_factors(E2))
    setup.prepare.update({"kfac_mv": prepare_K, "kfac_inv": prepare_K,
                          "ekfac_mv": prepare_E, "ekfac_inv": prepare_E})  # fmt: skip
    if problem.kfac_note:
        setup.notes["kfac"] = problem.kfac_note


def _once(call: Callable[[], Any]) -> Callable[[], None]:
    """``call`` on the first call only."""
    done: list = []

    def run() -> None:
        if not done:
            call()
            done.append(True)

    return run
