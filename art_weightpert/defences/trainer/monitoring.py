"""Monitoring of :class:`.WeightRobustTrainer`: the totals of an epoch's steps, and the validation data (checked once,
evaluated after every epoch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from art_weightpert import distributed
from art_weightpert.budget import PerturbationBudget
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode


class EpochTotals:
    """The sums over an epoch's steps of the terms of :meth:`.WeightRobustTrainer.loss_terms` (weighted by the step's
    samples) and the label counts. Each step's terms stay on the device, detached, until :meth:`totals` sums them:
    no host synchronization and a single stacking operation per step."""

    TERMS = ("loss", "ce", "robust", "accuracy")

    def __init__(self, nb_classes: int, device: torch.device) -> None:
        self.nb_classes, self.device = nb_classes, device
        self.steps: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, terms: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Add one step's terms (batch means) and labels."""
        self.steps.append(torch.stack([terms[key].detach() for key in self.TERMS]))
        self.labels.append(labels)

    def totals(self) -> tuple[dict[str, float], np.ndarray]:
        """The sums by term name and the label counts (one host synchronization)."""
        if not self.steps:
            return dict.fromkeys(self.TERMS, 0.0), np.zeros(self.nb_classes, dtype=np.int64)
        sizes = torch.tensor([len(labels) for labels in self.labels], dtype=torch.float64, device=self.device)
        sums = (torch.stack(self.steps).to(torch.float64) * sizes.unsqueeze(1)).sum(dim=0)
        counts = torch.bincount(torch.cat(self.labels), minlength=self.nb_classes)
        return dict(zip(self.TERMS, sums.tolist())), counts.cpu().numpy()


def check_validation_data(
    estimator: PyTorchWeightClassifier, validation_data: Any
) -> tuple[np.ndarray, np.ndarray] | None:
    """``None``, or ``(x_val, y_val)`` checked against the estimator (labels as class indices)."""
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ValueError("`validation_data` must be a tuple (x_val, y_val).")
    x_val = estimator.check_inputs(validation_data[0])
    y_val = estimator.check_labels(validation_data[1], len(x_val), required=True)
    return x_val, y_val


def validation_metrics(
    estimator: PyTorchWeightClassifier, budget: PerturbationBudget, x_val: np.ndarray, y_val: np.ndarray
) -> dict[str, float]:
    """Clean accuracy and certified accuracy at the budget (interval bound in float64, docs/theory.md §4–§5), in eval
    mode; in a process group the samples are sharded by whole batches and the results gathered on every rank."""
    from art_weightpert.certification.certifier import WeightPerturbationCertifier

    with eval_mode(estimator.base_model):
        predictions = distributed.map_batches(  # in a process group: each rank its batches, gathered
            lambda index: np.argmax(estimator.predict(x_val[index], batch_size=512), axis=1), len(x_val), 512
        )
        certifier = WeightPerturbationCertifier(estimator, budget, method="interval", verbose=False)
        certified = certifier.certify(x_val, y_val)
    return {
        "val_accuracy": float(np.mean(predictions == y_val)),
        "val_certified_accuracy": float(np.mean(certified)),
    }


__all__ = ["EpochTotals", "check_validation_data", "validation_metrics"]
