"""
Pair terms of bit flips (docs/theory.md §8): per weight and allowed bit, the change ``D`` of the weight (``s·d_b(c)``
for integer codes, ``w' − w`` for float encodings), and the selection of the ``k`` most negative terms ``min(G_w D)``
over a box ``G_w ∈ [gmin, gmax]`` of the weight's coefficient ``G_w`` in a bound.

A flip of bit ``b`` of weight ``w`` adds ``D_{w,b} G_w`` to a bound that is linear in the weights with coefficient
``G_w``; over the box its minimum is ``D⁺ gmin + D⁻ gmax`` (``D⁺ = max(D, 0)``, ``D⁻ = min(D, 0)``). The ``n_bits``
terms of every weight are never materialized for every weight: the most negative term of weight ``w`` is
``min(P_w gmin, N_w gmax, 0)`` with ``P_w`` its largest positive change and ``N_w`` its most negative one; the ``k``
weights with the most negative such term hold every one of the ``k`` most negative pair terms (a weight outside them
has all its terms above the ``k``-th of these maxima), so only their ``k·n_bits`` pair terms are expanded. Exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from art_weightpert.flips import check_bit_positions
from art_weightpert.float_bits import FloatWeights, check_float_bits, mantissa_bits, sign_bit
from art_weightpert.network import Affine
from art_weightpert.quantization import QuantizedWeights, as_weight_classifier, check_quantization_args
from art_weightpert.rounding import down_cast, error_factor, finite_box, smallest_subnormal, up_cast
from art_weightpert.torch_tools import batch_slices
from art_weightpert.validation import check_choice

ENCODINGS = ("int", "float")

# Elements of a (samples, specifications, weights) tensor processed at once; bounds the memory of the pair terms.
CHUNK_ELEMENTS = 1 << 22


@dataclass(eq=False)
class FlipTable:
    """The single-flip changes of one quantized weight, rows (output units) by flattened fan-in.

    :param changes: ``(rows, fan_in, n_bits)`` float64, ``s·d_b(c)`` of every weight and bit.
    :param largest: ``(rows, fan_in)``, the largest positive change of each weight (0 if none).
    :param smallest: ``(rows, fan_in)``, the most negative change of each weight (0 if none).
    :param memo: :func:`neuron_flip_box` results by input box and budget, valid for one bound computation (the owner
        clears it).
    """

    changes: torch.Tensor
    largest: torch.Tensor
    smallest: torch.Tensor
    memo: dict = field(default_factory=dict)
    exact: torch.Tensor | None = None
    """The float64 changes when ``changes`` were cast to a narrower dtype (:func:`cast_table`), else ``None``."""

    @classmethod
    def of(cls, changes: torch.Tensor, exact: torch.Tensor | None = None) -> FlipTable:
        """The table of ``changes`` ``(rows, fan_in, n_bits)``, its largest and most negative change per weight."""
        return cls(changes, changes.clamp_min(0).amax(dim=2), changes.clamp_max(0).amin(dim=2), exact=exact)


def check_flip_args(
    estimator: Any, encoding: Any, n_bits: Any, granularity: Any, layers: Any, bits: Any
) -> tuple[int, ...] | None:
    """
    Validate the threat model of a k-flip certificate (docs/theory.md §8).

    :return: the allowed bit positions: ``bits`` sorted, or ``None`` (every bit) for integer codes; for float weights,
        the sign and mantissa bits by default.
    :raises ValueError: an unknown encoding, bad quantization arguments, unknown layers, or a bit position outside the
        encoding (names ``bits``).
    :raises TypeError: float encoding of weights that are not float32, float16, bfloat16 or float64.
    """
    check_choice(encoding, "encoding", ENCODINGS)
    if encoding == "float":
        dtype = FloatWeights.from_estimator(estimator, layers).dtype  # layers and dtype checked
        return check_float_bits((*mantissa_bits(dtype), sign_bit(dtype)) if bits is None else bits, dtype)
    check_quantization_args(n_bits, granularity, layers, as_weight_classifier(estimator).base_model)
    return check_bit_positions(bits, n_bits)


def encode_weights(
    estimator: Any, encoding: str, n_bits: int, granularity: str, layers: Any, bits: tuple[int, ...] | None
) -> QuantizedWeights | FloatWeights:
    """The weights that may flip: the quantized codes (``"int"``) or the float weights with their allowed bits."""
    if encoding == "float":
        return FloatWeights.from_estimator(estimator, layers, bits)
    return QuantizedWeights.from_estimator(estimator, n_bits, granularity, layers)


def flip_changes(weights: QuantizedWeights | FloatWeights, name: str, bits: tuple[int, ...] | None) -> torch.Tensor:
    """``weights.bit_changes(name)`` restricted to the allowed bits: ``(len(bits),) + weight shape`` float64."""
    changes = weights.bit_changes(name)
    return changes if bits is None or isinstance(weights, FloatWeights) else changes[list(bits)]


def flip_tables(
    quantized: QuantizedWeights | FloatWeights,
    layers: list[Affine],
    device: torch.device,
    bits: tuple[int, ...] | None = None,
) -> dict[str, FlipTable]:
    """``{weight name: FlipTable}`` for the weights among ``layers`` that may flip (their allowed ``bits``)."""
    tables = {}
    for layer in layers:
        if layer.weight_name not in quantized.param_names:
            continue
        changes = flip_changes(quantized, layer.weight_name, bits).to(device)  # (bits,) + weight shape
        rows = changes.shape[1]
        changes = changes.reshape(len(changes), rows, -1).permute(1, 2, 0).contiguous()
        tables[layer.weight_name] = FlipTable.of(changes)
    return tables


def with_combined_changes(tables: dict[str, FlipTable], weights: QuantizedWeights | FloatWeights) -> dict | None:
    """The tables of a bound against two flips or more, where several flips of one float weight do not add
    (docs/theory.md §8.2); ``None`` where they add (integer codes, mantissa bits only). More entries per weight, each
    counting one flip, so that every set of flips of a weight is one entry per flip, or fewer:

    * sign and mantissa bits: after a sign flip the mantissa flips' changes change sign (``w'' = −(w + Σ d_j)``), so
      each mantissa bit also gets ``−d_j``;
    * exponent bits: an exponent flip scales the others; each weight gets the two ends of
      :meth:`.FloatWeights.combined_change_range` (every set of its flips changes it by a value between them).
    """
    if not isinstance(weights, FloatWeights):
        return None
    layout, bits = weights.layout, weights.bits
    if all(b in layout.mantissa_bits for b in bits):
        return None
    exponent = any(b in layout.exponent_bits for b in bits)
    mantissa = [i for i, b in enumerate(bits) if b in layout.mantissa_bits]
    out = {}
    for name, table in tables.items():
        if exponent:
            rows = table.changes.shape[0]
            ends = weights.combined_change_range(name)
            extra = torch.stack([e.reshape(rows, -1) for e in ends], dim=2).to(table.changes)
        else:
            extra = -table.changes[:, :, mantissa]
        changes = torch.cat([table.changes, extra], dim=2)
        out[name] = FlipTable.of(changes)
    return out


def cast_table(table: FlipTable, dtype: torch.dtype) -> FlipTable:
    """``table`` with its changes in ``dtype``, rounded away from zero (docs/theory.md §5: a pair term ``min(D·g, 0)``
    over a box only decreases when ``|D|`` grows with its sign, so the cast costs the terms no error term, also below
    the normal range; a change beyond the dtype's range becomes ``±inf`` and certifies nothing), and the float64
    changes kept in :attr:`FlipTable.exact` for the evaluation of single flips."""
    if table.changes.dtype == dtype:
        return table
    exact = table.changes
    changes = torch.where(exact > 0, up_cast(exact, dtype), down_cast(exact, dtype))
    return FlipTable.of(changes, exact)


def smallest_terms(
    gmin: torch.Tensor, gmax: torch.Tensor, changes: torch.Tensor, largest: torch.Tensor, smallest: torch.Tensor, k: int
) -> torch.Tensor:
    """
    The ``k`` most negative pair terms ``D⁺ gmin + D⁻ gmax`` over the last dimension (the weights), 0 where fewer
    are negative.

    :param gmin: ``(..., W)`` lower ends of the coefficient box of every weight.
    :param gmax: ``(..., W)`` upper ends.
    :param changes: ``(..., W, n_bits)`` (broadcastable) single-flip changes.
    :param largest: ``(..., W)`` (broadcastable) largest positive change per weight.
    :param smallest: ``(..., W)`` (broadcastable) most negative change per weight.
    :param k: flips.
    :return: ``(..., min(k, W·n_bits))`` terms ≤ 0, ascending.
    """
    infinite = not bool(torch.isfinite(gmin.sum() + gmax.sum()))
    if infinite:  # an overflow or an infinite box end: its NaN (0·inf, inf − inf) would sort last and drop a flip
        gmin, gmax = finite_box(gmin, gmax)
    worst = _no_nan(torch.minimum(largest * gmin, smallest * gmax), infinite).clamp_max(0)
    if k == 1:  # the most negative term of a weight is its ``worst``: the smallest over the weights, no expansion
        return worst.amin(dim=-1, keepdim=True)
    nb = min(k, worst.shape[-1])
    idx = worst.topk(nb, dim=-1, largest=False).indices  # the weights holding the k most negative terms
    lo, hi = gmin.expand_as(worst).gather(-1, idx), gmax.expand_as(worst).gather(-1, idx)
    n_bits = changes.shape[-1]
    d = changes.expand(worst.shape + (n_bits,)).gather(-2, idx.unsqueeze(-1).expand(idx.shape + (n_bits,)))
    terms = _no_nan(d.clamp_min(0) * lo.unsqueeze(-1) + d.clamp_max(0) * hi.unsqueeze(-1), infinite)
    terms = terms.flatten(-2).clamp_max(0)
    return terms.topk(min(k, terms.shape[-1]), dim=-1, largest=False).values


def _no_nan(terms: torch.Tensor, infinite: bool) -> torch.Tensor:
    """Pair terms with NaN (a product ``0·inf`` of an infinite coefficient end, whose exact term is finite but unknown)
    replaced by ``−inf``, when ``infinite``."""
    return torch.nan_to_num(terms, nan=-math.inf, posinf=math.inf, neginf=-math.inf) if infinite else terms


def rounds(t: torch.Tensor) -> bool:
    """Whether bounds computed on ``t`` carry the rounding-error terms of docs/theory.md §5: every dtype narrower than
    float64 (float64 bounds are accepted above their relative tolerance, :func:`.certification_rtol`)."""
    return t.dtype != torch.float64


def sound_sum(total: torch.Tensor, count: int) -> torch.Tensor:
    """A lower bound of the exact sum of ``count`` exact pair terms ``D·g`` from the floating-point sum ``total`` of
    their computed values (docs/theory.md §5): every term is ≤ 0, each computed within ``u`` of ``D·g`` (one product,
    its sign exact; ``D`` rounded away from zero by :func:`cast_table`) and ``η/2`` below the normal range, the sum
    within ``γ_count``; as the selection of the ``k`` most negative uses the computed values, the exact ``k`` most
    negative sum at least this much. Unchanged in float64."""
    if not rounds(total) or count == 0:
        return total
    return total * (1 + error_factor(count + 2, total.dtype)) - count * smallest_subnormal(total.dtype)


def sum_smallest(candidates: list[torch.Tensor], k: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Sum of the ``k`` most negative entries among the candidate lists ``(..., m_i)`` (0 for no candidate), a sound
    lower bound of the exact one when the bounds round (:func:`sound_sum`)."""
    if not candidates or k == 0:
        return like.new_zeros(shape)
    pool = torch.cat(candidates, dim=-1)
    nb = min(k, pool.shape[-1])
    return sound_sum(pool.topk(nb, dim=-1, largest=False).values.sum(dim=-1), nb)


def chunked(fn, n: int, per_sample: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*tensors)`` evaluated on slices of the first dimension so that each slice holds at most
    :data:`CHUNK_ELEMENTS` elements of size ``per_sample`` per sample."""
    step = max(1, CHUNK_ELEMENTS // max(1, per_sample))
    if n <= step:
        return fn(*tensors)
    return torch.cat([fn(*(t[b] for t in tensors)) for b in batch_slices(n, step)])


def _patch_boxes(layer: Affine, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input patches of a convolution for every output channel: ``(N, O, P, fan_in)`` lower and upper ends."""
    mod = layer.module
    out_channels, groups = mod.out_channels, mod.groups
    group_of = torch.arange(out_channels, device=lo.device) // (out_channels // groups)

    def patches(t):
        cols = torch.nn.functional.unfold(t, mod.kernel_size, mod.dilation, layer.padding, mod.stride)
        cols = cols.reshape(len(t), groups, -1, cols.shape[-1]).index_select(1, group_of)  # (N, O, J, P)
        return cols.transpose(2, 3)

    return patches(lo), patches(hi)


def neuron_flip_terms(layer: Affine, table: FlipTable, lo: torch.Tensor, hi: torch.Tensor, k: int) -> torch.Tensor:
    """
    Per output unit of ``layer``, the sum of its own ``k`` most negative pair terms over the input box ``[lo, hi]``
    (docs/theory.md §8.1, interval method): a lower bound of the change of that unit by at most ``k`` flips of this
    layer. The upper bound is ``−neuron_flip_terms(layer, negated table, ...)``: see :func:`neuron_flip_box`.

    :return: a tensor shaped like the layer's output, ≤ 0.
    """
    changes, largest, smallest = table.changes, table.largest, table.smallest
    if not layer.is_conv:  # (N, 1, in) against rows (out, in)
        per_sample = changes.shape[0] * changes.shape[1]

        def run(a, b):
            terms = smallest_terms(a.unsqueeze(1), b.unsqueeze(1), changes, largest, smallest, k)
            return sound_sum(terms.sum(-1), terms.shape[-1])

        return chunked(run, len(lo), per_sample, lo, hi)
    rows = changes.shape[0]
    out_shape = None

    def run_conv(a, b):
        nonlocal out_shape
        pl, ph = _patch_boxes(layer, a, b)  # (n, O, P, J)
        terms = smallest_terms(pl, ph, changes.unsqueeze(1), largest.unsqueeze(1), smallest.unsqueeze(1), k)
        return sound_sum(terms.sum(-1), terms.shape[-1])

    spatial = layer.apply(lo[:1], torch.zeros_like(layer.module.weight, dtype=lo.dtype)).shape[2:]
    per_sample = rows * spatial.numel() * changes.shape[1]
    out = chunked(run_conv, len(lo), per_sample, lo, hi)
    return out.reshape((len(lo), rows) + tuple(spatial))


def neuron_flip_box(
    layer: Affine, table: FlipTable, lo: torch.Tensor, hi: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)``: per output unit, how far at most ``k`` flips of this layer can move it down (≤ 0) and up (≥ 0)
    for inputs in ``[lo, hi]``. Moving up by ``D ĥ`` is moving ``−z`` down by the negated changes. Memoized in
    ``table.memo`` by the identity of the input tensors (kept alive there) and ``k``."""
    key = (id(lo), id(hi), k)
    if key not in table.memo:
        down = neuron_flip_terms(layer, table, lo, hi, k)
        negated = FlipTable(-table.changes, -table.smallest, -table.largest)
        up = -neuron_flip_terms(layer, negated, lo, hi, k)
        table.memo[key] = ((down, up), (lo, hi))
    return table.memo[key][0]
