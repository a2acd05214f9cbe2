"""
The verdicts of a complete verifier (docs/theory.md §11): :class:`VerificationResult` is defined once, in
:mod:`art_weightpert.certification.verdicts` (shared with :meth:`.BitFlipCertifier.verify`), and re-exported here.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

from art_weightpert.certification.verdicts import STATUSES as VERDICTS
from art_weightpert.certification.verdicts import VerificationResult

__all__ = ["VERDICTS", "VerificationResult"]
