"""
2-D max pooling (docs/theory.md §4b): monotone and 1-Lipschitz in ℓ∞. In the backward bound ``y ≥ h_{j*}`` for the
window's input with the largest lower bound and ``y ≤ max_j u_j``; ``y = h_{j*}`` exactly when that input dominates the
window (every other upper bound at most ``l_{j*}``). With ``ceil_mode=True`` the backward pass stops at the pooling: the
bound is concretized with the interval box of its output.

Windows that do not overlap (stride ≥ the dilated kernel, the usual ``MaxPool2d(k)``) take ``j*`` per window and
put the coefficients back with one scatter into the input; overlapping windows unfold the boxes. Both give the same
values (the first maximum in the window wins ties in both, as in ``max_pool2d(..., return_indices=True)``).

Maxima are exact in floating point, so how they are computed is a matter of speed only. On the CPU, PyTorch's
``max_pool2d`` on channels-first maps runs 9-14x slower than element-wise maxima of the kernel's strided slices
(one pass per kernel offset: 45 against 425 µs on 9x16x28x28, 0.9 against 13 ms on 256x16x28x28, one core; measured
2026-12-08); on the CPU, :func:`window_max` and the window selection of the backward rule take that way for kernels of
at most :data:`SLICED_MAX_ENTRIES` entries without ``ceil_mode`` (the selection also without padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from art_weightpert.operators.base import Operator, UnsupportedModelError
from art_weightpert.operators.tensors import concretize, sum_features


@dataclass(eq=False)
class MaxPool(Operator):
    """2-D max pooling."""

    name: str
    module: nn.Module

    modules: ClassVar[tuple[type, ...]] = (nn.MaxPool2d,)

    @classmethod
    def from_module(cls, name: str, module: nn.MaxPool2d) -> MaxPool:
        if module.return_indices:
            raise UnsupportedModelError(f"module {name!r}: MaxPool2d with return_indices=True.")
        return cls(name, module)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return window_max(h, self.module)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(lo), self.apply(hi)

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        """``(λ on the input, constant)`` over the input box ``[lo, hi]``."""
        if self.module.ceil_mode:  # stop here: concretize with the interval box of the output
            out_lo, out_hi = self.apply(lo), self.apply(hi)
            const = concretize(a, out_lo, out_hi)
            if getattr(ctx, "rounding", False):  # docs/theory.md §5: the two dot products of the concretization
                from art_weightpert.rounding import abs_dot, error_factor

                m = torch.maximum(out_lo.abs(), out_hi.abs())
                const = const - 2 * abs_dot(a, m) * error_factor(a[0, 0].numel(), a.dtype)
            return a.new_zeros(a.shape[:2] + lo.shape[1:]), const
        rounding = getattr(ctx, "rounding", False)
        return (_native if self.disjoint_windows else _unfolded)(self, a, lo, hi, rounding)

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return n, d  # 1-Lipschitz in ℓ∞, the ∞-norm not increased

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        return inputs[0]

    @property
    def disjoint_windows(self) -> bool:
        """Whether the windows do not overlap (stride ≥ the dilated kernel) and the output size is floored."""
        kernel, stride, _, dil = _geometry(self.module)
        return not self.module.ceil_mode and all(s >= d * (kk - 1) + 1 for s, d, kk in zip(stride, dil, kernel))


def _geometry(mod):
    kernel, stride = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size)
    return kernel, stride, _pair(mod.padding), _pair(mod.dilation)


def _coefficients(lam: torch.Tensor, dominant: torch.Tensor, u_max: torch.Tensor, rounding: bool = False):
    """The coefficient on ``h_{j*}`` per window (``λ⁺``, and ``λ⁻`` where ``y = h_{j*}``) and the constant
    ``Σ λ⁻ max_j u_j`` of the other windows (``rounding``: minus its rounding error, docs/theory.md §5; the
    coefficients are exact: sums with a zero and products by 0 or 1)."""
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    exact = dominant.to(lam.dtype)  # 1 where y = h_{j*}: a product by 0/1 (faster than a broadcast select)
    selected = pos + neg * exact  # coefficient on h_{j*} (y ≥ h_{j*})
    if rounding:
        from art_weightpert.rounding import error_factor

        others = neg * (1 - exact)
        const = sum_features(others * u_max.unsqueeze(1))
        const = const + sum_features(others * u_max.abs().unsqueeze(1)) * error_factor(lam[0, 0].numel(), lam.dtype)
        return selected, const
    const = sum_features(neg * (1 - exact) * u_max.unsqueeze(1))  # y ≤ max_j u_j
    return selected, const


def _native_selection(layer: MaxPool, a, lo, hi, rounding: bool = False):
    """The rule on non-overlapping windows, before the coefficients are put back into the input: the coefficient on
    each window's ``h_{j*}`` ``(N, K, C, P)``, the flat index of ``j*`` in its channel's map ``(N, C, P)``, and the
    constant ``(N, K)``."""
    mod = layer.module
    n, k = a.shape[:2]
    channels = lo.shape[1]
    _, flat_best, u_max, dominant = _window_selection(lo, hi, mod)
    dominant = dominant.flatten(2).unsqueeze(1)  # y = h_{j*} exactly
    selected, const = _coefficients(a.reshape(n, k, channels, -1), dominant, u_max.flatten(2), rounding)
    return selected, flat_best, const


SLICED_MAX_ENTRIES = 16
"""Largest kernel (``kh·kw`` entries) whose window maxima are taken from its strided slices (one element-wise pass per
entry) rather than by ``max_pool2d``."""


def _sliced(module: nn.Module, t: torch.Tensor) -> bool:
    """Whether the maxima of ``module`` on ``t`` are taken from strided slices: on the CPU (where the measurement was
    made; a GPU's pooling kernel is one launch), a small kernel, floor mode."""
    kernel = _pair(module.kernel_size)
    return t.device.type == "cpu" and not module.ceil_mode and kernel[0] * kernel[1] <= SLICED_MAX_ENTRIES


def _offset_slices(t: torch.Tensor, module: nn.Module, fill: float):
    """``(entry, slice)`` for every kernel entry in row-major order: the slice of ``t`` (padded with ``fill``) that the
    entry reads in every window, a strided view shaped like the pooling's output. Floor mode only."""
    kernel, stride, pad, dil = _geometry(module)
    if pad != (0, 0):
        t = F.pad(t, (pad[1], pad[1], pad[0], pad[0]), value=fill)
    height, width = t.shape[-2:]
    out_h = (height - dil[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dil[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    for i in range(kernel[0]):
        rows = slice(i * dil[0], i * dil[0] + (out_h - 1) * stride[0] + 1, stride[0])
        for j in range(kernel[1]):
            cols = slice(j * dil[1], j * dil[1] + (out_w - 1) * stride[1] + 1, stride[1])
            yield i * kernel[1] + j, t[..., rows, cols]


def window_max(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module(t)`` for a ``MaxPool2d`` ``module``: the same values (maxima are exact; NaN propagates as in
    ``max_pool2d``), from the strided slices of the kernel's entries where :func:`_sliced` allows, the input is valid
    for ``max_pool2d`` and no gradient is taken (``max_pool2d``'s gradient goes to the window's first maximum, an
    element-wise maximum's splits ties); ``module(t)`` itself otherwise, which raises where PyTorch does."""
    kernel, _, pad, _ = _geometry(module)
    valid = t.dim() in (3, 4) and t.shape[-3] > 0 and all(p <= k // 2 for p, k in zip(pad, kernel))
    if not valid or not _sliced(module, t) or (t.requires_grad and torch.is_grad_enabled()):
        return module(t)
    slices = [part for _, part in _offset_slices(t, module, float("-inf"))]
    if slices[0].shape[-2:].numel() == 0:  # no window fits: max_pool2d raises
        return module(t)
    out = slices[0]
    for part in slices[1:]:
        out = torch.maximum(out, part)  # out of place: torch.func.vmap has no rule for maximum's out=
    return out if len(slices) > 1 else out.clone()


def _window_selection(lo: torch.Tensor, hi: torch.Tensor, module: nn.Module):
    """For disjoint windows: the largest lower bound ``l_{j*}`` per window, the flat index of ``j*`` in its channel's
    map ``(N, C, P)`` (the window's first maximum), the largest upper bound ``max_j u_j``, and whether ``y = h_{j*}`` on
    the whole box (``u_j ≤ l_{j*}`` for every other input ``j`` of the window). The strided slices use comparisons and
    boolean passes only (``where`` and ``masked_fill`` run 5x slower than a comparison here)."""
    kernel, stride, pad, dil = _geometry(module)
    if not _sliced(module, lo) or pad != (0, 0):
        l_best, best = F.max_pool2d(lo, kernel, stride, pad, dil, return_indices=True)
        flat_best = best.flatten(2)
        u_max = F.max_pool2d(hi, kernel, stride, pad, dil)
        others_hi = hi.flatten(2).scatter(2, flat_best, float("-inf")).reshape(hi.shape)  # each j* in one window only
        return l_best, flat_best, u_max, F.max_pool2d(others_hi, kernel, stride, pad, dil) <= l_best
    lows, highs = list(_offset_slices(lo, module, 0.0)), list(_offset_slices(hi, module, 0.0))
    l_best, u_max = lows[0][1].clone(), highs[0][1].clone()
    for (_, low), (_, high) in zip(lows[1:], highs[1:]):
        torch.maximum(l_best, low, out=l_best)  # NaN propagates, as in max_pool2d
        torch.maximum(u_max, high, out=u_max)
    entry = torch.zeros(l_best.shape, dtype=torch.uint8, device=lo.device)
    found = above = None
    for (index, low), (_, high) in zip(lows, highs):
        is_max = low == l_best
        if found is None:  # the first maximum wins ties, as in max_pool2d
            first, found = is_max, is_max.clone()
        else:
            first = is_max & ~found
            found |= is_max
            entry.add_(first, alpha=index)
        other_above = (high > l_best) & ~first
        above = other_above if above is None else above.logical_or_(other_above)
    width = lo.shape[-1]
    out_h, out_w = l_best.shape[-2:]
    device = lo.device
    start = torch.arange(out_h, device=device).mul_(stride[0] * width).unsqueeze(1) + torch.arange(
        out_w, device=device
    ).mul_(stride[1])  # flat index of each window's first entry
    rows, cols = torch.arange(kernel[0], device=device), torch.arange(kernel[1], device=device)
    within = (rows.mul_(dil[0] * width).unsqueeze(1) + cols.mul_(dil[1])).flatten()  # each entry's offset in the map
    flat_best = torch.add(start, within[entry.long()])
    return l_best, flat_best.flatten(2), u_max, ~above & found  # a NaN l_{j*} (no maximum found): not dominated


def put_back(selected: torch.Tensor, flat_best: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The coefficients ``selected`` ``(N, K, C, P)`` scattered to the window maxima ``flat_best`` of an input of
    ``shape`` ``(N, C, H, W)``: ``(N, K, C, H, W)`` (zero elsewhere)."""
    n, k, channels = selected.shape[:3]
    a_in = selected.new_zeros((n, k, channels, shape[2:].numel()))
    a_in.scatter_(3, flat_best.unsqueeze(1).expand(n, k, -1, -1), selected)
    return a_in.reshape((n, k) + tuple(shape[1:]))


def _native(layer: MaxPool, a, lo, hi, rounding: bool = False):
    selected, flat_best, const = _native_selection(layer, a, lo, hi, rounding)
    return put_back(selected, flat_best, lo.shape), const


def _unfolded(layer: MaxPool, a, lo, hi, rounding: bool = False):
    mod = layer.module
    kernel, stride, pad, dil = _geometry(mod)
    n, k = a.shape[:2]
    channels, height, width = lo.shape[1:]
    border = (pad[1], pad[1], pad[0], pad[0])

    def windows(t):  # (N, C, kh·kw, P), padding at -inf as in max pooling
        t = F.pad(t, border, value=float("-inf"))
        return F.unfold(t, kernel, dil, 0, stride).reshape(n, channels, kernel[0] * kernel[1], -1)

    lw, uw = windows(lo), windows(hi)
    best = lw.argmax(dim=2, keepdim=True)  # j*: the input with the largest lower bound
    l_best = lw.gather(2, best).squeeze(2)
    others = uw.scatter(2, best, float("-inf")).amax(dim=2)
    dominant = (others <= l_best).unsqueeze(1)  # y = h_{j*} exactly
    lam = a.reshape(n, k, channels, -1)
    selected, const = _coefficients(lam, dominant, uw.amax(dim=2), rounding)
    if rounding:  # docs/theory.md §5: an input's coefficient sums its windows' (at most one per kernel offset)
        from art_weightpert.rounding import error_factor, magnitude

        m_best = windows(magnitude(lo, hi)).gather(2, best).squeeze(2)  # |h_{j*}| of each window
        const = const - sum_features(selected.abs() * m_best.unsqueeze(1)) * error_factor(
            kernel[0] * kernel[1], a.dtype
        )
    spread = lam.new_zeros((n, k, channels, kernel[0] * kernel[1], lam.shape[-1]))
    spread = spread.scatter(3, best.unsqueeze(1).expand(n, k, -1, -1, -1), selected.unsqueeze(3))
    size = (height + 2 * pad[0], width + 2 * pad[1])
    folded = F.fold(spread.reshape(n * k, -1, lam.shape[-1]), size, kernel, dil, 0, stride)
    a_in = folded[:, :, pad[0] : pad[0] + height, pad[1] : pad[1] + width]
    return a_in.reshape(a.shape[:2] + lo.shape[1:]), const


def maxpool_activation_backward(
    layer: MaxPool, activation: Operator, a: torch.Tensor, boxes: tuple, pre_boxes: tuple, ctx: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The max-pooling rule then the activation's rule, for a pooling with :attr:`MaxPool.disjoint_windows` whose input
    is the output of the element-wise ``activation`` (and of nothing else). ``boxes``: the pooling's input box,
    ``pre_boxes``: the activation's.

    The pooling puts coefficients on one input per window only, so the activation's rule (element-wise; a zero
    coefficient takes nothing) runs on those entries alone, ``1/(kh·kw)`` of the map: the same values as the two rules
    one after the other. Returns ``(λ on those entries of the activation's input (N, K, C, P), their flat positions in
    its map (N, C, P), constant)``; :func:`put_back` makes the dense coefficients. ``ctx``: passed to the activation's
    rule (with :attr:`.BackwardContext.rounding`, both rules subtract their rounding errors, docs/theory.md §5)."""
    selected, flat_best, const = _native_selection(layer, a, *boxes, getattr(ctx, "rounding", False))
    pre_lo, pre_hi = (t.flatten(2).gather(2, flat_best) for t in pre_boxes)
    a_in, const_activation = activation.backward(selected, pre_lo, pre_hi, ctx)
    return a_in, flat_best, const + const_activation
