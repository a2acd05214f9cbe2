"""
Average pooling (docs/theory.md §4.2): ``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``, ``F.adaptive_avg_pool2d`` and a
spatial mean ``x.mean((2, 3))`` (global average pooling, checked on shapes by the reader): linear with non-negative
weights, so monotone, and exact in the backward bound (its adjoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.base import Operator, node_arg
from art_weightpert.operators.tensors import flatten_specs


class SpatialMean(nn.Module):
    """``h.mean((2, 3))``: global average pooling written as a mean over the spatial dimensions."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean((2, 3), keepdim=self.keepdim)


@dataclass(eq=False)
class AvgPool(Operator):
    """2-D average pooling, adaptive average pooling or a spatial mean (:class:`SpatialMean`)."""

    name: str
    module: nn.Module

    modules: ClassVar[tuple[type, ...]] = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> AvgPool:
        return cls(name, module)

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> AvgPool | None:
        """``F.adaptive_avg_pool2d(x, size)`` or ``x.mean((2, 3))`` / ``torch.mean(x, [-2, -1], keepdim=...)``, else
        ``None``."""
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            return cls(node.name, nn.AdaptiveAvgPool2d(node_arg(node, 1, "output_size", None)))
        if not ((node.op == "call_method" and node.target == "mean") or node.target is torch.mean):
            return None
        dims = node_arg(node, 1, "dim", None)
        if not isinstance(dims, (tuple, list)) or sorted(dims) not in ([2, 3], [-2, -1]) or "dtype" in node.kwargs:
            return None
        return cls(node.name, SpatialMean(bool(node_arg(node, 2, "keepdim", False))))

    @property
    def is_spatial_mean(self) -> bool:
        return isinstance(self.module, SpatialMean)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(lo), self.apply(hi)  # non-negative weights: monotone

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        """The adjoint of the (linear, bias-free) pooling: ``λ / (H·W)`` on every input of its channel for a global
        mean (one window over the whole map), by autograd otherwise."""
        if self.is_global(lo):
            height, width = lo.shape[2:]
            per_channel = a.reshape(a.shape[:3] + (1, 1)) / (height * width)
            g = per_channel.expand(a.shape[:3] + (height, width)).contiguous()
        else:
            flat = flatten_specs(a)
            with torch.enable_grad():
                probe = flat.new_zeros((len(flat),) + tuple(lo.shape[1:]), requires_grad=True)
                (g,) = torch.autograd.grad(self.apply(probe), probe, flat, create_graph=flat.requires_grad)
        const = a.new_zeros(a.shape[:2])
        if getattr(ctx, "rounding", False):  # docs/theory.md §5: each input's coefficient, a sum over the windows
            from art_weightpert.rounding import abs_dot, error_factor, magnitude

            m = magnitude(lo, hi)
            const = -abs_dot(a, self.apply(m)) * error_factor(self.window(lo), a.dtype)
        return g.reshape(a.shape[:2] + lo.shape[1:]), const

    def is_global(self, h: torch.Tensor) -> bool:
        """Whether the pooling is one mean over the whole map of ``h`` ``(N, C, H, W)`` per channel: a spatial mean or
        an adaptive pooling to 1×1."""
        if self.is_spatial_mean:
            return True
        size = getattr(self.module, "output_size", None)
        return isinstance(self.module, nn.AdaptiveAvgPool2d) and size in (1, (1, 1), [1, 1]) and h.dim() == 4

    def window(self, h: torch.Tensor) -> int:
        """An upper bound of the entries summed per output and of the windows per input, for the input ``h``: the
        kernel's size (an input lies in at most one window per kernel offset); for adaptive pooling, the larger of
        the map and the output map (one that upsamples puts an input in many windows); the map for a spatial mean."""
        k = getattr(self.module, "kernel_size", None)
        if k is not None:
            return k * k if isinstance(k, int) else k[0] * k[1]
        if self.is_spatial_mean:
            return h[0, 0].numel()
        return max(h[0, 0].numel(), self.apply(h[:1, :1]).numel())

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return n, d  # 1-Lipschitz in ℓ∞, the ∞-norm not increased

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        return inputs[0]

    def rademacher_refusal(self, has_bias: bool) -> str | None:
        return None
