"""
Interval bound propagation with weight intervals (docs/theory.md §4, the ``"interval"`` method; beyond the paper).

Boxes ``[l, u]`` of every activation of the perturbed network are propagated layer by layer, in topological order,
with the operators' box rules (:data:`INTERVAL_RULES`); at a residual addition the boxes add (§9). For
an affine layer ``ẑ = (W + Δ) ĥ + (b + Δb)`` with ``ĥ ∈ [c − r, c + r]`` and ``|ĥ| ≤ m``::

    ẑ ∈ W c + b ± ( |W| r + P(m) + β )

``P(m)`` is the ball's bound on ``|Δ ĥ|`` (:meth:`.Ball.interval_term`), ``β`` the bias ball's entry bound. The last
layer is folded into the margin specification (rows ``e_y − e_i``), as auto_LiRPA's C matrix: the margin
``(Ŵ_y − Ŵ_i)·ĥ + b_y − b_i`` gets the perturbation term ``P_y + P_i``.

Everything is plain torch: float64 for certificates (docs/theory.md §5), float32 and differentiable for training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from art_weightpert.budget import ParameterBall
from art_weightpert.certification.common import (
    BoundCache,
    Boxes,
    CentredBox,
    ParamBalls,
    by_param_name,
    cached,
    compact_radius,
    fill_label,
    sample_factors,
)
from art_weightpert.network import Activation, Add, Affine, AvgPool, BatchNorm, Flatten, MaxPool, Network
from art_weightpert.operators import rule_table
from art_weightpert.operators.batch_norm import per_channel_affine
from art_weightpert.rounding import (
    ROUNDING_SLACK,
    down_cast,
    error_factor,
    finite_box,
    finite_lower,
    gamma,
    magnitude,
    round_down,
    round_up,
    smallest_subnormal,
    unit_roundoff,
    up_cast,
    widen,
)

INTERVAL_RULES = rule_table("interval")
"""The box rule of every operator (:meth:`.Operator.interval`), by operator class; the affine layer's is
:func:`affine_interval`."""


def perturbation_radius(
    layer: Affine,
    m: torch.Tensor,
    param_balls: dict[str, ParameterBall],
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    include_weight: bool = True,
    rounding: bool = False,
) -> torch.Tensor | float:
    """``P(m) + β``: bound on ``|Δ ĥ + Δb|`` at the output of ``layer`` for ``|ĥ| ≤ m`` (0 if not perturbed).

    :param scale: optional per-sample factors ``(N,)`` applied to every radius (the bound is linear in the radii).
    :param cache: optional :class:`.BoundCache` (of the compact radius).
    :param include_weight: ``False``: the bias term ``β`` only.
    :param rounding: radii cast to a narrower ``dtype`` are rounded up (docs/theory.md §5).
    """
    out: torch.Tensor | float = 0.0
    wt = param_balls.get(layer.weight_name)
    if wt is not None and include_weight:
        radius = compact_radius(wt, dtype, cache, rounding)
        out = wt.ball.interval_term(layer, m, radius)
    bt = param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        bias_radius = up_cast(bt.radius, dtype) if rounding else bt.radius.to(dtype)
        beta = bt.ball.entry_bound(bias_radius, layer.module.bias.shape)
        out = out + layer.rows_shape(beta)
    if scale is not None and not isinstance(out, float):
        out = out * sample_factors(scale, out.dim())
    return out


def _abs_weight_factor(
    layer: Affine, weight: torch.Tensor, param_balls: dict[str, ParameterBall], cache: BoundCache | None
) -> float | None:
    """``ε`` when the layer's weight ball's interval term is ``ε|W| m`` (a relative box; then ``|W| r + ε|W| m =
    |W|(r + ε m)``, one product instead of two), else ``None``. Only without gradients: the fold would let them flow
    through the radius."""
    wt = param_balls.get(layer.weight_name)
    if wt is None or (torch.is_grad_enabled() and weight.requires_grad):
        return None
    return cached(
        cache,
        "abs_weight_factor",
        (weight, wt.radius),
        lambda: wt.ball.abs_weight_factor(wt.radius.to(weight.dtype), weight, wt.eps),
    )


def affine_interval(
    layer: Affine,
    params: dict[str, torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    param_balls: dict[str, ParameterBall],
    exact_input: bool = False,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    nonnegative: bool = False,
    centre: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box of ``(W + Δ) ĥ + b + Δb`` over the ball and ``ĥ ∈ [lo, hi]`` (``exact_input``: ``lo == hi``, the
    ``|W| r`` term is skipped); ``scale``: per-sample radius factors ``(N,)``; ``cache``: an optional
    :class:`.BoundCache`; ``nonnegative``: ``lo ≥ 0`` is known (after a ReLU), so ``max(|lo|, |hi|) = hi``. On an exact
    input the box of a perturbed layer is a :class:`.CentredBox`; ``centre``: its ``W h + b`` when already known."""
    weight = params[layer.weight_name]
    bias = params[layer.bias_name] if layer.bias_name else None
    if exact_input:
        center = layer.apply(lo, weight, bias) if centre is None else centre
        radius = perturbation_radius(layer, lo if nonnegative else lo.abs(), param_balls, lo.dtype, scale, cache)
        if not isinstance(radius, float):  # the box of a known input's image: keep its centre (CentredBox)
            return CentredBox(center - radius, center + radius, center)
    else:
        # W c = (W/2)(l + u) and |W| r = (|W|/2)(u − l): halving the weight (exact in floating point but for
        # subnormal weights: rounded_affine_interval) instead of the activations saves passes over the batch;
        # max(|l|, |u|) = max(−l, u) for l ≤ u.
        half = cached(cache, "half", (weight,), lambda: weight * 0.5)
        half_abs = cached(cache, "half_abs", (weight,), lambda: half.abs())
        center = layer.apply(lo + hi, half, bias)
        m = _upper_magnitude(lo, hi, nonnegative)
        fold = _abs_weight_factor(layer, weight, param_balls, cache)
        if fold is not None:  # (|W|/2)(u − l) + ε|W| m = (|W|/2)(u − l + 2ε m)
            factor = 2 * fold if scale is None else (2 * fold) * sample_factors(scale, m.dim())
            radius = layer.apply(torch.addcmul(hi - lo, m, torch.as_tensor(factor, dtype=m.dtype)), half_abs)
            beta = perturbation_radius(layer, m, param_balls, lo.dtype, scale, cache, include_weight=False)
            radius = radius + beta
        else:
            radius = perturbation_radius(layer, m, param_balls, lo.dtype, scale, cache)
            if isinstance(radius, torch.Tensor) and not layer.is_conv:  # P + (|W|/2)(u − l) in one fused product
                radius = torch.addmm(radius, hi - lo, half_abs.T)
            else:
                radius = layer.apply(hi - lo, half_abs) + radius
    if isinstance(radius, float):  # unperturbed layer on an exact input
        return center, center
    return center - radius, center + radius


