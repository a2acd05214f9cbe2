"""
Certification metrics in ART's function style (the classifier first, numpy in and out): certified accuracy and
certified radii under weight perturbation (docs/theory.md §3–§5). The Rademacher generalization bound (§6) lives in
:mod:`art_weightpert.metrics.generalization` and is re-exported here.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.estimators.wrapping import as_weight_classifier
from art_weightpert.metrics.generalization import generalization_bound

__all__ = ["weight_certified_accuracy", "certified_weight_radius", "generalization_bound"]

logger = logging.getLogger(__name__)


def weight_certified_accuracy(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    method: str = "linear",
    batch_size: int = 128,
    verbose: bool = False,
    dtype: torch.dtype | None = None,
) -> float:
    """
    Share of ``(x, y)`` classified correctly by *every* network in the weight ball, as certified by ``method``.

    :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`).
    :param x: inputs ``(N,) + input_shape``.
    :param y: integer or one-hot labels.
    :param budget: the ball of weight perturbations.
    :param method: a bound method of the registry :data:`.METHODS`: ``"linear"`` (the default, the tightest),
        ``"interval"`` or ``"paper"`` (chains only).
    :param batch_size: samples per bound computation.
    :param verbose: show a progress bar.
    :param dtype: the precision of the bounds (``torch.float32`` with the rounding terms of docs/theory.md §5, or
        ``torch.float64``; ``None``: the certifier's default).
    :return: the certified accuracy (an empty ``x`` is a ``ValueError``).
    """
    classifier = as_weight_classifier(classifier, "classifier")
    certifier = WeightPerturbationCertifier(
        classifier, budget, method=method, batch_size=batch_size, verbose=verbose, dtype=dtype
    )
    certified = certifier.certify(x, _required(y))
    return float(np.mean(certified)) if len(certified) else float("nan")


def certified_weight_radius(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    method: str = "linear",
    batch_size: int = 128,
    verbose: bool = False,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """
    Per sample, the largest radius of ``budget``'s ball for which the correct prediction is certified (``eps`` in the
    budget's units, or the factor applied to a per-layer ``eps`` dict; 0 where the clean prediction is wrong).

    :param classifier: an ART ``PyTorchClassifier``.
    :param x: inputs.
    :param y: integer or one-hot labels.
    :param budget: the ball (its ``eps`` sets the starting point of the search and the units of a dict).
    :param method: a bound method of the registry :data:`.METHODS` (default ``"linear"``, the tightest).
    :param batch_size: samples per bound computation.
    :param verbose: show a progress bar.
    :param dtype: the precision of the bounds (as :func:`weight_certified_accuracy`).
    :return: ``(N,)`` radii.
    """
    classifier = as_weight_classifier(classifier, "classifier")
    certifier = WeightPerturbationCertifier(
        classifier, budget, method=method, batch_size=batch_size, verbose=verbose, dtype=dtype
    )
    return certifier.certified_radius(x, _required(y))


def _required(y: Any) -> Any:
    if y is None:
        raise ValueError("labels `y` are required.")
    return y
