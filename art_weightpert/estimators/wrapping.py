"""
The one way every attack, certificate, metric and defence turns what a user passes into the estimator it works on
(:func:`as_weight_classifier`), the one rule for an estimator that carries a weight perturbation
(:func:`effective_estimator`: start from its effective weights ``W + Δ``), and the version of an estimator's weights
that every cache is keyed on (:func:`weights_version`).

A wrong type raises ART's :class:`~art.exceptions.EstimatorError` (a ``TypeError``), naming the argument.
"""

from __future__ import annotations

from typing import Any

import torch
from art.estimators.classification import PyTorchClassifier
from art.exceptions import EstimatorError

from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, WeightPerturbedModule, _init_kwargs

__all__ = ["as_weight_classifier", "effective_estimator", "weights_version", "EffectiveWeights"]


def as_weight_classifier(estimator: Any, name: str = "estimator") -> PyTorchWeightClassifier:
    """
    ``estimator`` as a :class:`.PyTorchWeightClassifier`: returned as it is, or an ART ``PyTorchClassifier`` wrapped
    (same module, loss, optimizer and preprocessing; nothing copied).

    :param estimator: what the user passed.
    :param name: the argument's name in the error message.
    :raises EstimatorError: (ART's, a ``TypeError``) for anything but an ART ``PyTorchClassifier``.
    """
    if isinstance(estimator, PyTorchWeightClassifier):
        return estimator
    if not isinstance(estimator, PyTorchClassifier):
        error = EstimatorError(PyTorchWeightClassifier, [PyTorchClassifier], estimator)
        error.message = f"`{name}` must be an ART PyTorchClassifier, got {type(estimator).__name__}."
        raise error
    return PyTorchWeightClassifier(
        estimator.model,
        estimator._loss,  # pylint: disable=protected-access
        estimator.input_shape,
        estimator.nb_classes,
        optimizer=estimator._optimizer,  # pylint: disable=protected-access
        **_init_kwargs(estimator),
    )


def weights_version(estimator: PyTorchWeightClassifier) -> tuple:
    """What a cache of results computed on ``estimator`` must be keyed on: the identity and in-place version of every
    parameter and buffer of its base module and of the perturbation it carries. Training, ``load_state_dict``, an
    in-place edit or a new carried perturbation all change it."""
    carried = estimator.current_deltas()
    base = estimator.base_model
    tensors = [*base.parameters(), *base.buffers(), *carried.values()]
    return (id(base), *((t.data_ptr(), t._version) for t in tensors))  # pylint: disable=protected-access


def effective_estimator(estimator: Any, name: str = "estimator") -> PyTorchWeightClassifier:
    """
    The estimator whose *base* weights are ``estimator``'s effective weights ``W + Δ`` (the weights it predicts with):
    ``estimator`` itself when it carries no perturbation, otherwise a new unperturbed estimator owning a copy of the
    module with ``Δ`` added (same loss, preprocessing and classifier arguments). Every attack, certificate and metric
    starts from it (docs/certification.md, "Perturbed estimators"); ``estimator`` and the user's module are unchanged.

    :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
    :param name: the argument's name in error messages.
    """
    estimator = as_weight_classifier(estimator, name)
    if not isinstance(estimator.model, WeightPerturbedModule):
        return estimator
    carried = estimator.current_deltas()
    baked = estimator.with_weight_perturbation(None)  # a clean estimator owning a copy of the base module
    with torch.no_grad():
        for param_name, delta in carried.items():
            baked.base_model.get_parameter(param_name).add_(delta.to(baked.base_model.get_parameter(param_name)))
    return baked


class EffectiveWeights:
    """:func:`effective_estimator` of one estimator, copied again only when its weights change
    (:func:`weights_version`)."""

    def __init__(self, estimator: PyTorchWeightClassifier) -> None:
        self._estimator = estimator
        self._key: tuple | None = None
        self._effective: PyTorchWeightClassifier | None = None

    def get(self) -> PyTorchWeightClassifier:
        """The effective estimator of the current weights."""
        if not isinstance(self._estimator.model, WeightPerturbedModule):
            return self._estimator
        key = weights_version(self._estimator)
        if key != self._key or self._effective is None:
            self._effective, self._key = effective_estimator(self._estimator), key
        return self._effective
