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
from art_weightpert.network import Affine, Network
from art_weightpert.operators import rule_table

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
) -> torch.Tensor | float:
    """``P(m) + β``: bound on ``|Δ ĥ + Δb|`` at the output of ``layer`` for ``|ĥ| ≤ m`` (0 if not perturbed).

    :param scale: optional per-sample factors ``(N,)`` applied to every radius (the bound is linear in the radii).
    :param cache: optional :class:`.BoundCache` (of the compact radius).
    :param include_weight: ``False``: the bias term ``β`` only.
    """
    out: torch.Tensor | float = 0.0
    wt = param_balls.get(layer.weight_name)
    if wt is not None and include_weight:
        radius = compact_radius(wt, dtype, cache)
        out = wt.ball.interval_term(layer, m, radius)
    bt = param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        beta = bt.ball.entry_bound(bt.radius.to(dtype), layer.module.bias.shape)
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
        # W c = (W/2)(l + u) and |W| r = (|W|/2)(u − l): halving the weight (exact in floating point) instead of the
        # activations saves passes over the batch; max(|l|, |u|) = max(−l, u) for l ≤ u.
        half = cached(cache, "half", (weight,), lambda: weight * 0.5)
        half_abs = cached(cache, "half_abs", (weight,), lambda: half.abs())
        center = layer.apply(lo + hi, half, bias)
        m = hi if nonnegative else torch.maximum(lo.neg(), hi)
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


def interval_preactivation_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    known: Mapping[int, torch.Tensor] | None = None,
    splits: Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
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
    never clipped."""
    param_balls = by_param_name(param_balls)
    boxes = [(x, x)]
    nonnegative = nonnegative_values(network)
    known = known or {}
    for layer, reads in zip(network.layers[:-1], network.inputs):
        lo, hi = boxes[reads[0]]
        if layer.weighted:  # on a known input: a CentredBox (its centre is the layer's value there)
            centre = known.get(len(boxes))
            exact, nonneg = lo is hi, nonnegative[reads[0]]
            box = affine_interval(layer, params, lo, hi, param_balls, exact, scale, cache, nonneg, centre)
        elif all(boxes[v][0] is boxes[v][1] for v in reads):  # exact values stay exact through a fixed layer
            out = layer.apply(*(boxes[v][0] for v in reads))
            box = (out, out)
        else:
            box = INTERVAL_RULES[type(layer)](layer, *(end for v in reads for end in boxes[v]))
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
    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column.
    """
    param_balls = by_param_name(param_balls)
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    if scale is not None:
        scale = scale.to(dtype)
    known = clean_centres(clean_values, dtype)
    if boxes is None:
        boxes = interval_preactivation_bounds(network, param_balls, x, params, scale, cache, known)
    last = network.layers[-1]
    lo, hi = boxes[network.inputs[-1][0]]
    weight = params[last.weight_name]
    bias = params[last.bias_name] if last.bias_name else None
    # Last layer folded into the specification (rows e_y − e_i): centre margins, minus |W_y − W_i|·r, minus P_y + P_i.
    exact_input = lo is hi
    if exact_input:
        z = known.get(len(network.layers))
        z = last.apply(lo, weight, bias) if z is None else z
    else:  # W c + b
        z = last.apply(lo + hi, cached(cache, "half", (weight,), lambda: weight * 0.5), bias)
    value = z.gather(1, labels.unsqueeze(1)) - z
    if not exact_input:
        value = value - 0.5 * pairwise_spread(weight, labels, hi - lo, cache)
    if nonnegative_input(network, len(network.layers) - 1):
        m = hi
    else:
        m = lo.abs() if exact_input else torch.maximum(lo.neg(), hi)
    pert = perturbation_radius(last, m, param_balls, dtype, scale, cache)  # bound per logit row, (N, K) or (N, 1)
    if not isinstance(pert, float):
        pert = pert.expand(len(x), z.shape[1])
        value = value - (pert.gather(1, labels.unsqueeze(1)) + pert)
    return fill_label(value, labels)
