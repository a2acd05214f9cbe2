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

With ``refine=True`` (:meth:`.BitFlipCertifier.verify`) the row split also covers up to :data:`MAX_SPLIT_FLIPS` flips
of a layer of at most :data:`MAX_SPLIT_ROWS` rows when other layers flip too (one branch per multiset of rows, the later
layers bounded with the flips left), and :func:`enumerated_split_margins` branches on the exact placement of one flip.
"""

from __future__ import annotations

import itertools
import math

import torch

from art_weightpert.certification.bit_flip_bounds import (
    Case,
    affine_flip_box,
    backward_margins,
    backward_pass,
    concretized_sound,
    flip_boxes,
    interval_margins,
    layer_flip_terms,
    sound_total,
)
from art_weightpert.certification.bit_flip_enumeration import enumerable_layer, single_flip_margins
from art_weightpert.certification.bit_flip_first_layer import applicable as first_layer_applicable
from art_weightpert.certification.bit_flip_first_layer import first_layer_margins
from art_weightpert.certification.bit_flip_terms import (
    FlipTable,
    chunked,
    neuron_flip_box,
    rounds,
    sound_sum,
    sum_smallest,
)
from art_weightpert.certification.common import margin_matrix
from art_weightpert.certification.interval import fixed_interval, outward
from art_weightpert.network import Affine, Network
from art_weightpert.operators.tensors import concretize
from art_weightpert.rounding import down_cast, error_factor, finite_box, magnitude, smallest_subnormal, up_cast

MAX_CASES = 16
"""Largest number of per-layer budget splits enumerated; beyond it the cases are the first layer that flips."""

MAX_SPLIT_FLIPS = 2
"""Most flips of the first flipped layer whose output rows are split on (one branch per multiset of rows)."""

MAX_SPLIT_BRANCHES = 160
"""Most branches (multisets of rows) of a row split; beyond, the sparse or plain case bound."""

MAX_SPLIT_ROWS = 32
"""Most output rows (units, or channels of a convolution) of a layer whose rows are split on when other flips remain."""

MAX_LINEAR_ROWS = 32
"""A one-flip row split also bounds each row with the flipped layer in the backward pass (its exact pair terms,
restricted to the row) when the layer has at most this many output rows."""

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
    refine: bool = False,
    linear_rows: bool = True,
    additive: bool = False,
) -> torch.Tensor:
    """Margin lower bounds ``(N, K)`` (label column included) over the flip sets of ``case`` with at most ``k`` flips:
    the maximum of the interval and the backward bound, with the row split where it applies.

    :param additive: the changes of several flips add up (integer codes): with ``refine``, a case whose first flipped
        layer is a convolution is bounded by :func:`.first_layer_margins` (its flips enumerated exactly).
    :param refine: the finer (slower) splits of :meth:`.BitFlipCertifier.verify`: rows of up to
        :data:`MAX_SPLIT_FLIPS` flips of the first flipped layer also when other layers flip (else only for
        ``k = 1``), and with ``linear_rows`` the per-row backward bound of a one-flip split (:data:`MAX_LINEAR_ROWS`).
    """
    first = first_flipped(network, case)
    rounding = rounds(x)  # float32: every bound on boxes that hold the exact values (docs/theory.md §5)
    if refine and additive and not rounding and first_layer_applicable(network, tables, case, k, first):
        return first_layer_margins(network, params, tables, case, k, x, labels, nb_classes, first)
    if first is not None and first < len(network.layers) - 1:
        if k == 1 and _enumerable(network.layers[first], tables):
            enumerated = _rounded_enumerated_margins if rounding else _enumerated_margins
            return enumerated(network, params, tables, x, labels, first)
        k_f = case[network.layers[first].weight_name]
        rows = tables[network.layers[first].weight_name].changes.shape[0]
        if k == 1:
            return _row_split_margins(
                network, params, tables, case, k, x, labels, nb_classes, first, refine and linear_rows
            )
        split = (
            k_f <= MAX_SPLIT_FLIPS and rows <= MAX_SPLIT_ROWS and math.comb(rows + k_f - 1, k_f) <= MAX_SPLIT_BRANCHES
        )
        if refine and split:
            return _row_split_margins(network, params, tables, case, k, x, labels, nb_classes, first, linear_rows)
        if _next_affine(network, first) is not None:
            sparse = _rounded_sparse_margins if rounding else _sparse_margins
            return sparse(network, params, tables, case, k, x, labels, nb_classes, first)
    boxes = flip_boxes(network, params, tables, case, x, x)
    return torch.maximum(
        interval_margins(network, params, tables, case, boxes, labels, nb_classes),
        backward_margins(network, params, tables, case, k, boxes, labels, nb_classes),
    )


def _enumerable(layer: Affine, tables: dict[str, FlipTable]) -> bool:
    """Whether one flip of ``layer`` is evaluated exactly, flip by flip: at most :data:`MAX_ENUMERATED_FLIPS` weight-bit
    pairs, and not a grouped convolution (:func:`.enumerable_layer`)."""
    return enumerable_layer(layer) and tables[layer.weight_name].changes.numel() <= MAX_ENUMERATED_FLIPS


def _plain_margins(network, params, tables, case, k, x, labels, nb_classes) -> torch.Tensor:
    """The case's interval and backward bounds without any split (from a known input ``x``)."""
    try:
        boxes = flip_boxes(network, params, tables, case, x, x)
        return torch.maximum(
            interval_margins(network, params, tables, case, boxes, labels, nb_classes),
            backward_margins(network, params, tables, case, k, boxes, labels, nb_classes),
        )
    finally:
        for table in tables.values():
            table.memo.clear()


