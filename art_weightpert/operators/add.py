"""
A residual addition ``a + b`` of two same-shape values (docs/theory.md §4.2): the one operator that combines branches.
Boxes add; a backward bound passes the same coefficients to both terms. Formula B (§3) has no rule: it multiplies
norms along one chain.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from art_weightpert.operators.base import Operator, UnsupportedModelError

_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


@dataclass(eq=False)
class Add(Operator):
    """A residual addition ``a + b`` of same-shape values (docs/theory.md §4.2)."""

    name: str

    @staticmethod
    def matches(node: torch.fx.Node) -> bool:
        """Whether ``node`` is an addition (``+``, ``+=``, ``torch.add``, ``x.add``)."""
        return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
            node.op == "call_method" and node.target in ("add", "__add__")
        )

    def apply(self, *hs: torch.Tensor) -> torch.Tensor:
        out = hs[0]
        for h in hs[1:]:
            out = out + h
        return out

    def interval(self, *ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box of a sum, the boxes ``lo_a, hi_a, lo_b, hi_b`` given end by end: the sum of the boxes."""
        return self.apply(*ends[0::2]), self.apply(*ends[1::2])

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        """The coefficients of every term: ``a`` itself (no constant)."""
        return a, a.new_zeros(a.shape[:2])

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise UnsupportedModelError(
            "formula B (method 'paper') is defined for chains of layers; this model has branches (residual additions)."
        )

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        return all(inputs)
