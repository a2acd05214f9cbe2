"""
The affine layer in the backward linear bound (docs/theory.md §4b): ``ẑ = (W + Δ) ĥ + b + Δb``.

For coefficients ``λ`` on ``ẑ``: ``λ·ẑ = (λW)·ĥ + λ·b + ⟨Δ, G⟩ + Δb·s`` with ``G`` the gradient of ``λ·ẑ`` in the
weights (Linear: ``G = λ ĥᵀ``; convolution: ``G_r = Σ_p λ_{r,p} patch_p(ĥ)``, the kernel shared by all positions) and
``s_r = Σ_p λ_{r,p}``. The weight ball bounds ``min_Δ ⟨Δ, G⟩`` by a linear function of ``ĥ`` on the input box
(:meth:`.Ball.linear_term`, reading the layer through the operator's view :class:`.AffineBackward`); the bias term
is exact, minus the bias ball's support function at ``s`` (:meth:`.Ball.support`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from art_weightpert import conv_gemm
from art_weightpert.budget import ParameterBall
from art_weightpert.certification.common import (
    BoundCache,
    batched_dot,
    cached,
    compact_radius,
    flatten_specs,
    times_sample_factors,
)
from art_weightpert.certification.interval import error_bias, perturbation_radius
from art_weightpert.network import Affine
from art_weightpert.operators.affine_view import AffineBackward
from art_weightpert.rounding import abs_dot, error_factor, smallest_subnormal, up_cast
from art_weightpert.torch_tools import batch_slices


@dataclass
class BackwardContext:
    """What the backward rules need besides the layer: the (cast) parameters, the parameter balls and the per-sample
    radius factors."""

    params: dict[str, torch.Tensor]
    param_balls: dict[str, ParameterBall]
    scale: torch.Tensor | None = None
    cache: BoundCache | None = None
    lower_slopes: dict[str, torch.Tensor] | None = None
    """Optimized lower slopes (α-CROWN, docs/theory.md §11) by activation name: ``(N, J) + value shape`` in
    ``[0, 1]``, read by :meth:`.Activation.backward` through :meth:`.ActivationFunction.optimizable_lower`."""
    rounding: bool = False
    """Whether every rule subtracts its own floating-point rounding error (docs/theory.md §5), so that the bound holds
    for the exact real-number network."""

    def radius(self, target: ParameterBall, dtype: torch.dtype) -> torch.Tensor:
        """The ball's :meth:`.Ball.compact_radius` in ``dtype``, from the cache (:func:`.compact_radius`; rounded up
        when cast to a narrower dtype with :attr:`rounding`)."""
        return compact_radius(target, dtype, self.cache, self.rounding)

    def rows(self, samples: slice) -> BackwardContext:
        """The context of the samples ``samples`` (their radius factors)."""
        slopes = self.lower_slopes
        return replace(
            self,
            scale=None if self.scale is None else self.scale[samples],
            lower_slopes=None if slopes is None else {k: v[samples] for k, v in slopes.items()},
        )


KERNEL_CHUNK_BYTES = 2 * 2**20
"""Bytes of a convolution's kernel-gradient box ``(samples, specifications) + kernel shape`` per piece: the rule of a
perturbed convolution runs on as many samples at a time. The box is often larger than the coefficients (a 3x3 kernel
with 32 input channels has 288 entries per row for 16 output positions on a 4x4 map); its element-wise passes run
2-3x faster when the piece stays in the processor's cache."""


def in_kernel_chunks(rule):
    """Run the affine rule ``rule(layer, a, *per_sample, ctx)`` on a few samples at a time where the layer is a
    perturbed convolution whose kernel-gradient box would exceed :data:`KERNEL_CHUNK_BYTES`; the outputs are
    concatenated. ``per_sample``: tensors (or ``None``) sliced with ``a``; one given twice (``lo is hi``) stays one."""

    def chunked(layer: Affine, a: torch.Tensor, *per_sample_then_ctx):
        *boxes, ctx = per_sample_then_ctx
        size = len(a)
        if layer.is_conv and layer.weight_name in ctx.param_balls:
            per_sample = a.shape[1] * ctx.params[layer.weight_name].numel() * a.element_size()
            size = max(1, KERNEL_CHUNK_BYTES // per_sample)
        if size >= len(a):
            return rule(layer, a, *boxes, ctx)
        parts = []
        for rows in batch_slices(len(a), size):
            sliced = {id(box): None if box is None else box[rows] for box in boxes}
            parts.append(rule(layer, a[rows], *(sliced[id(box)] for box in boxes), ctx.rows(rows)))
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(outputs) for outputs in zip(*parts))
        return torch.cat(parts)

    chunked.__doc__ = rule.__doc__
    return chunked


