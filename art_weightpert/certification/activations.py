"""
Linear relaxations of the activations for the backward linear bound (THEORY.md §4b): per element of a pre-activation
box ``[lo, hi]``, a lower and an upper line ``slope·z + intercept`` enclosing the activation there.

* ReLU / LeakyReLU (:func:`kinked`): CROWN's relaxation, the chord on one side and a line through the origin (slope
  chosen by ``hi > −lo``) on the other; exact on stable boxes.
* hardtanh / clipped ReLU (:func:`clamped`): ``clamp(z, a, b)``, convex below ``b`` and concave above ``a``: the chord
  on the side where the box is convex or concave, a line through a kink (or the constant) on the other; exact on
  stable boxes.
* sigmoid / tanh (:func:`s_shaped`): lines through the box's end points with slope ``min(σ'(end), chord)``, tangents at
  the midpoint where the box lies in the convex or concave part.
"""

from __future__ import annotations

import torch

from art_weightpert.certification.common import batched_dot
from art_weightpert.network import Activation


def kinked(lo: torch.Tensor, hi: torch.Tensor, slope: float):
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


def clamped(lo: torch.Tensor, hi: torch.Tensor, a: float, b: float):
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


def s_shaped(fn, dfn, lo: torch.Tensor, hi: torch.Tensor):
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


def relaxation(layer: Activation, lo: torch.Tensor, hi: torch.Tensor):
    """``((lower slope, intercept), (upper slope, intercept))`` of lines enclosing the activation on ``[lo, hi]``."""
    if layer.kind == "relu":
        return kinked(lo, hi, 0.0)
    if layer.kind == "leaky_relu":
        return kinked(lo, hi, layer.negative_slope)
    if layer.kind == "hardtanh":
        return clamped(lo, hi, layer.min_val, layer.max_val)
    if layer.kind == "sigmoid":
        return s_shaped(torch.sigmoid, _dsigmoid, lo, hi)
    return s_shaped(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lo, hi)


def activation_backward(layer: Activation, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx=None):
    """The backward rule of an activation: ``λ = λ⁺ + λ⁻``, ``λ⁺`` takes the lower line and ``λ⁻`` the upper one;
    returns ``(λ on the input, constant)``.

    One select of the slopes by the sign of ``λ`` and one product (instead of ``λ·u + λ⁺·(l − u)``: the same value in
    exact arithmetic, with fewer roundings); a constant only from the lines with a non-zero intercept (ReLU's lower
    line and, for a convex LeakyReLU, its lower line pass through the origin)."""
    (l_slope, l_icpt), (u_slope, u_icpt) = relaxation(layer, lo, hi)
    positive = a >= 0
    a_in = torch.where(positive, l_slope.unsqueeze(1), u_slope.unsqueeze(1))
    a_in = a_in * a if a.requires_grad or a_in.requires_grad else a_in.mul_(a)  # in place: one pass fewer
    kinked_convex = layer.kind == "relu" or (layer.kind == "leaky_relu" and layer.negative_slope <= 1)
    if kinked_convex:  # lower line through the origin: only λ⁻ meets an intercept
        return a_in, batched_dot(a.clamp_max(0), u_icpt)
    return a_in, batched_dot(a.clamp_min(0), l_icpt) + batched_dot(a.clamp_max(0), u_icpt)
