r"""EK-FAC's factors for influence, as kronfluence's ``fit_all_factors``: fewer passes, resumable.

:func:`fit_ekfac` computes what
:meth:`~curvlinops.EKFACLinearOperator.compute_eigenvalue_correction` computes
(the Kronecker factors, their eigenvectors and the corrected eigenvalues, the
same numbers), with options for large runs:

* ``cache_memory``: the layer inputs and output gradients of the first pass
  (the factors) are kept, batch by batch, while they fit in this many bytes,
  and the second pass (the correction) reads them instead of running the
  model again: each kept batch saves a forward and a backward pass. Batches
  beyond the budget are recomputed. Default ``0``: nothing kept (the memory of
  :meth:`~curvlinops.EKFACLinearOperator.compute_eigenvalue_correction`).
* ``keep_captures``: the kept captures are returned after the correction
  (:class:`KeptCaptures`); for an empirical Fisher of a summed loss they hold
  each example's own gradients, and the pairwise scores of the same training
  data form their training gradients from them
  (``InfluenceScorer.pairwise_scores(..., train_captures=)``): factors and
  scores then run the model once over the training data.
* ``output_dir``: the data are taken in partitions of ``batches_per_partition``
  batches; each partition's sums (its covariances, then its corrections) are
  saved when done (safetensors, with the settings), and a rerun with the same
  settings loads the partitions found there instead of computing them, so an
  interrupted run continues where it stopped. Factors of other settings in the
  folder are refused, not mixed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops._checks import check_positive_int, type_error, value_error
from curvlinops.influence_store import SUFFIX, _check_same, _factor_settings, _read, _write
from curvlinops.kfac import EKFACLinearOperator, _forget_closed_forms, _nest_corrections

__all__ = ["KeptCaptures", "fit_ekfac"]


def fit_ekfac(
    curvature: EKFACLinearOperator,
    *,
    cache_memory: float = 0,
    output_dir: Any = None,
    batches_per_partition: int = 1,
    keep_captures: bool = False,
) -> KeptCaptures | None:
    """Compute an EK-FAC operator's factors and corrected eigenvalues (see the module).

    Args:
        curvature: The :class:`~curvlinops.EKFACLinearOperator` (its data and
            options); its factors are replaced.
        cache_memory: Bytes for the first pass's layer inputs and output
            gradients, kept for the second pass (``0``: none kept).
        output_dir: A folder for the partitions' sums (resuming a run), or ``None``.
        batches_per_partition: Batches per saved partition (with ``output_dir``).
        keep_captures: Return the kept captures (those within ``cache_memory``)
            after the correction, for the scores of the same training data
            (``InfluenceScorer.pairwise_scores(..., train_captures=)``): with
            ``fisher_type="empirical"`` and a summed loss, they hold each
            example's own gradients. They take ``cache_memory`` until dropped.

    Returns:
        The :class:`KeptCaptures` with ``keep_captures``, else ``None``.
    """
    E = _check_ekfac(curvature)
    b = E.backend
    budget = _check_bytes(cache_memory)
    size = check_positive_int(batches_per_partition, "batches_per_partition")
    if keep_captures:
        _check_keepable(E)
    store = None if output_dir is None else _PartitionStore(output_dir, E, size)
    cache: dict[int, Any] = {}
    inputs, gradients = _covariances(E, size, store, cache, budget)
    if E._comm.world_size > 1:
        inputs, gradients = E._sum_over_processes(inputs, gradients)
    E._check_all_layers_called(inputs, gradients)
    E._input_covariances, E._gradient_covariances = inputs, gradients
    if store is not None:  # corrections saved in a folder belong to these covariances
        store.settings["covariance_total"] = repr(sum(_total(b, f) for f in (inputs, gradients)))
    eigenvectors = E._run("eigenvectors")
    E._input_covariances_eigenvectors = eigenvectors(inputs)
    E._gradient_covariances_eigenvectors = eigenvectors(gradients)
    corrections = _corrections(E, size, store, cache, keep_captures)
    if E._comm.world_size > 1:
        corrections = E._sum_corrections_over_processes(corrections)
    E._corrected_eigenvalues = _nest_corrections(corrections, E._mapping, E._is_joint)
    _forget_closed_forms(E)
    return KeptCaptures(E, cache) if keep_captures else None


def _covariances(
    E: EKFACLinearOperator, size: int, store: Any, cache: dict, budget: int
) -> tuple[dict, dict]:
    """The first pass: each partition's covariance sums (loaded, or computed and saved)."""
    totals: tuple[dict, dict] = ({}, {})
    kept = 0
    for part, batches in _partitions(E._batches("EK-FAC factors"), size):
        if store is not None and store.has("covariances", part):
            sums = store.get("covariances", part)
        else:
            sums = ({}, {})
            for index, X, y, n in batches:
                captures = _captures(E, index, X, y, n)
                if captures is None:
                    continue
                for total, batch in zip(sums, E._run("captured_factors")(*captures)):
                    _add(total, batch)
                size = _nbytes(captures)
                if kept + size <= budget:
                    cache[index], kept = (captures, X, y), kept + size
            if store is not None:
                store.put("covariances", part, sums)
        for total, partial in zip(totals, sums):
            _add(total, partial)
    return totals


