"""Weight-aware ART estimators."""

from art_weightpert.estimators.weight_classifier import (
    PyTorchWeightClassifier,
    WeightPerturbedModule,
    eval_mode,
)
from art_weightpert.estimators.wrapping import as_weight_classifier, effective_estimator

__all__ = [
    "PyTorchWeightClassifier",
    "WeightPerturbedModule",
    "eval_mode",
    "as_weight_classifier",
    "effective_estimator",
]