# ------------------------------------------------------------------------------------------------ affine rules
def _row_sums(a: torch.Tensor) -> torch.Tensor:
    """``(N, K, rows)``: ``λ`` summed over the output positions (the coefficient of the bias)."""
    return a.flatten(3).sum(dim=3) if a.dim() > 3 else a


def _bias_term(
    target: ParameterBall, row_sums: torch.Tensor, dtype: torch.dtype, rounding: bool = False
) -> torch.Tensor:
    """Exact ``min_{Δb} Σ_r Δb_r s_r``: minus the bias ball's support function at ``s`` (``rounding``: the radius
    rounded up when cast to a narrower dtype)."""
    radius = up_cast(target.radius, dtype) if rounding else target.radius.to(dtype)
    return -target.ball.support(row_sums, radius, row_sums.shape[2:])


def rounding_map(
    layer: Affine,
    m: torch.Tensor,
    ctx: BackwardContext,
    value: torch.Tensor | None = None,
    abs_product: torch.Tensor | None = None,
) -> torch.Tensor:
    """``S`` ``(N, rows[, H', W'])`` with ``⟨|Λ|, S⟩`` a bound on the rounding error of the affine rule's output for
    coefficients ``Λ`` on the layer's output and an input with ``|ĥ| ≤ m`` (docs/theory.md §5):

    * ``g_w |W| m``: the adjoint ``Λ W`` (length ``rows·k_h·k_w/groups`` per input entry), or on a known input the
      layer's value ``W h`` it was concretized with (length ``n``);
    * ``g_b |b|``: the bias's constant ``Σ_r (Σ_p λ_{r,p}) b_r``;
    * ``4 g_P P(m)``: the weight ball's linear term and the bias ball's support function, whose magnitude is at most
      ``⟨|Λ|, P(m)⟩`` (``P`` the interval term of §4) and whose pieces (the kernel-gradient box, the chords of ``|·|``,
      their sums over the kernel) are each within ``γ`` of a part of it; the lengths ``numel(W) + P`` (convolution) or
      ``rows + n`` (Linear) cover every sum;
    * ``g |W h + b|`` when ``value`` (the layer's value on a known input) is given: ``Λ·value``'s own dot product.

    ``abs_product``: ``|W| m`` as the interval bound computed it on a known input (:attr:`.CentredBox.abs_product`),
    used instead of a product of its own (its rounding is within ``g_w``'s slack, as that of ``(g_w|W|) m``).
    """
    weight = ctx.params[layer.weight_name]
    bias = ctx.params[layer.bias_name] if layer.bias_name else None
    dtype = m.dtype
    rows = weight.shape[0]
    if layer.is_conv:
        positions = math.prod(conv_output_hw(layer, m.shape[2:]))
        adjoint = rows // layer.module.groups * weight[0, 0].numel()
        ball_length = weight.numel() + positions
    else:
        positions, adjoint, ball_length = 1, rows, rows + weight.shape[1]
    g_w = error_factor(max(adjoint, weight[0].numel()), dtype)
    g_bias = error_bias(layer, weight, bias, error_factor(positions + rows, dtype), ctx.cache)  # + underflow
    if abs_product is None:
        out = layer.apply(m, cached(ctx.cache, f"g_abs/{g_w}", (weight,), lambda: weight.abs() * g_w), g_bias)
    else:
        out = torch.add(layer.rows_shape(g_bias), abs_product, alpha=g_w)
    pert = perturbation_radius(layer, m, ctx.param_balls, dtype, ctx.scale, ctx.cache, rounding=True)
    if not isinstance(pert, float):
        out = torch.add(out, pert, alpha=4 * error_factor(ball_length, dtype))
    if value is not None:
        out = torch.add(out, value.abs(), alpha=error_factor(rows * positions, dtype))
    return out


