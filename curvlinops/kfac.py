r"""Kronecker-factored approximate curvature (KFAC) and its inverse.

KFAC approximates each layer's block of the GGN/Fisher by a Kronecker product
of an input covariance and a covariance of the gradients at the layer's
output (Martens & Grosse 2015; convolutions: Grosse & Martens 2016; layers
with weight sharing, ``expand`` and ``reduce``: Eschenhagen et al. 2023).

The mathematics is written once, against the backend's array namespace
``backend.xp``: the per-batch factors, EKFAC's eigenvalue correction and the
products are pure functions of a configuration without arrays
(:class:`curvlinops._kfac_program.KFACProgram`), which JAX compiles once per
configuration; the accumulation over batches, normalisation, damped
inverses and closed forms are here. Only the capture of layer inputs and
output gradients is framework code: forward hooks on ``torch.nn.Linear``/``Conv2d`` modules
(:mod:`curvlinops.backends._kfac_torch`), and for JAX the dense and
convolution layers of a plain function, found by tracing it to a jaxpr
(:mod:`curvlinops.backends._kfac_jax`). Names and numbers follow
curvlinops-for-pytorch 3.0.1: ``_mapping``, ``_input_covariances`` and
``_gradient_covariances`` are keyed by layer name (``"0"``, ``"2"``, ...),
and downstream code (laplace-torch) reads them.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np

from curvlinops._base import LinearOperator
from curvlinops._checks import check_positive_int, type_error, value_error
from curvlinops._curvature import CurvatureOperator
from curvlinops._kfac_program import FisherType, KFACProgram, KFACType
from curvlinops._kfac_state import check_state
from curvlinops._tracing import compiled_method
from curvlinops.fisher import DEFAULT_SEED, batch_seed, check_mc_samples, check_seed
from curvlinops.losses import CallableLoss

__all__ = [
    "EKFACLinearOperator",
    "FisherType",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "KFACType",
]


def check_enum(value: Any, enum: type[Enum], argument: str) -> Any:
    """``value`` as a member of ``enum``: members and their strings are accepted."""
    choices = " or ".join(repr(member.value) for member in enum)
    if not isinstance(value, str):
        raise type_error(argument, f"a {enum.__name__} or one of {choices}", value)
    try:
        return enum(value)
    except ValueError:
        raise value_error(argument, f"a {enum.__name__} or one of {choices}", repr(value)) from None


def _cached_property(name: str) -> Callable[[Callable], property]:
    """A property computed once and kept as ``name`` (until the factors change)."""

    def decorate(compute: Callable) -> property:
        @functools.wraps(compute)
        def cached(self: Any) -> Any:
            if self.__dict__.get(name) is None:
                self.__dict__[name] = compute(self)
            return self.__dict__[name]

        return property(cached)

    return decorate


def _forget_closed_forms(op: Any) -> None:
    """New factors (or eigenvalues): the cached closed forms are stale."""
    for name in ("_trace", "_det", "_logdet", "_frobenius_norm"):
        op.__dict__.pop(name, None)


class KFACLinearOperator(CurvatureOperator):
    r"""KFAC approximation of the GGN/Fisher, block-diagonal over layers.

    For a layer with weight :math:`W \in \mathbb{R}^{d_\text{out} \times
    d_\text{in}}` (row-major flattened, as in the parameter vector) and bias
    :math:`b`,

    .. math::
        F_{W} \approx G \otimes A, \qquad
        A = \frac{1}{N S} \sum_{n,s} a_{ns} a_{ns}^\top, \qquad
        G = c \sum_{n,s,j} g_{nsj} g_{nsj}^\top,

    with :math:`a_{ns}` the layer's input at example :math:`n` and shared
    position :math:`s` (``S = 1`` without weight sharing), :math:`g_{nsj}` the
    gradient at the layer's output of column :math:`j` (a column of the output
    Hessian's square root for ``type-2``, a sampled gradient for ``mc``, the
    gradient for ``empirical``), and :math:`c` the loss's normalisation
    (:math:`1/(N \cdot \text{terms per example} \cdot C)` for the mean of MSE/BCE,
    :math:`1/(N \cdot \text{terms per example})` for cross-entropy, 1 for
    ``"sum"``; divided by ``mc_samples``). The bias block is :math:`G`, or, with
    ``separate_weight_and_bias=False``, weight and bias share one block with
    :math:`a` extended by a 1. ``reduce`` averages :math:`a` and sums
    :math:`g` over the shared positions before the outer products (and
    :math:`S` is 1). The normalisation is that of curvlinops-for-pytorch 3.0.1.

    The factors are computed by :meth:`compute_kronecker_factors` (at the first
    product if not before); a product then costs two small matrix products
    per layer. Layers: ``torch.nn.Linear`` (inputs ``(N, ..., d_in)``, the
    middle axes shared), Hugging Face's ``Conv1D`` (GPT-2's, the same with the
    weight stored ``(d_in, d_out)``) and ``torch.nn.Conv2d`` (``groups=1``, zero padding);
    in JAX, each ``dot_general`` or ``conv_general_dilated`` with a parameter
    leaf as weight, and a leaf added to its output as bias (``x @ W + b``,
    ``x @ W.T + b``, flax ``Dense``/``Conv``, equinox ``Linear``), named by
    the weight's path without its last key (e.g. ``"['params']['Dense_0']"``).
    ``_mapping`` says which parameter positions each layer holds.

    Args:
        model_func: A ``torch.nn.Module``, or a JAX function ``(params, X) ->
            outputs``.
        loss_func: MSE, cross-entropy or BCE-with-logits (a callable loss for
            ``empirical`` and ``forward-only`` only).
        params: The parameters (list or dict, as for the other operators); all
            must belong to supported layers.
        data: Re-iterable of ``(X, y)`` batches.
        progressbar, check_deterministic, num_data, batch_size_fn, backend: As
            for :class:`~curvlinops.GGNLinearOperator`.
        process_group, sharding: Data parallelism, as for the other operators:
            the factors are sums over all processes' (devices') data, the same
            on every process.
        seed: Seed of the ``mc`` draws (the draws are those of
            :class:`~curvlinops.FisherMCLinearOperator` with this seed).
        fisher_type: A :class:`FisherType` or its string.
        mc_samples: Sampled targets per term (``mc`` only; else 1).
        kfac_approx: A :class:`KFACType` or its string.
        num_per_example_loss_terms: Loss terms per example (e.g. tokens); by
            default read off the outputs. It enters the ``"mean"`` normalisation
            as in curvlinops-for-pytorch.
        separate_weight_and_bias: Whether weight and bias get separate blocks.
        layers: JAX only: layers to name where tracing cannot tell, as ``{name:
            {"weight": leaf, "bias": leaf}}`` with the leaves' names from
            ``repr(op)`` / the parameter paths (e.g. ``"['W1']"``). The weight
            must be an operand of a ``dot_general``/``conv_general_dilated``;
            the bias (optional) is taken as added to that layer's output (its
            gradient the output gradient summed over shared positions), which
            the caller vouches for. Other layers are still found by tracing.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import GGNLinearOperator, KFACLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
        >>> args = (model, torch.nn.MSELoss(), list(model.parameters()), [(X, y)])
        >>> K = KFACLinearOperator(*args, fisher_type="type-2", separate_weight_and_bias=False)
        >>> bool(np.allclose(K @ np.eye(8), GGNLinearOperator(*args) @ np.eye(8)))
        True
    """

    is_symmetric = True
    _ekfac = False  # which state dicts load_state_dict takes
    _params_in = _params_out = True
    # curvlinops-for-pytorch 3.0.1's class attributes (its tests parametrize over them)
    _SUPPORTED_FISHER_TYPE = FisherType
    _SUPPORTED_KFAC_APPROX = KFACType

    def __init__(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Any,
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        seed: int = DEFAULT_SEED,
        fisher_type: str = FisherType.MC,
        mc_samples: int = 1,
        kfac_approx: str = KFACType.EXPAND,
        num_per_example_loss_terms: int | None = None,
        separate_weight_and_bias: bool = True,
        layers: dict[str, dict[str, str]] | None = None,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        backend: str | None = None,
        process_group: Any = None,
        sharding: Any = None,
    ) -> None:
        self._fisher_type = check_enum(fisher_type, FisherType, "fisher_type")
        self._mc_samples = check_mc_samples(mc_samples)
        if self._fisher_type != FisherType.MC and self._mc_samples != 1:
            raise value_error(
                "mc_samples",
                f"1 for fisher_type={self._fisher_type.value!r}",
                str(mc_samples),
                "Only fisher_type='mc' samples; leave mc_samples at 1 otherwise.",
            )
        self._kfac_approx = check_enum(kfac_approx, KFACType, "kfac_approx")
        self._seed = check_seed(seed)
        self._separate_weight_and_bias = bool(separate_weight_and_bias)
        self._num_per_example_loss_terms = (
            None
            if num_per_example_loss_terms is None
            else check_positive_int(num_per_example_loss_terms, "num_per_example_loss_terms")
        )
        self._input_covariances: dict[str, Any] = {}
        self._gradient_covariances: dict[str, Any] = {}
        super().__init__(
            model_func,
            loss_func,
            params,
            data,
            progressbar=progressbar,
            check_deterministic=False,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            backend=backend,
            process_group=process_group,
            sharding=sharding,
        )
        self._capture = _capture(self, model_func, layers)
        self._mapping: dict[str, dict[str, int]] = self._capture.mapping
        self._program = KFACProgram(self)
        self._check_loss()
        if check_deterministic:
            self._check_deterministic()

    # --- set-up -----------------------------------------------------------------
    def _check_loss(self) -> None:
        """Fail now, not at the first product, for a loss the fisher type cannot use."""
        if self._fisher_type == FisherType.TYPE2 and isinstance(self._loss, CallableLoss):
            if self._loss.variant:
                raise self._loss.closed_form_error("a closed-form output Hessian for 'type-2'")
            raise type_error(
                "loss_func",
                "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss for fisher_type='type-2' "
                "(a closed-form output Hessian)",
                self._loss.fn,
                "Use fisher_type='mc' or 'empirical', or one of these losses.",
            )
        if self._fisher_type == FisherType.EMPIRICAL and getattr(self._loss, "weighted_mean", 0):
            if self._loss.reduction == "mean":
                raise self._loss.coupled_error("KFAC's per-example gradients")
        if self._fisher_type == FisherType.MC:
            self._loss.sample_noise(self.backend, (1,), 1, 0)  # raises for callables

    def _check_deterministic(self) -> None:
        """The base checks (data, model, a finite product), then the factors twice."""
        super()._check_deterministic()
        first = (dict(self._input_covariances), dict(self._gradient_covariances))
        self.compute_kronecker_factors()
        second = (self._input_covariances, self._gradient_covariances)
        for before, after in zip(first, second):
            for name, factor in before.items():
                if not _agree(self.backend, factor, after[name]):
                    raise RuntimeError(
                        f"{type(self).__name__}: two computations of the Kronecker factors "
                        f"of layer {name!r} differ. Is the model or the data random? Pass "
                        "check_deterministic=False to skip this check."
                    )

    def __repr__(self) -> str:
        """The base's description, plus which parameters each layer holds."""
        names = self.backend.param_names
        layers = {
            layer: [names[position] for position in parts.values()]
            for layer, parts in self._mapping.items()
        }
        return f"{super().__repr__()[:-1]}, layers={layers}>"

    def _is_joint(self, name: str) -> bool:
        """Whether layer ``name``'s weight and bias share one Kronecker block."""
        return self._program.is_joint(name)

    def _run(self, name: str) -> Callable:
        """Method ``name`` of the operator's :class:`KFACProgram`, compiled by JAX.

        The program holds no arrays, so operators of equal configuration share
        the compilation (``compiled_method``).
        """
        programs = self.__dict__.setdefault("_programs", {})
        if name not in programs:
            data_args = (1, 2) if name.startswith("batch_") else ()
            programs[name] = compiled_method(self._program, name, data_args=data_args)
        return programs[name]

    def _set_program(self) -> None:
        """A new program after the options changed (``load_state_dict``)."""
        self._program = KFACProgram(self)
        self.__dict__.pop("_programs", None)

    # --- the Kronecker factors ----------------------------------------------------
    def compute_kronecker_factors(self) -> None:
        """Compute the Kronecker factors from the data (replacing earlier ones)."""
        inputs: dict[str, Any] = {}
        gradients: dict[str, Any] = {}
        for index, X, y, n in self._batches("KFAC factors"):
            if n == 0:  # an empty batch adds nothing
                continue
            self._accumulate_batch(index, X, y, n, inputs, gradients)
        if self._comm.world_size > 1:
            inputs, gradients = self._sum_over_processes(inputs, gradients)
        if self._fisher_type == FisherType.FORWARD_ONLY:
            # identity gradient covariances, as curvlinops-for-pytorch sets them
            gradients = {name: self.backend.eye(self._output_size(name)) for name in self._mapping}
        self._check_all_layers_called(inputs, gradients)
        self._input_covariances, self._gradient_covariances = inputs, gradients
        _forget_closed_forms(self)

    def _sum_over_processes(self, inputs: dict, gradients: dict) -> tuple[dict, dict]:
        """The factors of all processes' data (``process_group``), on every process.

        Every process sums every factor in the layers' order; a process whose
        shard holds no data adds zeros.
        """
        b, summed = self.backend, ({}, {})
        for name, parts in self._mapping.items():
            d_out = self._output_size(name)
            if "weight" in parts:
                d_in = math.prod(b.param_shapes[parts["weight"]]) // d_out
                d_in += self._is_joint(name)
                A = inputs.get(name, b.zeros((d_in, d_in)))
                summed[0][name] = self._comm.all_reduce_sum(A)
            if self._fisher_type != FisherType.FORWARD_ONLY:
                G = gradients.get(name, b.zeros((d_out, d_out)))
                summed[1][name] = self._comm.all_reduce_sum(G)
        return summed

    def _check_all_layers_called(self, inputs: dict, gradients: dict) -> None:
        uncalled = [
            name
            for name, parts in self._mapping.items()
            if name not in gradients or ("weight" in parts and name not in inputs)
        ]
        if uncalled:
            raise value_error(
                "model_func",
                "a forward pass that calls every layer whose parameters are in params",
                f"layers {uncalled} not called on the data",
                "Leave their parameters out of params.",
            )

    def _output_size(self, name: str) -> int:
        return self._program.output_size(name)

    def _accumulate_batch(
        self, index: int, X: Any, y: Any, n: int, inputs: dict, gradients: dict
    ) -> None:
        b = self.backend
        self._capture.prepare(X)  # JAX: trace the model outside the compiled function
        batch_inputs, batch_gradients = self._run("batch_factors")(
            b.primals, X, y, self._noise(index, X), self._weight(n)
        )
        for name, value in batch_inputs.items():
            _add_to(inputs, name, value)
        for name, value in batch_gradients.items():
            _add_to(gradients, name, value)

    def _noise(self, index: int, X: Any) -> Any:
        """The random numbers of batch ``index``'s ``mc`` draws (those of FisherMC), else None."""
        if self._fisher_type != FisherType.MC:
            return None
        shapes = self.__dict__.setdefault("_output_shapes", {})
        if index not in shapes:
            b = self.backend
            shapes[index] = tuple(b.model_fn(b.primals, X).shape)
        seed = batch_seed(self._seed, index)
        return self._loss.sample_noise(self.backend, shapes[index], self._mc_samples, seed)

    def _factors_ready(self) -> None:
        if not (self._input_covariances or self._gradient_covariances):
            self.compute_kronecker_factors()

    # --- products ---------------------------------------------------------------
    def _native(self, X: Any, adjoint: bool) -> Any:
        self._factors_ready()
        product = self._run("kfac_product")
        return product(self._input_covariances, self._gradient_covariances, X)

    # --- checkpoints ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Options, the model's state and the Kronecker factors, with curvlinops-for-pytorch's keys.

        The closed forms are not cached here: ``trace``, ``det``, ``logdet``
        and ``frobenius_norm`` are saved as ``None``.
        """
        loss = self._loss
        if isinstance(loss, CallableLoss):
            raise type_error(
                "loss_func",
                "MSELoss, CrossEntropyLoss or BCEWithLogitsLoss to save the operator",
                loss.fn,
                "A callable cannot be saved; rebuild the operator with it instead.",
            )
        state = {
            "model_func_state_dict": self._capture.model_state(self.backend),
            "loss_type": type(loss).__name__,
            "loss_reduction": loss.reduction,
            "progressbar": self._progressbar,
            "seed": self._seed,
            "fisher_type": self._fisher_type,
            "mc_samples": self._mc_samples,
            "kfac_approx": self._kfac_approx,
            "num_per_example_loss_terms": self._num_per_example_loss_terms,
            "separate_weight_and_bias": self._separate_weight_and_bias,
            "num_data": self.num_data,
            "input_covariances": self._input_covariances,
            "gradient_covariances": self._gradient_covariances,
            **dict.fromkeys(("trace", "det", "logdet", "frobenius_norm")),
        }
        if hasattr(loss, "class_axis"):  # our addition: where cross-entropy's classes are
            state["loss_class_axis"] = loss.class_axis
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: the model's parameters are overwritten (with a warning).

        The whole state is checked first (keys, the operator's kind, loss, number of
        data points, the model's entries, and every factor's layer, shape, dtype and
        finiteness); a state that does not fit is refused before anything is written.
        """
        check_state(self, state_dict, ekfac=self._ekfac)
        options = (
            check_seed(state_dict["seed"]),
            check_enum(state_dict["fisher_type"], FisherType, "fisher_type"),
            check_mc_samples(state_dict["mc_samples"]),
            check_enum(state_dict["kfac_approx"], KFACType, "kfac_approx"),
        )
        warnings.warn(
            "Loading a state dict will overwrite the parameters of the model underlying "
            "the linear operator!",
            UserWarning,
            stacklevel=2,
        )
        self._capture.load_model_state(state_dict["model_func_state_dict"], self.backend)
        self._seed, self._fisher_type, self._mc_samples, self._kfac_approx = options
        self._progressbar = bool(state_dict["progressbar"])
        self._num_per_example_loss_terms = state_dict["num_per_example_loss_terms"]
        self._separate_weight_and_bias = bool(state_dict["separate_weight_and_bias"])
        self._input_covariances = dict(state_dict["input_covariances"])
        self._gradient_covariances = dict(state_dict["gradient_covariances"])
        self._set_program()
        _forget_closed_forms(self)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, Any],
        model_func: Any,
        params: Any,
        data: Any,
        check_deterministic: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> KFACLinearOperator:
        """A new operator from a :meth:`state_dict`, the model, its parameters and the data."""
        from curvlinops import losses

        loss_class = getattr(losses, state_dict["loss_type"])
        options = {"reduction": state_dict["loss_reduction"]}
        if "loss_class_axis" in state_dict:
            options["class_axis"] = state_dict["loss_class_axis"]
        elif loss_class is losses.CrossEntropyLoss:  # a state of curvlinops-for-pytorch
            options["class_axis"] = 1
        operator = cls(
            model_func,
            loss_class(**options),
            params,
            data,
            batch_size_fn=batch_size_fn,
            check_deterministic=False,
            progressbar=state_dict["progressbar"],
            seed=state_dict["seed"],
            fisher_type=state_dict["fisher_type"],
            mc_samples=state_dict["mc_samples"],
            kfac_approx=state_dict["kfac_approx"],
            num_per_example_loss_terms=state_dict["num_per_example_loss_terms"],
            separate_weight_and_bias=state_dict["separate_weight_and_bias"],
            num_data=state_dict["num_data"],
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Loading a state dict", UserWarning)
            operator.load_state_dict(state_dict)
        if check_deterministic:
            operator._check_deterministic()
        return operator

    # --- closed forms -----------------------------------------------------------
    def _block_factors(self) -> list[tuple[Any, Any]]:
        """``(G, A)`` of every Kronecker block (``A`` is ``None`` for a bias alone)."""
        self._factors_ready()
        blocks = []
        for name, parts in self._mapping.items():
            G = self._gradient_covariances[name]
            if self._is_joint(name):
                blocks.append((G, self._input_covariances[name]))
                continue
            for part in parts:
                blocks.append((G, self._input_covariances[name] if part == "weight" else None))
        return blocks

    # cached as in curvlinops-for-pytorch (read as _trace, ...; None until computed)
    _trace = _det = _logdet = _frobenius_norm = None

    @_cached_property("_trace")
    def trace(self) -> Any:
        r"""Trace, from :math:`\mathrm{tr}(G \otimes A) = \mathrm{tr}(G)\,\mathrm{tr}(A)`."""
        linalg = self.backend.xp.linalg
        return sum(
            linalg.trace(G) * (1.0 if A is None else linalg.trace(A))
            for G, A in self._block_factors()
        )

    @_cached_property("_det")
    def det(self) -> Any:
        r"""Determinant, from :math:`\det(G \otimes A) = \det(G)^{n_A} \det(A)^{n_G}`."""
        xp = self.backend.xp
        result = 1.0
        for G, A in self._block_factors():
            n_A = 1 if A is None else A.shape[0]
            result = result * _det(xp, G) ** n_A
            if A is not None:
                result = result * _det(xp, A) ** G.shape[0]
        return result

    @_cached_property("_logdet")
    def logdet(self) -> Any:
        r"""Log-determinant, :math:`\sum n_A \log\det G + n_G \log\det A` (stabler than ``det``)."""
        result = 0.0
        for G, A in self._block_factors():
            n_A = 1 if A is None else A.shape[0]
            result = result + n_A * _logdet(self.backend.xp, G)
            if A is not None:
                result = result + G.shape[0] * _logdet(self.backend.xp, A)
        return result

    @_cached_property("_frobenius_norm")
    def frobenius_norm(self) -> Any:
        r"""Frobenius norm, from :math:`\|G \otimes A\|_F = \|G\|_F \|A\|_F`."""
        xp = self.backend.xp
        squared = sum(
            xp.sum(G * G) * (1.0 if A is None else xp.sum(A * A)) for G, A in self._block_factors()
        )
        return xp.sqrt(squared)


class KFACInverseLinearOperator(LinearOperator):
    r"""Inverse of a damped :class:`KFACLinearOperator`, block by block.

    By default each block's factors are damped and inverted by Cholesky:
    :math:`(G + \delta_G I)^{-1} \otimes (A + \delta_A I)^{-1}`, with
    :math:`\delta_A = \delta_G =` ``damping`` (a pair ``(δ_A, δ_G)`` sets them
    apart). ``use_heuristic_damping`` sets :math:`\delta_A = \max(\pi
    \sqrt{\lambda}, \delta_\min)`, :math:`\delta_G = \max(\sqrt{\lambda} / \pi,
    \delta_\min)` with :math:`\pi = \sqrt{(\mathrm{tr}A / n_A) / (\mathrm{tr}G /
    n_G)}` (Martens & Grosse 2015, section 6.3). ``use_exact_damping``
    inverts :math:`G \otimes A + \lambda I` exactly, from the factors'
    eigendecompositions. As in curvlinops-for-pytorch 3.0.1.

    Args:
        A: The KFAC operator.
        damping: :math:`\lambda` (or a pair ``(δ_A, δ_G)`` without heuristic
            or exact damping).
        use_heuristic_damping: Martens & Grosse's damping split.
        min_damping: :math:`\delta_\min` of the heuristic.
        use_exact_damping: Invert :math:`G \otimes A + \lambda I`.
        cache: Keep the inverted (or decomposed) factors between products.
        retry_double_precision: Retry a failed Cholesky in float64.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> K = KFACLinearOperator(model, torch.nn.MSELoss(), list(model.parameters()),
        ...                        [(X, y)], fisher_type="type-2")
        >>> K_inv = KFACInverseLinearOperator(K, damping=0.1, use_exact_damping=True)
        >>> v = np.random.default_rng(0).normal(size=8)
        >>> bool(np.allclose(K_inv @ (K @ v + 0.1 * v), v))
        True
    """

    is_symmetric = True
    _params_in = _params_out = True

    def __init__(
        self,
        A: KFACLinearOperator,
        damping: float | tuple[float, float] = 0.0,
        use_heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        use_exact_damping: bool = False,
        cache: bool = True,
        retry_double_precision: bool = True,
    ) -> None:
        if not isinstance(A, KFACLinearOperator):
            raise type_error("A", "a KFACLinearOperator or EKFACLinearOperator", A)
        if isinstance(A, EKFACLinearOperator) and not use_exact_damping:
            raise value_error(
                "use_exact_damping",
                "True for an EKFACLinearOperator (its eigenvalues are damped directly)",
                "False",
                "Pass use_exact_damping=True.",
            )
        if use_heuristic_damping and use_exact_damping:
            raise value_error(
                "use_heuristic_damping/use_exact_damping",
                "at most one of them",
                "both True",
                "Either use heuristic damping or exact damping (curvlinops-for-pytorch's "
                "words): choose the heuristic split of the damping or exact damping.",
            )
        _check_damping(damping, use_heuristic_damping or use_exact_damping)
        self._A = A
        self.backend = A.backend
        self._damping = damping
        self._use_heuristic_damping = bool(use_heuristic_damping)
        self._min_damping = float(min_damping)
        self._use_exact_damping = bool(use_exact_damping)
        self._cache = bool(cache)
        self._retry_double_precision = bool(retry_double_precision)
        self._inverse_input_covariances: dict[str, Any] = {}
        self._inverse_gradient_covariances: dict[str, Any] = {}
        self._eigenvalues_checked = False  # EKFAC's, for a singular damped operator
        super().__init__(A.dtype, A.shape)

    # --- state, with curvlinops-for-pytorch 3.0.1's keys -------------------------------
    _OPTIONS = (
        "damping",
        "use_heuristic_damping",
        "min_damping",
        "use_exact_damping",
        "cache",
        "retry_double_precision",
    )

    def state_dict(self) -> dict[str, Any]:
        """The KFAC operator's state (``"A"``), the options, and the cached inverted factors."""
        return {
            "A": self._A.state_dict(),
            **{key: getattr(self, f"_{key}") for key in self._OPTIONS},
            "inverse_input_covariances": self._inverse_input_covariances,
            "inverse_gradient_covariances": self._inverse_gradient_covariances,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the KFAC operator's too: its parameters are overwritten)."""
        try:
            self._A.load_state_dict(state_dict["A"])
        except ValueError as error:
            raise ValueError(
                f"state_dict['A']: mismatch with this inverse's operator: {error}"
            ) from error
        options = {key: state_dict[key] for key in self._OPTIONS}
        _check_damping(
            options["damping"], options["use_heuristic_damping"] or options["use_exact_damping"]
        )
        for key, value in options.items():
            setattr(self, f"_{key}", value)
        self._inverse_input_covariances = dict(state_dict["inverse_input_covariances"])
        self._inverse_gradient_covariances = dict(state_dict["inverse_gradient_covariances"])
        self._eigenvalues_checked = False  # the loaded operator's, checked at the next product

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Any], A: KFACLinearOperator
    ) -> KFACInverseLinearOperator:
        """A new inverse of ``A`` from a :meth:`state_dict` (``A`` takes its ``"A"`` state)."""
        inverse = cls(A, **{key: state_dict[key] for key in cls._OPTIONS})
        inverse.load_state_dict(state_dict)
        return inverse

    def _native(self, X: Any, adjoint: bool) -> Any:
        A = self._A
        A._factors_ready()
        if isinstance(A, EKFACLinearOperator):
            if not self._eigenvalues_checked:
                _warn_if_singular(
                    "the EKFAC operator", A._flat_eigenvalues(), self._damping, self.backend.xp
                )
                self._eigenvalues_checked = True
            return A._eigenbasis_product(self._damping, X)
        factors = {name: self._inverse_factors(name) for name in A._mapping}
        inv_A = {name: pair[0] for name, pair in factors.items() if pair[0] is not None}
        inv_G = {name: pair[1] for name, pair in factors.items()}
        if self._use_exact_damping:
            return A._run("exact_damped_solve")(inv_A, inv_G, self._damping, X)
        return A._run("kfac_product")(inv_A, inv_G, X)

    def _inverse_factors(self, name: str) -> tuple[Any, Any]:
        """Inverted damped factors (or eigendecompositions, for exact damping), maybe cached."""
        if name in self._inverse_gradient_covariances:
            return self._inverse_input_covariances.get(name), self._inverse_gradient_covariances[
                name
            ]
        aaT = self._A._input_covariances.get(name)
        ggT = self._A._gradient_covariances[name]
        xp = self.backend.xp
        if self._use_exact_damping:
            inv_A = None if aaT is None else xp.linalg.eigh(aaT)
            inv_G = xp.linalg.eigh(ggT)
            block = (
                inv_G[0]
                if inv_A is None
                else xp.reshape(inv_G[0][:, None] * inv_A[0][None, :], (-1,))
            )
            _warn_if_singular(f"the Kronecker block of layer {name!r}", block, self._damping, xp)
        else:
            damping_A, damping_G = self._split_damping(aaT, ggT)
            for factor, damping, what in ((aaT, damping_A, "input"), (ggT, damping_G, "gradient")):
                if factor is not None:
                    _warn_if_singular(
                        f"the {what} covariance of layer {name!r}",
                        xp.linalg.eigvalsh(factor),
                        damping,
                        xp,
                    )
            inv_A = None if aaT is None else self._damped_inverse(aaT, damping_A)
            inv_G = self._damped_inverse(ggT, damping_G)
        if self._cache:
            if inv_A is not None:
                self._inverse_input_covariances[name] = inv_A
            self._inverse_gradient_covariances[name] = inv_G
        return inv_A, inv_G

    def _split_damping(self, aaT: Any, ggT: Any) -> tuple[float, float]:
        """``(δ_A, δ_G)``: the heuristic split where it applies, else the damping given."""
        if self._use_heuristic_damping and aaT is not None:
            linalg = self.backend.xp.linalg
            mean_A = float(linalg.trace(aaT)) / aaT.shape[0]
            mean_G = float(linalg.trace(ggT)) / ggT.shape[0]
            if mean_A >= 0.0 and mean_G > 0.0:
                ratio, root = math.sqrt(mean_A / mean_G), math.sqrt(self._damping)
                return (
                    max(root * ratio, self._min_damping),
                    max(root / ratio, self._min_damping),
                )
        if isinstance(self._damping, tuple):
            return self._damping
        return self._damping, self._damping

    def _damped_inverse(self, M: Any, damping: float) -> Any:
        """``(M + δ I)⁻¹`` by Cholesky, retried in float64 if it fails in lower precision."""
        try:
            return _cholesky_inverse(self.backend, M, damping)
        except ValueError as error:
            xp = self.backend.xp
            if not self._retry_double_precision or M.dtype == xp.float64:
                raise
            warnings.warn(
                f"KFACInverseLinearOperator: Cholesky failed in {M.dtype} ({error}); "
                "retrying in float64.",
                RuntimeWarning,
                stacklevel=4,
            )
            inverse = _cholesky_inverse(self.backend, xp.astype(M, xp.float64), damping)
            return xp.astype(inverse, M.dtype)


