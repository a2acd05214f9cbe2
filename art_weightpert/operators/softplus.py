"""
Softplus, ``s(z) = log(1 + e^{βz}) / β`` (docs/theory.md §4.6): monotone, convex, 1-Lipschitz, ``s(0) = log 2 / β``.
Torch returns ``z`` itself where ``βz > threshold``, below ``s`` by at most ``gap = log(1 + e^{−threshold}) / β``.
A box on one side of the switch (with a margin for the rounding of ``βz``) is bounded as ``s`` or as ``z`` exactly; a
box across it as ``s``, its lower ends dropped by ``gap`` (torch's value lies in ``[s − gap, s]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import ActivationFunction, Parameter, refuse
from art_weightpert.operators.smooth import curvature_relaxation

_PIECES = ((-math.inf, math.inf, True),)


class Softplus(ActivationFunction):
    """``nn.Softplus(beta, threshold)``, ``F.softplus(x, beta, threshold)`` with ``beta > 0``, ``threshold ≥ 0``."""

    kind = "softplus"
    modules = (nn.Softplus,)
    functions = (F.softplus,)
    parameters = (Parameter("beta", 1, 1.0), Parameter("threshold", 2, 20.0))
    beta: float
    threshold: float
    nonnegative = True

    def __init__(self, name: str, beta: float, threshold: float) -> None:
        super().__init__(name, beta=float(beta), threshold=float(threshold))

    def check(self, name):
        if not (self.beta > 0 and self.threshold >= 0):
            raise refuse(
                name,
                f"Softplus with beta={self.beta}, threshold={self.threshold} (the rules need beta > 0 "
                "and threshold ≥ 0).",
            )

    @property
    def gap(self) -> float:
        """How far torch's value may lie below the exact function."""
        return math.log1p(math.exp(-self.threshold)) / self.beta

    @property
    def zero_at_zero(self) -> bool:
        return False

    def apply(self, h):
        return F.softplus(h, self.beta, self.threshold)

    def exact(self, h: torch.Tensor) -> torch.Tensor:
        """The function without torch's threshold."""
        return torch.logaddexp(self.beta * h, torch.zeros_like(h)) / self.beta

    def _sides(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where torch may take ``s`` and where it may take ``z`` on the box (``βz`` rounded in any float dtype)."""
        margin = 1e-6 * max(1.0, abs(self.threshold))
        return self.beta * lo <= self.threshold + margin, self.beta * hi > self.threshold - margin

    def interval(self, lo, hi):
        across = torch.logical_and(*self._sides(lo, hi))  # elsewhere torch's value is monotone: its ends
        return (
            torch.where(across, self.exact(lo) - self.gap, self.apply(lo)),
            torch.where(across, self.exact(hi), self.apply(hi)),
        )

    def relaxation(self, lo, hi):
        smooth, identity = self._sides(lo, hi)
        (l_slope, l_icpt), (u_slope, u_icpt) = curvature_relaxation(
            self.exact, lambda z: torch.sigmoid(self.beta * z), lo, hi, _PIECES
        )
        one, zero = torch.ones_like(lo), torch.zeros_like(lo)
        gap = torch.full_like(lo, self.gap)  # in lo's dtype: a Python float in torch.where would round it to float32
        low = (torch.where(smooth, l_slope, one), torch.where(smooth, l_icpt - torch.where(identity, gap, zero), zero))
        return low, (torch.where(smooth, u_slope, one), torch.where(smooth, u_icpt, zero))

    def paper(self, n, d):  # |σ(t)| ≤ |t| + log 2 / β; torch's threshold moves values by at most gap
        return n + math.log(2) / self.beta, d + self.gap
