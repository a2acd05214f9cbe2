"""Certificates of pairwise-margin robustness under weight perturbation (THEORY.md §3–§4b)."""
