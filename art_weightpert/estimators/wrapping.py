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

__all__ = ["as_weight_classifier", "effective_estimator", "weights_version", "EffectiveWeights", "WeightsSnapshot"]


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


class WeightsSnapshot:
    """
    What a cache of results computed on an estimator is keyed on (:func:`weights_version`): its base module, the
    values of every parameter and buffer and of the perturbation it carries, and its ART arguments (preprocessing,
    clip values, ...). Two snapshots are equal only when all of them are: the values are compared exactly, so every
    change counts, also an in-place edit through ``.data`` (which torch's version counters do not see).
    """

    def __init__(self, estimator: PyTorchWeightClassifier) -> None:
        base = estimator.base_model
        carried = estimator.current_deltas()
        self._module = id(base)
        self._names = [name for name, _ in base.named_parameters()] + [name for name, _ in base.named_buffers()]
        tensors = [*base.parameters(), *base.buffers(), *carried.values()]
        self._values = [t.detach().clone() for t in tensors]
        self._carried = list(carried)
        arguments = estimator.get_params()
        self._arguments = repr({k: v for k, v in arguments.items() if k not in ("model", "loss", "optimizer")})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightsSnapshot):
            return NotImplemented
        return (
            (self._module, self._names, self._carried, self._arguments)
            == (other._module, other._names, other._carried, other._arguments)
            and len(self._values) == len(other._values)
            and all(
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
                for a, b in zip(self._values, other._values)
            )
        )

    __hash__ = None  # compared by value, never hashed


def weights_version(estimator: PyTorchWeightClassifier) -> WeightsSnapshot:
    """What a cache of results computed on ``estimator`` must be keyed on (:class:`WeightsSnapshot`): training,
    ``load_state_dict``, any in-place edit, a new carried perturbation or new ART arguments all change it."""
    return WeightsSnapshot(estimator)


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
        self._key: WeightsSnapshot | None = None
        self._effective: PyTorchWeightClassifier | None = None

    def get(self) -> PyTorchWeightClassifier:
        """The effective estimator of the current weights."""
        if not isinstance(self._estimator.model, WeightPerturbedModule):
            return self._estimator
        key = weights_version(self._estimator)
        if key != self._key or self._effective is None:
            self._effective, self._key = effective_estimator(self._estimator), key
        return self._effective
