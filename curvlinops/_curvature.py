"""What every operator built from a model and a data set shares.

A subclass writes its per-batch product once, as a pure function of
``(primals, X, y, V, weight)`` against the backend protocol; this class
compiles it (``jax.jit``; as is for PyTorch), walks over the data, converts
batches, splits wide matrices into column blocks, and accumulates.

A subclass may also split its product in two: :meth:`_batch_linearize`
(what depends on parameters and data only) and :meth:`_linearized_matmat`
(what depends on the vectors). The operator then keeps each batch's
linearization for later products (``cache=``, :mod:`curvlinops._linearization`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from curvlinops._base import LinearOperator, _numpy_dtype
from curvlinops._checks import type_error, value_error
from curvlinops._linearization import (
    LinearizationCache,
    active_solver_trace,
    check_cache_options,
)
from curvlinops._memory import MemoryEstimate, operator_memory
from curvlinops._tracing import compiled_method
from curvlinops.backends import make_backend
from curvlinops.backends._arrays import is_array

__all__ = ["DEFAULT_COLUMNS_PER_PASS", "CurvatureOperator", "map_columns", "outputs_with_jvp"]

DEFAULT_COLUMNS_PER_PASS = 16
"""Columns evaluated together by ``vmap``: bounds the memory of wide products.

