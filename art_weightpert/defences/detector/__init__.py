"""Detectors of tampered weights (ART's ``art.defences.detector`` grammar): run-time integrity checks of a deployed
model's weights."""

from art_weightpert.defences.detector.weight_integrity import WeightIntegrityDetector

__all__ = ["WeightIntegrityDetector"]
