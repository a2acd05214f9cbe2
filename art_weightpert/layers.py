"""
The layer descriptions of a network read by :func:`.read_network` (THEORY.md §1): :class:`Affine` (a Linear layer or
a Conv2d, with its maps and the per-receptive-field helpers the bounds use), :class:`Activation`, :class:`BatchNorm`,
:class:`AvgPool` (also adaptive and global average pooling), :class:`MaxPool`, :class:`Flatten` and :class:`Add` (a
residual addition, THEORY.md §9). Each one knows how to apply itself; the fx reader lives in :mod:`.graph`, the network
(:class:`.Network`) in :mod:`art_weightpert.network`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import conv_gemm


class UnsupportedModelError(ValueError):
    """The model cannot be read as a graph of supported layers; the message names the module or node and the
    reason."""


def conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """The padding of ``module`` as two integers; ``padding="same"`` must be symmetric (odd kernel extents)."""
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise UnsupportedModelError(f"Conv2d with padding='same' and an even kernel extent ({module}).")
        return (total[0] // 2, total[1] // 2)
    return tuple(module.padding)


# ---------------------------------------------------------------------------------------------- layer descriptions
@dataclass(eq=False)
class Affine:
    """``z = W h + b``: a Linear layer or a Conv2d seen as the linear map it defines."""

    name: str
    module: nn.Module
    weight_name: str
    bias_name: str | None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def padding(self) -> tuple[int, int]:
        """A conv's zero padding as two integers (``"valid"`` is 0; ``"same"`` is symmetric, checked by the
        reader)."""
        return conv_padding(self.module)

    def apply(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's map with the given weight (and bias, if any): a matmul or a convolution."""
        if self.is_conv:
            return self._convolve(h, weight, bias, self.module.groups)
        return F.linear(h, weight, bias)

    def _convolve(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
        """The convolution's geometry with ``weight``: one batched product in float64 on small maps (no library
        kernel there, :mod:`.conv_gemm`), torch's convolution otherwise."""
        m = self.module
        out_hw = conv_gemm.output_hw(h.shape[2:], weight.shape[2:], m.stride, self.padding, m.dilation)
        conv = conv_gemm.conv2d if conv_gemm.use_gemm(h, out_hw) else F.conv2d
        return conv(h, weight, bias, m.stride, self.padding, m.dilation, groups)

    def apply_per_sample(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's map without bias where sample ``n`` of ``h`` uses its own ``weight[n]`` (``weight``:
        ``(N,) + weight shape``): one batched matmul, or one grouped convolution with the samples as groups."""
        if not self.is_conv:
            return torch.bmm(weight, h.unsqueeze(2)).squeeze(2)
        m, n = self.module, len(h)
        folded = h.reshape((1, -1) + tuple(h.shape[2:]))
        kernels = weight.reshape((-1,) + tuple(weight.shape[2:]))
        out = F.conv2d(folded, kernels, None, m.stride, self.padding, m.dilation, n * m.groups)
        return out.reshape((n, -1) + tuple(out.shape[2:]))

    def patch_max(self, m: torch.Tensor) -> torch.Tensor:
        """Per output position, the max of ``m`` (≥ 0) over the position's receptive field (all input channels):
        ``(N, 1)`` for Linear, ``(N, 1, H', W')`` for a conv."""
        if not self.is_conv:
            return m.amax(dim=1, keepdim=True)
        mod = self.module
        return F.max_pool2d(m.amax(dim=1, keepdim=True), mod.kernel_size, mod.stride, self.padding, mod.dilation)

    def patch_norm2(self, m: torch.Tensor) -> torch.Tensor:
        """Per output position, the ℓ2 norm of ``m`` over the receptive field (all input channels)."""
        if not self.is_conv:
            return m.norm(dim=1, keepdim=True)
        return self.patch_sum(m * m).clamp_min(0).sqrt()

    def patch_sum(self, m: torch.Tensor) -> torch.Tensor:
        """Per output position, the sum of ``m`` over the receptive field (all input channels): ``(N, 1)`` for Linear,
        ``(N, 1, H', W')`` for a conv (the channels summed first: a one-channel window sum)."""
        if not self.is_conv:
            return m.sum(dim=1, keepdim=True)
        ones = m.new_ones((1, 1) + tuple(self.module.kernel_size))
        return self._convolve(m.sum(dim=1, keepdim=True), ones, None, 1)

    def rows_shape(self, per_row: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-output-unit tensor ``(rows,)`` against the layer's output ``(N, rows[, H', W'])``."""
        return per_row.reshape((1, -1, 1, 1) if self.is_conv else (1, -1))

    def apply_transposed(self, g: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """The adjoint map (for backward bounds): ``Wᵀ g``, or the transposed convolution onto ``input_shape``
        (``(C, H, W)`` of one sample) with its output padding computed up front."""
        if not self.is_conv:
            return g @ weight
        m, padding = self.module, self.padding
        if m.stride == (1, 1) and conv_gemm.use_gemm(g, input_shape[1:]):  # float64: no library kernel
            return conv_gemm.conv_transpose2d(g, weight, padding, m.dilation, m.groups)
        extra = []
        for i in range(2):
            size = (g.shape[2 + i] - 1) * m.stride[i] - 2 * padding[i] + m.dilation[i] * (weight.shape[2 + i] - 1) + 1
            extra.append(input_shape[1 + i] - size)
        return F.conv_transpose2d(g, weight, None, m.stride, padding, tuple(extra), m.groups, m.dilation)


@dataclass(eq=False)
class Activation:
    """A coordinatewise monotone activation: ``relu``, ``leaky_relu`` (with ``negative_slope``), ``sigmoid``,
    ``tanh``, ``hardtanh`` (``clamp(h, min_val, max_val)`` with ``min_val ≤ 0 ≤ max_val``; a clipped ReLU when
    ``min_val = 0``)."""

    name: str
    kind: str
    negative_slope: float = 0.0
    min_val: float = -1.0
    max_val: float = 1.0

    @property
    def nonnegative(self) -> bool:
        """Whether every output is ≥ 0: ReLU, sigmoid, a hardtanh with ``min_val ≥ 0``."""
        return self.kind in ("relu", "sigmoid") or (self.kind == "hardtanh" and self.min_val >= 0)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(h)
        if self.kind == "leaky_relu":
            return F.leaky_relu(h, self.negative_slope)
        if self.kind == "sigmoid":
            return torch.sigmoid(h)
        if self.kind == "hardtanh":
            return torch.clamp(h, self.min_val, self.max_val)
        return torch.tanh(h)


@dataclass(eq=False)
class BatchNorm:
    """Eval-mode batch norm, a fixed per-channel affine map ``scale * h + shift`` (channels on dim 1)."""

    name: str
    scale: torch.Tensor
    shift: torch.Tensor

    def shaped(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return t.to(h).reshape((1, -1) + (1,) * (h.dim() - 2))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.shaped(self.scale, h) + self.shaped(self.shift, h)


class SpatialMean(nn.Module):
    """``h.mean((2, 3))``: global average pooling written as a mean over the spatial dimensions."""

    def __init__(self, keepdim: bool = False) -> None:
        super().__init__()
        self.keepdim = keepdim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mean((2, 3), keepdim=self.keepdim)


@dataclass(eq=False)
class AvgPool:
    """2-D average pooling, adaptive average pooling or a spatial mean (:class:`SpatialMean`): linear, with
    non-negative weights."""

    name: str
    module: nn.Module

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


@dataclass(eq=False)
class MaxPool:
    """2-D max pooling (monotone; 1-Lipschitz in ℓ∞)."""

    name: str
    module: nn.Module

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)


@dataclass(eq=False)
class Flatten:
    """Flattens every dimension after the batch."""

    name: str

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h.flatten(1)


@dataclass(eq=False)
class Add:
    """A residual addition ``a + b`` of same-shape values (THEORY.md §9): the one node that combines branches."""

    name: str

    def apply(self, *hs: torch.Tensor) -> torch.Tensor:
        out = hs[0]
        for h in hs[1:]:
            out = out + h
        return out


Layer = Affine | Activation | BatchNorm | AvgPool | MaxPool | Flatten | Add
