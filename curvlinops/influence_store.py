"""Influence factors and scores on disk: safetensors files that carry their settings.

* :func:`save_factors` / :func:`load_factors`: the Kronecker factors of a
  :class:`~curvlinops.KFACLinearOperator` (and EK-FAC's eigenvectors and
  corrected eigenvalues), with the options they were computed with; loading
  checks that the operator it goes into has the same options and layers.
* :func:`save_scores` / :func:`load_scores`: scores (one array, or one per
  layer) with the settings that produced them.
* :class:`ScoreBlockStore`: the blocks of a partitioned
  :meth:`~curvlinops.influence_scores.InfluenceScorer.pairwise_scores` run,
  one file per (query partition, training batch), written when done, so that
  a rerun resumes where an interrupted one stopped.

Files are safetensors (the settings as JSON in its metadata, under
``"settings"``), or ``.npz`` where the path ends so (the settings under
``__settings__``); files of either kind load, whatever their name, so files
written before safetensors was the format still do. Files are written to a
temporary name and renamed, so an interruption never leaves a partial file
under the final name. Arrays are saved as numpy arrays: factors saved from
PyTorch load into JAX (and back) where the layer names agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from curvlinops._checks import type_error, value_error
from curvlinops.kfac import EKFACLinearOperator, KFACLinearOperator

__all__ = ["ScoreBlockStore", "load_factors", "load_scores", "save_factors", "save_scores"]

SETTINGS_KEY = "__settings__"
"""The ``.npz`` entry holding the settings as JSON."""

METADATA_KEY = "settings"
"""The safetensors metadata entry holding the settings as JSON."""

SUFFIX = ".safetensors"
"""The suffix of the files this module names itself (score blocks, factor partitions)."""

_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; safetensors starts with its header size


# --- files --------------------------------------------------------------------------
def _write(path: Path, arrays: dict[str, np.ndarray], settings: dict[str, Any]) -> None:
    """``arrays`` and ``settings`` to ``path`` (via a temporary file and a rename).

    safetensors, or ``.npz`` where ``path`` ends so.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    text = json.dumps(settings)
    if path.suffix == ".npz":
        with open(temporary, "wb") as file:
            np.savez(file, **arrays, **{SETTINGS_KEY: np.array(text)})
    else:
        save = _safetensors().numpy.save
        contiguous = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
        temporary.write_bytes(save(contiguous, metadata={METADATA_KEY: text}))
    os.replace(temporary, path)