class EKFACLinearOperator(KFACLinearOperator):
    r"""Eigenvalue-corrected KFAC (George et al. 2018), block-diagonal over layers.

    .. math::
        F_W \approx (Q_G \otimes Q_A) \, \mathrm{diag}(\Lambda) \,
        (Q_G \otimes Q_A)^\top, \qquad
        \Lambda = c \sum_{n,j} \big(Q_G^\top \, \textstyle\sum_s g_{nsj} a_{ns}^\top
        \, Q_A\big)^{\odot 2},

    with :math:`Q_A, Q_G` the eigenvectors of KFAC's factors (see
    :class:`KFACLinearOperator`, whose options it takes, except
    ``fisher_type="forward-only"``) and :math:`\Lambda` the second moments of
    the per-example gradients in that basis: the diagonal closest to the
    block in the Frobenius norm among those in the basis. A bias block uses
    :math:`\sum_s g_{nsj}` alone. With ``fisher_type="type-2"`` the model's
    outputs must be ``(N, C)``, as in curvlinops-for-pytorch 3.0.1 (per-example
    gradients of coupled loss terms are not formed); with ``"mc"`` and
    ``"empirical"`` they may be sequences (``(N, S, C)``): each example's
    gradient is then that of its summed terms, as kronfluence has it.
    :meth:`compute_eigenvalue_correction` computes :math:`\Lambda` (at the
    first product if not before) in a second pass over the data.

    Example:
        >>> import numpy as np, torch
        >>> from curvlinops import EKFACLinearOperator, KFACLinearOperator
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
        >>> args = (model, torch.nn.MSELoss(), list(model.parameters()), [(X, y)])
        >>> E = EKFACLinearOperator(*args, fisher_type="type-2")
        >>> K = KFACLinearOperator(*args, fisher_type="type-2")
        >>> bool(np.allclose(E @ np.eye(8), K @ np.eye(8)))  # exact for one data point
        True
    """

    _ekfac = True
    _SUPPORTED_FISHER_TYPE = (FisherType.TYPE2, FisherType.MC, FisherType.EMPIRICAL)

    def __init__(
        self, model_func: Any, loss_func: Any, params: Any, data: Any, **options: Any
    ) -> None:
        fisher_type = check_enum(
            options.get("fisher_type", FisherType.MC), FisherType, "fisher_type"
        )
        if fisher_type == FisherType.FORWARD_ONLY:
            raise value_error(
                "fisher_type",
                "'type-2', 'mc' or 'empirical' for EKFAC",
                repr(fisher_type.value),
                "EKFAC corrects eigenvalues with output gradients, which forward-only has not.",
            )
        self._input_covariances_eigenvectors: dict[str, Any] = {}
        self._gradient_covariances_eigenvectors: dict[str, Any] = {}
        self._corrected_eigenvalues: dict[str, Any] = {}
        check = options.pop("check_deterministic", True)
        super().__init__(model_func, loss_func, params, data, check_deterministic=False, **options)
        if check:
            self._check_deterministic()

    def state_dict(self) -> dict[str, Any]:
        """KFAC's state, plus the eigenvectors and corrected eigenvalues."""
        return {
            **super().state_dict(),
            "input_covariances_eigenvectors": self._input_covariances_eigenvectors,
            "gradient_covariances_eigenvectors": self._gradient_covariances_eigenvectors,
            "cached_activations": {},
            "corrected_eigenvalues": self._corrected_eigenvalues,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the model's parameters are overwritten)."""
        super().load_state_dict(state_dict)
        self._input_covariances_eigenvectors = dict(state_dict["input_covariances_eigenvectors"])
        self._gradient_covariances_eigenvectors = dict(
            state_dict["gradient_covariances_eigenvectors"]
        )
        self._corrected_eigenvalues = dict(state_dict["corrected_eigenvalues"])

    def _check_deterministic(self) -> None:
        super()._check_deterministic()  # recomputes the factors, which drops the correction
        self._factors_ready()  # the corrected eigenvalues too, as 3.0.1 has them after it

    def compute_kronecker_factors(self) -> None:
        """Compute the Kronecker factors; the eigencorrection is then recomputed too."""
        super().compute_kronecker_factors()
        self._corrected_eigenvalues = {}

    def compute_eigenvalue_correction(self) -> None:
        """Eigenvectors of the factors, then the corrected eigenvalues from the data."""
        super()._factors_ready()
        eigenvectors = self._run("eigenvectors")
        self._input_covariances_eigenvectors = eigenvectors(self._input_covariances)
        self._gradient_covariances_eigenvectors = eigenvectors(self._gradient_covariances)
        Q_A, Q_G = self._input_covariances_eigenvectors, self._gradient_covariances_eigenvectors
        keys = self._program.correction_keys()
        totals: list[Any] | None = None
        b = self.backend
        for index, X, y, n in self._batches("EKFAC eigenvalue correction"):
            if n == 0:  # an empty batch adds nothing
                continue
            self._capture.prepare(X)
            batch = self._run("batch_correction")(
                b.primals, X, y, self._noise(index, X), self._weight(n), Q_A, Q_G
            )
            totals = batch if totals is None else [t + c for t, c in zip(totals, batch)]
        corrections = {} if totals is None else dict(zip(keys, totals))
        if self._comm.world_size > 1:
            corrections = self._sum_corrections_over_processes(corrections)
        self._corrected_eigenvalues = _nest_corrections(corrections, self._mapping, self._is_joint)
        _forget_closed_forms(self)

    def _sum_corrections_over_processes(self, corrections: dict) -> dict:
        """The corrections of all processes' data, in the layers' order (zeros for none)."""
        summed = {}
        for name, parts in self._mapping.items():
            d_out = self._gradient_covariances_eigenvectors[name].shape[0]
            for key in ["joint"] if self._is_joint(name) else list(parts.values()):
                if key == parts.get("bias"):
                    shape = (d_out,)
                else:
                    shape = (d_out, self._input_covariances_eigenvectors[name].shape[0])
                local = corrections.get((name, key), self.backend.zeros(shape))
                summed[(name, key)] = self._comm.all_reduce_sum(local)
        return summed

    def _factors_ready(self) -> None:
        super()._factors_ready()
        if not self._corrected_eigenvalues:
            self.compute_eigenvalue_correction()

    def _native(self, X: Any, adjoint: bool) -> Any:
        self._factors_ready()
        return self._eigenbasis_product(None, X)

    def _eigenbasis_product(self, damping: float | None, X: Any) -> Any:
        """``E X``, or ``(E + λ I)⁻¹ X`` for a ``damping`` λ."""
        self._factors_ready()
        product = self._run("ekfac_product")
        return product(
            self._input_covariances_eigenvectors,
            self._gradient_covariances_eigenvectors,
            self._corrected_eigenvalues,
            damping,
            X,
        )

    def _all_eigenvalues(self) -> list[Any]:
        self._factors_ready()
        values = []
        for entry in self._corrected_eigenvalues.values():
            values.extend(entry.values() if isinstance(entry, dict) else [entry])
        return values

    def _flat_eigenvalues(self) -> Any:
        xp = self.backend.xp
        return xp.concat([xp.reshape(values, (-1,)) for values in self._all_eigenvalues()])

    @_cached_property("_trace")
    def trace(self) -> Any:
        """Trace: the sum of the corrected eigenvalues."""
        xp = self.backend.xp
        return sum(xp.sum(values) for values in self._all_eigenvalues())

    @_cached_property("_det")
    def det(self) -> Any:
        """Determinant: the product of the corrected eigenvalues."""
        xp = self.backend.xp
        values = self._flat_eigenvalues()
        return xp.where(_singular(xp, values), 0.0, xp.prod(values))

    @_cached_property("_logdet")
    def logdet(self) -> Any:
        """Log-determinant: the sum of the corrected eigenvalues' logarithms."""
        return _logdet_of_eigenvalues(self.backend.xp, self._flat_eigenvalues())

    @_cached_property("_frobenius_norm")
    def frobenius_norm(self) -> Any:
        """Frobenius norm: the 2-norm of the corrected eigenvalues."""
        xp = self.backend.xp
        return xp.sqrt(sum(xp.sum(values * values) for values in self._all_eigenvalues()))


def _nest_corrections(corrections: dict, mapping: dict, is_joint: Callable) -> dict[str, Any]:
    """``{layer: Λ}`` for joint blocks, ``{layer: {position: Λ}}`` otherwise (as in 3.0.1)."""
    nested: dict[str, Any] = {}
    for name, parts in mapping.items():
        if is_joint(name):
            nested[name] = corrections[(name, "joint")]
        else:
            nested[name] = {position: corrections[(name, position)] for position in parts.values()}
    return nested


def _cholesky_inverse(b: Any, M: Any, damping: float) -> Any:
    xp = b.xp
    damped = M + damping * b.eye(M.shape[0])
    try:
        L = xp.linalg.cholesky(damped)
    except RuntimeError as error:  # torch.linalg.LinAlgError
        raise _not_positive_definite(M.shape[0], damping) from error
    if not b.all_finite(L):  # JAX returns NaN instead of raising
        raise _not_positive_definite(M.shape[0], damping)
    L_inv = xp.linalg.inv(L)
    return L_inv.T @ L_inv


def _not_positive_definite(n: int, damping: float) -> ValueError:
    return value_error(
        "damping",
        f"a damping that makes the {n}x{n} Kronecker factor positive definite",
        str(damping),
        "Increase the damping (or use use_exact_damping=True with a positive damping).",
    )


def _check_damping(damping: Any, single: bool) -> None:
    if isinstance(damping, tuple):
        if single:
            raise value_error(
                "damping",
                "one number for heuristic or exact damping",
                f"the pair {damping!r}",
                "Heuristic and exact damping require a single damping value.",
            )
        if len(damping) != 2 or not all(isinstance(d, (int, float)) for d in damping):
            raise value_error("damping", "a number or a pair (δ_A, δ_G)", repr(damping))
        return
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)):
        raise type_error("damping", "a number or a pair (δ_A, δ_G)", damping)


