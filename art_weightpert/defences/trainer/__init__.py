"""Defence trainers against weight perturbations and bit flips (ART's ``art.defences.trainer`` grammar)."""

from art_weightpert.defences.trainer.bit_flip_robust_trainer import BitFlipRobustTrainer
from art_weightpert.defences.trainer.schedule import TrainingCollapsedError, raise_if_collapsed
from art_weightpert.defences.trainer.weight_robust_trainer import WeightRobustTrainer

__all__ = ["WeightRobustTrainer", "BitFlipRobustTrainer", "TrainingCollapsedError", "raise_if_collapsed"]
