"""Attacks on the weights of a classifier: universal weight PGD, random fault injection, joint weight + input PGD,
a per-sample weight PGD that falsifies certificates, and bit flips of quantized weights (BFA and random faults).
The gradient attacks share one ascent loop (:mod:`art_weightpert.attacks.ascent`)."""

from art_weightpert.attacks.base import WeightAttack, WeightBudgetAttack
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.joint import JointWeightInputPGD
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_faults import RandomWeightPerturbation
from art_weightpert.attacks.weight_pgd import WeightPGD

__all__ = [
    "WeightBudgetAttack",
    "WeightAttack",
    "WeightPGD",
    "RandomWeightPerturbation",
    "JointWeightInputPGD",
    "PerSampleWeightPGD",
    "BitFlipAttack",
    "RandomBitFlips",
]
