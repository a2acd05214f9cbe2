"""
:class:`ValidatedSettings`: ``set_params`` for the trainers, validating every new value before any is assigned (ART's
``set_params`` assigns first and validates after, so a rejected value stays; ART_NOTES in docs/architecture.md).
"""

from __future__ import annotations

from typing import Any


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
    def _check_params(params: dict[str, Any], estimator: Any) -> dict[str, Any]:
        raise NotImplementedError
