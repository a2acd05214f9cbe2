"""
:class:`ValidatedSettings`: what the trainers share about their settings: the classifier a trainer accepts, and a
``set_params`` that validates every new value before any is assigned (ART's ``set_params`` assigns first and validates
after, so a rejected value would stay).
"""

from __future__ import annotations

from typing import Any

from art.estimators.classification import PyTorchClassifier

from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier


class ValidatedSettings:
    """
    Mixin of a trainer that names its settings in ``trainer_params``, keeps its estimator as ``_estimator`` and
    validates a whole settings dict with ``_check_params(params, estimator) -> params`` (normalized values).
    """

    trainer_params: list[str] = []

    def set_params(self, **kwargs: Any) -> None:
        """
        Set trainer parameters (names in :attr:`trainer_params`); all values are validated before any is assigned.

        :param kwargs: parameters to change.
        """
        unknown = [key for key in kwargs if key not in self.trainer_params]
        if unknown:
            raise ValueError(f"unknown trainer parameter(s) {unknown}; valid ones are {self.trainer_params}.")
        params = {key: getattr(self, key) for key in self.trainer_params}
        params.update(kwargs)
        params = self._check_params(params, self._estimator)
        for key in kwargs:
            setattr(self, key, params[key])

    @staticmethod
    def _trainable(classifier: Any) -> PyTorchWeightClassifier:
        """``classifier`` as a :class:`.PyTorchWeightClassifier` (wrapped, not copied) that a trainer can train in
        place: an ART ``PyTorchClassifier`` with an optimizer and no carried weight perturbation."""
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(f"`classifier` must be an ART PyTorchClassifier, got {type(classifier).__name__}.")
        estimator = PyTorchWeightClassifier.from_classifier(classifier)
        if estimator.weight_perturbation is not None:
            raise ValueError("`classifier` carries a weight perturbation; train the unperturbed estimator instead.")
        if classifier._optimizer is None:  # pylint: disable=protected-access
            raise ValueError("`classifier` has no optimizer; build it with `optimizer=` to train it.")
        return estimator

    @staticmethod
    def _check_params(params: dict[str, Any], estimator: Any) -> dict[str, Any]:
        raise NotImplementedError
