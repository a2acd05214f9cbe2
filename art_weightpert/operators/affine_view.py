"""
The affine operator at one step of the backward linear bound (docs/theory.md §4b), as the weight balls' terms read it
(:meth:`.Ball.linear_term`): the coefficients ``λ`` on its output, the box of its input, the magnitude bound, the box of
the kernel gradient ``G`` of a convolution, and the maps from terms in ``G`` back onto the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from art_weightpert.operators.affine import Affine
from art_weightpert.operators.tensors import abs_chord, batched_dot, flatten_specs, sample_factors, sum_features

CHORD_MAX_RATIO = 32
"""Largest ratio of a convolution's kernel (``numel(W)``) to its output (the coefficients per sample and specification)
for which a box ball's term runs on the kernel-gradient box (the chord of ``|G|``, linear in the input,
:meth:`.BoxBall.linear_term`); above it the term is the constant of the gradient at the box's centre plus the interval
term of the box's radius (docs/theory.md §4b). The chord's passes over the box ``(samples, specifications) + kernel
shape`` and the per-sample kernel they leave cost ``numel(W)`` per row, the rest of the step the coefficients: on
ResNet-18's deep layers (ratios 36 to 4608) the box is most of the bound's time (``bench_residual.py``, one core,
float32 with rounding terms: 1.9 s per sample with the chord everywhere, 0.5 s above this ratio), while every digits
network of the docs (ratios up to 18) keeps the chord, which is tighter by a second-order term."""


@dataclass(eq=False)
class AffineBackward:
    """One affine layer at one step of the backward pass, as the balls' linear terms read it: the coefficients ``λ``
    ``(N, K, rows[, H', W'])`` on its output and the box ``[lo, hi]`` ``(N, ...)`` of its input (``lo is hi``: the
    input is known)."""

    layer: Affine
    coefficients: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    scale: torch.Tensor | None = None  # per-sample radius factors (N,) of the terms given to add_to_kernel
    gradient: tuple[torch.Tensor, torch.Tensor] | None = None  # the kernel-gradient box, when computed elsewhere
    kernel_offset: tuple[torch.Tensor, torch.Tensor] | None = None  # (coefficient, factor): see add_to_kernel
    native_adjoint: bool = False  # kernel_to_input by one grouped transposed convolution (float32, with rounding)

    @property
    def known_input(self) -> bool:
        return self.lo is self.hi

    @cached_property
    def magnitude(self) -> torch.Tensor:
        """``m = max(|lo|, |hi|)``, a bound on ``|ĥ|``."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @cached_property
    def centre(self) -> torch.Tensor:
        """The input box's centre ``(lo + hi) / 2``."""
        return self.lo if self.known_input else (self.lo + self.hi) / 2

    @cached_property
    def radius(self) -> torch.Tensor:
        """The input box's radius ``(hi − lo) / 2`` (0 for a known input)."""
        return torch.zeros_like(self.lo) if self.known_input else (self.hi - self.lo) / 2

    @property
    def large_kernel(self) -> bool:
        """Whether the convolution's kernel is more than :data:`CHORD_MAX_RATIO` times its output (the coefficients of
        one sample and specification): its kernel-gradient box would dominate the step."""
        return self.layer.module.weight.numel() > CHORD_MAX_RATIO * self.coefficients[0, 0].numel()

    def transposed(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Coefficients ``a`` on the output mapped onto the input through the layer's adjoint with ``weight``:
        ``(N, K) + input shape``."""
        out = self.layer.apply_transposed(flatten_specs(a), weight, self.lo.shape[1:])
        return out.reshape(a.shape[:2] + self.lo.shape[1:])

    def magnitude_term(self, bound: torch.Tensor) -> torch.Tensor:
        """``−Σ |λ| ⊙ P`` for a bound ``P`` ``(N, rows[, H', W'])`` on ``|Δĥ|`` per output unit: ``(N, K)``."""
        return -sum_features(self.coefficients.abs() * bound.unsqueeze(1))

    def minus_abs_input(self, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The term ``−g·|ĥ|`` (``g ≥ 0``, ``(N, K) + input shape`` or broadcastable) as ``(coefficients, constant)``:
        exact for ``ĥ ≥ 0`` (absorbed into the coefficients) and for a known input (a constant), the chord of ``|ĥ|``
        otherwise."""
        lo, hi = self.lo, self.hi
        if bool((lo >= 0).all()) and lo is not hi:  # after a ReLU: exact absorption A ← λW − |λ|δ
            return -g, None
        g = g.expand(self.coefficients.shape[:2] + lo.shape[1:])
        if lo is hi:  # a known input: the exact constant −(|λ|δ)·|x|
            return None, -batched_dot(g, lo.abs())
        slope, offset = abs_chord(self.centre, self.radius)
        return -g * slope.unsqueeze(1), -batched_dot(g, offset)

    # ------------------------------------------------------------------------------------------- convolutions
    def _patches(self, t: torch.Tensor) -> torch.Tensor:
        """The convolution's input patches ``(N, groups, C/groups·kh·kw, P)``."""
        mod = self.layer.module
        cols = F.unfold(t, mod.kernel_size, mod.dilation, self.layer.padding, mod.stride)
        return cols.reshape(len(t), mod.groups, -1, cols.shape[-1])

    def _grouped(self) -> torch.Tensor:
        """The coefficients ``(N, K, rows, H', W')`` as ``(N, K, groups, rows/groups, P)``."""
        a = self.coefficients
        n, k, rows = a.shape[:3]
        return a.reshape(n, k, self.layer.module.groups, rows // self.layer.module.groups, -1)

    def gradient_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre and radius of a box of the kernel gradient ``G`` of a convolution over ``ĥ ∈ [lo, hi]``, each
        ``(N, K, groups, rows/groups, C/groups·kh·kw)`` (the radius is 0 for a known input)."""
        return self._gradient_box

    @cached_property
    def _gradient_box(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gradient is not None:
            return self.gradient
        centre = self.centre_gradient()
        if self.known_input:
            return centre, torch.zeros_like(centre)
        return centre, _per_sample_kernel_gradient(self._grouped().abs(), self._patches(self.radius))

    def centre_gradient(self) -> torch.Tensor:
        """The kernel gradient ``G`` of a convolution at the input box's centre (exact for a known input), shaped like
        :meth:`gradient_box`'s tensors."""
        return self._centre_gradient

    @cached_property
    def _centre_gradient(self) -> torch.Tensor:
        if self.gradient is not None:
            return self.gradient[0]
        return _per_sample_kernel_gradient(self._grouped(), self._patches(self.centre))

    def add_to_kernel(self, coef: torch.Tensor, factor: torch.Tensor | None = None) -> None:
        """Add the term ``ĥ ↦ ⟨coef·factor, G(ĥ)⟩`` (``coef`` shaped like :meth:`gradient_box`'s tensors, ``factor``
        broadcastable to it) to the input coefficients. Since ``λ·(W ĥ) = ⟨W, G(ĥ)⟩``, it joins the layer's adjoint:
        :meth:`input_coefficients` maps ``λ`` through the per-sample kernel ``W + coef·factor`` once instead of through
        ``W`` and ``coef`` separately. The term is linear in the ball's radius: it takes the per-sample factors
        :attr:`scale` here."""
        factor = torch.ones((), dtype=coef.dtype, device=coef.device) if factor is None else factor
        if self.scale is not None:
            factor = factor * sample_factors(self.scale, coef.dim())
        if self.kernel_offset is not None:
            coef, factor = self.kernel_offset[0] * self.kernel_offset[1] + coef * factor, factor.new_ones(())
        self.kernel_offset = (coef, factor)

    def input_coefficients(self, weight: torch.Tensor) -> torch.Tensor:
        """``λ`` mapped onto the input through the adjoint of the layer with ``weight`` plus the terms recorded by
        :meth:`add_to_kernel`: ``(N, K) + input shape``."""
        if self.kernel_offset is None:
            return self.transposed(self.coefficients, weight)
        groups = self.layer.module.groups
        coef, factor = self.kernel_offset
        return self.kernel_to_input(torch.addcmul(weight.reshape(groups, len(weight) // groups, -1), coef, factor))

    def kernel_to_input(self, coef: torch.Tensor) -> torch.Tensor:
        """The linear function ``ĥ ↦ ⟨coef, G(ĥ)⟩`` of the input, for ``coef`` shaped like :meth:`gradient_box`'s
        tensors, as coefficients ``(N, K) + input shape`` (the patches' adjoint)."""
        a, lo, mod = self.coefficients, self.lo, self.layer.module
        lam = self._grouped()
        n, k, g, r, p = lam.shape
        coef = coef.expand(n, k, g, r, coef.shape[-1])
        if self.native_adjoint and _native_is_faster(lam, coef.shape[-1], mod.stride):  # per-sample kernels: groups
            kernels = coef.reshape((n * k * g * r, -1) + tuple(mod.kernel_size))
            out = self.layer.apply_transposed(a.reshape((1, -1) + a.shape[3:]), kernels, lo.shape[1:], n * k * g)
            return out.reshape(a.shape[:2] + lo.shape[1:])
        # per sample, class and group: coefᵀ λ, (j × r)(r × p); explicit bmm on views (einsum copies operands)
        per_patch = torch.bmm(coef.reshape(n * k * g, r, -1).transpose(1, 2), lam.reshape(n * k * g, r, p))
        cols = per_patch.reshape(n * k, -1, p)
        folded = F.fold(cols, lo.shape[2:], mod.kernel_size, mod.dilation, self.layer.padding, mod.stride)
        return folded.reshape(a.shape[:2] + lo.shape[1:])


def _native_is_faster(lam: torch.Tensor, kernel_entries: int, stride: tuple[int, int]) -> bool:
    """Whether one grouped ``conv_transpose2d`` (a kernel per sample, class and group) beats bmm + fold for
    :meth:`AffineBackward.kernel_to_input`: float32 (oneDNN), stride 1, and maps of 64 positions or more or few channels
    (measured on one core on the digits ResNet's and ResNet-18's shapes: 1.3-6x faster there, up to 3x slower on
    512 channels at 4x4 or with stride 2)."""
    rows, positions = lam.shape[3], lam.shape[4]
    return lam.dtype == torch.float32 and stride == (1, 1) and (positions >= 64 or rows * kernel_entries <= 4096 * 9)


def _per_sample_kernel_gradient(lam: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """``Σ_p λ_{n,k,g,r,p} patch_{n,g,j,p}``, ``(N, K, groups, rows/groups, C/groups·kh·kw)``, from ``λ`` ``(N, K,
    groups, rows/groups, P)`` and the patches ``(N, groups, C/groups·kh·kw, P)``: one bmm per sample and group over
    its ``K·rows`` (explicit bmm on views: einsum copies operands)."""
    n, k, g, r, p = lam.shape
    left = lam.permute(0, 2, 1, 3, 4).reshape(n * g, k * r, p)  # a view when groups = 1
    out = torch.bmm(left, patches.reshape(n * g, -1, p).transpose(1, 2))
    return out.reshape(n, g, k, r, -1).permute(0, 2, 1, 3, 4)