Wider passes stop paying on the CPU: per column, a 32-column Hessian pass cost
15 ms against 11.5 ms at 16 (MLP of the benchmarks, PyTorch) and 94 against
78 ms (transformer); JAX was flat between 8 and 32.
"""


class CurvatureOperator(LinearOperator):
    """Base of Hessian, GGN and Jacobian operators.

    Subclasses set ``_needs_loss`` and implement :meth:`_batch_matmat` (and
    :meth:`_batch_rmatmat` when not symmetric).
    """

    _needs_loss = True

    def __init__(
        self,
        model_func: Any,
        loss_func: Any,
        params: Any,
        data: Iterable,
        *,
        progressbar: bool = False,
        check_deterministic: bool = True,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        backend: str | None = None,
        columns_per_pass: int = DEFAULT_COLUMNS_PER_PASS,
        process_group: Any = None,
        sharding: Any = None,
        cache: bool | str = "auto",
        cache_memory: int | None = None,
    ) -> None:
        cache, cache_memory = check_cache_options(cache, cache_memory)
        self.backend = make_backend(model_func, params, backend)
        self._cache = LinearizationCache(cache, cache_memory, self.backend.device)
        # Data parallelism (backends/_distributed.py): sums over processes.
        self._comm = self.backend.distribute(process_group, sharding)
        self._loss = self.backend.loss(loss_func) if self._needs_loss else None
        self._data = _check_data(data)
        # In-memory data (list/tuple) is converted to native arrays once.
        self._converted: list | None = None
        self._batch_size_fn = _check_callable_or_none(batch_size_fn, "batch_size_fn")
        self._progressbar = bool(progressbar)
        self.columns_per_pass = _check_positive_int(columns_per_pass, "columns_per_pass")
        self.num_params = sum(int(np.prod(s, dtype=int)) for s in self.backend.param_shapes)
        self._batch_sizes, self._output_sizes = self._survey_data()
        self.num_data = self._check_num_data(num_data)
        super().__init__(self.backend.dtype, self._shape())
        if check_deterministic:
            self._check_deterministic()

    @property
    def _N_data(self) -> int:
        """curvlinops-for-pytorch 3.0.1's name of :attr:`num_data`."""
        return self.num_data

    # --- what subclasses write ----------------------------------------------
    _vector_products = False
    """Whether the per-batch products also take a ``(P,)`` vector (``map_columns`` does)."""
    _activation_factors = (3.0, 0.6)
    """A product's activations in forward passes of the loss (of the model for a
    Jacobian), ``(first column, each further column of a pass)``; see
    :func:`curvlinops._memory.operator_memory` for the measurements. The default is
    the largest kind's, the Hessian's."""

    def _shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def _batch_matmat(self, primals: Any, X: Any, y: Any, V: Any, weight: Any) -> Any:
        raise NotImplementedError

    def _batch_rmatmat(self, primals: Any, X: Any, y: Any, U: Any, weight: Any) -> Any:
        raise NotImplementedError

    # optional: the product split into a linearization, kept per batch, and its use
    def _batch_linearize(self, primals: Any, X: Any, y: Any, *extras: Any) -> Any:
        """What a batch's products share: built once, kept, passed to the two below."""
        raise NotImplementedError

    def _linearized_matmat(self, state: Any, V: Any) -> Any:
        raise NotImplementedError

    def _linearized_rmatmat(self, state: Any, U: Any) -> Any:
        raise NotImplementedError

    def _linearizable(self) -> bool:
        """Whether products may go through :meth:`_batch_linearize` (it is written)."""
        return type(self)._batch_linearize is not CurvatureOperator._batch_linearize

    def _batch_extras(self, index: int, X: Any, n: int) -> tuple:
        """The per-batch arguments after ``V``: the batch's weight (and noise, see fisher.py)."""
        return (self._weight(n),)

    def _batch_operand(self, V: Any, index: int, adjoint: bool) -> Any:
        """The part of ``V`` that batch ``index`` multiplies (all of it; see jacobian.py)."""
        return V

    # --- the kept linearizations ------------------------------------------------
    def cache_info(self) -> dict[str, Any]:
        """What the operator keeps for repeated products (see ``cache=``).

        Returns:
            A dict: ``mode`` (the ``cache`` option), ``batches`` (indices of
            the batches whose linearization is kept), ``nbytes`` (bytes kept,
            parameters not counted) and ``nbytes_per_batch``, ``budget``
            (bytes it may keep; ``None`` for no limit), ``recomputed``
            (batches past the budget, recomputed on every product),
            ``builds`` (linearizations built so far) and ``invalidations``
            (times the parameters changed in place and everything kept was
            dropped).
        """
        return self._cache.info()

    def clear_cache(self) -> None:
        """Forget the kept linearizations (the next product builds them again)."""
        self._cache.clear()

    # --- memory -----------------------------------------------------------------
    def memory_estimate(self, num_columns: int = 1, *, adjoint: bool = False) -> MemoryEstimate:
        """What a product ``A @ X`` with ``num_columns`` columns will need, part by part.

        Parameters; input and output columns; the parameter-space intermediates
        of a pass; the model's activations for one product on the largest batch;
        the kept linearizations (bytes held now, and what the cache may still
        keep). Activations are measured on the first call and remembered:
        PyTorch, the bytes autograd saves in one forward pass, scaled per
        operator kind (``_activation_factors``); JAX, XLA's
        memory analysis of the compiled product (one extra compilation). Nothing
        runs at construction or in products. The Krylov methods check these parts
        against the available memory before they start.

        Args:
            num_columns: Columns of ``X``.
            adjoint: The estimate of ``Aᵀ @ X`` instead.

        Returns:
            A :class:`~curvlinops.MemoryEstimate`; ``held`` names the parts that are
            allocated already.

        Raises:
            TypeError: ``num_columns`` is not an int.
            ValueError: ``num_columns`` is not positive.
        """
        num_columns = _check_positive_int(num_columns, "num_columns")
        return operator_memory(self, num_columns, bool(adjoint) and not self.is_symmetric)

    def _forward_saved_bytes(self) -> tuple[int, int, int]:
        """``(bytes, batch size, batches)``: what a forward pass on the largest batch saves.

        Of the loss (of the model for a Jacobian); measured once (a forward pass,
        PyTorch; abstract, JAX).
        """
        measured = _MEASURED.setdefault(self, {})
        if "forward" not in measured:
            b, nbytes, size = self.backend, 0, 0
            batch = self._largest_batch()
            if batch is not None:
                _, X, y, size = batch
                if self._loss is None:
                    nbytes = b.saved_bytes(lambda p: b.model_fn(p, X), b.primals)
                else:
                    loss = self._loss
                    nbytes = b.saved_bytes(lambda p: loss.value(b, b.model_fn(p, X), y), b.primals)
            batches = sum(1 for n in self._batch_sizes if n > 0)
            measured["forward"] = (int(nbytes), int(size), batches)
        return measured["forward"]

    def _compiled_product_bytes(self, columns: int, adjoint: bool) -> int | None:
        """XLA's temporary bytes of the product on the largest batch (``None``: not compiled)."""
        b = self.backend
        if not (b.compiles and hasattr(b, "compiled_memory")):
            return None
        measured = _MEASURED.setdefault(self, {})
        key = ("compiled", columns, adjoint)
        if key not in measured:
            measured[key] = None
            batch = self._largest_batch()
            if batch is not None:
                index, X, y, n = batch
                size = self.shape[0] if adjoint else self.shape[1]
                # a view of one zero: V's shape and dtype, no memory
                V = np.broadcast_to(np.zeros((), b.dtype), (size, columns))
                product = self._batch_rmatmat if adjoint else self._batch_matmat
                operand = self._batch_operand(V, index, adjoint)
                extras = self._batch_extras(index, X, n)
                stats = b.compiled_memory(product, b.primals, X, y, operand, *extras)
                measured[key] = None if stats is None else stats["temp"]
        return measured[key]

    def _largest_batch(self) -> tuple[int, Any, Any, int] | None:
        """``(index, X, y, n)`` of the largest non-empty batch (``None``: no data here)."""
        sizes = self._batch_sizes
        if not sizes or max(sizes) == 0:
            return None
        largest = int(np.argmax(sizes))
        for batch in self._batches("curvlinops: memory estimate"):
            if batch[0] == largest:
                return batch
        return None

    # --- products -------------------------------------------------------------
    def _compiled(self, name: str, data_args: tuple[int, ...] = (1, 2)) -> Callable:
        """Method ``name`` compiled (JAX), shared with operators of equal configuration."""
        methods = self.__dict__.setdefault("_compiled_methods", {})
        if name not in methods:
            methods[name] = compiled_method(self, name, data_args=data_args)
        return methods[name]

    @property
    def _compiled_matmat(self) -> Callable:
        return self._compiled("_batch_matmat")

    @property
    def _compiled_rmatmat(self) -> Callable:
        return self._compiled("_batch_rmatmat")

    def _native(self, X: Any, adjoint: bool) -> Any:
        """Accumulate the per-batch products over the data, a column block at a time."""
        # a self-adjoint operator has no separate adjoint product (rmatvec, Hᵀ in composites)
        adjoint = adjoint and not self.is_symmetric
        K = X.shape[1]
        if K <= self.columns_per_pass:
            return self._sum_over_processes(self._local_product(X, adjoint), X, adjoint)
        blocks = [
            self._local_product(X[:, start : start + self.columns_per_pass], adjoint)
            for start in range(0, K, self.columns_per_pass)
        ]
        return self._sum_over_processes(self.backend.concat(blocks, axis=1), X, adjoint)

    def _native_vector(self, x: Any, adjoint: bool) -> Any:
        if not self._vector_products or self._comm.world_size > 1:
            # (the all-reduce packs a column check next to the columns)
            return super()._native_vector(x, adjoint)
        adjoint = adjoint and not self.is_symmetric
        return self._sum_over_processes(self._local_product(x, adjoint), x, adjoint)

    def _local_product(self, V: Any, adjoint: bool) -> Any:
        """The product over this process's data; zeros when it holds none."""
        result = self._accumulate(V, adjoint)
        if result is None:
            rows = self.shape[1] if adjoint else self.shape[0]
            return self.backend.zeros((rows, *V.shape[1:]))
        return result

    def _sum_over_processes(self, Y: Any, X: Any, adjoint: bool) -> Any:
        """Sum a product over the processes' data shards (identity in one process).

        Results in the parameter space are sums over all data: all-reduced.
        Results in the data space (Jacobian rows) stay with the process that
        holds the data. Parameter-space inputs must agree across processes.
        """
        if not (self._params_in if adjoint else self._params_out):
            return Y
        replicated_input = self._params_out if adjoint else self._params_in
        return self._comm.all_reduce_sum(Y, check=X if replicated_input else None)

    def _accumulate(self, V: Any, adjoint: bool) -> Any:
        return self._combine(self._batch_terms(V, adjoint), V, adjoint)

    def _combine(self, terms: Iterator[tuple[int, Any]], V: Any, adjoint: bool) -> Any:
        """The sum of the batches' terms (``None`` without any)."""
        result = None
        for _, term in terms:
            result = term if result is None else result + term
        return result

    def _batch_terms(self, V: Any, adjoint: bool) -> Iterator[tuple[int, Any]]:
        """``(index, product)`` per non-empty batch, from its kept linearization if any.

        When every batch's linearization is kept, the data is not read at all
        (a DataLoader is not iterated).
        """
        cache = self._usable_cache(V)
        kept = [i for i, n in enumerate(self._batch_sizes) if n > 0]
        # the bar reads like curvlinops-for-pytorch 3.0.1's, one "_matmat" bar per product
        label = f"{type(self).__name__}._matmat (on {self.backend.device})"
        if cache is not None and cache.holds_all(kept):
            for index in self._progress(kept, label):
                yield index, self._apply_linearization(cache.get(index), V, index, adjoint)
            return
        product = self._compiled_rmatmat if adjoint else self._compiled_matmat
        primals = self.backend.primals
        for index, X, y, n in self._batches(label):
            if n == 0:  # an empty batch adds nothing (and its mean loss is NaN)
                continue
            extras = self._batch_extras(index, X, n)
            state = None if cache is None else cache.get(index)
            if state is None and cache is not None and cache.wants(index):
                state = self._compiled("_batch_linearize")(primals, X, y, *extras)
                cache.offer(index, state, self.backend.cached_bytes(state))
            if state is not None:
                yield index, self._apply_linearization(state, V, index, adjoint)
            else:
                yield index, product(primals, X, y, self._batch_operand(V, index, adjoint), *extras)

    def _usable_cache(self, V: Any) -> LinearizationCache | None:
        """The cache, fresh for the current parameters, if this product may use it."""
        cache = self._cache
        if not (cache.enabled and self._linearizable()):
            return None
        if self.backend.can_linearize(V):
            cache.check_fresh(self.backend.parameters_token())
            return cache
        # a solver compiling its loop reads what is kept (nothing is built under a trace)
        kept = [i for i, n in enumerate(self._batch_sizes) if n > 0]
        if active_solver_trace() is None or not cache.holds_all(kept):
            return None
        cache.check_fresh(self.backend.parameters_token())
        return cache if cache.holds_all(kept) else None

    def _apply_linearization(self, state: Any, V: Any, index: int, adjoint: bool) -> Any:
        """A kept linearization applied to ``V``, in passes as wide as the backend prefers."""
        name = "_linearized_rmatmat" if adjoint else "_linearized_matmat"
        operand = self._batch_operand(V, index, adjoint)
        apply = self._compiled(name, data_args=())
        width = self.backend.linearized_columns_per_pass(self._cache.nbytes_of(index))
        wide = width is None or operand.ndim == 1 or operand.shape[1] <= width
        # traced (a compiled solver loop, jax.jit): one vmap, not a program per column
        if wide or not self.backend.is_concrete(operand):
            return apply(state, operand)
        passes = range(0, operand.shape[1], width)
        return self.backend.concat([apply(state, operand[:, i : i + width]) for i in passes], 1)

    # --- the loss itself -------------------------------------------------------------
    def gradient_and_loss(self) -> tuple[Any, Any]:
        """The gradient and value of the loss over the data (as curvlinops-for-pytorch 3.0.1).

        Those of the function whose curvature the operator is, normalised alike
        (one pass over the data; :func:`curvlinops.gradient_and_loss` as a method).

        Returns:
            ``(gradient, loss)``: the gradient as a list of tensors shaped like the
            parameters (PyTorch) or a pytree like ``params`` (JAX); the loss a 0-d array.

        Raises:
            ValueError: The operator has no loss function (a Jacobian).
        """
        if self._loss is None:
            raise value_error(
                f"{type(self).__name__}.gradient_and_loss",
                "an operator with a loss function",
                "one without (it depends on the model only)",
                "Call curvlinops.gradient_and_loss(model_func, loss_func, params, data).",
            )
        gradient, loss = self._flat_gradient_and_loss()
        pieces = self.backend.unflatten(gradient)
        return (list(pieces) if self.backend.name == "torch" else pieces), loss

    def _flat_gradient_and_loss(self) -> tuple[Any, Any]:
        """The gradient ``(P,)`` and the loss, summed over batches (and processes)."""
        b = self.backend
        step = self._compiled("_batch_gradient_and_loss")
        gradient, loss = b.zeros((self.num_params,)), b.zeros(())
        for _, X, y, n in self._batches("gradient_and_loss"):
            if n == 0:  # an empty batch (shard) adds nothing
                continue
            g, value = step(b.primals, X, y, self._weight(n))
            gradient, loss = gradient + g, loss + value
        # data parallelism: the sums over all processes' data
        return self._comm.all_reduce_sum(gradient), self._comm.all_reduce_sum(loss)

    def _batch_gradient_and_loss(self, primals: Any, X: Any, y: Any, weight: Any) -> Any:
        b, loss, model = self.backend, self._loss, self.backend.model_fn
        value, pullback = b.vjp(lambda p: loss.value(b, model(p, X), y), primals)
        return weight * b.flatten(pullback(b.xp.ones_like(value))), weight * value

    def _weight(self, batch_size: int) -> float:
        """The factor of one batch's loss in the total (normalisation by N)."""
        if self._loss is not None and self._loss.reduction == "mean":
            return batch_size / self.num_data
        return 1.0

    # --- data -------------------------------------------------------------------
    def _batches(self, description: str = "") -> Iterator[tuple[int, Any, Any, int]]:
        """``(index, X, y, batch size)`` with native arrays, in the data's order.

        Batches of a list or tuple are converted once and kept (zero-copy where
        the framework can alias the caller's memory); other iterables, such as
        data loaders, are read and converted on every pass.
        """
        if self._converted is not None:
            return iter(self._progress(self._converted, description))
        trace = active_solver_trace()
        if trace is not None and not isinstance(self._data, (list, tuple)):
            trace.streamed = True
        if isinstance(self._data, (list, tuple)):
            self._converted = list(self._read(self._data))
            return iter(self._progress(self._converted, description))
        return self._read(self._progress(self._data, description))

    def _read(self, batches: Iterable) -> Iterator[tuple[int, Any, Any, int]]:
        b = self.backend
        for index, batch in enumerate(batches):
            X, y = _split_batch(batch, index)
            X = b.import_batch(X, index)
            y = None if y is None else b.import_batch(y, index)
            yield index, X, y, self._batch_size(X, index)

    def _progress(self, batches: Iterable, description: str) -> Iterable:
        if not self._progressbar:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc=description, leave=False)

    def _batch_size(self, X: Any, index: int) -> int:
        if self._batch_size_fn is not None:
            return int(self._batch_size_fn(X))
        if not hasattr(X, "shape"):
            raise value_error(
                "batch_size_fn",
                "a function X -> batch size when X is not an array",
                f"None while batch {index} has X of type {type(X).__name__}",
                "Pass e.g. batch_size_fn=lambda X: X['input_ids'].shape[0].",
            )
        return self.backend.batch_size(X)

    def _survey_data(self) -> tuple[list[int], list[int]]:
        """Batch sizes and model output sizes, from one pass over the data that checks it."""
        batch_sizes, output_sizes = [], []
        self._batch_output_shapes: list[tuple[int, ...]] = []
        b = self.backend
        for index, X, y, n in self._batches("curvlinops: reading data"):
            batch_sizes.append(n)
            if n == 0 and self._needs_loss:  # an empty batch adds nothing to a loss
                continue
            outputs = model_outputs(b, b.primals, X, f"data batch {index}")
            if not self._needs_loss:
                output_sizes.append(int(np.prod(outputs.shape, dtype=int)))
                self._batch_output_shapes.append(tuple(outputs.shape))
            if n:
                self._check_batch(index, X, y, outputs)
        if not batch_sizes and self._comm.world_size == 1:
            raise value_error("data", "at least one batch (X, y)", "an empty iterable")
        loss = self._loss
        if getattr(loss, "weighted_mean", False) and loss.reduction == "mean":
            if sum(1 for n in batch_sizes if n) > 1 or self._comm.world_size > 1:
                raise loss.coupled_error(
                    "data in several batches (each batch divides by its own weights)"
                )
        return batch_sizes, output_sizes

    def _check_batch(self, index: int, X: Any, y: Any, outputs: Any) -> None:
        check_batch(self.backend, self._loss, f"data batch {index}", X, y, outputs)

    def _check_num_data(self, num_data: int | None) -> int:
        counted = self._comm.global_count(sum(self._batch_sizes))
        W = self._comm.world_size
        where = "" if W == 1 else f", summed over {W} processes"
        if counted == 0:
            raise value_error("data", f"at least one data point{where}", "batches of size 0 only")
        if num_data is None:
            return counted
        num_data = _check_positive_int(num_data, "num_data")
        if num_data != counted:
            raise value_error(
                "num_data",
                f"the number of data points in data ({counted}{where})",
                str(num_data),
                "Leave num_data=None to count them.",
            )
        return num_data

    # --- determinism ----------------------------------------------------------------
    def _check_deterministic(self) -> None:
        """Two passes over the data must see the same batches and the same model."""
        with self._cache.paused():  # two products that recompute everything
            self._check_deterministic_uncached()

    def _check_deterministic_uncached(self) -> None:
        b = self.backend
        first = list(self._batches("curvlinops: checking determinism"))
        second = list(self._batches("curvlinops: checking determinism"))
        if len(first) != len(second):
            raise RuntimeError(
                f"data: two passes gave {len(first)} and {len(second)} batches. "
                "Is it a generator or a loader with drop_last and shuffling? Pass a "
                "deterministic re-iterable, or check_deterministic=False."
            )
        for (i, X1, y1, _), (_, X2, y2, _) in zip(first, second):
            if not (b.equal(X1, X2) and b.equal(y1, y2)):
                raise RuntimeError(
                    f"data: batch {i} differed between two passes. A shuffled DataLoader "
                    "(shuffle=True) or random augmentation? Use shuffle=False and no random "
                    "transforms, or pass check_deterministic=False."
                )
            out1 = b.model_fn(b.primals, X1)
            out2 = b.model_fn(b.primals, X2)
            if not b.equal(out1, out2):
                raise RuntimeError(
                    f"model_func: two evaluations on batch {i} gave different outputs. Dropout "
                    "or another random layer active? Call model.eval() (PyTorch) or make the "
                    "function deterministic, or pass check_deterministic=False."
                )
        probe = b.random_normal((self.shape[1], 1), seed=0)
        product = self._native(probe, False)
        if not b.all_finite(product):
            functions = "model_func and loss_func" if self._needs_loss else "model_func"
            raise value_error(
                f"{type(self).__name__} of {functions}",
                "finite products",
                "NaN or inf in the product with a random vector, while the data and the "
                "model's outputs are finite",
                "Look for derivatives that do not exist at the data (sqrt or log at 0, "
                "abs at 0 in a loss) or overflow in the loss.",
            )
        if not _close(b, product, self._native(probe, False)):
            raise RuntimeError(
                f"{type(self).__name__}: two products with the same vector differ. Is the "
                "model or the loss random? Pass check_deterministic=False to skip this check."
            )


