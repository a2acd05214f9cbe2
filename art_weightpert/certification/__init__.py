"""Certificates of pairwise-margin robustness under weight perturbation (docs/theory.md §3–§4b) and under k flipped bits
of quantized weights (§8).

:data:`METHODS` is the registry of bound methods (name → :class:`BoundMethod`); :class:`WeightPerturbationCertifier`
certifies predictions with any of them. :class:`BitFlipCertifier` certifies the quantized model against every set of
at most k flipped bits.
"""

from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.certifier import WeightPerturbationCertifier
from art_weightpert.certification.registry import METHODS, BoundMethod

__all__ = ["METHODS", "BoundMethod", "WeightPerturbationCertifier", "BitFlipCertifier"]
