"""Defence trainers against weight perturbations (ART's ``art.defences.trainer`` grammar)."""

from art_weightpert.defences.trainer.weight_robust_trainer import WeightRobustTrainer

__all__ = ["WeightRobustTrainer"]