def ball_underflow(layer: Affine, a: torch.Tensor, m: torch.Tensor, ctx: BackwardContext) -> torch.Tensor | float:
    """The absolute rounding errors of a convolution's weight-ball term (docs/theory.md §5), ``(N, K)``: below the
    normal range each product of the kernel gradient ``G``, of its box's centre and radius, of the chord and of the
    ball's own sums loses up to ``η/2`` whatever its operands, and these losses are weighted by the radius ``δ``
    (which may be large) rather than by the coefficients. With ``U`` the ball's term per output unit on unit inputs
    (``U ≥ Σ_j δ_rj`` over the taps one position reads) and ``P`` the output positions: the losses in ``G`` cost at
    most ``η/2 · P · Σ_r max U_r``, the chord, the products with ``δ`` and the sums over the kernel and the output
    ``η/2 (4 Σ_r max U_r + numel(W) + rows·P)``, and the rounding of the box's centre, radius and slopes and of
    ``P(ρ)`` at most ``η/2 ⟨|Λ|, max U + k (1 + max m)⟩`` (``k`` the fan-in). All doubled. 0 for a Linear layer (its
    products' underflow is in the coefficients', :func:`.linear._underflow`) or an unperturbed weight."""
    wt = ctx.param_balls.get(layer.weight_name)
    if not layer.is_conv or wt is None:
        return 0.0
    eta = smallest_subnormal(a.dtype)
    weight = ctx.params[layer.weight_name]

    def unit_term() -> tuple[torch.Tensor, torch.Tensor, int]:  # Σ_r max U_r, max_r max U_r, P: per layer and shape
        ones = m.new_ones((1,) + tuple(m.shape[1:]))
        unit = perturbation_radius(layer, ones, {layer.weight_name: wt}, a.dtype, None, ctx.cache, rounding=True)
        per_row = unit.flatten(2).amax(dim=2)  # (1, rows)
        return per_row.sum(), per_row.max(), unit[0, 0].numel()

    label = f"ball_underflow/{layer.name}/{a.dtype}/{tuple(m.shape[1:])}"  # the layer: its geometry
    mass, top, positions = cached(ctx.cache, label, (weight, wt.radius), unit_term)
    factor = ctx.scale.to(a.dtype) if ctx.scale is not None else a.new_ones(len(a))
    fan_in = weight[0].numel()
    per_coefficient = 2 * eta * (top * factor + fan_in * (1 + m.flatten(1).amax(dim=1)))  # (N,)
    constant = 2 * eta * ((positions + 4) * mass * factor + weight.numel() + weight.shape[0] * positions + 4)
    norms = torch.linalg.vector_norm(a.flatten(2), 1, dim=2)  # Σ|Λ| per sample and specification
    return (norms * per_coefficient.unsqueeze(1) + constant.unsqueeze(1)) * 2


def conv_output_hw(layer: Affine, input_hw) -> tuple[int, int]:
    mod = layer.module
    return conv_gemm.output_hw(tuple(input_hw), tuple(mod.weight.shape[2:]), mod.stride, layer.padding, mod.dilation)


