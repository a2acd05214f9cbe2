"""Certificates of pairwise-margin robustness under weight perturbation (THEORY.md §3–§4b)."""

from art_weightpert.certification.certifier import METHODS, WeightPerturbationCertifier, available_methods

__all__ = ["METHODS", "WeightPerturbationCertifier", "available_methods"]
