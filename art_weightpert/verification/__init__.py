"""Complete verification under weight perturbation (docs/theory.md §11): bounds, a per-sample attack and branch and
bound over ReLU phases give each sample a verdict, ``"certified"``, ``"falsified"`` (with a checked counterexample) or
``"unknown"`` at a time limit."""

from art_weightpert.verification.result import VERDICTS, VerificationResult
from art_weightpert.verification.verifier import WeightPerturbationVerifier

__all__ = ["VERDICTS", "VerificationResult", "WeightPerturbationVerifier"]
