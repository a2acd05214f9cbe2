"""
ReLU and LeakyReLU (docs/theory.md §4b): CROWN's relaxation, the chord on one side and a line through the origin on
the other; exact on stable boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import Line, MonotoneActivation, Parameter, refuse


def kinked(lo: torch.Tensor, hi: torch.Tensor, slope: float) -> tuple[Line, Line]:
    """ReLU (``slope = 0``) and LeakyReLU: ``f(z) = z`` for ``z ≥ 0``, ``slope·z`` below. Returns the (slope,
    intercept) of a lower and an upper line valid on ``[lo, hi]``: the chord on one side, a line through the origin
    with slope 1 or ``slope`` (1 when ``hi > −lo``, as CROWN) on the other."""
    active, inactive = lo >= 0, hi <= 0
    width = torch.where(active | inactive, torch.ones_like(hi), hi - lo)
    chord = (hi - slope * lo) / width
    chord_icpt = (slope - chord) * lo  # f(lo) − chord·lo with f(lo) = slope·lo for a crossing box
    one, leak = torch.ones_like(lo), torch.full_like(lo, slope)  # in lo's dtype: no float32 rounding of slope
    alpha = torch.where(hi > -lo, one, leak)
    if slope <= 1:  # convex: the chord is above, lines through 0 with slope in [slope, 1] below
        low, up = (alpha, torch.zeros_like(lo)), (chord, chord_icpt)
    else:  # concave
        low, up = (chord, chord_icpt), (alpha, torch.zeros_like(lo))
    fixed = torch.where(active, one, leak)  # exact on stable boxes

    def exact(line):
        stable = active | inactive
        return torch.where(stable, fixed, line[0]), torch.where(stable, 0.0, line[1])

    return exact(low), exact(up)


def optimizable_kinked(lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor, slope: float) -> torch.Tensor:
    """The lower slope of a convex kinked activation (``slope ≤ 1``) picked by ``alpha`` ``(N, J) + value shape`` in
    ``[0, 1]``: ``slope + α (1 − slope)`` on a crossing box (any line through the origin with a slope in ``[slope, 1]``
    is below), the exact slope on a stable one."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    free = slope + alpha.clamp(0.0, 1.0) * (1.0 - slope)
    return torch.where(lo >= 0, torch.ones_like(free), torch.where(hi <= 0, torch.full_like(free, slope), free))


class ReLU(MonotoneActivation):
    """``max(z, 0)``: |σ(t)| ≤ |t|, 1-Lipschitz (formula B as stated)."""

    kind = "relu"
    modules = (nn.ReLU,)
    functions = (torch.relu, F.relu)
    methods = ("relu",)
    nonnegative = True
    lower_through_origin = True

    @property
    def fixes_one(self) -> bool:
        return True

    def apply(self, h):
        return torch.relu(h)

    def relaxation(self, lo, hi):
        return kinked(lo, hi, 0.0)

    def optimizable_lower(self, lo, hi, alpha):
        return optimizable_kinked(lo, hi, alpha, 0.0)

    def paper(self, n, d):
        return n, d


class LeakyReLU(MonotoneActivation):
    """``z`` for ``z ≥ 0``, ``negative_slope·z`` below (``negative_slope ≥ 0``: monotone)."""

    kind = "leaky_relu"
    modules = (nn.LeakyReLU,)
    functions = (F.leaky_relu,)
    parameters = (Parameter("negative_slope", 1, 0.01),)
    negative_slope: float

    def __init__(self, name: str, negative_slope: float) -> None:
        super().__init__(name, negative_slope=float(negative_slope))

    def check(self, name):
        if self.negative_slope < 0:  # the bounds need a monotone activation (docs/theory.md §1)
            raise refuse(name, f"LeakyReLU with negative_slope={self.negative_slope} is not monotone.")

    @property
    def lower_through_origin(self) -> bool:
        return self.negative_slope <= 1  # convex: the lower line passes through the origin

    @property
    def lipschitz(self) -> float:
        return max(1.0, abs(self.negative_slope))

    @property
    def fixes_one(self) -> bool:
        return True

    def apply(self, h):
        return F.leaky_relu(h, self.negative_slope)

    def relaxation(self, lo, hi):
        return kinked(lo, hi, self.negative_slope)

    def optimizable_lower(self, lo, hi, alpha):
        return optimizable_kinked(lo, hi, alpha, self.negative_slope) if self.negative_slope <= 1 else None

    def paper(self, n, d):
        return n * self.lipschitz, d * self.lipschitz
