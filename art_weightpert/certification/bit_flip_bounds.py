"""
Margin lower bounds of a network under at most ``k`` flipped bits of its weights (docs/theory.md §8).

A *case* gives every quantized layer a flip budget ``k_l`` and a total ``k``: it covers the flip sets with at most
``k_l`` flips in layer ``l`` and at most ``k`` in all. Within a case:

* :func:`flip_boxes` (the ``"interval"`` method): boxes of every layer's input; each output unit of a flippable layer
  takes its own worst ``k_l`` flips against the input box (a superset: the true flips are shared by all units). A
  layer whose input is exact and that cannot flip stays exact.
* :func:`interval_margins`: the last layer folded into the margin specification, its pair terms against its input box.
* :func:`backward_margins` (the ``"linear"`` method): the CROWN backward pass from the margins (the fixed operators'
  backward rules), each affine layer contributing its ``k_l`` most negative pair terms
  ``min(λ_r s d_b ĥ_c)`` over the box; the ``k`` most negative over all layers together are added (the budget shared
  exactly at the specification). The first affine layer sees the known input: its terms are exact.

The cases themselves (where the flips land) are in :mod:`.bit_flip_cases`.
"""

from __future__ import annotations

import torch

from art_weightpert.certification.bit_flip_terms import (
    FlipTable,
    chunked,
    neuron_flip_box,
    rounds,
    smallest_terms,
    sum_smallest,
)
from art_weightpert.certification.common import margin_matrix
from art_weightpert.certification.interval import INTERVAL_RULES, fixed_interval, outward, rounded_affine_interval
from art_weightpert.certification.linear import BACKWARD_RULES, backward_step
from art_weightpert.certification.weight_terms import BackwardContext, affine_at_input, affine_backward
from art_weightpert.network import Affine, Network
from art_weightpert.operators.affine_view import AffineBackward
from art_weightpert.operators.tensors import concretize
from art_weightpert.rounding import abs_dot, error_factor, finite_lower, magnitude, round_down, smallest_subnormal

Case = dict  # {weight name: flips allowed in that layer}


def affine_flip_box(layer: Affine, params: dict, lo, hi, table: FlipTable | None, k: int):
    """The box of ``layer``'s output for inputs in ``[lo, hi]`` (``lo is hi``: known) and at most ``k`` flips of its
    ``table`` (``None`` or ``k = 0``: its own weights; exact, one tensor twice, on a known input in float64)."""
    if rounds(lo):  # docs/theory.md §5: the clean box holds the exact layer's values, the flips' box is added outward
        lower, upper = box = rounded_affine_interval(layer, params, lo, hi, {}, exact_input=lo is hi)
        if table is None or k == 0:
            return box
        down, up = neuron_flip_box(layer, table, lo, hi, k)
        return outward(lower + down, -1.0), outward(upper + up, 1.0)
    weight = params[layer.weight_name]
    bias = params[layer.bias_name] if layer.bias_name else None
    if lo is hi:
        center = layer.apply(lo, weight, bias)
        if table is None or k == 0:
            return center, center
        lower = upper = center
    else:
        center = layer.apply((lo + hi) / 2, weight, bias)
        radius = layer.apply((hi - lo) / 2, weight.abs())
        lower, upper = center - radius, center + radius
        if table is None or k == 0:
            return lower, upper
    down, up = neuron_flip_box(layer, table, lo, hi, k)
    return lower + down, upper + up


def flip_boxes(
    network: Network, params: dict, tables: dict[str, FlipTable], case: Case, lo: torch.Tensor, hi: torch.Tensor
) -> list:
    """Boxes ``(lo, hi)`` of the input of every layer (``lo is hi`` where exact) under the case's budgets, from the
    box ``[lo, hi]`` of the network's input (pass the same tensor twice for a known input)."""
    boxes = []
    for layer in network.layers:
        boxes.append((lo, hi))
        if layer.weighted:
            lo, hi = affine_flip_box(
                layer, params, lo, hi, tables.get(layer.weight_name), case.get(layer.weight_name, 0)
            )
        elif rounds(lo):  # outward-rounded, exact only through the layers exact in floating point (§5)
            lo, hi = fixed_interval(layer, [(lo, hi)], (0,), True)
        elif lo is hi:
            lo = hi = layer.apply(lo)
        else:
            lo, hi = INTERVAL_RULES[type(layer)](layer, lo, hi)
    return boxes


