"""kronfluence 1.0.1 as a contender: factors and scores of a PyTorch classifier or language model.

Used by the tests that compare with kronfluence (skipped where it is not
installed) and by ``benchmarks/bench_influence.py``. kronfluence wraps the
model's modules in place, so it gets a copy.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset


def _task(kind: str, empirical: bool, modules: list[str] | None) -> Any:
    from kronfluence.task import Task

    class SummedCrossEntropy(Task):
        """Cross-entropy summed over examples (and tokens, for a language model)."""

        def get_influence_tracked_modules(self) -> list[str] | None:
            return modules

        def _logits_and_targets(self, batch: Any, model: torch.nn.Module) -> tuple[Any, Any]:
            inputs, labels = batch
            logits = model(inputs)
            if kind == "lm":  # (n, S, V) logits against (n, S) targets
                return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            return logits, labels

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False):
            logits, labels = self._logits_and_targets(batch, model)
            if sample and not empirical:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probs, num_samples=1).flatten()
            return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module):
            logits, labels = self._logits_and_targets(batch, model)
            return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")

    return SummedCrossEntropy()


class KronfluenceContender:
    """kronfluence's Analyzer on a copy of ``model``, float64 or float32 throughout.

    Args:
        model: A ``torch.nn.Module`` (Linear/Conv2d layers are tracked).
        output_dir: Where kronfluence writes its factors and scores.
        kind: ``"classifier"`` (logits ``(n, C)``) or ``"lm"`` (``(n, S, V)``).
        strategy: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        empirical: Empirical Fisher (data targets), else sampled targets.
        dtype: The dtype of every factor and score.
        modules: The names of the modules to track (default: every Linear/Conv2d).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        output_dir: str,
        kind: str = "classifier",
        strategy: str = "ekfac",
        empirical: bool = True,
        dtype: torch.dtype = torch.float64,
        modules: list[str] | None = None,
    ) -> None:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        task = _task(kind, empirical, modules)
        wrapped = prepare_model(copy.deepcopy(model), task)
        self.analyzer = Analyzer(
            analysis_name="contender",
            model=wrapped,
            task=task,
            cpu=True,
            disable_tqdm=True,
            output_dir=str(output_dir),
        )
        self.factor_args = FactorArguments(
            strategy=strategy,
            use_empirical_fisher=empirical,
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
            eigendecomposition_dtype=torch.float64,
        )
        self.dtype = dtype

    def fit_factors(self, train: Dataset, batch_size: int) -> None:
        """Covariances, eigendecompositions and (EK-FAC) corrected eigenvalues."""
        self.analyzer.fit_all_factors(
            factors_name="factors",
            dataset=train,
            per_device_batch_size=batch_size,
            factor_args=self.factor_args,
            overwrite_output_dir=True,
        )

    def _score_args(self, damping: float | None, per_module: bool, rank: int | None = None) -> Any:
        from kronfluence.arguments import ScoreArguments

        return ScoreArguments(
            damping_factor=damping,
            compute_per_module_scores=per_module,
            query_gradient_low_rank=rank,
            use_full_svd=True,
            query_gradient_svd_dtype=self.dtype,
            per_sample_gradient_dtype=self.dtype,
            precondition_dtype=self.dtype,
            score_dtype=self.dtype,
        )

    def pairwise_scores(
        self,
        query: Dataset,
        train: Dataset,
        batch_size: int,
        damping: float | None,
        per_module: bool = False,
        rank: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"all_modules": (T, N)}`` (or one entry per module); ``damping=None``: heuristic.

        ``rank``: the query gradients in low rank (full SVD).
        """
        self.analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="factors",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=batch_size,
            per_device_train_batch_size=batch_size,
            score_args=self._score_args(damping, per_module, rank),
            overwrite_output_dir=True,
        )
        return dict(self.analyzer.load_pairwise_scores("pairwise"))

    def self_scores(
        self, train: Dataset, batch_size: int, damping: float | None
    ) -> dict[str, torch.Tensor]:
        """``{"all_modules": (N,)}``."""
        self.analyzer.compute_self_scores(
            scores_name="self",
            factors_name="factors",
            train_dataset=train,
            per_device_train_batch_size=batch_size,
            score_args=self._score_args(damping, False),
            overwrite_output_dir=True,
        )
        return dict(self.analyzer.load_self_scores("self"))


def tensor_dataset(X: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    """``(X, y)`` as a map-style dataset for kronfluence's data loaders."""
    return TensorDataset(X, y)