def fan_in(layer: Affine, weight: torch.Tensor) -> int:
    """``n``: the length of one output's dot product (``C_in·k_h·k_w / groups`` for a convolution)."""
    return weight[0].numel()


def centre_of_sum(
    layer: Affine, total: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cache: BoundCache | None
) -> torch.Tensor:
    """``W c + b`` from ``total = l + u = 2c``: one product with ``W/2``, exact in floating point unless ``W`` has a
    subnormal entry with an odd last bit (a float32 weight of ``2⁻¹⁴⁹`` halves to 0, while the input may be 1e30:
    docs/theory.md §5); for such a weight the product with ``W`` itself, halved, then the bias."""
    half = cached(cache, "half", (weight,), lambda: weight * 0.5)
    if cached(cache, "half_exact", (weight,), lambda: bool(torch.equal(half * 2, weight))):
        return layer.apply(total, half, bias)
    out = layer.apply(total, weight) * 0.5
    return out if bias is None else out + layer.rows_shape(bias)


def halved_abs_up(weight: torch.Tensor) -> torch.Tensor:
    """``|W|/2``, never below it: the halving is exact but for subnormal entries with an odd last bit, moved one float
    up there."""
    magnitude = weight.abs()
    half = magnitude * 0.5
    return torch.where(half * 2 == magnitude, half, round_up(half))


def _abs_row_sums(weight: torch.Tensor) -> torch.Tensor:
    """``Σ |W_r|`` over each output row's weights (a convolution's whole kernel of that output channel)."""
    return weight.abs().flatten(1).sum(dim=1)


