"""
Eval-mode batch norm (docs/theory.md §4.2): a fixed per-channel affine map, exact in every bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert.operators.base import Operator, UnsupportedModelError
from art_weightpert.operators.tensors import batched_dot


@dataclass(eq=False)
class BatchNorm(Operator):
    """Eval-mode batch norm, a fixed per-channel affine map ``scale * h + shift`` (channels on dim 1)."""

    name: str
    scale: torch.Tensor
    shift: torch.Tensor
    shift_error: torch.Tensor | None = field(default=None, repr=False)
    """Per channel, a bound on ``|shift − t|`` with ``t = β − μ s`` the exact shift: ``shift`` is computed in float64,
    and ``β ≈ μ s`` can cancel far below the float64 rounding of ``μ s`` (docs/theory.md §5). The float32 bounds add
    it; ``None``: an exact shift."""

    modules: ClassVar[tuple[type, ...]] = (nn.BatchNorm1d, nn.BatchNorm2d)

    @classmethod
    def from_module(cls, name: str, module: nn.Module) -> BatchNorm:
        """``scale`` and ``shift`` from the running statistics (also for a module in training mode: certificates are
        for eval-mode predictions)."""
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedModelError(
                f"module {name!r}: BatchNorm without running statistics (track_running_stats=False) normalizes with "
                "the statistics of the batch, also in eval mode; certify a model whose batch norm has running "
                "statistics."
            )
        with torch.no_grad():
            scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.double()
            shift = -module.running_mean.double() * scale
            # |s − s_exact| ≤ 4u|s| (sum, square root, division, product), then the product μ s and the sum with β
            error = module.running_mean.double().abs() * scale.abs() * (8 * 2.0**-53)
            if module.bias is not None:
                shift = shift + module.bias.double()
                error = error + (shift.abs() + module.bias.double().abs()) * 2.0**-53
            error = error * (1 + 2.0**-40) + torch.finfo(torch.float64).tiny
        return cls(name, scale, shift, error)

    def shaped(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return t.to(h).reshape((1, -1) + (1,) * (h.dim() - 2))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.shaped(self.scale, h) + self.shaped(self.shift, h)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per channel, the ends map to the ends: s⁺ l + s⁻ u + t ≤ s h + t ≤ s⁺ u + s⁻ l + t with s⁺ = max(s, 0) and
        # s⁻ = min(s, 0) (a zero product adds exactly 0, so a channel of either sign is exact); scales of one sign (the
        # usual case, read at every call) in one pass per end.
        sign = self.scale_sign()
        if sign != 0:
            low, high = (lo, hi) if sign > 0 else (hi, lo)
            return per_channel_affine(low, self.scale, self.shift), per_channel_affine(high, self.scale, self.shift)
        up, down = self.scale.clamp_min(0), self.scale.clamp_max(0)
        return (
            per_channel_affine(lo, up, self.shift) + per_channel_affine(hi, down),
            per_channel_affine(hi, up, self.shift) + per_channel_affine(lo, down),
        )

    def scale_sign(self) -> int:
        """``1`` when every channel's scale is ``≥ 0``, ``−1`` when every one is ``≤ 0``, else ``0``. Read at every call
        on the CPU (a few µs; a kept sign could go stale under ``scale.data`` edits); ``0`` on other devices (no device
        synchronization) and for a scale with gradients (a trainer's): the general rule."""
        scale = self.scale
        if scale.requires_grad or scale.device.type != "cpu":
            return 0
        return 1 if bool((scale >= 0).all()) else -1 if bool((scale <= 0).all()) else 0

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        scale, shift = self.shaped(self.scale, lo), self.shaped(self.shift, lo)
        a_in, const = a * scale.unsqueeze(1), batched_dot(a, shift.expand_as(lo))
        if getattr(ctx, "rounding", False):  # docs/theory.md §5: the cast scale and shift, λ s and ⟨λ, t⟩ rounded
            from art_weightpert.rounding import abs_dot, error_factor, magnitude, smallest_subnormal

            m = magnitude(lo, hi)
            error = per_channel_affine(m, self.scale.abs(), self.shift.abs())
            const = const - abs_dot(a, error) * error_factor(a[0, 0].numel(), a.dtype)
            const = const - abs_dot(a, m) * smallest_subnormal(a.dtype)  # a subnormal scale's cast: η/2 absolute
            const = const - abs_dot(a, self.shift_bound(lo).expand_as(m))  # the float64 shift's own error
        return a_in, const

    def shift_bound(self, like: torch.Tensor) -> torch.Tensor:
        """:attr:`shift_error` shaped like ``like``'s channels, rounded up into its dtype (zero for ``None``)."""
        from art_weightpert.rounding import up_cast

        error = torch.zeros_like(self.shift) if self.shift_error is None else self.shift_error
        return up_cast(error.to(like.device), like.dtype).reshape((1, -1) + (1,) * (like.dim() - 2))

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale.abs().max().to(n)
        shift = self.shift.abs().max() + (0 if self.shift_error is None else self.shift_error.max())
        return scale * n + shift.to(n), scale * d


def per_channel_affine(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """``scale·h + shift`` per channel (dim 1), ``scale`` and ``shift`` of one entry per channel (cast to ``h``'s
    dtype), rounded as a product and a sum (or fused). On the CPU one pass of ``F.batch_norm`` with mean 0 and
    variance 1 (its per-channel kernel; ``1/√1`` is exactly 1); ``torch.addcmul`` broadcasting a ``(1, C, 1, 1)``
    factor ran 3-4x slower there (one core: 111 against 30 µs on 200×16×8×8). Elsewhere the broadcast product and
    sum."""
    scale = scale.to(h)
    shift = None if shift is None else shift.to(h)
    if h.device.type == "cpu" and h.dim() >= 2:
        ones = torch.ones_like(scale)
        return F.batch_norm(h, torch.zeros_like(scale), ones, scale, shift, False, 0.0, 0.0)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    out = h * scale.reshape(shape)
    return out if shift is None else out + shift.reshape(shape)
