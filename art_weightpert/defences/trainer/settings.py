"""
:class:`ValidatedSettings`: what the trainers share about their settings. They follow the settings grammar of the
attacks and certifiers (:class:`.Settings`: ``set_params`` validates every new value on a copy before any is
assigned, and assigning a public setting goes through it), with their settings named in ``trainer_params``; and the
classifier a trainer accepts.
"""

from __future__ import annotations

from typing import Any

from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import as_weight_classifier


class ValidatedSettings(Settings):
    """
    Mixin of a trainer that names its settings in ``trainer_params``, keeps its estimator as ``_estimator`` and
    validates a whole settings dict with ``_validated(params, estimator) -> params`` (normalized values).
    """

    params_attribute = "trainer_params"
    trainer_params: list[str] = []

    def _check_params(self) -> None:
        """Validate the current settings (:class:`.Settings` calls it on a copy before a change is kept)."""
        params = self._validated({name: getattr(self, name) for name in self.trainer_params}, self._estimator)
        for name, value in params.items():
            self._store(name, value)

    @staticmethod
    def _trainable(classifier: Any) -> PyTorchWeightClassifier:
        """``classifier`` as a :class:`.PyTorchWeightClassifier` (wrapped, not copied) that a trainer can train in
        place: an ART ``PyTorchClassifier`` with an optimizer and no carried weight perturbation."""
        estimator = as_weight_classifier(classifier, "classifier")
        if estimator.weight_perturbation is not None:
            raise ValueError(
                "`classifier` carries a weight perturbation, which training would not update; train its unperturbed "
                "estimator, `classifier.with_weight_perturbation(None)`, instead."
            )
        if classifier._optimizer is None:  # pylint: disable=protected-access
            raise ValueError("`classifier` has no optimizer; build it with `optimizer=` to train it.")
        return estimator

    @staticmethod
    def _validated(params: dict[str, Any], estimator: Any) -> dict[str, Any]:
        raise NotImplementedError
