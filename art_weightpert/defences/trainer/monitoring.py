"""Validation data of :class:`.WeightRobustTrainer`: checked once, evaluated after every epoch."""

from __future__ import annotations

from typing import Any

import numpy as np

from art_weightpert.budget import PerturbationBudget
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode


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
    """Clean accuracy and certified accuracy at the budget (interval bound in float64, THEORY.md §4–§5), in eval
    mode."""
    from art_weightpert.certification.certifier import WeightPerturbationCertifier

    with eval_mode(estimator.base_model):
        predictions = np.argmax(estimator.predict(x_val, batch_size=512), axis=1)
        certifier = WeightPerturbationCertifier(estimator, budget, method="interval", verbose=False)
        certified = certifier.certify(x_val, y_val)
    return {
        "val_accuracy": float(np.mean(predictions == y_val)),
        "val_certified_accuracy": float(np.mean(certified)),
    }


__all__ = ["check_validation_data", "validation_metrics"]
