"""
Exact flip sets of the first flipped convolution (docs/theory.md §8.1, §11): a case bound of
:meth:`.BitFlipCertifier.verify` that keeps the single flips of the first flipped layer ``f`` (a convolution whose
input is known) as points rather than one box.

A flip of kernel entry ``(r, col)`` of ``f`` by ``D`` moves output channel ``r`` alone, by ``D`` times the input patch
of ``col`` (``δ_j``); after the elementwise activation ``σ`` that follows ``f`` the change of the activated output is
``e_j = σ(z_r + δ_j) − σ(z_r)``, in channel ``r`` only. For at most two flips (integer codes: the changes of two bits
add, also within one weight) the activated output moves by ``e_i + e_j`` when the flips are in different channels
(exactly: channels do not interact through ``σ``) and by ``e_{ij} = σ(z_r + δ_i + δ_j) − σ(z_r)`` when they share
channel ``r``. The next convolution ``g`` is linear, so its output moves by ``g(e_i) + g(e_j)`` or ``g(e_{ij})``.

The flips are ranked by ``‖g(e_j)‖₁``; the :data:`NB_POINTS` largest are *points*, the others *small*. The branches:

* points: each large flip alone; with two flips, each pair of large flips and each same-channel pair with a large flip,
  the input of ``g`` known exactly (the rest bounded as a case of its own with the later layers' budgets);
* one flip: per channel of ``f``, its small flips (or none) as one group;
* two flips: per large flip, that flip plus at most one small flip of another channel; and the group of at most two
  small flips (the same-channel pairs enumerated).

A group is bounded from ``g``'s output: its box is the output of the group's fixed part plus the members' exact
entrywise extremes (the two most negative per-channel extremes for two flips); the backward pass from the margins gives
``λ·z_g + c`` over that box, and ``min λ·g(e)`` over the members is exact. With a flip of ``g`` budgeted, a group is
split on ``g``'s output channel holding that flip's box. The minimum over the branches is the case's bound: every set of
flips of the case lies in a branch, every branch bound is sound.
"""

from __future__ import annotations

import functools

import torch

from art_weightpert.certification.bit_flip_bounds import (
    Case,
    backward_pass,
    flip_boxes,
    interval_margins,
    neuron_flip_box,
)
from art_weightpert.certification.bit_flip_terms import FlipTable, sum_smallest
from art_weightpert.network import Network
from art_weightpert.operators.tensors import concretize

MAX_PAIR_FLIPS = 2048
"""Most (weight, bit) pairs of the first flipped layer for which its flip pairs are enumerated (two flips)."""

MAX_SINGLE_FLIPS = 65536
"""Most (weight, bit) pairs of the first flipped layer enumerated one by one (one flip)."""

_CHUNK = 1 << 22  # elements per intermediate tensor (memory)

NB_POINTS = 96
"""The largest single flips of the first flipped layer (by their effect on the next layer) kept as exact points."""

POINT_CHUNK = 2048
"""Points bounded at once."""

MAX_SAME_ROW_PAIRS = 100_000
"""Most pairs of flips within one output channel of the first flipped layer (two flips)."""


def _apply(layer, params: dict, h: torch.Tensor) -> torch.Tensor:
    if layer.weighted:
        return layer.apply(h, params[layer.weight_name], params[layer.bias_name] if layer.bias_name else None)
    return layer.apply(h)