def _coefficient_box(layer: Affine, a: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """Box of the coefficient ``G_w`` of every weight in ``λ·ẑ`` over ``ĥ ∈ [lo, hi]``, ``(N, K, rows·fan_in)``:
    Linear ``G_rc = λ_r ĥ_c``; convolution ``G_r = Σ_p λ_{r,p} patch_p(ĥ)``."""
    if layer.is_conv:
        centre, spread = AffineBackward(layer, a, lo, hi).gradient_box()
        if rounds(a):  # §5: centre and spread are sums over the P output positions, within γ_P Σ_p |λ_p| m_p each
            m = magnitude(lo, hi)
            error = AffineBackward(layer, a.abs(), -m, m).gradient_box()[1]  # Σ_p |λ_p| m_p, both ends
            positions = a[0, 0].numel() // a.shape[2]
            spread = (
                spread + error * (3 * error_factor(positions, a.dtype)) + smallest_subnormal(a.dtype) * 2 * positions
            )
        return (centre - spread).flatten(2), (centre + spread).flatten(2)
    pos, neg = a.clamp_min(0).unsqueeze(3), a.clamp_max(0).unsqueeze(3)
    low, high = lo.unsqueeze(1).unsqueeze(2), hi.unsqueeze(1).unsqueeze(2)
    # (Linear, when the bounds round: one product each, the other a product by 0: widened after the selection,
    # :func:`layer_flip_terms`, on the k selected terms rather than on every weight)
    return (pos * low + neg * high).flatten(2), (pos * high + neg * low).flatten(2)


def layer_flip_terms(layer: Affine, table: FlipTable, a: torch.Tensor, lo, hi, k: int) -> torch.Tensor:
    """The ``k`` most negative pair terms of ``layer`` in ``λ·ẑ`` (``a`` = λ, ``(N, K, ...)``): ``(N, K, ≤ k)``.

    When the bounds round (docs/theory.md §5) a Linear layer's coefficient ``G = λ_r ĥ_c`` is one product whose sign is
    exact: within ``u|G|`` and ``η/2`` of the exact one, so each exact term ``min(D·G, 0)`` is at least the computed
    term times ``1 + γ`` minus ``max|D|·η``. That map is monotone, so it is applied to the ``k`` terms selected on the
    computed values (the exact ``k`` smallest sum at least as much); the sums' own rounding is :func:`.sound_sum`'s."""
    changes = table.changes.flatten(0, 1)
    largest, smallest = table.largest.flatten(), table.smallest.flatten()
    widen = rounds(a) and not layer.is_conv
    if widen:
        g, scale = error_factor(1, a.dtype), float(torch.maximum(largest.max(), -smallest.min()))
        eta = scale * smallest_subnormal(a.dtype)

    def run(a_, lo_, hi_):
        gmin, gmax = _coefficient_box(layer, a_, lo_, hi_ if lo is not hi else lo_)
        terms = smallest_terms(gmin, gmax, changes, largest, smallest, k)
        return terms * (1 + g) - eta if widen else terms

    per_sample = a.shape[1] * changes.shape[0]
    return chunked(run, len(a), per_sample, a, lo, hi)


def _affine_backward(layer: Affine, params: dict, a: torch.Tensor, lo, hi):
    weight = params[layer.weight_name]
    flat = a.reshape((-1,) + tuple(a.shape[2:]))
    a_in = layer.apply_transposed(flat, weight, lo.shape[1:]).reshape(a.shape[:2] + lo.shape[1:])
    row_sums = a.flatten(3).sum(dim=3) if a.dim() > 3 else a
    const = row_sums @ params[layer.bias_name] if layer.bias_name else a.new_zeros(a.shape[:2])
    return a_in, const


def _terms(layer, tables, case, a, lo, hi, candidates: list) -> None:
    table, k = tables.get(layer.weight_name), case.get(layer.weight_name, 0)
    if table is not None and k > 0:
        candidates.append(layer_flip_terms(layer, table, a, lo, hi, k))


def _rounding_context(params: dict) -> BackwardContext:
    """The backward rules' context of a bound with rounding terms (docs/theory.md §5) and no weight ball."""
    return BackwardContext(params, {}, rounding=True)


def concretized_sound(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``min A·ĥ`` over the box, minus its rounding error when the bounds round (§5: the centre's and the radius's
    dot products, each within ``γ_n ⟨|A|, m⟩``, their difference, and ``η`` per product below the normal range)."""
    out = concretize(a, lo, hi)
    if not rounds(a):
        return out
    n = a[0, 0].numel()
    return (
        out - abs_dot(a, magnitude(lo, hi)) * (2 * error_factor(n, a.dtype)) - smallest_subnormal(a.dtype) * 4 * (n + 2)
    )


def sound_total(*terms: torch.Tensor) -> torch.Tensor:
    """The sum of a bound's terms; when the bounds round, minus the sum's own rounding and rounded down (§5)."""
    out = sum(terms)
    if not rounds(out):
        return out
    size = sum(t.abs() for t in terms) * error_factor(len(terms), out.dtype)
    return round_down(finite_lower(out - size))


def interval_margins(
    network: Network, params: dict, tables: dict, case: Case, boxes: list, labels: torch.Tensor, nb_classes: int
) -> torch.Tensor:
    """Margin lower bounds ``(N, K)`` with the last layer folded into the specification (label column included)."""
    last = network.layers[-1]
    lo, hi = boxes[-1]
    a = margin_matrix(labels, nb_classes, lo.dtype)
    candidates: list = []
    _terms(last, tables, case, a, lo, hi, candidates)
    if rounds(lo):  # the rules' own rounding terms (§5)
        ctx = _rounding_context(params)
        if lo is hi:
            const, concretized = affine_at_input(last, a, lo, None, None, ctx), a.new_zeros(a.shape[:2])
        else:
            a_in, const = affine_backward(last, a, lo, hi, ctx)
            concretized = concretized_sound(a_in, lo, hi)
    else:
        a_in, const = _affine_backward(last, params, a, lo, hi)
        concretized = concretize(a_in, lo, hi)
    flips = sum_smallest(candidates, case.get(last.weight_name, 0), const.shape, const)
    return sound_total(const, concretized, flips)


def backward_pass(
    network: Network, params: dict, tables: dict, case: Case, boxes: list, labels: torch.Tensor, nb_classes: int
) -> tuple[torch.Tensor | None, torch.Tensor, list]:
    """The backward pass from the margins: ``(a, const, candidates)`` with ``a`` the coefficients on the network's
    input box (``None`` where the pass ended at a layer with an exact input, evaluated there with exact pair terms),
    ``const`` ``(N, K)`` and the per-layer lists of the most negative pair terms."""
    a = margin_matrix(labels, nb_classes, boxes[0][0].dtype)
    if rounds(a):
        return _rounded_backward_pass(network, params, tables, case, boxes, a)
    const = a.new_zeros(a.shape[:2])
    candidates: list = []
    for index in range(len(network.layers) - 1, -1, -1):
        layer, (lo, hi) = network.layers[index], boxes[index]
        if lo is hi:  # known input: λ·(W h + b) with exact pair terms, or the fixed layer's exact output
            if layer.weighted:
                _terms(layer, tables, case, a, lo, lo, candidates)
                weight, bias = params[layer.weight_name], params[layer.bias_name] if layer.bias_name else None
                out = layer.apply(lo, weight, bias)
            else:
                out = layer.apply(lo)
            return None, const + concretize(a, out, out), candidates
        if layer.weighted:
            _terms(layer, tables, case, a, lo, hi, candidates)
            a, c = _affine_backward(layer, params, a, lo, hi)
        else:
            a, c = BACKWARD_RULES[type(layer)](layer, a, lo, hi, None)
        const = const + c
    return a, const, candidates


def _rounded_backward_pass(network: Network, params: dict, tables: dict, case: Case, boxes: list, a: torch.Tensor):
    """:func:`backward_pass` with the rounding terms of docs/theory.md §5: the weight-ball certificate's backward steps
    with no ball (:func:`.linear.backward_step`, each subtracting its own rounding error; ``boxes`` are the values'
    boxes of a chain, the last layer's output aside), the constants' sum within ``γ_L Σ|c|``."""
    ctx = _rounding_context(params)
    pending = {len(network.layers): a}
    const = total = a.new_zeros(a.shape[:2])
    candidates: list = []
    steps = 0
    for index in range(len(network.layers) - 1, -1, -1):
        a = pending.pop(index + 1, None)
        if a is None:  # a step before concretized it, or ran two rules at once
            continue
        layer = network.layers[index]
        if layer.weighted:
            _terms(layer, tables, case, a, *boxes[index], candidates)
        c = backward_step(network, index, a, boxes, ctx, pending, fuse_input_convolution=False)  # its flip terms
        const, total, steps = const + c, total + c.abs(), steps + 1
    const = round_down(finite_lower(const - total * error_factor(steps, const.dtype)))
    return pending.pop(0, None), const, candidates


def backward_margins(
    network: Network,
    params: dict,
    tables: dict,
    case: Case,
    k: int,
    boxes: list,
    labels: torch.Tensor,
    nb_classes: int,
) -> torch.Tensor:
    """Margin lower bounds ``(N, K)`` of the backward pass (:func:`backward_pass`), the ``k`` most negative pair
    terms over all layers added, concretized over the box of the network's input where the pass reached it."""
    a, const, candidates = backward_pass(network, params, tables, case, boxes, labels, nb_classes)
    concretized = concretized_sound(a, *boxes[0]) if a is not None else const.new_zeros(const.shape)
    return sound_total(const, concretized, sum_smallest(candidates, k, const.shape, const))