def _clean_input(network: Network, params: dict, x: torch.Tensor, first: int) -> tuple:
    """The box ``(lo, hi)`` of the input of layer ``first`` with no flip before it: the exact value twice in float64,
    the outward-rounded boxes of :func:`.flip_boxes` when the bounds round (docs/theory.md §5)."""
    if not rounds(x):
        h = x
        for layer in network.layers[:first]:
            h = _apply(layer, params, h)
        return h, h
    return flip_boxes(Network(network.model, network.layers[: first + 1]), params, {}, {}, x, x)[first]


def _row_split_margins(
    network, params, tables, case, k, x, labels, nb_classes, first: int, linear_rows: bool = True
) -> torch.Tensor:
    """The case split on the output rows of the ``k_f ≤ MAX_SPLIT_FLIPS`` flips of the first flipped layer: one branch
    per multiset of rows (see the module docstring)."""
    h_lo, h_hi = _clean_input(network, params, x, first)  # clean (and exact in float64) up to the flipped layer
    layer = network.layers[first]
    k_f = case[layer.weight_name]
    z_lo, z_hi = affine_flip_box(layer, params, h_lo, h_hi, None, 0)
    boxes_by_count = [neuron_flip_box(layer, tables[layer.weight_name], h_lo, h_hi, m) for m in range(1, k_f + 1)]
    suffix = Network(network.model, network.layers[first + 1 :])
    # Flips left for the later layers: k − k_f when the case's budgets add up to k (a split); the "first layer that
    # flips" cases give the later layers more in all, and the branches' boxes also cover fewer flips in this layer.
    later = sum(case.get(lay.weight_name, 0) for lay in suffix.layers if lay.weighted)
    k_rest = min(k, later) if later > k - k_f else k - k_f
    if k_f == 1 and _to_last_without_flips(suffix, case, k_rest) and z_lo.dim() == 2 and z_lo is z_hi:
        return _one_unit_margins(suffix, params, z_lo, *boxes_by_count[0], labels, nb_classes)
    rows = z_lo.shape[1]
    branches = row_branches(rows, k_f, z_lo.device)  # (B, k_f) row indices, ascending
    nb = len(branches)

    def run(z_lo_, z_hi_, labels_, *ends):
        lo = z_lo_.unsqueeze(1).repeat((1, nb) + (1,) * (z_lo_.dim() - 1))  # (n, branches, output)
        hi = lo.clone() if z_lo_ is z_hi_ else z_hi_.unsqueeze(1).repeat((1, nb) + (1,) * (z_hi_.dim() - 1))
        for m in range(1, k_f + 1):
            down, up = ends[2 * (m - 1)], ends[2 * m - 1]
            for j in range(k_f):  # the rows of each branch flipped exactly m times (the first of equal rows)
                row = branches[:, j]
                count = (branches == row.unsqueeze(1)).sum(1)
                first_of = (branches[:, :j] != row.unsqueeze(1)).all(1) if j else torch.ones_like(row, dtype=bool)
                sel = (count == m) & first_of
                idx, r = sel.nonzero().flatten(), row[sel]
                lo[:, idx, r] += down[:, r]
                hi[:, idx, r] += up[:, r]
        lo, hi = lo.flatten(0, 1), hi.flatten(0, 1)
        if rounds(lo):  # §5: the moved rows' sums rounded outward (the others move by nothing)
            lo, hi = outward(lo, -1.0), outward(hi, 1.0)
        lab = labels_.repeat_interleave(nb)
        boxes = flip_boxes(suffix, params, tables, case, lo, hi)
        bound = torch.maximum(
            interval_margins(suffix, params, tables, case, boxes, lab, nb_classes),
            backward_margins(suffix, params, tables, case, k_rest, boxes, lab, nb_classes),
        )
        return bound.reshape(len(z_lo_), nb, -1).amin(dim=1)

    ends = [t for pair in boxes_by_count for t in pair]
    per_sample = nb * z_lo[0].numel() * nb_classes
    if z_lo is z_hi:
        bound = chunked(lambda z_, *rest: run(z_, z_, *rest), len(x), per_sample, z_lo, labels, *ends)
    else:
        bound = chunked(run, len(x), per_sample, z_lo, z_hi, labels, *ends)
    if linear_rows and k_f == 1 and nb <= MAX_LINEAR_ROWS:
        bound = torch.maximum(
            bound, _row_linear_margins(network, params, tables, case, k, (h_lo, h_hi), labels, nb_classes, first)
        )
    return bound