def _upper_magnitude(lo: torch.Tensor, hi: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """``max(|l|, |u|)`` of a box with ``l ≤ u``: ``max(−l, u)`` (``u`` itself for a value non-negative by
    construction)."""
    return hi if nonnegative else torch.maximum(lo.neg(), hi)


def rounding_factor(layer: Affine, weight: torch.Tensor, dtype: torch.dtype) -> float:
    """``g = γ_{n+k} (1 + 2γ_{n+k})`` of an affine layer's interval step (docs/theory.md §5, :func:`.error_factor`)."""
    return error_factor(fan_in(layer, weight), dtype)


def rounded_affine_interval(
    layer: Affine,
    params: dict[str, torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    param_balls: dict[str, ParameterBall],
    exact_input: bool = False,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    nonnegative: bool = False,
    float64_centre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`affine_interval` sound for the exact real-number layer despite floating-point evaluation (docs/theory.md
    §5): the radius gains ``g·(|W| m + |b| + P)`` with ``g ≈ γ_{n+k}`` (:func:`rounding_factor`), which covers the
    centre's dot product ``W c + b`` (``γ_{n+1}(|W||c| + |b|)``), the casts of ``W``, ``b`` and the input, the ball
    term's own rounding and the final ``c ± R``; the radius's product ``|W| r`` (possibly rounded down by ``γ_{n+3}``)
    uses ``|W|`` rounded up by ``1 + 2γ_{n+k}``.
    The ``g |W| m`` term rides in the radius's product (``|W|/2 · (u − l + 2g m)``): no extra product; on a known
    input it is one product ``|W||x|``, kept in the :class:`.CentredBox` for the linear bound's own error terms
    (:func:`.rounding_map`). The box is never exact (``lo is hi`` only for the network's input).

    ``float64_centre`` (an unknown input in a narrower dtype): for every sample whose box needs it
    (:data:`FLOAT64_CENTRE_SHARE`) the centre ``W c + b`` is computed in float64 and the box's ends ``C ± R`` too, then
    cast outward; the centre's term ``g |W| m`` becomes ``(g₆₄ + 4u) |W| m``
    (:func:`_float64_centre_factor`), the rest of the radius is unchanged. The dot products' error is of the size of
    the activations (``|W||c|``) while the radius is of the size of the ball: on the 32-channel convolutions of a
    residual network (``n`` = 288) it cost the linear bound up to 1.5% of its certified share (docs/results.md)."""
    weight = params[layer.weight_name]
    bias = params[layer.bias_name] if layer.bias_name else None
    g = rounding_factor(layer, weight, lo.dtype)
    g_bias = error_bias(layer, weight, bias, g, cache)
    m = lo.abs() if exact_input and not nonnegative else _upper_magnitude(lo, hi, nonnegative)
    pert = perturbation_radius(layer, m, param_balls, lo.dtype, scale, cache, rounding=True)
    if exact_input:  # centre W x + b; radius P(1 + 2g) + g(|W||x| + |b|)
        center = layer.apply(lo, weight, bias)
        product = layer.apply(m, cached(cache, "abs", (weight,), weight.abs))  # |W||x|, which rounding_map reuses
        radius = torch.add(layer.rows_shape(g_bias), product, alpha=g)
        radius = radius if isinstance(pert, float) else torch.add(radius, pert, alpha=1 + 2 * g)
        return CentredBox(*finite_box(center - radius, center + radius), center, product)
    # |W|/2 rounded up by 1 + 2γ: the radius's product, rounded down by at most γ_{n+3}, still bounds |W| r (free);
    # (halved_abs_up: the halving rounds only subnormal weights)
    up = 1 + 2 * gamma(fan_in(layer, weight) + ROUNDING_SLACK, lo.dtype)
    half_abs = cached(cache, f"half_abs_up/{up}", (weight,), lambda: halved_abs_up(weight) * up)
    width = hi - lo
    wide = _float64_rows(m, width, g) if float64_centre and lo.dtype != torch.float64 else None
    if wide is not None and not bool(wide.any()):
        wide = None
    every = wide is not None and bool(wide.all())
    g_centre = g
    if wide is not None:  # the centre's rounding: float64's, plus the casts of W and b to the working dtype
        g_wide = _float64_centre_factor(layer, weight, lo.dtype)
        shape = (-1,) + (1,) * (m.dim() - 1)
        g_centre = g_wide if every else torch.where(wide, g_wide, g).to(m.dtype).reshape(shape)
        # g_bias keeps the float32 factor g: one term per row, the same for every sample whatever its centre
    if not every:
        center = centre_of_sum(layer, lo + hi, weight, bias, cache)
    if wide is not None:
        half64 = cached(cache, "half64", (weight,), lambda: weight.double() * 0.5)  # exact: float32 subnormals too
        bias64 = None if bias is None else cached(cache, "bias64", (bias,), bias.double)
        total64 = (lo.double() + hi.double()) if every else (lo[wide].double() + hi[wide].double())
        center64 = layer.apply(total64, half64, bias64)
    # the centre's term 2g·m underflows for a subnormal m, losing up to η per entry of the spread, which |W|/2 may
    # then scale far above the smallest normal number: η Σ|W_r| per row covers it
    eta = smallest_subnormal(lo.dtype)
    g_bias = g_bias + cached(cache, f"eta_abs_rows/{eta}", (weight,), lambda: _abs_row_sums(weight) * eta)
    fold = _abs_weight_factor(layer, weight, param_balls, cache)
    if fold is None:
        factor = 2 * g_centre
    elif scale is None:  # ε|W|m folded in: (|W|/2)(u − l + 2(ε + gε + g) m)
        factor = 2 * (fold * (1 + g) + g_centre)
    else:  # the radius factors scale the ball's ε, never the rounding term g (docs/theory.md §5)
        factor = sample_factors(scale, m.dim()) * (2 * fold * (1 + g)) + 2 * g_centre
    spread = torch.addcmul(width, m, torch.as_tensor(factor, dtype=m.dtype))
    if fold is not None:  # only the bias ball's β is left of P
        pert = perturbation_radius(layer, m, param_balls, lo.dtype, scale, cache, include_weight=False, rounding=True)
    radius = layer.apply(spread, half_abs, g_bias)
    if not isinstance(pert, float):
        radius = torch.add(radius, pert, alpha=1 + 2 * g)
    if wide is None:
        return finite_box(center - radius, center + radius)
    # C ± R in float64 (their rounding within g₆₄'s slack), then each end cast outward
    radius64 = (radius if every else radius[wide]).double()
    lo64, hi64 = down_cast(center64 - radius64, lo.dtype), up_cast(center64 + radius64, lo.dtype)
    if every:
        return finite_box(lo64, hi64)
    rows = torch.nonzero(wide).squeeze(1)
    low, high = center - radius, center + radius  # float64 when a caller's radius factors were (an exact widening)
    return finite_box(low.index_put((rows,), lo64.to(low.dtype)), high.index_put((rows,), hi64.to(high.dtype)))


FLOAT64_CENTRE_SHARE = 2.0**-10
"""With ``float64_centre``, a sample's box gets its centre in float64 where the float32 centre's rounding term would be
more than this share of the box's spread, ``2g Σ m > share · Σ (u − l)`` over the input box: below it the float32
centre widens the box by about 0.1% at most, and the float64 product would only cost time (an MLP at box 1e-3:
``2g Σm / Σ(u − l)`` ≈ 1e-4; the digits ResNet's first block at 3e-5: 0.014)."""


def _float64_rows(m: torch.Tensor, width: torch.Tensor, g: float) -> torch.Tensor:
    """``(N,)`` bool: the samples whose box gets a float64 centre (:data:`FLOAT64_CENTRE_SHARE`), decided by each
    sample's own box, so that its bound does not depend on the batch it is computed in."""
    return m.flatten(1).sum(dim=1) * (2 * g) > width.flatten(1).sum(dim=1) * FLOAT64_CENTRE_SHARE


def float64_centre_rows(network: Network, boxes: Boxes, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(N,)`` bool: the samples whose boxes ``float64_centres=True`` would change, decided on ``boxes`` computed
    without it (with rounding): those for which some affine layer on an unknown input gets a float64 centre
    (:func:`_float64_rows`). For any other sample every layer decides the same on the same inputs, layer after layer,
    so its boxes are the same either way (up to the rounding of a mixed batch's factors)."""
    nonnegative = nonnegative_values(network)
    out = torch.zeros(len(boxes[0][0]), dtype=torch.bool, device=boxes[0][0].device)
    for layer, reads in zip(network.layers[:-1], network.inputs):
        lo, hi = boxes[reads[0]]
        if not layer.weighted or lo is hi or lo.dtype == torch.float64:
            continue
        m = _upper_magnitude(lo, hi, nonnegative[reads[0]])
        out |= _float64_rows(m, hi - lo, rounding_factor(layer, params[layer.weight_name], lo.dtype))
    return out


def _float64_centre_factor(layer: Affine, weight: torch.Tensor, dtype: torch.dtype) -> float:
    """The factor of ``|W| m + |b|`` that covers an affine interval step whose centre is computed in float64 from
    parameters in ``dtype`` (docs/theory.md §5): ``g₆₄`` (:func:`rounding_factor` in float64) for the centre's dot
    product, the sum ``l + u`` and the float64 ends ``C ± R`` (``|C| ≤ |W| m + |b|``, ``R ≤ |W| m + P``, its ``P`` part
    within the ball term's factor ``1 + 2g``), plus ``4u`` of ``dtype``: the casts of ``W`` and ``b`` to it (the
    centre and the radius's product use the cast weights: ``|W − fl(W)| (|c| + r) ≤ u |fl(W)| m``) and the rounding of
    the radius's last sum in ``dtype`` (``u R``)."""
    return rounding_factor(layer, weight, torch.float64) + 4 * unit_roundoff(dtype)


def error_bias(
    layer: Affine, weight: torch.Tensor, bias: torch.Tensor | None, g: float, cache: BoundCache | None
) -> torch.Tensor:
    """``g|b| + η`` per output row, the bias of the error terms' product (docs/theory.md §5): ``η`` the smallest
    normal number covers the absolute errors of gradual underflow (at most ``2⁻¹⁴⁹`` per operation in float32), which
    the relative ``γ`` bounds do not; as a bias it costs no pass."""
    tiny = torch.finfo(weight.dtype).tiny
    if bias is None:
        return cached(cache, "tiny_bias", (weight,), lambda: weight.new_full((weight.shape[0],), tiny))
    return cached(cache, f"g_abs_bias/{g}", (bias,), lambda: bias.abs() * g + tiny)


def fixed_interval(layer, boxes: list, reads, rounding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of a fixed layer's output (its operator's rule), outward-rounded when ``rounding`` (docs/theory.md §5;
    :func:`round_fixed`). Exact values stay exact through a fixed layer, with ``rounding`` only through those exact
    in floating point (flattening, max pooling, ReLU)."""
    exact = all(boxes[v][0] is boxes[v][1] for v in reads)
    if exact and (not rounding or exact_in_float(layer)):
        out = layer.apply(*(boxes[v][0] for v in reads))
        return out, out
    box = INTERVAL_RULES[type(layer)](layer, *(end for v in reads for end in boxes[v]))
    if not rounding or exact_in_float(layer):  # an exact rule keeps finite_box's ends as they are: no pass to redo it
        return box
    return finite_box(*round_fixed(layer, box, [boxes[v] for v in reads]))


def exact_in_float(layer) -> bool:
    """Whether the fixed layer's floating-point box rule is exact (no rounding): flattening, max pooling, ReLU."""
    return isinstance(layer, (Flatten, MaxPool)) or (isinstance(layer, Activation) and layer.kind == "relu")


ACTIVATION_ULPS = 16
"""Assumed accuracy of torch's element-wise functions (exp, tanh, sigmoid, erf, log1p…) in units of ``u`` relative to
the value, plus the smallest normal number absolutely (underflow): the box of a smooth activation is widened by that
much (docs/theory.md §5). Parameters such as a LeakyReLU slope cast to the dtype are covered too."""


CANCELLING_ACTIVATIONS = ("gelu", "silu", "softplus")
"""Activations whose float32 error is a few ulps of the input ``|x|``, not of the value, so their boxes widen by
:data:`ACTIVATION_ULPS` ulps of the input too: GELU, evaluated as ``x`` times a sum that cancels
(``x (1 + erf(x/√2))/2``: gelu(−6) evaluates to −0.0, the exact value is −5.9e-9); SiLU, ``x σ(x)`` with σ underflowing
to 0 below −88 (silu(−89) evaluates to −0.0, the exact value is −2.0e-37, above the smallest normal a later product
of 1e37 makes count); Softplus with ``β ≠ 1``, ``log(1 + e^{βx})/β``, whose rounding of ``βx`` costs up to
``u|x|σ(βx)`` and whose underflow of ``e^{βx}`` below ``βx ≈ −104`` loses ``e^{βx}/β ≤ u|x|`` (β = 1e-20: 6.8e-26)."""


def round_fixed(layer, box: tuple[torch.Tensor, torch.Tensor], inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The box ``(lo, hi)`` of a fixed layer computed in floating point, widened to hold the exact layer's values
    (docs/theory.md §5): batch norm by ``γ(|s| m + |t|)`` (a product and a sum, the cast scale and shift), average
    pooling by ``γ_{k}·avg(m)`` (``k`` the window), additions rounded outward one float per term, smooth activations by
    :data:`ACTIVATION_ULPS`; flattening, max pooling and ReLU are exact."""
    lo, hi = box
    if exact_in_float(layer):
        return box
    if isinstance(layer, Add):
        return (outward(lo, -1.0), outward(hi, 1.0)) if len(inputs) == 2 else _rounded_sum(inputs)
    if isinstance(layer, BatchNorm):  # |s h + t| ≤ |s| m + |t|: the final ± within the factor's slack
        in_lo, in_hi = inputs[0]
        m = in_lo.abs() if in_lo is in_hi else _upper_magnitude(in_lo, in_hi, False)
        g, tiny = error_factor(2, m.dtype), torch.finfo(m.dtype).tiny
        # per channel: g|t| + η and the float64 shift's own error (BatchNorm.shift_error), in one constant; the factor
        # of m: g|s|, plus 2η for a scale below the normal range, whose cast loses up to η/2 absolutely (and g|s|
        # underflows with it)
        constant = layer.shaped(layer.shift.abs() * g + tiny, m) + layer.shift_bound(m) * (1 + 2 * g)
        factor = layer.scale.abs().to(m) * g + 2 * smallest_subnormal(m.dtype)
        error = per_channel_affine(m, factor, constant.flatten())
        return lo - error, hi + error
    if isinstance(layer, AvgPool):
        m = magnitude(*inputs[0])
        window = m[0, 0].numel() if not isinstance(layer.module, nn.AvgPool2d) else _window(layer.module)
        error = layer.apply(m).mul_(error_factor(window, m.dtype)).add_(torch.finfo(m.dtype).tiny)
        return lo - error, hi + error  # |avg| ≤ avg(m): the final subtraction is within the factor's slack
    # a smooth (or leaky) activation: torch's function within ACTIVATION_ULPS of the exact one
    u = unit_roundoff(lo.dtype)
    tiny = torch.finfo(lo.dtype).tiny
    error = magnitude(lo, hi).mul(ACTIVATION_ULPS * u).add_(tiny)
    if isinstance(layer, Activation) and layer.kind in CANCELLING_ACTIVATIONS:  # ulps of the input, not the output
        error = error.add_(magnitude(*inputs[0]), alpha=ACTIVATION_ULPS * u)
    lo, hi = widen(lo, hi, error)
    if isinstance(layer, Activation) and layer.function.nonnegative:
        lo = lo.clamp_min(0)
    return lo, hi


def _window(module: nn.AvgPool2d) -> int:
    k = module.kernel_size
    return k * k if isinstance(k, int) else k[0] * k[1]


def _rounded_sum(inputs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of a sum of several boxes, each addition rounded outward."""
    lo, hi = inputs[0]
    for other_lo, other_hi in inputs[1:]:
        lo, hi = outward(lo + other_lo, -1.0), outward(hi + other_hi, 1.0)
    return lo, hi


def outward(t: torch.Tensor, side: float) -> torch.Tensor:
    """``t`` (a sum or product rounded to nearest) moved past the exact value on ``side`` (−1: below, +1: above):
    ``t ± (3u|t| + η)``, two cheap passes instead of ``nextafter`` (docs/theory.md §5: the exact value is within
    ``u|t|(1 + u)`` of ``t``, the move's own rounding within ``u`` of the result; ``η`` covers underflow)."""
    u, tiny = unit_roundoff(t.dtype), torch.finfo(t.dtype).tiny
    return torch.add(t, t.abs().add_(tiny / (3 * u)), alpha=side * 3 * u)


def interval_preactivation_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    known: Mapping[int, torch.Tensor] | None = None,
    splits: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
    *,
    rounding: bool = False,
    float64_centres: bool = False,
) -> Boxes:
    """Boxes of the values of ``network`` (index 0: its input; index ``i + 1``: the output of ``network.layers[i]``,
    for every layer but the last; on a chain, index ``i`` is the input of ``network.layers[i]``). A box ``(lo, hi)``
    with ``lo is hi`` is an exact value (it depends on no perturbed weight). Residual additions add boxes
    (docs/theory.md §9). ``scale``: optional per-sample radius factors ``(N,)``; ``cache``: an optional
    :class:`.BoundCache`; ``known``: centres of :class:`.CentredBox` values already computed for these samples (by
    value index: they do not depend on the radius, so a radius search computes them once); ``splits``: per value
    index, ``(floor, ceiling)`` tensors (or ``None``) of the value's shape ``(N, ...)`` that its box is clipped to
    before later layers read it (branch and bound, docs/theory.md §11: on a branch where a ReLU's input is known to be
    ``≥ 0`` the floor is 0; the boxes are then sound for that branch's subset of the ball only). An exact value is
    never clipped. ``rounding``: the boxes hold the exact real-number network's values despite the floating-point
    evaluation in the boxes' dtype (docs/theory.md §5; :func:`rounded_affine_interval`, :func:`round_fixed`); only the
    input is then an exact value, and ``known`` is ignored. ``float64_centres`` (with ``rounding`` in float32): the
    centres of the affine layers on unknown inputs are computed in float64 for the samples whose boxes need them
    (:func:`rounded_affine_interval`; tighter boxes for at most one float64 forward pass: the linear and optimized
    bounds take them, the interval bound does not)."""
    param_balls = by_param_name(param_balls)
    boxes = [(x, x)]
    nonnegative = nonnegative_values(network)
    known = {} if rounding else known or {}
    for layer, reads in zip(network.layers[:-1], network.inputs):
        lo, hi = boxes[reads[0]]
        if layer.weighted and rounding:
            box = rounded_affine_interval(
                layer, params, lo, hi, param_balls, lo is hi, scale, cache, nonnegative[reads[0]], float64_centres
            )
        elif layer.weighted:  # on a known input: a CentredBox (its centre is the layer's value there)
            centre = known.get(len(boxes))
            exact, nonneg = lo is hi, nonnegative[reads[0]]
            box = affine_interval(layer, params, lo, hi, param_balls, exact, scale, cache, nonneg, centre)
        else:
            box = fixed_interval(layer, boxes, reads, rounding)
        if splits and len(boxes) in splits and box[0] is not box[1]:
            box = clip_box(box, *splits[len(boxes)])
        boxes.append(box)
    return boxes


def clip_box(box: tuple[torch.Tensor, torch.Tensor], floor: torch.Tensor | None, ceiling: torch.Tensor | None):
    """``box`` intersected with ``[floor, ceiling]`` (``None``: no limit on that side)."""
    lo, hi = box
    lo = lo if floor is None else torch.maximum(lo, floor)
    hi = hi if ceiling is None else torch.minimum(hi, ceiling)
    return lo, hi


def clean_centres(clean_values: Mapping[int, torch.Tensor] | None, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """The ``known`` centres of :func:`interval_preactivation_bounds` from a clean forward pass's values (by value
    index, in ``dtype``; empty without them)."""
    return {} if clean_values is None else {index: value.to(dtype) for index, value in clean_values.items()}


def nonnegative_values(network: Network) -> list[bool]:
    """Per value of ``network`` (as :func:`interval_preactivation_bounds` indexes them), whether it is non-negative by
    construction (:meth:`.Operator.output_nonnegative`: a ReLU, sigmoid or clipped ReLU, possibly followed by pooling or
    flattening, or a sum of such)."""
    out = [False]
    for layer, reads in zip(network.layers, network.inputs):
        out.append(layer.output_nonnegative(tuple(out[v] for v in reads)))
    return out


def nonnegative_input(network: Network, index: int) -> bool:
    """Whether the input of ``network.layers[index]`` is non-negative by construction (:func:`nonnegative_values`)."""
    return nonnegative_values(network)[network.inputs[index][0]]


def pairwise_spread(
    weight: torch.Tensor, labels: torch.Tensor, r: torch.Tensor, cache: BoundCache | None = None
) -> torch.Tensor:
    """``|W_y − W_i| · r`` for every sample and class, ``(N, K)``, without materializing ``(N, K, n)`` when the
    class count is small (one ``(N, n) × (n, K·K)`` product instead)."""
    nb_classes = weight.shape[0]
    if nb_classes <= 32:
        pair_abs = cached(
            cache,
            "pair_abs",
            (weight,),
            lambda: (weight.unsqueeze(1) - weight.unsqueeze(0)).abs().reshape(nb_classes * nb_classes, -1),
        )
        spread = (r @ pair_abs.T).reshape(len(r), nb_classes, nb_classes)
        return spread.gather(1, labels.reshape(-1, 1, 1).expand(-1, 1, nb_classes)).squeeze(1)
    rows = (weight[labels].unsqueeze(1) - weight.unsqueeze(0)).abs()  # (N, K, n)
    return torch.einsum("nkj,nj->nk", rows, r)


def interval_margin_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    *,
    boxes: Boxes | None = None,
    clean_values: Mapping[int, torch.Tensor] | None = None,
    rounding: bool = False,
) -> torch.Tensor:
    """
    Lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball (docs/theory.md §4).

    :param network: the model read by :func:`.read_network`.
    :param param_balls: the budget resolved on the model (:meth:`.PerturbationBudget.parameter_balls`).
    :param x: preprocessed inputs ``(N, ...)``.
    :param labels: classes ``y`` ``(N,)`` (int64).
    :param dtype: float64 for certificates; float32 keeps the training graph cheap (differentiable either way).
    :param scale: optional per-sample factors ``(N,)`` multiplying every radius of the budget (the certifier's
        vectorized bisection for the certified radius); ``None`` is a factor of 1.
    :param cache: optional :class:`.BoundCache` of per-layer constants (certificates; ``None`` when training).
    :param boxes: precomputed :func:`interval_preactivation_bounds` (in ``dtype``), to share them with other methods.
    :param clean_values: values of the clean network on ``x`` that the caller has already (``{value index:
        tensor}``, indexed as :func:`interval_preactivation_bounds`, the logits at ``len(network.layers)``; the
        trainer's cross-entropy forward): an affine layer on an exact input takes its value from them as the centre of
        its box instead of computing it again.
    :param rounding: bounds sound for the exact real-number network despite the floating-point evaluation in
        ``dtype`` (docs/theory.md §5; ``boxes``, if given, computed with ``rounding`` too; ``clean_values`` ignored),
        over the ball of ``param_balls``' radii as they are (cast up to ``dtype``): radii resolved in float32
        (``parameter_balls(model, torch.float32)``) are already rounded, a relative radius of a subnormal weight to 0;
        the certifiers resolve them in float64.
    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column.
    """
    param_balls = by_param_name(param_balls)
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    if scale is not None:
        scale = scale.to(dtype)
    known = {} if rounding else clean_centres(clean_values, dtype)
    if boxes is None:
        boxes = interval_preactivation_bounds(network, param_balls, x, params, scale, cache, known, rounding=rounding)
    last = network.layers[-1]
    lo, hi = boxes[network.inputs[-1][0]]
    weight = params[last.weight_name]
    bias = params[last.bias_name] if last.bias_name else None
    # Last layer folded into the specification (rows e_y − e_i): centre margins, minus |W_y − W_i|·r, minus P_y + P_i.
    exact_input = lo is hi
    if exact_input:
        z = known.get(len(network.layers))
        z = last.apply(lo, weight, bias) if z is None else z
    elif rounding:  # W c + b
        z = centre_of_sum(last, lo + hi, weight, bias, cache)
    else:
        z = last.apply(lo + hi, cached(cache, "half", (weight,), lambda: weight * 0.5), bias)
    value = z.gather(1, labels.unsqueeze(1)) - z
    if not exact_input:
        value = value - 0.5 * pairwise_spread(weight, labels, hi - lo, cache)
    if nonnegative_input(network, len(network.layers) - 1):
        m = hi
    else:
        m = lo.abs() if exact_input else _upper_magnitude(lo, hi, False)
    pert = perturbation_radius(last, m, param_balls, dtype, scale, cache, rounding=rounding)  # per logit row
    if not isinstance(pert, float):
        pert = pert.expand(len(x), z.shape[1])
        value = value - (pert.gather(1, labels.unsqueeze(1)) + pert)
    if rounding:  # docs/theory.md §5: every term of the margin computed in floating point
        value = round_down(finite_lower(value - _margin_rounding(last, weight, bias, m, pert, labels, cache)))
    return fill_label(value, labels)


def _margin_rounding(last: Affine, weight, bias, m: torch.Tensor, pert, labels: torch.Tensor, cache) -> torch.Tensor:
    """The rounding error of the folded last layer's margin bound, ``(N, K)`` (docs/theory.md §5): with ``S_k = |W_k|
    m + |b_k| + P_k`` per logit, the centres ``W_k c + b_k``, the spread ``|W_y − W_i| r`` (the difference rounded
    too), the ball terms and the subtractions are each within ``γ_{n+k}`` of a part of ``S_y + S_i``: ``2g (S_y +
    S_i)``, ``g = 2γ_{n+k}`` (twice :func:`rounding_factor`, for the extra differences)."""
    g = 2 * rounding_factor(last, weight, m.dtype)
    abs_w = cached(cache, "abs", (weight,), weight.abs)
    s = last.apply(m, abs_w, None if bias is None else bias.abs())
    s = s if isinstance(pert, float) else s + pert
    eta = smallest_subnormal(m.dtype) * 4 * (m[0].numel() + 2)  # products below the normal range: η/2 each
    return (s.gather(1, labels.unsqueeze(1)) + s) * g + eta
