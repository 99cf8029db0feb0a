r"""Curvature along a direction, and directions from transformations of the parameters.

The Rayleigh quotient :math:`v^\top A v / v^\top v` measures how fast the loss
curves up or down along :math:`v`. Directions of interest often come from a
one-parameter family of transformations :math:`T_t` of the parameters (all
weights scaled by :math:`\gamma`; a rotation of a latent space by
:math:`\theta`): its tangent at the identity,
:math:`v = \tfrac{d}{dt} T_t(w) \big|_{t = t_0}`, is one JVP. The lecture's
experiment on a regularised linear autoencoder is then::

    v_scale = transformation_tangent(lambda w, g: [g * W for W in w], params, at=1.0)
    v_rot = transformation_tangent(rotate, params, at=0.0)
    rayleigh_quotient(H, v_scale), rayleigh_quotient(H, v_rot)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

from curvlinops._checks import shape_error, type_error, value_error
from curvlinops.backends import make_backend
from curvlinops.backends._arrays import is_array

__all__ = ["rayleigh_quotient", "transformation_tangent"]


def rayleigh_quotient(A: Any, v: Any) -> Any:
    r"""The Rayleigh quotient of ``A`` along ``v`` (or along each column of ``V``).

    .. math:: \rho_A(v) = \frac{v^\top A v}{v^\top v} .

    Args:
        A: A square operator (this library's or scipy's) or a dense matrix.
        v: A vector ``(n,)``, a matrix ``(n, K)`` of ``K`` directions, or, for
            operators on the parameter space, a list/dict/pytree of
            parameter-shaped arrays (optionally with a trailing axis ``K``).

    Returns:
        A 0-d array (``K`` values for ``K`` directions) in the library of ``v``.

    Raises:
        ValueError: If ``A`` is not square or a direction is zero.

    Example:
        >>> import numpy as np
        >>> from curvlinops.directional import rayleigh_quotient
        >>> A = np.diag([1.0, 4.0])
        >>> float(rayleigh_quotient(A, np.array([1.0, 1.0])))
        2.5
    """
    shape = _square_shape(A)
    V, single = _as_columns(A, v, shape[0])
    xp = array_api_compat.array_namespace(V)
    AV = A @ V
    numerator = xp.sum(V * AV, axis=0)
    denominator = xp.sum(V * V, axis=0)
    if not bool(xp.all(denominator > 0)):
        raise value_error("v", "nonzero direction(s)", "a direction of norm zero")
    quotient = numerator / denominator
    return quotient[0] if single else quotient


def transformation_tangent(
    transform: Callable[[Any, Any], Any],
    params: Any,
    *,
    at: float = 0.0,
    flat: bool = False,
    backend: str | None = None,
) -> Any:
    r"""The tangent of a one-parameter transformation of the parameters, by one JVP.

    .. math:: v = \frac{d}{dt} T_t(w) \Big|_{t = t_0}, \qquad T_{t_0}(w) = w,

    where :math:`t_0` (``at``) is the identity of the family: ``1`` for a
    rescaling :math:`T_\gamma(W_1, W_2) = (\gamma W_1, \gamma W_2)`, ``0`` for
    a rotation :math:`T_\theta(W_1, W_2) = (Q_\theta W_1, W_2 Q_\theta^\top)`.

    Args:
        transform: ``(params, t) -> params`` written with the framework of
            ``params`` (``t`` is a 0-d array of their dtype); it returns the
            same structure and shapes as ``params``.
        params: The parameters :math:`w` (a list/dict of PyTorch tensors, or a
            JAX pytree), e.g. the optimum at which a Hessian is evaluated.
        at: The value :math:`t_0` at which :math:`T_t` is the identity.
        flat: Return one flat vector (in the order curvature operators use)
            instead of the structure of ``params``.
        backend: ``"torch"``, ``"jax"`` or ``None`` to read it off ``params``.

    Returns:
        The tangent, in the structure of ``params`` (or flat), as native arrays.

    Raises:
        ValueError: If ``transform(params, at)`` is not ``params``, or its
            output has another structure or other shapes.

    Example:
        >>> import torch
        >>> from curvlinops.directional import transformation_tangent
        >>> W1, W2 = torch.ones(2, 3), torch.full((3, 2), 2.0)
        >>> v = transformation_tangent(lambda w, g: [g * W for W in w], [W1, W2], at=1.0)
        >>> [tuple(t.shape) for t in v], bool(torch.equal(v[1], W2))
        ([(2, 3), (3, 2)], True)
    """
    if not callable(transform):
        raise type_error("transform", "a callable (params, t) -> params", transform)
    if isinstance(at, bool) or not isinstance(at, (int, float, np.floating, np.integer)):
        raise type_error("at", "a real number (where the transformation is the identity)", at)
    b = make_backend(transform, params, backend)
    _, rebuild = b.tree_flatten(params)
    structured = rebuild(list(b.tree_flatten(b.primals)[0]))
    t0 = b.zeros(()) + float(at)
    image, tangent = b.jvp(lambda t: transform(structured, t), (t0,), (b.zeros(()) + 1.0,))
    _check_like_params(b, image, "transform(params, t)")
    _check_identity(b, image, at)
    return _flat(b, tangent) if flat else tangent


# --- helpers ------------------------------------------------------------------------
def _square_shape(A: Any) -> tuple[int, int]:
    if not (isinstance(A, ScipyLinearOperator) or (is_array(A) and getattr(A, "ndim", 0) == 2)):
        raise type_error("A", "a linear operator or a 2-d array", A)
    shape = tuple(int(s) for s in A.shape)
    if shape[0] != shape[1]:
        raise shape_error("A", "a square operator (n, n)", shape)
    return shape


def _is_structure(v: Any) -> bool:
    return isinstance(v, (Mapping, list, tuple))


def _as_columns(A: Any, v: Any, n: int) -> tuple[Any, bool]:
    """``v`` as an ``(n, K)`` array in the library of ``v``, and whether it was one vector."""
    if _is_structure(v):
        return _structure_columns(A, v, n)
    if not is_array(v):
        raise type_error("v", "an array or a list/pytree of parameter-shaped arrays", v)
    if v.ndim not in (1, 2) or v.shape[0] != n:
        raise shape_error("v", f"a vector ({n},) or directions ({n}, K)", tuple(v.shape))
    return (v[:, None], True) if v.ndim == 1 else (v, False)


def _structure_columns(A: Any, v: Any, n: int) -> tuple[Any, bool]:
    backend = getattr(A, "backend", None)
    if backend is None or not getattr(A, "_params_in", False):
        raise type_error(
            "v",
            f"an array with {n} rows",
            v,
            "Parameter lists are taken only by operators on the parameter space.",
        )
    leaves, _ = backend.tree_flatten(v)
    shapes = list(backend.param_shapes)
    if len(leaves) != len(shapes) or not all(is_array(leaf) for leaf in leaves):
        raise value_error("v", f"{len(shapes)} parameter-shaped arrays", f"{len(leaves)} leaves")
    xp = array_api_compat.array_namespace(*leaves)
    single = all(tuple(leaf.shape) == tuple(s) for leaf, s in zip(leaves, shapes))
    columns = [xp.reshape(leaf, (-1, 1) if single else (-1, leaf.shape[-1])) for leaf in leaves]
    V = xp.concat(columns, axis=0)
    if V.shape[0] != n:
        raise shape_error("v", f"parameter-shaped arrays with {n} entries in all", tuple(V.shape))
    return V, single


def _check_like_params(b: Any, tree: Any, argument: str) -> None:
    leaves, _ = b.tree_flatten(tree)
    shapes = [tuple(getattr(leaf, "shape", ())) for leaf in leaves]
    if shapes != [tuple(s) for s in b.param_shapes]:
        raise value_error(
            argument,
            f"the structure and shapes of params {[tuple(s) for s in b.param_shapes]}",
            f"arrays of shapes {shapes}",
        )


def _flat(b: Any, tree: Any) -> Any:
    """The leaves of a parameter-shaped structure, concatenated in flattening order."""
    leaves, _ = b.tree_flatten(tree)
    return b.concat([b.xp.reshape(leaf, (-1,)) for leaf in leaves], axis=0)


def _check_identity(b: Any, image: Any, at: float) -> None:
    """``transform(params, at)`` must give back ``params``: the tangent is taken there."""
    xp = b.xp
    original = _flat(b, b.primals)
    difference = xp.max(xp.abs(_flat(b, image) - original))
    scale = max(1.0, float(xp.max(xp.abs(original))))
    tolerance = 1e3 * float(np.finfo(b.dtype).eps) * scale
    if not float(difference) <= tolerance:
        raise value_error(
            "at",
            "the value where transform(params, at) == params (the identity)",
            f"at={at!r}, where they differ by {float(difference):.3g}",
            "Pass the identity of the family, e.g. at=1.0 for a rescaling, at=0.0 for a rotation.",
        )
