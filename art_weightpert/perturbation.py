"""
:class:`WeightPerturbation`: per-parameter deltas (numpy, keyed as ``model.named_parameters()``) with the budget
they were made for.

The class lives in :mod:`art_weightpert.budget`, next to :class:`.PerturbationBudget`: a budget projects and samples
perturbations, and a perturbation carries (and saves) its budget, so the two form one module rather than two modules
that import each other. This module is its documented import path.
"""

from art_weightpert.budget import WeightPerturbation

__all__ = ["WeightPerturbation"]
