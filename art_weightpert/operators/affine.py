"""
The affine operator (docs/theory.md §1): a Linear layer or a Conv2d as the linear map ``z = W h + b``, with its maps
(the layer's, per sample, the adjoint) and the per-receptive-field helpers the weight balls' terms use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import conv_gemm
from art_weightpert.operators.base import Operator, UnsupportedModelError
from art_weightpert.rounding import norm_up, smallest_subnormal


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


@dataclass(eq=False)
class Affine(Operator):
    """``z = W h + b``: a Linear layer or a Conv2d seen as the linear map it defines; the weighted operator (its rules
    are the bound methods' own: :attr:`.Operator.weighted`)."""

    name: str
    module: nn.Module
    weight_name: str
    bias_name: str | None

    RULES: ClassVar[tuple[str, ...]] = ()
    weighted: ClassVar[bool] = True
    modules: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> Affine:
        """The reader's rule: a Linear layer, or a Conv2d with zero padding (``"same"`` symmetric)."""
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise UnsupportedModelError(f"module {name!r}: Conv2d with padding_mode={module.padding_mode!r}.")
            conv_padding(module)  # rejects asymmetric "same" padding
        return cls(name, module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)

    def rademacher_refusal(self, has_bias: bool) -> str | None:
        return None

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
        # zero padding by hand (m ≥ 0: the zeros change no maximum): max_pool2d refuses a padding above half the
        # kernel, which a convolution allows (a 1×1 kernel with padding 1)
        ph, pw = self.padding
        channel_max = F.pad(m.amax(dim=1, keepdim=True), (pw, pw, ph, ph))
        return F.max_pool2d(channel_max, mod.kernel_size, mod.stride, 0, mod.dilation)

    def patch_norm2(self, m: torch.Tensor) -> torch.Tensor:
        """Per output position, the ℓ2 norm of ``m`` over the receptive field (all input channels)."""
        if not self.is_conv:
            return norm_up(m, 1, keepdim=True)
        window = m.shape[1] * math.prod(self.module.kernel_size)  # squares below √η underflow: √(n η) more
        return self.patch_sum(m * m).clamp_min(0).sqrt() + math.sqrt(window * smallest_subnormal(m.dtype))

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

    def apply_transposed(
        self, g: torch.Tensor, weight: torch.Tensor, input_shape: torch.Size, groups: int | None = None
    ) -> torch.Tensor:
        """The adjoint map (for backward bounds): ``Wᵀ g``, or the transposed convolution onto ``input_shape``
        (``(C, H, W)`` of one sample) with its output padding computed up front; ``groups``: of the convolution (the
        layer's by default; more for per-sample kernels stacked as groups)."""
        if not self.is_conv:
            return g @ weight
        m, padding = self.module, self.padding
        groups = m.groups if groups is None else groups
        if m.stride == (1, 1) and conv_gemm.use_gemm(g, input_shape[1:]):  # float64: no library kernel
            return conv_gemm.conv_transpose2d(g, weight, padding, m.dilation, groups)
        extra = []
        for i in range(2):
            size = (g.shape[2 + i] - 1) * m.stride[i] - 2 * padding[i] + m.dilation[i] * (weight.shape[2 + i] - 1) + 1
            extra.append(input_shape[1 + i] - size)
        return F.conv_transpose2d(g, weight, None, m.stride, padding, tuple(extra), groups, m.dilation)