# --- helpers ----------------------------------------------------------------------
def _capture(op: KFACLinearOperator, model_func: Any, layers: dict | None) -> Any:
    """The framework's capture of layer inputs and output gradients."""
    backend = op.backend
    if backend.name == "jax":
        module = importlib.import_module("curvlinops.backends._kfac_jax")
        first_inputs = next(X for _, X, _, n in op._batches() if n)  # layers are traced on it
        return module.JaxKFACCapture(backend, first_inputs, layers)
    if layers is not None:
        raise value_error(
            "layers",
            "None for PyTorch models (their Linear and Conv2d modules are the layers)",
            f"{type(layers).__name__} {layers!r}",
            "Leave layers out; it names the layers of a JAX function.",
        )
    module = importlib.import_module("curvlinops.backends._kfac_torch")
    return module.TorchKFACCapture(model_func, list(backend.param_names))


def _agree(b: Any, first: Any, second: Any) -> bool:
    """Whether two computations of a factor agree to 1e-5 of its largest entry."""
    first, second = b.to_numpy(first), b.to_numpy(second)
    scale = max(float(np.max(np.abs(first), initial=0.0)), np.finfo(first.dtype).tiny)
    return bool(np.max(np.abs(first - second), initial=0.0) <= 1e-5 * scale)


