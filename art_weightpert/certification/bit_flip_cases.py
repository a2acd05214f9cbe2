"""
Case splits on where the flips land (docs/theory.md §8.1), for the ``"linear"`` bit-flip certificate.

:func:`flip_cases` covers every set of at most ``k`` flips by cases of per-layer budgets: every split of ``k`` into
per-layer budgets ``k_l`` (``Σ k_l = k``) while there are at most :data:`MAX_CASES` of them, else one case per first
layer that flips (the layers before it clean, it up to ``k`` flips, each later layer up to ``k − 1``). Layers before the
first flipped one are then exact, and a layer without budget keeps its own weights.

:func:`case_margins` bounds one case. When the case is one flip in a layer that is not the last one, a small
layer (at most :data:`MAX_ENUMERATED_FLIPS` weight bits) is evaluated exactly flip by flip; otherwise the case is split
once more on the output row that flip touches (a flip of a Linear weight moves one output
unit, a flip of a kernel entry one output channel): per row ``r`` the layer's output is exact except row ``r``, which
moves within its single-flip box, and the rest of the network is bounded from that sparse box with the other layers'
budgets (``k − 1`` flips in all). The minimum over the rows is the case's bound. Every bound is sound, so the minimum
over cases is.
"""

from __future__ import annotations

import itertools
import math

import torch

from art_weightpert.certification.bit_flip_bounds import (
    Case,
    backward_margins,
    backward_pass,
    flip_boxes,
    interval_margins,
    layer_flip_terms,
)
from art_weightpert.certification.bit_flip_enumeration import single_flip_margins
from art_weightpert.certification.bit_flip_terms import FlipTable, chunked, neuron_flip_box, sum_smallest
from art_weightpert.certification.common import margin_matrix
from art_weightpert.network import Affine, Network
from art_weightpert.operators.tensors import concretize

MAX_CASES = 16
"""Largest number of per-layer budget splits enumerated; beyond it the cases are the first layer that flips."""

MAX_ENUMERATED_FLIPS = 1024
"""A single flip in a layer with at most this many (weight, bit) pairs is evaluated exactly, pair by pair."""


def flip_cases(names: list[str], k: int) -> list[Case]:
    """The cases covering every set of at most ``k`` flips in the layers ``names`` (in network order)."""
    if k == 0 or not names:
        return [dict.fromkeys(names, 0)]
    if math.comb(k + len(names) - 1, len(names) - 1) <= MAX_CASES:
        splits = (s for s in itertools.product(range(k + 1), repeat=len(names)) if sum(s) == k)
        return [dict(zip(names, split)) for split in splits]
    return [{n: 0 if j < i else (k if j == i else k - 1) for j, n in enumerate(names)} for i in range(len(names))]


def _apply(layer, params: dict, h: torch.Tensor) -> torch.Tensor:
    if layer.weighted:
        return layer.apply(h, params[layer.weight_name], params[layer.bias_name] if layer.bias_name else None)
    return layer.apply(h)


def case_margins(
    network: Network,
    params: dict,
    tables: dict[str, FlipTable],
    case: Case,
    k: int,
    x: torch.Tensor,
    labels: torch.Tensor,
    nb_classes: int,
) -> torch.Tensor:
    """Margin lower bounds ``(N, K)`` (label column included) over the flip sets of ``case`` with at most ``k`` flips:
    the maximum of the interval and the backward bound, with the row split where it applies."""
    first = next(
        (i for i, layer in enumerate(network.layers) if layer.weighted and case.get(layer.weight_name, 0)),
        None,
    )
    if first is not None and first < len(network.layers) - 1:
        if k == 1 and tables[network.layers[first].weight_name].changes.numel() <= MAX_ENUMERATED_FLIPS:
            return _enumerated_margins(network, params, tables, x, labels, first)
        if k == 1:
            return _row_split_margins(network, params, tables, case, k, x, labels, nb_classes, first)
        if _next_affine(network, first) is not None:
            return _sparse_margins(network, params, tables, case, k, x, labels, nb_classes, first)
    boxes = flip_boxes(network, params, tables, case, x, x)
    return torch.maximum(
        interval_margins(network, params, tables, case, boxes, labels, nb_classes),
        backward_margins(network, params, tables, case, k, boxes, labels, nb_classes),
    )