def applicable(network: Network, tables: dict[str, FlipTable], case: Case, k: int, first: int | None) -> bool:
    """Whether :func:`first_layer_margins` bounds ``case``: its first flipped layer ``first`` is an ungrouped
    convolution with 1 or 2 flips (at most :data:`MAX_PAIR_FLIPS` pairs for 2), followed by an elementwise activation
    and an ungrouped convolution ``g`` that is not the last layer, and the case's budgets add up to ``k``."""
    if first is None or first + 3 >= len(network.layers):
        return False
    layers = network.layers
    f, act, g = layers[first], layers[first + 1], layers[first + 2]
    if not (f.weighted and f.is_conv and f.module.groups == 1 and act.elementwise and g.weighted and g.is_conv):
        return False
    if g.module.groups != 1:
        return False
    k_f = case.get(f.weight_name, 0)
    pairs = int((tables[f.weight_name].changes != 0).sum())
    if k_f not in (1, 2) or (k_f == 2 and pairs > MAX_PAIR_FLIPS) or pairs > MAX_SINGLE_FLIPS:
        return False
    if k_f == 2:
        per_row = (tables[f.weight_name].changes != 0).flatten(1).sum(1)
        if int((per_row * (per_row - 1) // 2).sum()) > MAX_SAME_ROW_PAIRS:
            return False
    return sum(case.values()) == k


def _flips(table: FlipTable):
    """``(row, col, change)`` of every (weight, bit) pair that changes something."""
    changes = table.changes
    fan_in, n_bits = changes.shape[1], changes.shape[2]
    flat = changes.flatten()
    idx = (flat != 0).nonzero().flatten()
    return idx // (fan_in * n_bits), (idx // n_bits) % fan_in, flat[idx]


def _same_row_pairs(row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs ``i < j`` of flips in the same output row (distinct (weight, bit) pairs)."""
    i, j = torch.triu_indices(len(row), len(row), 1, device=row.device)
    keep = row[i] == row[j]
    return i[keep], j[keep]


def _g_of_channel(g, weight: torch.Tensor, e: torch.Tensor, channel: int) -> torch.Tensor:
    """``g``'s linear part applied to the change ``e`` ``(M, H, W)`` of input channel ``channel`` alone:
    ``(M, out)`` flattened."""
    mod = g.module
    w = weight[:, channel : channel + 1]
    out = torch.nn.functional.conv2d(e.unsqueeze(1), w, None, mod.stride, g.padding, mod.dilation)
    return out.flatten(1)


def first_layer_margins(
    network: Network,
    params: dict,
    tables: dict[str, FlipTable],
    case: Case,
    k: int,
    x: torch.Tensor,
    labels: torch.Tensor,
    nb_classes: int,
    first: int,
) -> torch.Tensor:
    """Margin lower bounds ``(N, K)`` (label column included) of ``case`` with the flips of the first flipped layer
    ``first`` enumerated (see the module docstring; check :func:`applicable` first)."""
    out = [
        _one_sample(network, params, tables, case, k, x[i : i + 1], labels[i : i + 1], nb_classes, first)
        for i in range(len(x))
    ]
    return torch.cat(out)


def _tail(network, params, tables, case, k_rest, first, points, labels, nb_classes):
    """Margin lower bounds ``(B, K)`` of the layers from ``g`` (``first + 2``) on, from known inputs ``points`` of
    ``g`` with the later layers' budgets (``k_rest`` flips in all): interval and backward bounds, or with flips of
    ``g`` itself budgeted, :func:`.case_margins` on that suffix (its row split on ``g``'s output channels)."""
    layers = network.layers
    tail = Network(network.model, layers[first + 2 :])
    g = layers[first + 2]
    if case.get(g.weight_name, 0) and g.weight_name in tables:
        from art_weightpert.certification.bit_flip_cases import case_margins  # noqa: PLC0415

        return case_margins(tail, params, tables, case, k_rest, points, labels, nb_classes)
    boxes = flip_boxes(tail, params, tables, case, points, points)
    interval = interval_margins(tail, params, tables, case, boxes, labels, nb_classes)
    a, const, candidates = backward_pass(tail, params, tables, case, boxes, labels, nb_classes)
    if a is not None:
        const = const + concretize(a, *boxes[0])
    const = const + sum_smallest(candidates, k_rest, const.shape, const)
    return torch.maximum(interval, const)


def _one_sample(
    network, params, tables, case, k, x, labels, nb_classes, first, nb_points: int | None = None
) -> torch.Tensor:
    layers = network.layers
    h = x
    for layer in layers[:first]:
        h = _apply(layer, params, h)
    f, act, g = layers[first], layers[first + 1], layers[first + 2]
    k_f = case[f.weight_name]
    k_rest = k - k_f
    z = _apply(f, params, h)[0]  # (R, H, W)
    clean = act.apply(z)
    rows_n = z.shape[0]
    row, col, change = _flips(tables[f.weight_name])
    mod = f.module
    fan_in = mod.weight[0].numel()
    eye = torch.eye(fan_in, dtype=h.dtype, device=h.device).reshape((fan_in,) + tuple(mod.weight.shape[1:]))
    basis = f.apply(h, eye)[0]  # (fan_in, H, W): the output map per unit change of each kernel entry
    delta = change.reshape(-1, 1, 1) * basis[col]  # (F, H, W)
    e = act.apply(z[row] + delta) - act.apply(z[row])  # (F, H, W), in channel row[j]
    weight_g = params[g.weight_name]
    nf = len(e)
    big_d = torch.cat([_g_of_channel(g, weight_g, e[row == r], r) for r in range(rows_n)]) if nf else None
    order = torch.cat([(row == r).nonzero().flatten() for r in range(rows_n)])
    g_change = torch.empty_like(big_d)
    g_change[order] = big_d  # (F, width): g's output change per flip
    score = g_change.abs().sum(1)
    nb_big = min(NB_POINTS if nb_points is None else nb_points, nf)
    big = score.topk(nb_big).indices
    is_big = torch.zeros(nf, dtype=torch.bool, device=z.device)
    is_big[big] = True
    lab = labels.reshape(1)

    def dense(changes, rows):  # (M, H, W) changes of channels ``rows`` -> (M, R, H, W) activated outputs
        out = clean.unsqueeze(0).repeat(len(changes), 1, 1, 1)
        out[torch.arange(len(changes), device=z.device), rows] += changes
        return out

    results = []
    # Points: the large flips alone; with two flips, the pairs of two large flips and the same-channel pairs with
    # one large flip.
    point_e, point_rows = [e[big]], [row[big]]
    if k_f == 2:
        i, j = torch.triu_indices(nb_big, nb_big, 1, device=z.device)
        bi, bj = big[i], big[j]
        cross = row[bi] != row[bj]
        results.append(("cross", bi[cross], bj[cross]))
        same_i, same_j = _same_row_pairs(row, col)
        involve = is_big[same_i] | is_big[same_j]
        si, sj = same_i[involve], same_j[involve]
        point_e.append(act.apply(z[row[si]] + delta[si] + delta[sj]) - act.apply(z[row[si]]))
        point_rows.append(row[si])
    pe, pr = torch.cat(point_e), torch.cat(point_rows)
    bounds = []
    if len(pe):
        pts = dense(pe, pr)
        if k_f == 2 and len(results[0][1]):
            _, ci, cj = results[0]
            two = dense(e[ci], row[ci])
            two[torch.arange(len(cj), device=z.device), row[cj]] += e[cj]
            pts = torch.cat([pts, two])
        bounds.append(_chunked_tail(network, params, tables, case, k_rest, first, pts, lab, nb_classes).amin(0, True))
    small = ~is_big
    shared = (network, params, tables, case, k_rest, first, clean, e, row, g_change)
    group = functools.partial(_group_bound, *shared, lab=lab, nb_classes=nb_classes)
    if k_f == 1:  # the small flips, one group per channel
        for r in range(rows_n):
            members = [(small & (row == r)).nonzero().flatten()]
            if len(members[0]):
                bounds.append(group(members))
    else:
        # one large flip with a small flip in another channel (or none): one group per large flip
        for b in big.tolist():
            bounds.append(group([(small & (row != row[b])).nonzero().flatten()], fixed=b))
        # two small flips (any channels), one, or none
        same_i, same_j = _same_row_pairs(row, col)
        keep = small[same_i] & small[same_j]
        si, sj = same_i[keep], same_j[keep]
        pair_e = act.apply(z[row[si]] + delta[si] + delta[sj]) - act.apply(z[row[si]])
        bounds.append(group([small.nonzero().flatten()], pairs=(pair_e, row[si]), two=True))
    return torch.cat(bounds).amin(0, keepdim=True)


def _chunked_tail(network, params, tables, case, k_rest, first, pts, lab, nb_classes) -> torch.Tensor:
    """:func:`_tail` on chunks of :data:`POINT_CHUNK` points: ``(B, K)``."""
    out = []
    for start in range(0, len(pts), POINT_CHUNK):
        p = pts[start : start + POINT_CHUNK]
        try:
            out.append(_tail(network, params, tables, case, k_rest, first, p, lab.expand(len(p)), nb_classes))
        finally:
            for t in tables.values():
                t.memo.clear()
    return torch.cat(out)


def _group_bound(
    network,
    params,
    tables,
    case,
    k_rest,
    first,
    clean,
    e,
    row,
    g_change,
    members,
    lab,
    nb_classes,
    fixed: int | None = None,
    pairs=None,
    two: bool = False,
):
    """One branch whose change of ``g``'s input is: the flip ``fixed`` (if any) plus at most one (``two``: two) flips
    of ``members[0]``, or one of the same-channel ``pairs`` changes (``two`` only). Bounded from ``g``'s output: its
    box is the clean output plus the members' exact entrywise extremes; with flips of ``g`` budgeted, one branch per
    output channel of ``g`` holding the flip's box (a flip of a kernel entry moves one output channel). The linear
    term of the members is exact: ``min λ·g(e)`` over them."""
    layers = network.layers
    g = layers[first + 2]
    weight_g = params[g.weight_name]
    mem = members[0]
    rows_n = clean.shape[0]
    width = g_change.shape[1]
    base = clean.clone()
    if fixed is not None:
        base[row[fixed]] += e[fixed]
    # per channel of f: extremes of the members' changes of g's input and output (0 included: no flip)
    h_lo, h_hi = torch.zeros_like(clean), torch.zeros_like(clean)
    gl = clean.new_zeros((rows_n, width))
    gh = clean.new_zeros((rows_n, width))
    for r in range(rows_n):
        sel = mem[row[mem] == r]
        if len(sel):
            h_lo[r], h_hi[r] = e[sel].amin(0).clamp_max(0), e[sel].amax(0).clamp_min(0)
            gl[r], gh[r] = g_change[sel].amin(0).clamp_max(0), g_change[sel].amax(0).clamp_min(0)
    nb = min(2 if two else 1, rows_n)
    down = gl.topk(nb, dim=0, largest=False).values.sum(0)
    up = gh.topk(nb, dim=0).values.sum(0)
    pair_g = []
    if pairs is not None and len(pairs[0]):
        pe, pr = pairs
        for r in range(rows_n):
            sel = (pr == r).nonzero().flatten()
            if len(sel):
                h_lo[r] = torch.minimum(h_lo[r], pe[sel].amin(0))
                h_hi[r] = torch.maximum(h_hi[r], pe[sel].amax(0))
                d = _g_of_channel(g, weight_g, pe[sel], r)  # (M, width)
                pair_g.append(d)
                down, up = torch.minimum(down, d.amin(0)), torch.maximum(up, d.amax(0))
    z_g = _apply(g, params, base.unsqueeze(0))  # (1, C, H, W)
    shape = z_g.shape
    out_lo, out_hi = z_g + down.reshape(shape), z_g + up.reshape(shape)
    table_g, k_g = tables.get(g.weight_name), case.get(g.weight_name, 0)
    nb_branches = 1
    flip_box = None
    if table_g is not None and k_g:
        in_lo, in_hi = (base + h_lo).unsqueeze(0), (base + h_hi).unsqueeze(0)
        moved_down, moved_up = neuron_flip_box(g, table_g, in_lo, in_hi, k_g)
        nb_branches = shape[1]
        eye = torch.eye(nb_branches, dtype=z_g.dtype, device=z_g.device).reshape(
            (nb_branches, nb_branches) + (1,) * (z_g.dim() - 2)
        )
        flip_box = (moved_down * eye, moved_up * eye)  # (B, C, H, W): branch b, the flip's box in channel b
        out_lo, out_hi = out_lo + flip_box[0], out_hi + flip_box[1]
    labels = lab.expand(nb_branches)
    suffix = Network(network.model, layers[first + 3 :])
    boxes = flip_boxes(suffix, params, tables, case, out_lo, out_hi)
    interval = interval_margins(suffix, params, tables, case, boxes, labels, nb_classes)
    a, const, candidates = backward_pass(suffix, params, tables, case, boxes, labels, nb_classes)
    for t in tables.values():
        t.memo.clear()
    const = const + sum_smallest(candidates, k_rest - k_g if flip_box is not None else k_rest, const.shape, const)
    const = const + concretize(a, z_g.expand_as(out_lo), z_g.expand_as(out_lo))
    if flip_box is not None:
        const = const + concretize(a, *flip_box)
    af = a.flatten(2)  # (B, K, width)
    single = af.new_zeros(af.shape[:2] + (rows_n,))
    for r in range(rows_n):
        sel = mem[row[mem] == r]
        if len(sel):
            single[:, :, r] = (af @ g_change[sel].T).amin(2).clamp_max(0)
    term = single.topk(nb, dim=2, largest=False).values.sum(2)
    for d in pair_g:
        term = torch.minimum(term, (af @ d.T).amin(2))
    return torch.maximum(interval, const + term).amin(0, keepdim=True)