def _add_to(totals: dict, name: str, value: Any) -> None:
    totals[name] = value if name not in totals else totals[name] + value


def _singular(xp: Any, eigenvalues: Any) -> Any:
    """Whether PSD eigenvalues are those of a matrix singular to working precision.

    numpy's ``matrix_rank`` rule: the smallest is at most ``n·eps`` times the
    largest (e.g. cross-entropy's rank C-1 output factor, whose null
    direction comes out at 1e-8 of the largest rather than 0).
    """
    size = math.prod(eigenvalues.shape)
    tolerance = size * xp.finfo(eigenvalues.dtype).eps * xp.max(xp.abs(eigenvalues))
    return xp.min(eigenvalues) <= tolerance


def _logdet(xp: Any, M: Any) -> Any:
    """``log det M`` of a PSD factor: ``-inf`` when it is singular to working precision."""
    return _logdet_of_eigenvalues(xp, xp.linalg.eigvalsh(M))


def _logdet_of_eigenvalues(xp: Any, eigenvalues: Any) -> Any:
    logs = xp.sum(xp.log(xp.abs(eigenvalues)))
    return xp.where(_singular(xp, eigenvalues), -math.inf, logs)


def _det(xp: Any, M: Any) -> Any:
    """``det M`` of a PSD factor: 0 when it is singular to working precision."""
    eigenvalues = xp.linalg.eigvalsh(M)
    return xp.where(_singular(xp, eigenvalues), 0.0, xp.prod(eigenvalues))


def _warn_if_singular(what: str, eigenvalues: Any, damping: float, xp: Any) -> None:
    """Warn when ``eigenvalues + damping`` are those of a singular matrix.

    Its inverse is then dominated by rounding: entries of 1e9 and more from an
    undamped cross-entropy factor, silently.
    """
    damped = eigenvalues + damping
    if not bool(_singular(xp, damped)):
        return
    largest = float(xp.max(xp.abs(damped)))
    smallest = float(xp.min(damped))
    if smallest < -math.sqrt(xp.finfo(damped.dtype).eps) * largest:
        return  # clearly indefinite (a negative damping): Cholesky says so

    condition = math.inf if smallest <= 0.0 else largest / smallest
    warnings.warn(
        f"KFACInverseLinearOperator: {what} plus damping {damping:g} is singular to "
        f"working precision ({eigenvalues.dtype}; condition number {condition:.3g}, "
        f"largest eigenvalue {largest:.3g}); its inverse is dominated by rounding. "
        f"Increase the damping, e.g. to 1e-3 of the largest eigenvalue ({1e-3 * largest:.3g}).",
        RuntimeWarning,
        stacklevel=5,
    )
