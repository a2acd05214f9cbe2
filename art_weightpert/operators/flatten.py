"""
Flattening every dimension after the batch: ``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)`` and
``view``/``reshape`` calls (the reader checks their shapes afterwards). Exact in every bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from art_weightpert.operators.base import Operator, UnsupportedModelError, node_arg


def is_batch_reshape(node: torch.fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` / ``x.reshape(-1, n)``-style flattening (checked on shapes afterwards)."""
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )


@dataclass(eq=False)
class Flatten(Operator):
    """Flattens every dimension after the batch."""

    name: str

    modules: ClassVar[tuple[type, ...]] = (nn.Flatten,)

    @classmethod
    def from_module(cls, name: str, module: nn.Flatten) -> Flatten:
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedModelError(f"module {name!r}: Flatten must flatten every dimension after the batch.")
        return cls(name)

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> Flatten | None:
        """``torch.flatten(x, 1)`` / ``x.flatten(1)`` (``end_dim`` -1) or a view/reshape, else ``None``."""
        if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"
        ):
            whole = node_arg(node, 1, "start_dim", 0) == 1 and node_arg(node, 2, "end_dim", -1) == -1
            return cls(node.name) if whole else None
        return cls(node.name) if is_batch_reshape(node) else None

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h.flatten(1)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(lo), self.apply(hi)

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        return a.reshape(a.shape[:2] + lo.shape[1:]), a.new_zeros(a.shape[:2])

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return n, d  # 1-Lipschitz in ℓ∞, the ∞-norm unchanged

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        return inputs[0]

    def rademacher_refusal(self, has_bias: bool) -> str | None:
        return None
