"""Certificates of pairwise-margin robustness under weight perturbation (THEORY.md §3–§4b).

:data:`METHODS` is the registry of bound methods (name → :class:`BoundMethod`); :class:`WeightPerturbationCertifier`
certifies predictions with any of them.
"""

from art_weightpert.certification.certifier import WeightPerturbationCertifier
from art_weightpert.certification.registry import METHODS, BoundMethod

__all__ = ["METHODS", "BoundMethod", "WeightPerturbationCertifier"]
