"""
The import path of the activations' linear relaxations (docs/theory.md §4b), which live with their operators in
:mod:`art_weightpert.operators`.
"""

from __future__ import annotations

import torch

from art_weightpert.network import Activation
from art_weightpert.operators.activation import Line
from art_weightpert.operators.hardtanh import clamped
from art_weightpert.operators.relu import kinked
from art_weightpert.operators.s_shaped import s_shaped

__all__ = ["clamped", "kinked", "relaxation", "s_shaped"]


def relaxation(layer: Activation, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
    """``((lower slope, intercept), (upper slope, intercept))`` of lines enclosing the activation on ``[lo, hi]``."""
    return layer.relaxation(lo, hi)
