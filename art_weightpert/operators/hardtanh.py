"""
Hardtanh, ReLU6 and clipped ReLUs, ``clamp(z, min_val, max_val)`` with ``min_val ≤ 0 ≤ max_val`` (docs/theory.md §4b):
convex below ``max_val`` and concave above ``min_val``, relaxed by chords and lines through a kink; exact on stable
boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from art_weightpert.operators.activation import Line, MonotoneActivation, Parameter
from art_weightpert.operators.base import UnsupportedModelError


def clamped(lo: torch.Tensor, hi: torch.Tensor, a: float, b: float) -> tuple[Line, Line]:
    """``f(z) = clamp(z, a, b)`` (``a < b``; a clipped ReLU when ``a = 0``): (slope, intercept) of a lower and an upper
    line valid on ``[lo, hi]`` (docs/theory.md §8.4).

    Lower: where ``lo ≥ a`` the box lies where ``f`` is concave and the chord is below; otherwise ``f ≥ a`` and ``f`` is
    above the chord from ``(a, a)`` to ``(hi, f(hi))`` (concave on ``[a, hi]``, that line ≤ ``a`` left of ``a``): the
    better of the two, the chord when ``hi − a > a − lo`` (as CROWN's choice for a ReLU). Upper: the mirror image
    (chord where ``hi ≤ b``; else the constant ``b`` or the chord from ``(lo, f(lo))`` to ``(b, b)``). Boxes inside one
    piece get the exact line."""
    f_lo, f_hi = lo.clamp(a, b), hi.clamp(a, b)
    width = hi - lo
    chord = (f_hi - f_lo) / torch.where(width > 0, width, torch.ones_like(width))
    chord_icpt = f_lo - chord * lo
    zero = torch.zeros_like(lo)
    # lower line
    to_a = hi - a
    k_low = (f_hi - a) / torch.where(to_a > 0, to_a, torch.ones_like(to_a))
    use_k = to_a > a - lo
    low_slope = torch.where(lo >= a, chord, torch.where(use_k, k_low, zero))
    low_icpt = torch.where(lo >= a, chord_icpt, torch.where(use_k, a - k_low * a, zero + a))
    # upper line
    from_b = b - lo
    k_up = (b - f_lo) / torch.where(from_b > 0, from_b, torch.ones_like(from_b))
    use_k = from_b > hi - b
    up_slope = torch.where(hi <= b, chord, torch.where(use_k, k_up, zero))
    up_icpt = torch.where(hi <= b, chord_icpt, torch.where(use_k, b - k_up * b, zero + b))
    # exact lines on the three stable pieces
    below, above, inside = hi <= a, lo >= b, (lo >= a) & (hi <= b)
    const = torch.where(below, zero + a, zero + b)
    one = torch.ones_like(lo)
    low_slope = torch.where(below | above, zero, torch.where(inside, one, low_slope))
    up_slope = torch.where(below | above, zero, torch.where(inside, one, up_slope))
    low_icpt = torch.where(below | above, const, torch.where(inside, zero, low_icpt))
    up_icpt = torch.where(below | above, const, torch.where(inside, zero, up_icpt))
    return (low_slope, low_icpt), (up_slope, up_icpt)


class Hardtanh(MonotoneActivation):
    """``clamp(z, min_val, max_val)`` (``nn.Hardtanh``, ``nn.ReLU6``, a clipped ReLU ``Hardtanh(0, b)``) with
    ``min_val ≤ 0 ≤ max_val``, so that ``|σ(t)| ≤ |t|`` as formula B assumes; 1-Lipschitz."""

    kind = "hardtanh"
    modules = (nn.Hardtanh,)
    parameters = (Parameter("min_val", 1, -1.0), Parameter("max_val", 2, 1.0))
    min_val: float
    max_val: float

    def __init__(self, name: str, min_val: float, max_val: float) -> None:
        super().__init__(name, min_val=float(min_val), max_val=float(max_val))

    def check(self, name):
        if not self.min_val <= 0.0 <= self.max_val:
            raise UnsupportedModelError(
                f"module {name!r}: Hardtanh with min_val={self.min_val}, max_val={self.max_val} (0 must lie in it)."
            )

    @property
    def nonnegative(self) -> bool:
        return self.min_val >= 0

    @property
    def fixes_one(self) -> bool:
        return self.max_val >= 1

    def apply(self, h):
        return torch.clamp(h, self.min_val, self.max_val)

    def relaxation(self, lo, hi):
        return clamped(lo, hi, self.min_val, self.max_val)

    def paper(self, n, d):
        return n, d