def _to_last_without_flips(suffix: Network, case: Case, k_rest: int) -> bool:
    """Whether ``suffix`` is an optional elementwise (monotone) activation, then the last affine layer, which cannot
    flip (no budget left for it)."""
    layers = suffix.layers
    last = layers[-1]
    shape_ok = len(layers) == 1 or (len(layers) == 2 and layers[0].elementwise)
    return shape_ok and last.weighted and (k_rest == 0 or case.get(last.weight_name, 0) == 0)


def _one_unit_margins(suffix: Network, params: dict, z, down, up, labels, nb_classes: int) -> torch.Tensor:
    """Row split of one flip of a Linear layer followed by an elementwise monotone activation and the last layer
    (which cannot flip), exactly: with unit ``r`` alone in ``[z_r + down_r, z_r + up_r]`` the margins are monotone in
    it, so their minimum is at an end; the minimum over the units is the case's bound."""
    act = suffix.layers[0] if len(suffix.layers) == 2 else None
    last = suffix.layers[-1]
    weight = params[last.weight_name]
    bias = params[last.bias_name] if last.bias_name else None
    h = z if act is None else act.apply(z)
    clean = last.apply(h, weight, bias)  # (N, K)
    base = clean.gather(1, labels.unsqueeze(1)) - clean  # (N, K) margins
    coef = weight[labels].unsqueeze(1) - weight.unsqueeze(0)  # (N, K, units): e_y − e_i through the last layer
    ends = [z + down, z + up]
    if act is not None:
        ends = [act.apply(e) for e in ends]
    moves = [coef * (e - h).unsqueeze(1) for e in ends]  # (N, K, units)
    worst = torch.minimum(*moves).amin(dim=2)
    return base + worst.clamp_max(0)


def _row_linear_margins(network, params, tables, case, k, h, labels, nb_classes, first: int) -> torch.Tensor:
    """The row split of the ``k_f`` flips of layer ``first`` with the flipped layer kept in the backward pass: per
    multiset of rows, that layer's flips restricted to those rows (pair terms against its clean input's box ``h``,
    ``(lo, hi)``, exact in float64), the later layers' boxes from those rows' boxes; the minimum over the branches."""
    layer = network.layers[first]
    table = tables[layer.weight_name]
    suffix = Network(network.model, network.layers[first:])
    bound = None
    for rows in row_branches(table.changes.shape[0], case[layer.weight_name], table.changes.device).tolist():
        keep = torch.zeros_like(table.changes, dtype=torch.bool)
        keep[sorted(set(rows))] = True
        restricted = dict(tables)
        restricted[layer.weight_name] = _restricted(table, keep)
        try:
            boxes = flip_boxes(suffix, params, restricted, case, *h)
            row = torch.maximum(
                interval_margins(suffix, params, restricted, case, boxes, labels, nb_classes),
                backward_margins(suffix, params, restricted, case, k, boxes, labels, nb_classes),
            )
        finally:
            restricted[layer.weight_name].memo.clear()
        bound = row if bound is None else torch.minimum(bound, row)
    return bound