def _corrections(
    E: EKFACLinearOperator, size: int, store: Any, cache: dict, keep: bool = False
) -> dict:
    """The second pass: each partition's corrections, from kept captures where there are."""
    Q_A, Q_G = E._input_covariances_eigenvectors, E._gradient_covariances_eigenvectors
    keys = E._program.correction_keys()
    correct = E._run("captured_correction")
    totals: dict = {}
    for part, batches in _partitions(E._batches("EK-FAC eigenvalue correction"), size):
        if store is not None and store.has("corrections", part):
            _add(totals, store.get("corrections", part)[0])
            continue
        sums: dict = {}
        for index, X, y, n in batches:
            kept = cache.get(index) if keep else cache.pop(index, None)
            captures = kept[0] if kept is not None else _captures(E, index, X, y, n)
            if captures is not None:
                _add(sums, dict(zip(keys, correct(*captures, Q_A, Q_G))))
        if store is not None:
            store.put("corrections", part, (sums, {}))
        _add(totals, sums)
    return totals


def _captures(E: EKFACLinearOperator, index: int, X: Any, y: Any, n: int) -> Any:
    """A batch's layer inputs, output gradients and scale (``None`` for an empty batch)."""
    if n == 0:
        return None
    E._capture.prepare(X)  # JAX: trace the model outside the compiled function
    return E._run("batch_captures")(E.backend.primals, X, y, E._noise(index, X), E._weight(n))


class KeptCaptures:
    """The factor pass's layer inputs and per-example output gradients of training batches.

    From :func:`fit_ekfac` with ``keep_captures=True``; passed as
    ``train_captures`` to
    :meth:`~curvlinops.influence_scores.InfluenceScorer.pairwise_scores`, a
    kept batch's per-example gradients are formed from them (a batched
    product per layer) instead of a forward and backward pass of the model.
    Each kept batch is checked to be the one scored (the same inputs and
    targets). Drop the object to free its memory.
    """

    def __init__(self, E: EKFACLinearOperator, batches: dict[int, Any]) -> None:
        self.operator, self.batches = E, batches

    def gradients(self, scorer: Any, index: int, start: int, X: Any, y: Any) -> Any:
        """``(P, n)`` gradients of rows ``start:start + n`` of batch ``index``, or ``None``."""
        from curvlinops._influence_tokens import gradients_from_captures

        if index not in self.batches:
            return None
        (inputs, gradients, _), X_kept, y_kept = self.batches[index]
        b, n = scorer.backend, y.shape[0]
        rows = slice(start, start + n)
        if not (b.equal(X_kept[rows], X) and b.equal(y_kept[rows], y)):
            raise value_error(
                "train_captures",
                f"captures of the training data scored (batch {index})",
                "captures of other inputs or targets",
                "Pass the data fit_ekfac ran on, in the same batches, as train_data.",
            )
        inputs = {name: a[rows] for name, a in inputs.items()}
        gradients = {name: g[:, rows] for name, g in gradients.items()}
        return gradients_from_captures(scorer, self.operator, inputs, gradients, n)

    def check_scorer(self, scorer: Any) -> None:
        """Raise unless ``scorer`` differentiates the same loss of the same parameters."""
        E, loss = self.operator, scorer._gradients.loss
        same_loss = type(loss) is type(E._loss) and loss.reduction == E._loss.reduction
        same_params = scorer.backend.param_names == E.backend.param_names
        if not (same_loss and same_params and scorer._capturing is E):
            raise value_error(
                "train_captures",
                "captures of the scorer's own EK-FAC curvature, loss and parameters",
                f"those of {type(E._loss).__name__}(reduction={E._loss.reduction!r})",
                "Score with the EKFACLinearOperator fit_ekfac ran on, and its loss.",
            )