_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per operator: its measured activations (kept off the operator, whose attributes
key the shared compilations, see :mod:`curvlinops._tracing`)."""


def check_batch(b: Any, loss: Any, where: str, X: Any, y: Any, outputs: Any) -> None:
    """Finite inputs, targets that suit the loss, finite outputs; else name the culprit."""
    if not all(b.all_finite(leaf) for leaf in _float_leaves(b, X)):
        raise value_error(
            f"X of {where}",
            "finite inputs",
            "NaN or inf values",
            "Remove or impute the examples with missing values.",
        )
    if loss is not None and y is not None:
        loss.check_targets(b, outputs, y, f"y of {where}")
    if b.all_finite(outputs):
        return
    leaves = b.tree_flatten(b.primals)[0]
    bad = [n for n, p in zip(b.param_names, leaves) if not b.all_finite(p)]
    raise value_error(
        "model_func",
        "finite outputs",
        f"NaN or inf outputs on {where}, whose inputs are finite",
        f"The parameters {bad} hold NaN or inf."
        if bad
        else "Look for an overflow (float16, exp) or a log or division of zero in the model.",
    )


def model_outputs(b: Any, primals: Any, X: Any, where: str, like: str = "") -> Any:
    """The model's outputs on a batch.

    Inputs of another dtype than the parameters and outputs that are not one
    array are named here rather than deep inside the framework; with ``like``
    (a description of the inputs the model took before), any failure of the
    model on these inputs is.
    """
    try:
        outputs = b.model_fn(primals, X)
    except (RuntimeError, TypeError, ValueError) as error:
        others = sorted({str(_numpy_dtype(leaf)) for leaf in _float_leaves(b, X)} - {str(b.dtype)})
        if not others and like:
            shapes = [tuple(leaf.shape) for leaf in b.tree_flatten(X)[0]]
            raise value_error(
                f"X of {where}",
                f"inputs the model accepts, {like}",
                f"shapes {shapes} (the model failed on them: {error})",
                "Pass inputs with the training inputs' features and layout.",
            ) from error
        if not others:
            raise
        name = np.dtype(b.dtype).name
        raise value_error(
            f"X of {where}",
            f"inputs of the parameters' dtype {name}",
            f"dtype {', '.join(others)} (the model failed on it: {error})",
            f"Cast the data to {name} (PyTorch: X.to(torch.{name}); numpy or JAX: "
            f"X.astype('{name}')), or the model to the data's dtype.",
        ) from error
    if not is_array(outputs):
        raise type_error(
            "model_func",
            "a model that returns one array (the predictions or logits)",
            outputs,
            _outputs_fix(outputs),
        )
    return outputs


def _outputs_fix(outputs: Any) -> str:
    if isinstance(outputs, dict) or hasattr(outputs, "keys"):
        keys = list(outputs.keys())
        return (
            f"It returned a mapping with the keys {keys}: wrap the model so that it returns "
            f"the array the loss takes, e.g. lambda ...: model(...)[{keys[0]!r}] (a Hugging "
            "Face model: its .logits)."
        )
    if isinstance(outputs, (tuple, list)):
        return (
            f"It returned a {type(outputs).__name__} of {len(outputs)}: wrap the model so that "
            "it returns the array the loss takes, e.g. lambda ...: model(...)[0] (drop the "
            "auxiliary outputs)."
        )
    return "Return the outputs as an array of the parameters' framework."


def map_columns(backend: Any, column: Callable[[Any], Any], V: Any) -> Any:
    """Apply ``column`` (vector -> vector) to every column of ``V``, vectorised.

    One column skips ``vmap``: its wrappers cost about 5% of a PyTorch
    matvec, and scipy's solvers call matvec. A 1-d ``V`` is one column too.
    """
    if V.ndim == 1:
        return column(V)
    if V.shape[1] == 1:
        return column(V[:, 0])[:, None]
    return backend.vmap(column, in_axes=1, out_axes=1)(V)


def outputs_with_jvp(backend: Any, model: Callable, primals: Any, X: Any, v: Any) -> tuple:
    """``(z, pullback, J v)`` for the outputs ``z = model(primals, X)`` and a flat ``v``.

    Forward mode inside reverse mode: one forward pass gives ``z`` and ``J v``
    (measured 1.9x a gradient in PyTorch, against 2.4x for a JVP and a VJP).
    """

    def outputs_and_jvp(p: Any) -> tuple[Any, Any]:
        return backend.jvp(lambda q: model(q, X), (p,), (backend.unflatten(v),))

    return backend.vjp(outputs_and_jvp, primals, has_aux=True)


def _close(b: Any, a: Any, c: Any) -> bool:
    a, c = b.to_numpy(a), b.to_numpy(c)
    if a.size == 0:  # no rows: a Jacobian over an empty data shard
        return a.shape == c.shape
    scale = max(float(np.max(np.abs(a))), np.finfo(a.dtype).tiny)
    return bool(np.max(np.abs(a - c)) <= 1e-5 * scale)


def _float_leaves(b: Any, tree: Any) -> list[Any]:
    leaves = b.tree_flatten(tree)[0]
    return [leaf for leaf in leaves if b.xp.isdtype(leaf.dtype, "real floating")]


def _split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise type_error(
        f"data batch {index}", "a pair (X, y)", batch, "data must yield (inputs, targets) pairs."
    )


def _check_data(data: Any) -> Iterable:
    if data is None or not hasattr(data, "__iter__"):
        raise type_error("data", "a re-iterable of (X, y) batches (list, DataLoader)", data)
    if iter(data) is data:
        raise type_error(
            "data",
            "a re-iterable of (X, y) batches (list, DataLoader)",
            data,
            "Iterators and generators can be read only once; wrap them in list(...).",
        )
    return data


def _check_callable_or_none(fn: Any, argument: str) -> Any:
    if fn is not None and not callable(fn):
        raise type_error(argument, "a callable or None", fn)
    return fn


def _check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise type_error(argument, "a positive int", value)
    if value <= 0:
        raise value_error(argument, "a positive int", str(value))
    return int(value)
