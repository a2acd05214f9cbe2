"""
Sigmoid and tanh (docs/theory.md §4b): convex below 0, concave above, ``σ'`` unimodal; lines through the box's ends
with slope ``min(σ'(end), chord)``, tangents at the midpoint where the box lies in the convex or concave part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import Line, MonotoneActivation


def s_shaped(fn, dfn, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
    """Sigmoid / tanh (convex below 0, concave above, ``σ'`` unimodal): ``σ(z) ≥ σ(lo) + k_l (z − lo)`` and
    ``σ(z) ≤ σ(hi) + k_u (z − hi)`` with ``k = min(σ'(end), chord)`` (the smallest mean slope on sub-intervals
    from that end); the tangent at the midpoint replaces the lower line where ``hi ≤ 0`` and the upper where
    ``lo ≥ 0``."""
    f_lo, f_hi = fn(lo), fn(hi)
    mid = (lo + hi) / 2
    width = hi - lo
    wide = width > 0
    chord = torch.where(wide, (f_hi - f_lo) / torch.where(wide, width, torch.ones_like(width)), dfn(mid))
    k_lo, k_hi = torch.minimum(dfn(lo), chord), torch.minimum(dfn(hi), chord)
    t_slope = dfn(mid)
    t_icpt = fn(mid) - t_slope * mid
    convex, concave = hi <= 0, lo >= 0
    low = torch.where(convex, t_slope, k_lo), torch.where(convex, t_icpt, f_lo - k_lo * lo)
    up = torch.where(concave, t_slope, k_hi), torch.where(concave, t_icpt, f_hi - k_hi * hi)
    return low, up


def _dsigmoid(z):
    s = torch.sigmoid(z)
    return s * (1 - s)


class Sigmoid(MonotoneActivation):
    """``1 / (1 + e^{−z})``: values in (0, 1), 1/4-Lipschitz."""

    kind = "sigmoid"
    modules = (nn.Sigmoid,)
    functions = (torch.sigmoid, F.sigmoid)
    methods = ("sigmoid",)
    nonnegative = True

    @property
    def lipschitz(self) -> float:
        return 0.25

    @property
    def zero_at_zero(self) -> bool:
        return False

    def apply(self, h):
        return torch.sigmoid(h)

    def relaxation(self, lo, hi):
        return s_shaped(torch.sigmoid, _dsigmoid, lo, hi)

    def paper(self, n, d):  # values in (0, 1): ‖σ(ĥ)‖_∞ ≤ 1
        return torch.ones_like(n), d / 4


class Tanh(MonotoneActivation):
    """``tanh z``: ``|tanh t| ≤ min(|t|, 1)``, 1-Lipschitz."""

    kind = "tanh"
    modules = (nn.Tanh,)
    functions = (torch.tanh, F.tanh)
    methods = ("tanh",)

    def apply(self, h):
        return torch.tanh(h)

    def relaxation(self, lo, hi):
        return s_shaped(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lo, hi)

    def paper(self, n, d):
        return n.clamp_max(1.0), d