def _row_split_margins(network, params, tables, case, k, x, labels, nb_classes, first: int) -> torch.Tensor:
    """The case split on the output row of the first flipped layer (one flip there): see the module docstring."""
    h = x
    for layer in network.layers[:first]:  # clean and exact up to the flipped layer
        h = _apply(layer, params, h)
    layer = network.layers[first]
    z = _apply(layer, params, h)
    down, up = neuron_flip_box(layer, tables[layer.weight_name], h, h, 1)
    suffix = Network(network.model, network.layers[first + 1 :])
    rows = z.shape[1]
    index = torch.arange(rows, device=z.device)

    def run(z_, down_, up_, labels_):
        lo = z_.unsqueeze(1).repeat((1, rows) + (1,) * (z_.dim() - 1))  # (n, rows: the flipped row, output)
        hi = lo.clone()
        lo[:, index, index] += down_
        hi[:, index, index] += up_
        lo, hi = lo.flatten(0, 1), hi.flatten(0, 1)
        lab = labels_.repeat_interleave(rows)
        boxes = flip_boxes(suffix, params, tables, case, lo, hi)
        bound = torch.maximum(
            interval_margins(suffix, params, tables, case, boxes, lab, nb_classes),
            backward_margins(suffix, params, tables, case, k - 1, boxes, lab, nb_classes),
        )
        return bound.reshape(len(z_), rows, -1).amin(dim=1)

    per_sample = rows * z[0].numel() * nb_classes
    return chunked(run, len(x), per_sample, z, down, up, labels)


def _next_affine(network: Network, first: int) -> int | None:
    """Index of the affine layer ``g`` fed by the affine layer ``first`` through at most one activation (Linear to
    Linear, or convolution to an ungrouped convolution), else ``None``."""
    layers = network.layers
    nxt = first + 2 if layers[first + 1].elementwise else first + 1
    if nxt >= len(layers) or not layers[nxt].weighted or layers[nxt].is_conv != layers[first].is_conv:
        return None
    return nxt if not layers[nxt].is_conv or layers[nxt].module.groups == 1 else None


def _unit_contributions(g: Affine, weight: torch.Tensor, e_lo: torch.Tensor, e_hi: torch.Tensor):
    """Per input unit ``c`` of ``g`` (an entry, or a channel of a convolution), the box of its contribution
    ``V[:, c] ⋆ e_c`` to ``g``'s output over ``e_c ∈ [e_lo, e_hi]``: ``(N, C) + output shape`` each."""
    if not g.is_conv:
        w = weight.T.unsqueeze(0)  # (1, C, S)
        at_lo, at_hi = w * e_lo.unsqueeze(2), w * e_hi.unsqueeze(2)
        return torch.minimum(at_lo, at_hi), torch.maximum(at_lo, at_hi)
    mod, channels = g.module, weight.shape[1]
    per_channel = weight.transpose(0, 1).reshape((-1, 1) + tuple(weight.shape[2:]))  # one group per input channel

    def conv(t, w):
        return torch.nn.functional.conv2d(t, w, None, mod.stride, g.padding, mod.dilation, channels)

    centre, radius = conv((e_lo + e_hi) / 2, per_channel), conv((e_hi - e_lo) / 2, per_channel.abs())
    shape = (len(e_lo), channels, weight.shape[0]) + tuple(centre.shape[2:])
    return (centre - radius).reshape(shape), (centre + radius).reshape(shape)


def _sparse_units(g: Affine, weight, a, e_lo, e_hi, k: int) -> torch.Tensor:
    """The ``k`` most negative per-unit terms ``min over e_c of (λ ⋆ V)_c · e_c``: ``(N, K, ≤ k)``."""
    mu = g.apply_transposed(a.flatten(0, 1), weight, e_lo.shape[1:]).reshape(a.shape[:2] + e_lo.shape[1:])
    terms = torch.minimum(mu * e_lo.unsqueeze(1), mu * e_hi.unsqueeze(1))
    terms = (terms.flatten(3).sum(3) if terms.dim() > 3 else terms).clamp_max(0)
    return terms.topk(min(k, terms.shape[2]), dim=2, largest=False).values


