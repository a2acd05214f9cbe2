"""
Sound linear relaxations and boxes of smooth activations from their curvature (docs/theory.md §4.6): the real line is
cut into pieces where the function is convex or concave, and the lines have the chord's slope ``k`` with the intercepts
``min`` and ``max`` of ``g(z) = σ(z) − k z`` over the box, bounded piece by piece:

* where ``g`` is convex its minimum is at least the value where the tangents at the piece's ends meet (its maximum is
  at an end); where it is concave, the mirror image;
* on a point box the lines are the tangent there (exact).

Also the box of an activation with one minimum ``σ(z*)`` (decreasing before, increasing after): ``[σ(z*), max of the
ends]`` when the box holds ``z*``, the ends' values otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from art_weightpert.operators.activation import Line

Fn = Callable[[torch.Tensor], torch.Tensor]
Piece = tuple[float, float, bool]
"""``(start, end, convex)``: an interval of the real line where the function is convex (``True``) or concave."""


def _extreme(fn: Fn, dfn: Fn, k: torch.Tensor, lo, hi, pieces: tuple[Piece, ...], lowest: bool) -> torch.Tensor:
    """A lower bound of ``min g`` (``lowest``) or an upper bound of ``max g`` over ``[lo, hi]``, ``g = σ − k·id``."""
    best = None
    for start, end, convex in pieces:
        a, b = lo.clamp_min(start), hi.clamp_max(end)
        valid = a <= b
        ga, gb = fn(a) - k * a, fn(b) - k * b
        if convex != lowest:  # the minimum of a concave piece, the maximum of a convex one: at an end
            value = torch.minimum(ga, gb) if lowest else torch.maximum(ga, gb)
        else:  # the tangents at the ends meet below a convex g (above a concave one)
            da, db = dfn(a) - k, dfn(b) - k
            first, second = (da >= 0, db <= 0) if lowest else (da <= 0, db >= 0)
            inner = ~(first | second)
            step = (gb - ga - db * (b - a)) / torch.where(inner, da - db, torch.ones_like(da))
            value = torch.where(first, ga, torch.where(second, gb, ga + da * step))
        value = torch.where(valid, value, math.inf if lowest else -math.inf)
        best = value if best is None else (torch.minimum if lowest else torch.maximum)(best, value)
    return best


def curvature_relaxation(fn: Fn, dfn: Fn, lo: torch.Tensor, hi: torch.Tensor, pieces: tuple[Piece, ...]):
    """``(lower line, upper line)`` of ``fn`` on ``[lo, hi]`` with the chord's slope (``dfn`` at a point box)."""
    width = hi - lo
    wide = width > 0
    k = torch.where(wide, (fn(hi) - fn(lo)) / torch.where(wide, width, torch.ones_like(width)), dfn(lo))
    low: Line = (k, _extreme(fn, dfn, k, lo, hi, pieces, lowest=True))
    up: Line = (k, _extreme(fn, dfn, k, lo, hi, pieces, lowest=False))
    return low, up


def one_minimum_interval(fn: Fn, lo: torch.Tensor, hi: torch.Tensor, at: float, minimum: float):
    """The box of ``fn`` over ``[lo, hi]`` when ``fn`` decreases until ``at`` and increases after it (``minimum ≤
    fn(at)``)."""
    f_lo, f_hi = fn(lo), fn(hi)
    holds = (lo <= at) & (hi >= at) & (lo < hi)  # a point box: its own value
    return torch.where(holds, torch.full_like(f_lo, minimum), torch.minimum(f_lo, f_hi)), torch.maximum(f_lo, f_hi)


def bisect(fn: Callable[[float], float], low: float, high: float) -> float:
    """The root of ``fn`` on ``[low, high]`` (``fn(low) < 0 < fn(high)``) to the last bit of a float."""
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if fn(mid) < 0 else (low, mid)
    return low


MINIMUM_SLACK = 1e-15
"""Subtracted from a computed minimum value: the rounding of the root and of the value (both near 1e-17)."""
