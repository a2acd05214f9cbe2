"""
Verified accuracy under weight perturbation in ART's function style (the classifier first, numpy in and out): the
shares of samples certified, falsified and unknown by :class:`.WeightPerturbationVerifier` (docs/theory.md §11).

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import PerturbationBudget
from art_weightpert.estimators.wrapping import as_weight_classifier
from art_weightpert.verification import WeightPerturbationVerifier

__all__ = ["weight_verified_accuracy"]


def weight_verified_accuracy(
    classifier: PyTorchClassifier, x: np.ndarray, y: np.ndarray, budget: PerturbationBudget, **verifier_kwargs: Any
) -> dict[str, float]:
    """
    The verdicts of :class:`.WeightPerturbationVerifier` on ``(x, y)`` as shares: ``certified`` (a lower bound on the
    accuracy of every network in the ball), ``falsified`` (samples misclassified by some network in the ball, checked
    counterexamples), ``unknown``; ``certified + unknown`` bounds that accuracy from above.

    :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`).
    :param x: inputs ``(N,) + input_shape``.
    :param y: integer or one-hot labels (required).
    :param budget: the ball of weight perturbations.
    :param verifier_kwargs: settings of :class:`.WeightPerturbationVerifier` (``time_limit``, ``batch_size``,
        ``method``, ``verbose`` (default ``False`` here), ...).
    :return: ``{"certified": f, "falsified": f, "unknown": f, "seconds": total wall-clock seconds, "seconds_per_sample":
        mean}``.
    """
    if y is None:
        raise ValueError("labels `y` are required.")
    classifier = as_weight_classifier(classifier, "classifier")
    verifier_kwargs.setdefault("verbose", False)
    verifier = WeightPerturbationVerifier(classifier, budget, **verifier_kwargs)
    start = time.perf_counter()
    result = verifier.verify(x, y)
    seconds = time.perf_counter() - start
    return {**result.shares(), "seconds": seconds, "seconds_per_sample": seconds / len(result)}