@in_kernel_chunks
def affine_backward(
    layer: Affine, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: BackwardContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward rule of an affine layer: ``(λ on the input, constant)`` over the ball and the input box."""
    view = AffineBackward(layer, a, lo, hi, ctx.scale, native_adjoint=ctx.rounding)
    row_sums = _row_sums(a)
    const = row_sums @ ctx.params[layer.bias_name] if layer.bias_name else a.new_zeros(a.shape[:2])
    change = None
    wt = ctx.param_balls.get(layer.weight_name)
    if wt is not None:
        change, pert, kernel = wt.ball.linear_term(view, ctx.radius(wt, a.dtype))
        if kernel is not None:  # joins the layer's adjoint (one per-sample kernel)
            view.add_to_kernel(*kernel)
        if pert is not None:
            const = const + times_sample_factors(pert, ctx.scale)
    weight, change = ctx.params[layer.weight_name], times_sample_factors(change, ctx.scale)
    if change is not None and not layer.is_conv:  # λW + change in one product (the change broadcast into its output)
        a_in = torch.addmm(change.reshape(-1, change.shape[-1]), flatten_specs(a), weight).reshape(a.shape[:2] + (-1,))
    else:
        a_in = view.input_coefficients(weight)
        a_in = a_in if change is None else a_in + change
    bt = ctx.param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        const = const + times_sample_factors(_bias_term(bt, row_sums, a.dtype, ctx.rounding), ctx.scale)
    if ctx.rounding:  # docs/theory.md §5: γ ⟨|Λ|, (|W| + δ) m⟩, one product per layer; the ball term's underflow
        const = (
            const - abs_dot(a, rounding_map(layer, view.magnitude, ctx)) - ball_underflow(layer, a, view.magnitude, ctx)
        )
    return a_in, const


@in_kernel_chunks
def affine_at_input(
    layer: Affine,
    a: torch.Tensor,
    h: torch.Tensor,
    value: torch.Tensor | None,
    abs_product: torch.Tensor | None,
    ctx: BackwardContext,
) -> torch.Tensor:
    """``min λ·ẑ`` over the ball for the first affine layer, whose input ``h`` is known: ``λ·(W h + b)`` plus the
    ball's term at ``ĥ = h`` (exact for every ball: the minimum of ``⟨Δ, G⟩`` with ``G`` known). ``value``: ``W h +
    b`` when already computed (the centre of the layer's :class:`.CentredBox`), else ``None``; ``abs_product``: its
    ``|W||h|`` when computed (:attr:`.CentredBox.abs_product`, for the rounding terms), else ``None``."""
    value = _value_at(layer, h, ctx) if value is None else value
    const = batched_dot(a, value) + _terms_at_input(AffineBackward(layer, a, h, h), _row_sums(a), ctx)
    if ctx.rounding:  # docs/theory.md §5: the value W h + b, its dot product with Λ and the ball's terms
        error_map = rounding_map(layer, h.abs(), ctx, value, abs_product)
        const = const - abs_dot(a, error_map) - ball_underflow(layer, a, h.abs(), ctx)
    return const


def _value_at(layer: Affine, h: torch.Tensor, ctx: BackwardContext) -> torch.Tensor:
    """``W h + b``: the layer's value at the unperturbed weights."""
    return layer.apply(h, ctx.params[layer.weight_name], ctx.params[layer.bias_name] if layer.bias_name else None)


def _terms_at_input(view: AffineBackward, row_sums: torch.Tensor, ctx: BackwardContext) -> torch.Tensor | float:
    """The weight ball's and the bias ball's exact terms of an affine layer on a known input (``view``), ``(N, K)``
    (0 when neither is perturbed)."""
    layer, out = view.layer, 0.0
    wt = ctx.param_balls.get(layer.weight_name)
    if wt is not None:
        pert = wt.ball.linear_term(view, ctx.radius(wt, row_sums.dtype)).constant  # G known: no input term
        out = out + times_sample_factors(pert, ctx.scale)
    bt = ctx.param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        out = out + times_sample_factors(_bias_term(bt, row_sums, row_sums.dtype, ctx.rounding), ctx.scale)
    return out


@in_kernel_chunks
def convolution_at_input_on_entries(
    layer: Affine,
    a: torch.Tensor,
    where: torch.Tensor,
    h: torch.Tensor,
    value: torch.Tensor | None,
    abs_product: torch.Tensor | None,
    ctx: BackwardContext,
) -> torch.Tensor:
    """:func:`affine_at_input` for a convolution (one group) whose coefficients are zero but at one output position per
    (sample, channel, window): ``a`` ``(N, K, rows, P)`` at the flat positions ``where`` ``(N, rows, P)`` of the output
    map (a max pooling's maxima). The same value, with ``λ·ẑ``, the bias's row sums and the kernel gradient computed
    on those entries only (the kernel gradient from the input patches at each row's own positions). ``value`` and
    ``abs_product``: as :func:`affine_at_input`."""
    value = _value_at(layer, h, ctx) if value is None else value
    const = batched_dot(a, value.flatten(2).gather(2, where))
    gradient = None
    if layer.weight_name in ctx.param_balls:
        n, k, rows, p = a.shape
        mod = layer.module
        patches = F.unfold(h, mod.kernel_size, mod.dilation, layer.padding, mod.stride)  # (N, C·kh·kw, H'·W')
        at = patches.unsqueeze(1).expand(n, rows, -1, -1)
        at = at.gather(3, where.unsqueeze(2).expand(-1, -1, patches.shape[1], -1))
        # G_{n,k,r} = Σ_p λ_{n,k,r,p} patch(position_{n,r,p}): one bmm per sample and row over its K specifications
        g = torch.bmm(a.permute(0, 2, 1, 3).reshape(n * rows, k, p), at.reshape(n * rows, -1, p).transpose(1, 2))
        centre = g.reshape(n, rows, k, -1).transpose(1, 2).unsqueeze(2)  # (N, K, 1, rows, C·kh·kw)
        gradient = (centre, torch.zeros_like(centre))
    const = const + _terms_at_input(AffineBackward(layer, a, h, h, gradient=gradient), a.sum(dim=3), ctx)
    if ctx.rounding:  # docs/theory.md §5: as affine_at_input, on the entries read
        error_map = rounding_map(layer, h.abs(), ctx, value, abs_product).flatten(2).gather(2, where)
        const = const - abs_dot(a, error_map) - ball_underflow(layer, a, h.abs(), ctx)
    return const
