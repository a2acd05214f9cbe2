"""Weight-aware ART estimators."""

from art_weightpert.estimators.weight_classifier import (
    PyTorchWeightClassifier,
    WeightPerturbedModule,
    eval_mode,
)

__all__ = ["PyTorchWeightClassifier", "WeightPerturbedModule", "eval_mode"]
