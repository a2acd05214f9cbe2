"""Attacks on the weights of a classifier: universal weight PGD, random fault injection, joint weight + input PGD,
a per-sample weight PGD that falsifies certificates, bit flips of quantized weights (BFA and random faults) and of float
weights (the float bit-flip attack and random float faults), and backdoors planted by bit flips.
The gradient attacks share one ascent loop (:mod:`art_weightpert.attacks.ascent`)."""

from art_weightpert.attacks.backdoor import BackdoorResult, BitFlipBackdoor
from art_weightpert.attacks.base import BitFlipAttackBase, WeightAttack, WeightAttackBase, WeightBudgetAttack
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.float_bit_flip import FloatBitFlipAttack
from art_weightpert.attacks.joint import JointWeightInputPGD
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_faults import RandomWeightPerturbation
from art_weightpert.attacks.random_float_bit_flips import RandomFloatBitFlips
from art_weightpert.attacks.weight_pgd import WeightPGD

__all__ = [
    "WeightAttackBase",
    "BitFlipAttackBase",
    "WeightBudgetAttack",
    "WeightAttack",
    "WeightPGD",
    "RandomWeightPerturbation",
    "JointWeightInputPGD",
    "PerSampleWeightPGD",
    "BitFlipAttack",
    "RandomBitFlips",
    "FloatBitFlipAttack",
    "RandomFloatBitFlips",
    "BitFlipBackdoor",
    "BackdoorResult",
]
