"""
art-weightpert: attacks, certificates and robust training for perturbations of the *weights* of PyTorch classifiers,
as a plugin of the Adversarial Robustness Toolbox (ART).

| Paper link: https://arxiv.org/abs/2103.02200 (Tsai, Hsu, Yu and Chen, NeurIPS 2021)
"""

from __future__ import annotations

import importlib
from typing import Any

from art_weightpert.budget import PerturbationBudget, WeightPerturbation
from art_weightpert.estimators import PyTorchWeightClassifier
from art_weightpert.network import UnsupportedModelError

__version__ = "0.1.0"

# Heavier parts are imported on first use.
_LAZY = {
    "WeightAttack": "art_weightpert.attacks",
    "WeightPGD": "art_weightpert.attacks",
    "RandomWeightPerturbation": "art_weightpert.attacks",
    "JointWeightInputPGD": "art_weightpert.attacks",
    "BitFlipAttack": "art_weightpert.attacks",
    "RandomBitFlips": "art_weightpert.attacks",
    "FloatBitFlipAttack": "art_weightpert.attacks",
    "RandomFloatBitFlips": "art_weightpert.attacks",
    "BitFlipBackdoor": "art_weightpert.attacks",
    "BitFlipAttackBase": "art_weightpert.attacks",
    "as_weight_classifier": "art_weightpert.estimators",
    "effective_estimator": "art_weightpert.estimators",
    "QuantizedWeights": "art_weightpert.quantization",
    "BitFlip": "art_weightpert.quantization",
    "FloatBitFlip": "art_weightpert.float_bits",
    "FloatWeights": "art_weightpert.float_bits",
    "WeightPerturbationCertifier": "art_weightpert.certification",
    "BitFlipCertifier": "art_weightpert.certification",
    "WeightPerturbationVerifier": "art_weightpert.verification",
    "VerificationResult": "art_weightpert.verification",
    "WeightRobustTrainer": "art_weightpert.defences.trainer",
    "BitFlipRobustTrainer": "art_weightpert.defences.trainer",
    "WeightIntegrityDetector": "art_weightpert.defences.detector",
    "ActivationClipping": "art_weightpert.defences.transformer",
    "load_model": "art_weightpert.loading",
}

__all__ = [
    "PerturbationBudget",
    "WeightPerturbation",
    "UnsupportedModelError",
    "PyTorchWeightClassifier",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'art_weightpert' has no attribute {name!r}")
