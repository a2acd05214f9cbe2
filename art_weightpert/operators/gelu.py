"""
GELU, ``z·Φ(z)`` with ``Φ`` the standard normal distribution function (docs/theory.md §4.6; ``approximate="none"``):
not monotone, one minimum at ``z* ≈ −0.7518`` (where ``Φ(z) + z φ(z) = 0``); convex on ``[−√2, √2]`` (``σ'' = φ(z)(2 −
z²)``) and concave outside; ``|σ(t)| ≤ |t|`` and ``|σ'| ≤ σ'(√2) ≈ 1.1289``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.activation import ActivationFunction, Parameter, refuse
from art_weightpert.operators.smooth import MINIMUM_SLACK, bisect, curvature_relaxation, one_minimum_interval


def _cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _slope(z: float) -> float:
    return _cdf(z) + z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


_AT = bisect(_slope, -3.0, 0.0)
_MINIMUM = _AT * _cdf(_AT) - MINIMUM_SLACK
_C = math.sqrt(2)
_PIECES = ((-math.inf, -_C, False), (-_C, _C, True), (_C, math.inf, False))


def _dgelu(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


class GELU(ActivationFunction):
    """``z·Φ(z)`` (``nn.GELU()``, ``F.gelu``); the tanh approximation is refused."""

    kind = "gelu"
    modules = (nn.GELU,)
    functions = (F.gelu,)
    parameters = (Parameter("approximate", None, "none"),)
    approximate: str
    lipschitz = _slope(_C) + 1e-12

    def check(self, name):
        if self.approximate != "none":
            raise refuse(name, f"GELU with approximate={self.approximate!r} has no rules; use approximate='none'.")

    def apply(self, h):
        return F.gelu(h)

    def interval(self, lo, hi):
        return one_minimum_interval(F.gelu, lo, hi, _AT, _MINIMUM)

    def relaxation(self, lo, hi):
        return curvature_relaxation(F.gelu, _dgelu, lo, hi, _PIECES)

    def paper(self, n, d):  # |σ(t)| ≤ |t|, Lipschitz
        return n, d * self.lipschitz
