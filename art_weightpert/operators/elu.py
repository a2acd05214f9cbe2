"""
ELU, ``z`` for ``z > 0`` and ``α(e^z − 1)`` below (docs/theory.md §4.6), for ``0 < α ≤ 1``: monotone, convex,
1-Lipschitz, ``|σ(t)| ≤ |t|`` and ``σ(1) = 1``; relaxed by its chord above and a parallel line below (exact on
``z ≥ 0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import MonotoneActivation, Parameter, refuse
from art_weightpert.operators.smooth import curvature_relaxation

_PIECES = ((-math.inf, math.inf, True),)


class ELU(MonotoneActivation):
    """``nn.ELU(alpha)``, ``F.elu(x, alpha)`` with ``0 < alpha ≤ 1``."""

    kind = "elu"
    modules = (nn.ELU,)
    functions = (F.elu,)
    parameters = (Parameter("alpha", 1, 1.0),)
    alpha: float

    def __init__(self, name: str, alpha: float) -> None:
        super().__init__(name, alpha=float(alpha))

    def check(self, name):
        if not 0 < self.alpha <= 1:  # convex and 1-Lipschitz only there
            raise refuse(name, f"ELU with alpha={self.alpha} (the rules need 0 < alpha ≤ 1).")

    @property
    def fixes_one(self) -> bool:
        return True

    def apply(self, h):
        return F.elu(h, self.alpha)

    def _slope(self, z: torch.Tensor) -> torch.Tensor:  # a subgradient at 0 (α)
        return torch.where(z > 0, torch.ones_like(z), self.alpha * torch.exp(z.clamp_max(0)))

    def relaxation(self, lo, hi):
        return curvature_relaxation(self.apply, self._slope, lo, hi, _PIECES)

    def paper(self, n, d):  # |σ(t)| ≤ |t|, 1-Lipschitz
        return n, d