def row_branches(rows: int, count: int, device) -> torch.Tensor:
    """Every multiset of ``count`` rows among ``rows``: ``(B, count)`` int64, each row ascending."""
    combos = list(itertools.combinations_with_replacement(range(rows), count))
    return torch.tensor(combos, dtype=torch.int64, device=device).reshape(len(combos), count)


def _next_affine(network: Network, first: int) -> int | None:
    """Index of the affine layer ``g`` fed by the affine layer ``first`` through at most one activation (Linear to
    Linear, or convolution to an ungrouped convolution), else ``None``."""
    layers = network.layers
    nxt = first + 2 if layers[first + 1].elementwise else first + 1
    if nxt >= len(layers) or not layers[nxt].weighted or layers[nxt].is_conv != layers[first].is_conv:
        return None
    return nxt if not layers[nxt].is_conv or layers[nxt].module.groups == 1 else None


def _unit_contributions(g: Affine, weight: torch.Tensor, e_lo: torch.Tensor, e_hi: torch.Tensor):
    """:func:`_contribution_box`, with NaN ends (``0·inf`` of an infinite box end) made ``∓inf``."""
    lower, upper = _contribution_box(g, weight, e_lo, e_hi)
    if bool(torch.isfinite(lower.sum() + upper.sum())):
        return lower, upper
    return finite_box(lower, upper)


def _contribution_box(g: Affine, weight: torch.Tensor, e_lo: torch.Tensor, e_hi: torch.Tensor):
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
    return _worst_units(terms, k)


