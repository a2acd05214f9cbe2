"""
SiLU (swish), ``z·sigmoid(z)`` (docs/theory.md §4.6): not monotone, one minimum at ``z* ≈ −1.2785`` (where
``1 + z(1 − sigmoid(z)) = 0``, ``σ(z*) = z* + 1``); convex on ``[−c, c]`` and concave outside, ``c ≈ 2.3994`` the
root of ``2 + z(1 − 2 sigmoid(z))``; ``|σ(t)| ≤ |t|`` and ``|σ'| ≤ σ'(c) ≈ 1.0998``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import ActivationFunction
from art_weightpert.operators.smooth import MINIMUM_SLACK, bisect, curvature_relaxation, one_minimum_interval


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _slope(z: float) -> float:
    return _sigmoid(z) * (1 + z * (1 - _sigmoid(z)))


_AT = bisect(_slope, -3.0, 0.0)
_MINIMUM = _AT * _sigmoid(_AT) - MINIMUM_SLACK
_C = bisect(lambda z: -(2 + z * (1 - 2 * _sigmoid(z))), 0.0, 5.0)
_PIECES = ((-math.inf, -_C, False), (-_C, _C, True), (_C, math.inf, False))


def _dsilu(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class SiLU(ActivationFunction):
    """``z·sigmoid(z)`` (``nn.SiLU``, ``F.silu``)."""

    kind = "silu"
    modules = (nn.SiLU,)
    functions = (F.silu,)
    lipschitz = _slope(_C) + 1e-12

    def apply(self, h):
        return F.silu(h)

    def interval(self, lo, hi):
        return one_minimum_interval(F.silu, lo, hi, _AT, _MINIMUM)

    def relaxation(self, lo, hi):
        return curvature_relaxation(F.silu, _dsilu, lo, hi, _PIECES)

    def paper(self, n, d):  # |σ(t)| ≤ |t|, Lipschitz
        return n, d * self.lipschitz