def _sparse_margins(network, params, tables, case, k, x, labels, nb_classes, first: int) -> torch.Tensor:
    """Case bound when the first flipped layer ``f`` (``k_f`` flips) feeds an affine layer ``g`` through at most one
    activation: its flips move at most ``k_f`` of its output units (Linear) or channels (convolution), so ``g``'s input
    is the clean activation plus ``e`` with at most ``k_f`` non-zero units, each in the box of that unit's own worst
    ``k_f`` flips. ``g``'s output box and the backward pass's term ``(λ V)·e`` are then top-``k_f`` sums over the
    units; the activation after ``f`` needs only its box rule."""
    layers = network.layers
    h = x
    for layer in layers[:first]:
        h = _apply(layer, params, h)
    layer, g_index = layers[first], _next_affine(network, first)
    k_f = case[layer.weight_name]
    z = _apply(layer, params, h)
    down, up = neuron_flip_box(layer, tables[layer.weight_name], h, h, k_f)
    activation = layers[first + 1] if g_index == first + 2 else None
    clean = z if activation is None else activation.apply(z)
    moved = (z + down, z + up) if activation is None else activation.interval(z + down, z + up)
    e_lo, e_hi = moved[0] - clean, moved[1] - clean
    g = layers[g_index]
    weight = params[g.weight_name]
    centre = _apply(g, params, clean)
    lo_in, hi_in = clean + e_lo, clean + e_hi
    lower, upper = _unit_contributions(g, weight, e_lo, e_hi)
    nb = min(k_f, lower.shape[1])
    box_lo = centre + lower.clamp_max(0).topk(nb, dim=1, largest=False).values.sum(1)
    box_hi = centre + upper.clamp_min(0).topk(nb, dim=1).values.sum(1)
    table, k_g = tables.get(g.weight_name), case.get(g.weight_name, 0)
    if table is not None and k_g:
        moved_down, moved_up = neuron_flip_box(g, table, lo_in, hi_in, k_g)
        box_lo, box_hi = box_lo + moved_down, box_hi + moved_up
    interval = None
    if g_index == len(layers) - 1:
        a = margin_matrix(labels, nb_classes, x.dtype)
        const, candidates = a.new_zeros(a.shape[:2]), []
    else:
        suffix = Network(network.model, layers[g_index + 1 :])
        boxes = flip_boxes(suffix, params, tables, case, box_lo, box_hi)
        interval = interval_margins(suffix, params, tables, case, boxes, labels, nb_classes)
        a, const, candidates = backward_pass(suffix, params, tables, case, boxes, labels, nb_classes)
    const = const + concretize(a, centre, centre)  # λ·(V·clean + b)
    candidates.append(_sparse_units(g, weight, a, e_lo, e_hi, k_f))  # (λV)·e
    if table is not None and k_g:
        candidates.append(layer_flip_terms(g, table, a, lo_in, hi_in, k_g))
    linear = const + sum_smallest(candidates, k, const.shape, const)
    return linear if interval is None else torch.maximum(interval, linear)


def _enumerated_margins(network, params, tables, x, labels, first: int) -> torch.Tensor:
    """A case of one flip in the small layer ``first``: every (weight, bit) pair evaluated exactly."""
    h = x
    for layer in network.layers[:first]:
        h = _apply(layer, params, h)
    changes = tables[network.layers[first].weight_name].changes  # (rows, fan_in, n_bits)
    rows = changes.shape[0]
    weight_shape = params[network.layers[first].weight_name].shape
    changes = changes.permute(2, 0, 1).reshape((changes.shape[2], rows) + tuple(weight_shape[1:]))
    return single_flip_margins(network, params, first, changes, h, labels)
