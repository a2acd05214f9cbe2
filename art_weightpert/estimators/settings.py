"""
The settings of every public class that computes a result (attacks, certifiers): one grammar, and settings that cannot
go stale.

* Settings are constructor arguments and :meth:`Settings.set_params` (ART's convention); the new values are validated
  on a copy (``_check_params``) before any is assigned, so a rejected value never stays.
* Assigning a public setting (``certifier.budget = ...``) goes through :meth:`~Settings.set_params`: it is validated
  and takes effect on the next call. Every cache a class keeps is keyed on :attr:`~Settings.settings_version` (and on
  the estimator's :func:`.weights_version`), so no result outlives a change of settings or of the weights.
* Renamed keywords of functions are read by :func:`renamed_keyword` (a ``DeprecationWarning`` naming the new one).
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

__all__ = ["Settings", "renamed_keyword", "reject_unknown_keywords"]


class Settings:
    """
    Mixin of a class whose public settings are named in the class attribute that :attr:`params_attribute` names
    (``attack_params`` for attacks, ``certifier_params`` for certifiers) and checked by ``_check_params()`` (which reads
    them from ``self``, and may normalize them by assigning).
    """

    params_attribute = "attack_params"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args: Any, **kw: Any) -> None:
            outer = not self.__dict__.get("_settings_constructing", False)
            object.__setattr__(self, "_settings_constructing", True)
            try:
                init(self, *args, **kw)
            finally:
                if outer:
                    object.__setattr__(self, "_settings_constructing", False)
            if outer:  # the outermost constructor is done: from now on settings go through set_params
                object.__setattr__(self, "_settings_ready", True)

        cls.__init__ = __init__

    @property
    def settings_version(self) -> int:
        """Incremented by every change of a setting: part of the key of every cache."""
        return self.__dict__.get("_settings_version", 0)

    def settings_key(self) -> tuple:
        """The key of the settings for a cache: :attr:`settings_version` and the value of every setting as it is now
        (``repr``), so a setting changed in place (a budget's fields, a list of layers) counts too."""
        return self.settings_version, repr(self.get_params())

    def _setting_names(self) -> list[str]:
        return list(getattr(self, self.params_attribute))

    def get_params(self) -> dict[str, Any]:
        """The current settings, ``{name: value}``."""
        return {name: getattr(self, name) for name in self._setting_names()}

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._setting_names():
            object.__setattr__(self, name, value)
        elif self.__dict__.get("_settings_ready", False):
            self.set_params(**{name: value})
        else:
            self._store(name, value)

    def _store(self, name: str, value: Any) -> None:
        """Assign setting ``name`` without checks. A setting that the class shows through a read-only property (its
        normalized value) keeps the value given in ``_<name>_given``."""
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, f"_{name}_given", value)
        else:
            object.__setattr__(self, name, value)

    def set_params(self, **kwargs: Any) -> None:
        """
        Change settings: every new value is validated (on a copy) before any is assigned; the change takes effect on
        the next call (no cached result survives it).

        :param kwargs: settings (names in :attr:`attack_params` / :attr:`certifier_params`).
        :raises ValueError: an unknown name (the valid ones are listed), or an invalid value (names the argument).
        """
        names = self._setting_names()
        unknown = [key for key in kwargs if key not in names]
        if unknown:
            raise ValueError(f"The attribute(s) {unknown} cannot be set for {type(self).__name__}; valid: {names}.")
        candidate = copy.copy(self)
        object.__setattr__(candidate, "_settings_ready", False)  # plain assignments while the copy is checked
        for key, value in kwargs.items():
            candidate._store(key, value)
        candidate._check_params()
        for key, value in candidate.__dict__.items():  # the values as the check normalized them, and derived ones
            if key not in ("_settings_ready", "_settings_version") and self.__dict__.get(key, candidate) is not value:
                object.__setattr__(self, key, value)
        object.__setattr__(self, "_settings_version", self.settings_version + 1)
        self._settings_changed()

    def _settings_changed(self) -> None:
        """Called after every change of settings (drop what depends on them)."""


def renamed_keyword(extra: dict[str, Any], old: str, new: str, value: Any, default: Any, where: str) -> Any:
    """
    The value of keyword ``new``, taken from its deprecated spelling ``old`` in ``extra`` (``**kwargs``) when given
    there (a ``DeprecationWarning`` naming the new one); ``extra`` loses ``old``.

    :param value: the value passed as ``new``; ``default``: ``new``'s default (both given: ``TypeError``).
    :param where: the function's name, for the messages.
    """
    if old not in extra:
        return value
    if value is not default and value != default:
        raise TypeError(f"{where}() got both `{new}` and its deprecated spelling `{old}`; pass `{new}` only.")
    warnings.warn(f"{where}(): `{old}` is deprecated, use `{new}`.", DeprecationWarning, stacklevel=3)
    return extra.pop(old)


def reject_unknown_keywords(extra: dict[str, Any], where: str) -> None:
    """``TypeError`` for keywords left in ``extra`` (``**kwargs`` that kept only deprecated spellings)."""
    if extra:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(extra)}.")