def _check_keepable(E: EKFACLinearOperator) -> None:
    """Kept captures are per-example gradients for an empirical Fisher of a summed loss."""
    if E._fisher_type.value != "empirical" or E._loss.reduction != "sum":
        raise value_error(
            "keep_captures",
            "an EK-FAC of fisher_type='empirical' and a loss of reduction='sum' (its captured "
            "output gradients are then each example's own)",
            f"fisher_type={E._fisher_type.value!r}, reduction={E._loss.reduction!r}",
            "Leave keep_captures=False (the scores then run the model on the training data).",
        )


def _total(b: Any, arrays: dict) -> float:
    return sum(float(b.to_numpy(value).sum()) for value in arrays.values())


def _add(totals: dict, values: dict) -> None:
    for key, value in values.items():
        totals[key] = value if key not in totals else totals[key] + value


def _nbytes(captures: Any) -> int:
    inputs, gradients, _ = captures
    return sum(int(a.nbytes) for a in [*inputs.values(), *gradients.values()])


def _partitions(batches: Iterator, size: int) -> Iterator[tuple[int, list]]:
    """``(partition, its batches)``: ``size`` consecutive batches at a time."""
    part: list = []
    count = 0
    for batch in batches:
        part.append(batch)
        if len(part) == size:
            yield count, part
            part, count = [], count + 1
    if part:
        yield count, part


def _check_ekfac(curvature: Any) -> EKFACLinearOperator:
    if not isinstance(curvature, EKFACLinearOperator):
        raise type_error(
            "curvature",
            "an EKFACLinearOperator (fit_ekfac computes its factors and corrections)",
            curvature,
            "For KFAC, compute_kronecker_factors() is all there is.",
        )
    return curvature


def _check_bytes(cache_memory: Any) -> int:
    if isinstance(cache_memory, bool) or not isinstance(cache_memory, (int, float)):
        raise type_error("cache_memory", "a number of bytes >= 0", cache_memory)
    if not cache_memory >= 0 or math.isinf(cache_memory):
        raise value_error("cache_memory", "a finite number of bytes >= 0", repr(cache_memory))
    return int(cache_memory)


# --- partitions on disk -------------------------------------------------------------
class _PartitionStore:
    """A folder of partition sums of one :func:`fit_ekfac` run, with its settings."""

    def __init__(self, output_dir: Any, E: EKFACLinearOperator, size: int) -> None:
        if not isinstance(output_dir, (str, Path)):
            raise type_error("output_dir", "a folder path (str or pathlib.Path)", output_dir)
        self.folder = Path(output_dir)
        self.backend = E.backend
        self.settings = {
            **_factor_settings(E),
            "batches_per_partition": size,
            "batch_sizes": [int(n) for n in E._batch_sizes],
            "dtype": str(np.dtype(E.backend.dtype)),
            "backend": E.backend.name,
        }

    def _path(self, kind: str, part: int) -> Path:
        return self.folder / f"ekfac_{kind}_partition{part}{SUFFIX}"

    def has(self, kind: str, part: int) -> bool:
        """Whether partition ``part``'s ``kind`` sums are saved (of these settings, else raise)."""
        path = self._path(kind, part)
        if not path.is_file():
            return False
        _check_same(
            self.settings,
            _read(path, "output_dir")[1],
            "output_dir",
            "Use a new folder for other settings (or empty this one).",
        )
        return True

    def put(self, kind: str, part: int, sums: tuple[dict, dict]) -> None:
        """Save a partition's sums: two dicts keyed by layer or ``(layer, block)``."""
        to_numpy = self.backend.to_numpy
        arrays = {
            f"{which}/{_key(key)}": to_numpy(value)
            for which, values in enumerate(sums)
            for key, value in values.items()
        }
        _write(self._path(kind, part), arrays, self.settings)

    def get(self, kind: str, part: int) -> tuple[dict, dict]:
        """A saved partition's sums, as native arrays."""
        arrays, _ = _read(self._path(kind, part), "output_dir")
        b, sums = self.backend, ({}, {})
        for entry, value in arrays.items():
            which, key = entry.split("/", 1)
            native = b.import_array(value.astype(b.dtype), "partition")[0]
            sums[int(which)][_unkey(key)] = native
        return sums


def _key(key: Any) -> str:
    """A layer name, or a correction's ``(layer, position or "joint")``, as a string."""
    if isinstance(key, tuple):
        name, block = key
        return f"{name}|{block}"
    return key


def _unkey(text: str) -> Any:
    if "|" not in text:
        return text
    name, block = text.rsplit("|", 1)
    return (name, block if block == "joint" else int(block))