def _worst_units(terms: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most negative per-unit terms ``(N, K, units)`` → ``(N, K, ≤ k)``, NaN (``0·inf`` of an infinite box
    end) counted as ``−inf`` rather than sorted last and dropped."""
    terms = torch.nan_to_num(terms, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
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
    rest = _after_g(network, params, tables, case, labels, nb_classes, g_index, box_lo, box_hi)
    interval, a, const, candidates = rest
    const = const + concretize(a, centre, centre)  # λ·(V·clean + b)
    candidates.append(_sparse_units(g, weight, a, e_lo, e_hi, k_f))  # (λV)·e
    if table is not None and k_g:
        candidates.append(layer_flip_terms(g, table, a, lo_in, hi_in, k_g))
    linear = const + sum_smallest(candidates, k, const.shape, const)
    return linear if interval is None else torch.maximum(interval, linear)


def _after_g(network, params, tables, case, labels, nb_classes, g_index: int, box_lo, box_hi) -> tuple:
    """The sparse bound's rest of the network after the affine layer ``g`` (``network.layers[g_index]``) from the box
    of its output: ``(interval bound or None, coefficients on g's output, constant, per-layer flip terms)``; when ``g``
    is the last layer, the margins' own coefficients."""
    layers = network.layers
    if g_index == len(layers) - 1:
        a = margin_matrix(labels, nb_classes, box_lo.dtype)
        return None, a, a.new_zeros(a.shape[:2]), []
    suffix = Network(network.model, layers[g_index + 1 :])
    boxes = flip_boxes(suffix, params, tables, case, box_lo, box_hi)
    interval = interval_margins(suffix, params, tables, case, boxes, labels, nb_classes)
    return (interval, *backward_pass(suffix, params, tables, case, boxes, labels, nb_classes))


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


def _rounded_enumerated_margins(network, params, tables, x, labels, first: int) -> torch.Tensor:
    """:func:`_enumerated_margins` with the rounding terms of docs/theory.md §5: every single flip of the small layer
    ``first`` moves one row of the clean output's box by ``D·ĥ_c`` (rounded outward), and the rest of the network is
    bounded on that box by the interval rules (a box of the rounding's width around the exact value)."""
    from art_weightpert.certification.bit_flip_enumeration import _unit_outputs  # noqa: PLC0415

    layer, nb_classes = network.layers[first], params[network.layers[-1].weight_name].shape[0]
    table = tables[layer.weight_name]
    h_lo, h_hi = _clean_input(network, params, x, first)
    z_lo, z_hi = affine_flip_box(layer, params, h_lo, h_hi, None, 0)
    # the unit outputs (input entries, or patches through one-hot kernels) are exact, and monotone in the input
    basis_lo, basis_hi = _unit_outputs(layer, h_lo), _unit_outputs(layer, h_hi)
    suffix = Network(network.model, network.layers[first + 1 :])

    def suffix_bound(lo, hi, labels_):
        boxes = flip_boxes(suffix, params, {}, {}, lo, hi)
        return interval_margins(suffix, params, {}, {}, boxes, labels_, nb_classes)

    bound = suffix_bound(z_lo, z_hi, labels)  # no flip
    fan_in, n_bits = table.changes.shape[1], table.changes.shape[2]
    exact = (table.exact if table.exact is not None else table.changes).flatten()
    pairs = exact.nonzero().flatten()  # (weight, bit) pairs that change something
    dtype = z_lo.dtype
    step = max(1, (1 << 22) // max(1, z_lo[0].numel() * len(x)))
    for start in range(0, len(pairs), step):
        index = pairs[start : start + step]
        row, col = index // (fan_in * n_bits), (index // n_bits) % fan_in
        shape = (len(index), 1) + (1,) * (z_lo.dim() - 2)
        d = exact[index].reshape(shape)
        d_lo, d_hi = down_cast(d, dtype), up_cast(d, dtype)  # the change between two floats (exact if one)
        b_lo, b_hi = basis_lo[:, col].movedim(1, 0), basis_hi[:, col].movedim(1, 0)
        ends = [d_lo * b_lo, d_lo * b_hi, d_hi * b_lo, d_hi * b_hi]  # (F, N, ...): D·ĥ over both boxes is bilinear
        move_lo = outward(torch.minimum(torch.minimum(ends[0], ends[1]), torch.minimum(ends[2], ends[3])), -1.0)
        move_hi = outward(torch.maximum(torch.maximum(ends[0], ends[1]), torch.maximum(ends[2], ends[3])), 1.0)
        lo = z_lo.unsqueeze(0).repeat((len(index),) + (1,) * z_lo.dim())
        hi = z_hi.unsqueeze(0).repeat((len(index),) + (1,) * z_hi.dim())
        flips = torch.arange(len(index), device=x.device)
        lo[flips, :, row] = outward(lo[flips, :, row] + move_lo, -1.0)
        hi[flips, :, row] = outward(hi[flips, :, row] + move_hi, 1.0)
        out = suffix_bound(lo.flatten(0, 1), hi.flatten(0, 1), labels.repeat(len(index)))
        bound = torch.minimum(bound, out.reshape(len(index), len(x), -1).amin(dim=0))
    return bound


def _rounded_unit_contributions(g: Affine, weight: torch.Tensor, e_lo: torch.Tensor, e_hi: torch.Tensor):
    """:func:`_unit_contributions` widened by its rounding (docs/theory.md §5): one product per entry (Linear), or
    per channel a convolution of ``kh·kw`` taps, within ``γ (|V| ⋆ |e|)``."""
    lower, upper = _unit_contributions(g, weight, e_lo, e_hi)
    if not g.is_conv:
        return outward(lower, -1.0), outward(upper, 1.0)
    channels, mod = weight.shape[1], g.module
    per_channel = weight.transpose(0, 1).reshape((-1, 1) + tuple(weight.shape[2:])).abs()
    m = magnitude(e_lo, e_hi)
    size = torch.nn.functional.conv2d(m, per_channel, None, mod.stride, g.padding, mod.dilation, channels)
    error = size.reshape(lower.shape) * error_factor(weight[0, 0].numel() + 2, m.dtype) + smallest_subnormal(m.dtype)
    return lower - error, upper + error


def _rounded_sparse_units(g: Affine, weight, a, e_lo, e_hi, k: int) -> torch.Tensor:
    """:func:`_sparse_units` minus its rounding (docs/theory.md §5): ``μ = λV`` within ``γ (|λ| |V|)``, each product
    ``μ e`` within ``u``, and a convolution's sum over the output positions within ``γ_P``."""
    flat = a.flatten(0, 1)
    mu = g.apply_transposed(flat, weight, e_lo.shape[1:]).reshape(a.shape[:2] + e_lo.shape[1:])
    size = g.apply_transposed(flat.abs(), weight.abs(), e_lo.shape[1:]).reshape(mu.shape)
    mu_error = size * error_factor(a[0, 0].numel() // max(1, a.shape[2]) * weight.shape[0] + 2, a.dtype)
    terms = torch.minimum(mu * e_lo.unsqueeze(1), mu * e_hi.unsqueeze(1))
    terms = outward(terms, -1.0) - mu_error * magnitude(e_lo, e_hi).unsqueeze(1)
    if terms.dim() > 3:
        summed = terms.flatten(3).sum(3)
        terms = summed - terms.abs().flatten(3).sum(3) * error_factor(terms[0, 0, 0].numel(), a.dtype)
    return _worst_units(terms.clamp_max(0), k)


def _rounded_sparse_margins(network, params, tables, case, k, x, labels, nb_classes, first: int) -> torch.Tensor:
    """:func:`_sparse_margins` on boxes that hold the exact values (docs/theory.md §5): the clean activations and
    ``g``'s clean output are boxes, the moved units' ``e`` the difference of the moved and the clean boxes, every sum
    and product rounded outward."""
    layers = network.layers
    h_lo, h_hi = _clean_input(network, params, x, first)
    layer, g_index = layers[first], _next_affine(network, first)
    k_f = case[layer.weight_name]
    z_lo, z_hi = affine_flip_box(layer, params, h_lo, h_hi, None, 0)
    down, up = neuron_flip_box(layer, tables[layer.weight_name], h_lo, h_hi, k_f)
    clean, moved = (z_lo, z_hi), (outward(z_lo + down, -1.0), outward(z_hi + up, 1.0))
    if g_index == first + 2:
        activation = layers[first + 1]
        clean, moved = fixed_interval(activation, [clean], (0,), True), fixed_interval(activation, [moved], (0,), True)
    e_lo, e_hi = outward(moved[0] - clean[1], -1.0).clamp_max(0), outward(moved[1] - clean[0], 1.0).clamp_min(0)
    g = layers[g_index]
    weight = params[g.weight_name]
    c_lo, c_hi = affine_flip_box(g, params, *clean, None, 0)  # V·clean + b
    lower, upper = _rounded_unit_contributions(g, weight, e_lo, e_hi)
    nb = min(k_f, lower.shape[1])
    top_lo = sound_sum(lower.clamp_max(0).topk(nb, dim=1, largest=False).values.sum(1), nb)
    top_hi = -sound_sum(-upper.clamp_min(0).topk(nb, dim=1).values.sum(1), nb)
    box_lo, box_hi = outward(c_lo + top_lo, -1.0), outward(c_hi + top_hi, 1.0)
    table, k_g = tables.get(g.weight_name), case.get(g.weight_name, 0)
    if table is not None and k_g:
        moved_down, moved_up = neuron_flip_box(g, table, *moved, k_g)  # g's input: the moved box holds the clean one
        box_lo, box_hi = outward(box_lo + moved_down, -1.0), outward(box_hi + moved_up, 1.0)
    rest = _after_g(network, params, tables, case, labels, nb_classes, g_index, box_lo, box_hi)
    interval, a, const, candidates = rest
    candidates.append(_rounded_sparse_units(g, weight, a, e_lo, e_hi, k_f))  # (λV)·e
    if table is not None and k_g:
        candidates.append(layer_flip_terms(g, table, a, *moved, k_g))
    linear = sound_total(const, concretized_sound(a, c_lo, c_hi), sum_smallest(candidates, k, const.shape, const))
    return linear if interval is None else torch.maximum(interval, linear)


MAX_REFINED_FLIPS = 16384
"""The largest layer (weight-bit pairs) whose one-flip cases :meth:`.BitFlipCertifier.verify` branches on."""

MAX_BRANCH_FLIPS = 1024
"""The largest single flips of a layer enumerated one by one in :func:`enumerated_split_margins` (the others are one
branch per output row, with their smaller single-flip boxes)."""


def _restricted(table: FlipTable, keep: torch.Tensor) -> FlipTable:
    """``table`` with only the pairs ``keep`` (``(rows, fan_in, bits)`` bool): the others change nothing (a superset of
    the flip sets that use only ``keep``'s pairs)."""
    changes = torch.where(keep, table.changes, torch.zeros_like(table.changes))
    return FlipTable.of(changes)


def enumerated_split_margins(
    network: Network,
    params: dict,
    tables: dict[str, FlipTable],
    case: Case,
    k: int,
    x: torch.Tensor,
    labels: torch.Tensor,
    nb_classes: int,
    first: int,
    nb_enumerated: int = MAX_BRANCH_FLIPS,
) -> torch.Tensor:
    """
    Margin lower bounds ``(N, K)`` of a case with exactly one flip budgeted in its first flipped layer ``first``
    (docs/theory.md §11, branching on the placement of a flip): the ``nb_enumerated`` largest single flips of that
    layer are branches of their own, the layer's output exact and the rest of the network bounded with the other
    layers' budgets (``k − 1`` flips, recursively by :func:`case_margins`); the remaining flips form one more branch,
    split on the output row as in the row split. The minimum over the branches is sound.
    """
    from art_weightpert.certification.bit_flip_enumeration import _unit_outputs  # noqa: PLC0415

    h = x
    for layer in network.layers[:first]:
        h = _apply(layer, params, h)
    layer = network.layers[first]
    table = tables[layer.weight_name]
    z = _apply(layer, params, h)
    magnitude = table.changes.abs().flatten()
    nb = min(nb_enumerated, int((magnitude > 0).sum()))
    top = magnitude.topk(nb).indices if nb else magnitude.new_zeros(0, dtype=torch.int64)
    fan_in, n_bits = table.changes.shape[1], table.changes.shape[2]
    row, col, bit = top // (fan_in * n_bits), (top // n_bits) % fan_in, top % n_bits
    suffix = Network(network.model, network.layers[first + 1 :])
    rest = {name: (0 if name == layer.weight_name else count) for name, count in case.items()}
    bound = None
    if nb:
        basis = _unit_outputs(layer, h)  # (N, fan_in, ...)
        change = table.changes[row, col, bit]

        def run(z_, basis_, labels_):
            zf = z_.unsqueeze(0).repeat((nb,) + (1,) * z_.dim())  # (branches, n, ...)
            shape = (nb, 1) + (1,) * (z_.dim() - 2)
            zf[torch.arange(nb, device=z_.device), :, row] += change.reshape(shape) * basis_[:, col].movedim(1, 0)
            flat = zf.flatten(0, 1)
            lab = labels_.repeat(nb)
            out = case_margins(
                suffix, params, tables, rest, k - 1, flat, lab, nb_classes, refine=True, linear_rows=False
            )
            return out.reshape(nb, len(z_), -1).amin(dim=0)

        bound = chunked(run, len(x), nb * max(1, z[0].numel()) * 16, z, basis, labels)
    keep = torch.ones_like(table.changes, dtype=torch.bool)
    keep.view(-1)[top] = False
    if bool((table.changes.flatten()[keep.flatten()] != 0).any()):
        small = dict(tables)
        small[layer.weight_name] = _restricted(table, keep)
        one = dict(case)
        one[layer.weight_name] = 1
        rest_bound = _row_split_margins(network, params, small, one, k, x, labels, nb_classes, first)
        small[layer.weight_name].memo.clear()
        bound = rest_bound if bound is None else torch.minimum(bound, rest_bound)
    if bound is None:  # nothing of this layer can change: the case is the suffix's
        bound = case_margins(suffix, params, tables, rest, k - 1, _apply(layer, params, h), labels, nb_classes)
    return bound


def first_flipped(network: Network, case: Case) -> int | None:
    """Index in ``network.layers`` of the first affine layer with a flip budget in ``case`` (``None``: none)."""
    return next(
        (i for i, layer in enumerate(network.layers) if layer.weighted and case.get(layer.weight_name, 0)), None
    )