def _read(path: Any, argument: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, settings)`` of a file of :func:`_write` (safetensors or ``.npz``)."""
    path = Path(path)
    if not path.is_file():
        raise value_error(argument, "an existing .safetensors or .npz file", repr(str(path)))
    with open(path, "rb") as file:
        is_npz = file.read(4) == _ZIP_MAGIC
    if is_npz:
        with np.load(path, allow_pickle=False) as contents:
            arrays = {key: contents[key] for key in contents.files if key != SETTINGS_KEY}
            text = str(contents[SETTINGS_KEY]) if SETTINGS_KEY in contents.files else None
    else:
        arrays, text = _read_safetensors(path, argument)
    if text is None:
        raise value_error(argument, "a file written by curvlinops (with settings)", str(path))
    return arrays, json.loads(text)


def _safetensors() -> Any:
    """The safetensors package (with its numpy module), or an ImportError saying what to do."""
    try:
        import safetensors
        import safetensors.numpy  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "curvlinops.influence_store writes and reads safetensors files: pip install "
            "'curvlinops[influence]' (safetensors), or give paths ending in .npz."
        ) from error
    return safetensors


def _read_safetensors(path: Path, argument: str) -> tuple[dict[str, np.ndarray], str | None]:
    safetensors = _safetensors()
    try:
        with safetensors.safe_open(str(path), framework="numpy") as contents:
            arrays = {key: contents.get_tensor(key) for key in contents.keys()}  # noqa: SIM118
            metadata = contents.metadata() or {}
    except safetensors.SafetensorError as error:
        raise value_error(
            argument, "a .safetensors or .npz file", f"{path} (unreadable: {error})"
        ) from error
    return arrays, metadata.get(METADATA_KEY)


def _check_same(expected: dict, found: dict, argument: str, fix: str) -> None:
    """Raise naming the settings that differ."""
    differ = {
        key: (found.get(key), expected.get(key))
        for key in expected
        if found.get(key) != expected[key]
    }
    if differ:
        described = ", ".join(
            f"{key}: {old!r} there, {new!r} here" for key, (old, new) in differ.items()
        )
        raise value_error(argument, "files of the same settings", described, fix)


# --- scores -------------------------------------------------------------------------
def _score_arrays(scores: Any, to_numpy: Any) -> dict[str, np.ndarray]:
    if isinstance(scores, dict):
        return {f"layer:{name}": to_numpy(value) for name, value in scores.items()}
    return {"scores": to_numpy(scores)}


def _scores_from(arrays: dict[str, np.ndarray]) -> Any:
    if "scores" in arrays:
        return arrays["scores"]
    return {key.removeprefix("layer:"): value for key, value in arrays.items()}


def save_scores(path: Any, scores: Any, settings: dict[str, Any] | None = None) -> None:
    """Save scores (an array, or ``{layer: array}``) and their settings to ``path``.

    Args:
        path: The file: safetensors (``.npz`` where the name ends so).
        scores: PyTorch, JAX or numpy array(s).
        settings: JSON-serialisable settings, e.g. ``InfluenceScorer.settings()``.
    """
    _write(Path(path), _score_arrays(scores, _numpy), settings or {})


def load_scores(path: Any) -> tuple[Any, dict[str, Any]]:
    """``(scores, settings)`` from a :func:`save_scores` file; scores as numpy array(s)."""
    arrays, settings = _read(path, "path")
    return _scores_from(arrays), settings


class ScoreBlockStore:
    """A folder of score blocks of one partitioned run, keyed by (query partition, batch).

    Args:
        output_dir: The folder (created if needed).
        kind: ``"pairwise"`` (the files' prefix).
        settings: What the scores depend on; a folder holding blocks of other
            settings is refused rather than mixed in.
        backend: The backend the loaded blocks are imported into.
    """

    def __init__(self, output_dir: Any, kind: str, settings: dict[str, Any], backend: Any) -> None:
        if not isinstance(output_dir, (str, os.PathLike)):
            raise type_error("output_dir", "a folder path (str or pathlib.Path)", output_dir)
        self.folder = Path(output_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kind, self.settings, self.backend = kind, settings, backend
        record = self.folder / f"{kind}_settings.json"
        if record.is_file():
            _check_same(
                settings,
                json.loads(record.read_text()),
                "output_dir",
                "Use a new folder for other settings (or empty this one).",
            )
        else:
            record.write_text(json.dumps(settings, indent=1))

    def _path(self, part: int, index: int) -> Path:
        """The block's file: safetensors, or an ``.npz`` of a run before that was the format."""
        path = self.folder / f"{self.kind}_query{part}_batch{index}{SUFFIX}"
        earlier = path.with_suffix(".npz")
        return earlier if earlier.is_file() and not path.is_file() else path

    def has(self, part: int, index: int) -> bool:
        """Whether the block of query partition ``part`` and training batch ``index`` is saved."""
        return self._path(part, index).is_file()

    def put(self, part: int, index: int, block: Any) -> None:
        """Save a block (an array, or ``{layer: array}``)."""
        _write(self._path(part, index), _score_arrays(block, self.backend.to_numpy), self.settings)

    def get(self, part: int, index: int, per_layer: bool) -> Any:
        """A saved block, as native array(s)."""
        arrays, _ = _read(self._path(part, index), "output_dir")
        native = {
            key: self.backend.import_array(value.astype(self.backend.dtype), "block")[0]
            for key, value in arrays.items()
        }
        return _scores_from(native)


# --- factors ------------------------------------------------------------------------
def _factor_settings(K: KFACLinearOperator) -> dict[str, Any]:
    return {
        "operator": type(K).__name__,
        "fisher_type": K._fisher_type.value,
        "kfac_approx": K._kfac_approx.value,
        "mc_samples": K._mc_samples,
        "seed": K._seed,
        "separate_weight_and_bias": K._separate_weight_and_bias,
        "num_per_example_loss_terms": K._num_per_example_loss_terms,
        "num_data": int(K.num_data),
        "loss": type(K._loss).__name__,
        "loss_reduction": K._loss.reduction,
        "layers": {name: dict(parts) for name, parts in K._mapping.items()},
    }


def _check_kfac(curvature: Any) -> KFACLinearOperator:
    if not isinstance(curvature, KFACLinearOperator):
        raise type_error("curvature", "a KFACLinearOperator or EKFACLinearOperator", curvature)
    return curvature


def save_factors(curvature: KFACLinearOperator, path: Any) -> None:
    """Save a KFAC/EK-FAC operator's factors (computed now if not yet) and options to ``path``.

    Args:
        curvature: A :class:`~curvlinops.KFACLinearOperator` or
            :class:`~curvlinops.EKFACLinearOperator`.
        path: The file: safetensors (``.npz`` where the name ends so).
    """
    K = _check_kfac(curvature)
    K._factors_ready()
    to_numpy = K.backend.to_numpy
    arrays = {}
    for key, factors in _factor_dicts(K).items():
        for name, value in factors.items():
            if isinstance(value, dict):  # EK-FAC: one correction per parameter position
                for position, part in value.items():
                    arrays[f"{key}/{name}/{position}"] = to_numpy(part)
            else:
                arrays[f"{key}/{name}"] = to_numpy(value)
    _write(Path(path), arrays, _factor_settings(K))


def load_factors(curvature: KFACLinearOperator, path: Any) -> None:
    """Load :func:`save_factors`' factors into an operator of the same options and layers.

    Raises:
        ValueError: The file's options or layers differ from the operator's.
    """
    K = _check_kfac(curvature)
    arrays, settings = _read(path, "path")
    _check_same(
        _factor_settings(K),
        settings,
        "path",
        "Build the operator with the options the factors were computed with.",
    )
    b = K.backend
    loaded: dict[str, dict[str, Any]] = {key: {} for key in _factor_dicts(K)}
    for entry, value in arrays.items():
        key, name, *position = entry.split("/", 2)
        native = b.import_array(value.astype(b.dtype), "factors")[0]
        if position:
            loaded[key].setdefault(name, {})[int(position[0])] = native
        else:
            loaded[key][name] = native
    K._input_covariances = loaded["input_covariances"]
    K._gradient_covariances = loaded["gradient_covariances"]
    if isinstance(K, EKFACLinearOperator):
        K._input_covariances_eigenvectors = loaded["input_eigenvectors"]
        K._gradient_covariances_eigenvectors = loaded["gradient_eigenvectors"]
        K._corrected_eigenvalues = loaded["corrected_eigenvalues"]


def _factor_dicts(K: KFACLinearOperator) -> dict[str, dict[str, Any]]:
    factors = {
        "input_covariances": K._input_covariances,
        "gradient_covariances": K._gradient_covariances,
    }
    if isinstance(K, EKFACLinearOperator):
        factors["input_eigenvectors"] = K._input_covariances_eigenvectors
        factors["gradient_eigenvectors"] = K._gradient_covariances_eigenvectors
        factors["corrected_eigenvalues"] = K._corrected_eigenvalues
    return factors


def _numpy(x: Any) -> np.ndarray:
    """A numpy copy of a numpy, PyTorch or JAX array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
