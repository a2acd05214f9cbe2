"""
Backward linear bounds with exact weight absorption (docs/theory.md §4b, the ``"linear"`` method; beyond the paper).

The margin specification ``C`` (rows ``e_y − e_i``) is propagated backward from the logits to the input, CROWN-style:
the state is a linear lower bound ``A·ĥ + c`` of the margins in terms of the input ``ĥ`` of the current layer, valid
for every weight perturbation in the ball and every ``ĥ`` in the interval box of §4. Each operator's backward rule
(:meth:`.Operator.backward`, :data:`BACKWARD_RULES`) maps the coefficients ``λ`` on its output to coefficients on its
input: the activations by their linear relaxations (ReLU as CROWN), batch norm, average pooling and flattening exactly,
max pooling by its window maxima (:mod:`art_weightpert.operators`). The affine layer ``ẑ = (W + Δ) ĥ + b + Δb``
(:mod:`.weight_terms`): ``λ·ẑ = (λW)·ĥ + λ·b + ⟨Δ, G⟩ + Δb·s`` with ``G`` the gradient of ``λ·ẑ`` in the weights and
``s_r = Σ_p λ_{r,p}``; the minimum over the ball is minus its support function at ``G``, bounded linearly in ``ĥ`` by
the weight ball's :meth:`.Ball.linear_term`. Box ``|Δ| ≤ δ``: ``−Σ δ ⊙ |G|``, on a Linear layer ``−(|λ|δ)·|ĥ|``,
folded into the coefficients for ``ĥ ≥ 0`` (exact absorption ``A ← λW − |λ|δ``), bounded by the chord of ``|ĥ|`` for a
signed ``ĥ``; on a convolution ``|G|`` is bounded by its chord over the box of ``G``. ``row_l1``: ``−Σ_r ε_r ‖G_r‖_∞``,
``l2``: ``−ε ‖G‖_F``, both bounded with ``|ĥ| ≤ m = max(|l|, |u|)`` or the box of ``G``. Bias balls are exact: minus
their support function at ``s``.

On a network with branches (docs/theory.md §9) the coefficients are accumulated per value in reverse topological order:
a residual addition passes its coefficients to every term, and they are summed where the paths meet again. Every affine
layer whose input depends on no perturbed weight (its box is exact: the first affine layer, or later ones when only
deeper layers are perturbed) is evaluated forward on that known input, where every ball's term is exact; coefficients
reaching any other exact value are concretized on it. :func:`linear_margin_bounds` returns the element-wise maximum
of this bound and the interval bound (both sound), so it is never looser than ``"interval"``.

Everything is plain torch, batched over samples and specifications, on the input's device; float64 for certificates
(docs/theory.md §5), differentiable in any dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from art_weightpert.certification.common import (
    BoundCache,
    Boxes,
    ParamBalls,
    abs_product_of,
    batched_dot,
    by_param_name,
    centre_of,
    check_batch,
    fill_label,
    margin_matrix,
    slice_boxes,
)
from art_weightpert.certification.interval import interval_margin_bounds, interval_preactivation_bounds
from art_weightpert.certification.weight_terms import (
    BackwardContext,
    affine_at_input,
    affine_backward,
    convolution_at_input_on_entries,
)
from art_weightpert.network import Add, Affine, Network
from art_weightpert.operators import rule_table
from art_weightpert.operators.max_pool import maxpool_activation_backward, put_back
from art_weightpert.rounding import (
    abs_dot,
    error_factor,
    finite_lower,
    magnitude,
    round_down,
    smallest_subnormal,
    underflow_error,
)
from art_weightpert.torch_tools import batch_slices, keep_freed_memory

BACKWARD_RULES = rule_table("backward", {Affine: affine_backward})
"""The backward rule of every operator (:meth:`.Operator.backward`) by operator class, the affine layer's with the
weight ball (:func:`.affine_backward`): ``(layer, λ on the output, box of the input, context) -> (λ on the input,
constant)``; an operator reading several values (an addition) gives every one of them the coefficients returned."""


# ------------------------------------------------------------------------------------------------------ bounds
def linear_boxes(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    cache: BoundCache | None,
    rounding: bool,
) -> Boxes:
    """The interval boxes the backward pass relaxes the activations on (:func:`.interval_preactivation_bounds`); with
    ``rounding`` their affine centres in float64 (docs/theory.md §5): the centres' rounding is of the size of the
    activations, and the relaxations would carry it into every margin."""
    return interval_preactivation_bounds(
        network, param_balls, x, params, scale, cache, rounding=rounding, float64_centres=rounding
    )


def other_classes(labels: torch.Tensor, nb_classes: int) -> torch.Tensor:
    """``(N, K − 1)``: every class but the label, in increasing order."""
    every = torch.arange(nb_classes, device=labels.device).expand(len(labels), -1)
    return every[every != labels.unsqueeze(1)].reshape(len(labels), nb_classes - 1)


def backward_margin_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    *,
    boxes: Boxes | None = None,
    classes: torch.Tensor | None = None,
    lower_slopes: dict[str, torch.Tensor] | None = None,
    rounding: bool = False,
) -> torch.Tensor:
    """
    The backward linear bound alone (docs/theory.md §4b), without the maximum with the interval bound.

    Parameters and return value as :func:`linear_margin_bounds`; ``lower_slopes``: optimized lower slopes of the
    activations (:attr:`.BackwardContext.lower_slopes`, α-CROWN, §11), ``(N, J) + value shape`` by activation name,
    ``J`` the specification rows (``classes``' columns, or ``K − 1`` without them); the batch is then one chunk.
    """
    param_balls = by_param_name(param_balls)
    x = x.to(dtype)
    scale = check_batch(x, labels, scale, dtype)
    chunked = None
    if lower_slopes is None:
        chunked = _in_chunks_if_large(
            backward_margin_bounds, network, param_balls, x, labels, dtype, scale, cache, boxes, classes, rounding
        )
    if chunked is not None:
        return chunked
    nb_classes = network.layers[-1].module.out_features
    params = network.params(dtype=dtype)
    if boxes is None:
        boxes = linear_boxes(network, param_balls, x, params, scale, cache, rounding)
    if classes is None:  # every class but the label (its row e_y − e_y is zero; +inf there): 1/K less work
        others = other_classes(labels, nb_classes)
        rows = backward_margin_bounds(
            network,
            param_balls,
            x,
            labels,
            dtype,
            scale,
            cache,
            boxes=boxes,
            classes=others,
            lower_slopes=lower_slopes,
            rounding=rounding,
        )
        return fill_label(rows.new_zeros((len(x), nb_classes)).scatter(1, others, rows), labels)
    ctx = BackwardContext(params, param_balls, scale, cache, lower_slopes, rounding)
    return _backward_chunk(network, x, labels, boxes, classes, ctx)


CHUNK_BYTES = 8 * 2**20
"""Bytes of the largest coefficient tensor ``(samples, specifications) + value shape`` of one chunk of the backward
pass. Every rule makes several tensors of that size; small ones stay in the processor's cache and are reused from the
heap (which :func:`.keep_freed_memory` keeps from being returned to the system between steps), while each chunk pays a
fixed cost of many small operations (about 2.7 ms for the 1x28x28 CNN's). Measured on one CPU core in float32 with
rounding terms, alternating in one process (2026-12-08): against 4 MiB, the 1x28x28 CNN 10% faster (its largest value,
the first convolution's 16x28x28 output, is only ever read at the pooling's window maxima), the MLP 784-512-512-10 2%,
the digits ResNet unchanged; 16 MiB makes the MLP 20% slower."""


def chunk_size(network: Network, x: torch.Tensor, nb_rows: int, dtype: torch.dtype) -> int:
    """Samples per chunk of the linear bound: :data:`CHUNK_BYTES` over the coefficients per sample of the largest value
    (``nb_rows`` specifications), at least 1 (the kernel-gradient boxes are chunked further:
    :data:`.KERNEL_CHUNK_BYTES`)."""
    largest = max(network.value_sizes(tuple(x.shape[1:])))
    return max(1, CHUNK_BYTES // (max(nb_rows, 1) * largest * torch.finfo(dtype).bits // 8))


def _in_chunks_if_large(bound, network, param_balls, x, labels, dtype, scale, cache, boxes, classes, rounding=False):
    """``bound``'s value computed by :func:`in_chunks` when the batch is larger than one chunk (:func:`chunk_size`),
    else ``None``. The chunks' temporaries are freed and allocated again at every step: the C allocator is first told
    to keep freed memory (:func:`.keep_freed_memory`)."""
    keep_freed_memory()
    nb_classes = network.layers[-1].module.out_features
    size = chunk_size(network, x, nb_classes - 1 if classes is None else classes.shape[1], dtype)
    if size >= len(x):
        return None
    fixed = dict(network=network, param_balls=param_balls, dtype=dtype, cache=cache)
    if rounding:
        fixed["rounding"] = True
    return in_chunks(bound, size, x, labels, scale, boxes, classes, **fixed)


def in_chunks(bound, size: int, x, labels, scale, boxes, classes, **fixed) -> torch.Tensor:
    """``bound`` (a margin bound with keyword arguments) on ``size`` samples at a time, concatenated: the same values,
    with every tensor of the pass ``size`` samples long."""
    parts = []
    for rows in batch_slices(len(x), size):
        parts.append(
            bound(
                x=x[rows],
                labels=labels[rows],
                scale=None if scale is None else scale[rows],
                boxes=None if boxes is None else slice_boxes(boxes, rows),
                classes=None if classes is None else classes[rows],
                **fixed,
            )
        )
    return torch.cat(parts)


def _backward_chunk(
    network: Network, x: torch.Tensor, labels: torch.Tensor, boxes: Boxes, classes: torch.Tensor, ctx: BackwardContext
) -> torch.Tensor:
    """The backward pass of :func:`backward_margin_bounds` on one chunk of samples: ``(N, J)``."""
    nb_classes = ctx.params[network.layers[-1].weight_name].shape[0]
    a = margin_matrix(labels, nb_classes, x.dtype).gather(1, classes.unsqueeze(2).expand(-1, -1, nb_classes))
    return backward_from(network, len(network.layers), a, x, boxes, ctx)


def backward_from(
    network: Network,
    value: int,
    a: torch.Tensor,
    x: torch.Tensor,
    boxes: Boxes,
    ctx: BackwardContext,
    *,
    rounding: bool | None = None,
    injections: Mapping[int, torch.Tensor] | None = None,
    stop: int = 0,
) -> torch.Tensor:
    """
    A lower bound of ``a · v`` over the ball, ``v`` the network's value ``value`` (indexed as
    :func:`.interval_preactivation_bounds`; ``len(network.layers)``: the logits), by the backward pass of §4b from
    that value to the input: ``(N, J)`` for coefficients ``a`` ``(N, J) + value shape``. The margins' bound starts at
    the logits with the specification rows; an intermediate value's box (α-CROWN's and branch and bound's
    intermediate bounds, docs/theory.md §11) starts there with ``±`` the identity. ``boxes`` must hold the values
    before ``value``; ``ctx`` carries the parameters, balls, radius factors, cache and optimized lower slopes.
    ``rounding`` (default: :attr:`.BackwardContext.rounding`): sound for the exact real-number network despite the
    floating-point evaluation (docs/theory.md §5; the boxes computed with ``rounding`` too): every rule subtracts its
    own rounding error, and here the sums of coefficients where paths meet and of the constants.

    ``injections``: coefficients ``(N, J) + value shape`` added to those reaching a value before its step, by value
    index (β-CROWN's multipliers of split constraints, docs/theory.md §11); ``stop``: the pass runs through the layers
    of index ``≥ stop`` only, and the coefficients then left on earlier values are concretized on their boxes (sound:
    every box holds on the whole ball, or branch); ``0``: to the input.
    """
    if rounding is not None and rounding != ctx.rounding:
        ctx = replace(ctx, rounding=rounding)
    injections = injections or {}
    if ctx.rounding:
        return _rounded_backward_from(network, value, a, x, boxes, ctx, injections, stop)
    pending = {value: a}  # value -> coefficients on it, (N, J) + the value's shape
    const = a.new_zeros(a.shape[:2])
    for index in range(value - 1, stop - 1, -1):  # reverse topological order (docs/theory.md §9)
        a = _injected(pending.pop(index + 1, None), injections.get(index + 1))
        if a is None:
            continue
        const = const + backward_step(network, index, a, boxes, ctx, pending)
    for v, a in pending.items():  # the input (a shortcut from it), or with ``stop`` values before that layer
        lo, hi = (x, x) if v == 0 else boxes[v]
        const = const + (batched_dot(a, lo) if lo is hi else _concretized(a, lo, hi))
    return const


def _injected(a: torch.Tensor | None, extra: torch.Tensor | None) -> torch.Tensor | None:
    """Coefficients ``a`` plus an injection ``extra`` (either may be ``None``)."""
    if extra is None:
        return a
    return extra if a is None else a + extra


def _concretized(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``min a · v`` over the box ``[lo, hi]``: ``a⁺·lo + a⁻·hi``, ``(N, J)``."""
    return batched_dot(a.clamp_min(0), lo) + batched_dot(a.clamp_max(0), hi)


def _rounded_backward_from(
    network: Network, value: int, a, x, boxes: Boxes, ctx: BackwardContext, injections: Mapping, stop: int
) -> torch.Tensor:
    """:func:`backward_from` with the rounding terms of docs/theory.md §5 that belong to no single rule: coefficients
    summed where ``k`` paths meet (an injection is one more) are within ``γ_k`` of their exact sum, ``γ_k ⟨|Λ|, m⟩``
    with ``m`` the value's magnitude; the constants, accumulated over ``L`` steps, within ``γ_L Σ|c|``; the final
    ``Λ₀·x`` (or ``Λ⁺·l + Λ⁻·u`` on an earlier value's box, with ``stop``) within ``γ_n ⟨|Λ₀|, m⟩``, and each of its
    products below the normal range within ``η/2``."""
    pending = {value: a}
    joins = Joins()
    const = a.new_zeros(a.shape[:2])
    total = a.new_zeros(a.shape[:2])  # Σ |c| of the steps' constants
    steps = 0
    dtype = a.dtype
    for index in range(value - 1, stop - 1, -1):
        a = pending.pop(index + 1, None)
        extra = injections.get(index + 1)
        if extra is not None:
            joins.add(index + 1, a)
            a = _injected(a, extra)
        if a is None:
            continue
        if joins.count.get(index + 1, 1) > 1:  # docs/theory.md §5: the join's sum rounded
            c = -joins.error(index + 1, a, magnitude(*boxes[index + 1]))
        else:
            c = 0.0
        c = c + backward_step(network, index, a, boxes, ctx, pending, joins)
        const, total, steps = const + c, total + c.abs(), steps + 1
    for v, a in pending.items():  # docs/theory.md §5: Λ₀·x (or a box's ends with ``stop``), plus the join there
        lo, hi = (x, x) if v == 0 else boxes[v]
        length, m = a[0, 0].numel(), magnitude(lo, hi)
        c = batched_dot(a, lo) if lo is hi else _concretized(a, lo, hi)
        c = c - abs_dot(a, m) * error_factor(length + 1 + joins.count.get(v, 1), dtype) - joins.partial_error(v, m)
        c = c - smallest_subnormal(dtype) * 4 * (length + 2)
        const, total, steps = const + c, total + c.abs(), steps + 1
    return round_down(finite_lower(const - total * error_factor(steps, dtype)))  # round_down(inf) would be finite


def backward_step(
    network: Network,
    index: int,
    a: torch.Tensor,
    boxes: Boxes,
    ctx: BackwardContext,
    pending: dict,
    joins: Joins | None = None,
    fuse_input_convolution: bool = True,
):
    """Move the coefficients ``a`` on the output of ``network.layers[index]`` onto the values it reads (accumulated in
    ``pending``, counted in ``joins`` when given, :class:`Joins`); return the constant collected on the way, ``(N, K)``.
    ``fuse_input_convolution=False``: a max pooling's fused rule leaves the convolution on the known input before it to
    its own step (whose coefficients the bit-flip bounds read) instead of evaluating it on the window maxima."""
    layer, reads = network.layers[index], network.inputs[index]
    if index + 1 < len(boxes) and boxes[index + 1][0] is boxes[index + 1][1]:  # an exact value: concretize
        v = boxes[index + 1][0]
        if ctx.rounding:  # docs/theory.md §5: the dot product's rounding, relative and below the normal range
            eta = smallest_subnormal(a.dtype) * 4 * (a[0, 0].numel() + 2)
            return batched_dot(a, v) - abs_dot(a, v.abs()) * error_factor(a[0, 0].numel(), a.dtype) - eta
        return batched_dot(a, v)
    lo, hi = boxes[reads[0]]
    if layer.weighted and lo is hi:  # its input depends on no perturbed weight: evaluate there exactly
        c = affine_at_input(layer, a, lo, centre_of(boxes, index + 1), abs_product_of(boxes, index + 1), ctx)
        return c - _underflow(layer, a, lo, lo) if ctx.rounding else c
    activation = _activation_before_pool(network, index)
    if activation is not None:  # both rules at once, on the windows' maxima only
        pre = network.inputs[activation][0]
        a_in, where, c = maxpool_activation_backward(
            layer, network.layers[activation], a, (lo, hi), boxes[pre], _pooled_context(ctx)
        )
        if ctx.rounding:  # the coefficients' underflow, against the pre-activation box they multiply
            c = c - _underflow(layer, a, *boxes[pre])
        conv = _convolution_at_input(network, pre, boxes) if fuse_input_convolution else None
        if conv is not None:  # and the convolution on the input before them, on those entries too
            h, known = boxes[network.inputs[conv][0]][0], (centre_of(boxes, pre), abs_product_of(boxes, pre))
            c = c + convolution_at_input_on_entries(network.layers[conv], a_in, where, h, *known, ctx)
            return c - _underflow(network.layers[conv], a_in, h, h) if ctx.rounding else c
        _accumulate(pending, pre, put_back(a_in, where, boxes[pre][0].shape), joins)
        return c
    a_in, c = BACKWARD_RULES[type(layer)](layer, a, lo, hi, ctx)
    if ctx.rounding and not isinstance(layer, Add):  # docs/theory.md §5: coefficients that fell below normal range
        c = c - _underflow(layer, a, lo, hi)
    for v in reads:  # an addition: the same coefficients on every term, summed where the paths meet again
        _accumulate(pending, v, a_in, joins)
    return c


def _underflow(layer, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The absolute part of the rounding of a step's coefficients (docs/theory.md §5): each entry of the coefficients
    on the input is a sum of at most ``a``'s entries per specification times the layer's weights, and each product
    below the normal range loses up to ``η/2``; against the input box, ``(N, 1)`` (broadcast over the rows)."""
    weight = getattr(getattr(layer, "module", None), "weight", None)
    length = a[0, 0].numel() + (weight.numel() if isinstance(weight, torch.Tensor) else 0)
    return underflow_error(length, magnitude(lo, hi))


def _pooled_context(ctx: BackwardContext) -> BackwardContext | None:
    """The context of an activation's rule on a max pooling's window maxima: none (plain CROWN lines), or with
    :attr:`.BackwardContext.rounding` one that only carries it (no optimized slopes, which cover the whole map)."""
    return replace(ctx, lower_slopes=None) if ctx.rounding else None


def _activation_before_pool(network: Network, index: int) -> int | None:
    """The index of the activation whose output only ``network.layers[index]`` reads, when that layer is a max pooling
    with :attr:`.MaxPool.disjoint_windows` (their rules then run together: :func:`.maxpool_activation_backward`)."""
    layer, value = network.layers[index], network.inputs[index][0]
    if not getattr(layer, "disjoint_windows", False) or value == 0:
        return None
    if not network.layers[value - 1].elementwise:
        return None
    return value - 1 if network.nb_readers(value) == 1 else None


def _convolution_at_input(network: Network, value: int, boxes: Boxes) -> int | None:
    """The index of the layer producing ``value`` when it is a 2-d convolution (one group) on a known input whose output
    only one layer reads (:func:`.convolution_at_input_on_entries` then applies)."""
    if value == 0:
        return None
    layer = network.layers[value - 1]
    if not layer.weighted or not layer.is_conv or layer.module.weight.dim() != 4 or layer.module.groups != 1:
        return None
    lo, hi = boxes[network.inputs[value - 1][0]]
    return value - 1 if lo is hi and network.nb_readers(value) == 1 else None


class Joins:
    """The sums of coefficients where paths meet, for their rounding terms (docs/theory.md §5): per value, how many
    coefficient tensors were summed into it (``count``) and ``Σ |s_j|`` over its partial sums before the last one
    (``partial``). Summing ``k`` tensors one after the other, the ``j``-th addition rounds within ``u |s_j|`` of its
    result ``s_j``, and a partial sum can exceed the final one (``1e8 + 1 − 1e8``): the error is at most
    ``u Σ_{j ≥ 2} |s_j|``, the final sum's part taken by ``γ_k ⟨|Λ|, m⟩`` and the others' by :meth:`partial_error`."""

    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.partial: dict[int, torch.Tensor] = {}

    def add(self, value: int, current: torch.Tensor | None) -> None:
        """Count one more tensor summed into ``value``'s coefficients, ``current`` (or ``None``) before it."""
        if current is not None and self.count.get(value, 1) >= 2:  # a third term or later: keep the partial sum
            self.partial[value] = self.partial[value] + current.abs() if value in self.partial else current.abs()
        self.count[value] = 1 if current is None else self.count.get(value, 1) + 1

    def error(self, value: int, a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The rounding of the join at ``value`` (``a``: its summed coefficients, ``m``: the value's magnitude)."""
        return abs_dot(a, m) * error_factor(self.count[value], a.dtype) + self.partial_error(value, m)

    def partial_error(self, value: int, m: torch.Tensor) -> torch.Tensor | float:
        """``u' ⟨Σ_j |s_j|, m⟩`` for the partial sums before the last one (0 when at most two terms met)."""
        partial = self.partial.pop(value, None)
        return 0.0 if partial is None else abs_dot(partial, m) * error_factor(2, partial.dtype)


def _accumulate(pending: dict, value: int, a: torch.Tensor, joins: Joins | None = None) -> None:
    if joins is not None:
        joins.add(value, pending.get(value))
    pending[value] = pending[value] + a if value in pending else a


def linear_margin_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    *,
    boxes: Boxes | None = None,
    classes: torch.Tensor | None = None,
    rounding: bool = False,
) -> torch.Tensor:
    """
    Lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball by backward linear propagation with
    exact weight absorption (docs/theory.md §4b), never looser than the interval bound (§4).

    Arguments as :func:`.interval_margin_bounds` (the signature of every bound, :mod:`.registry`); ``boxes`` must be
    computed with the same ``scale`` (and ``rounding``); ``classes`` ``(N, J)``: bound only the margins ``f_y − f_i``
    of these classes; ``rounding``: sound for the exact real-number network despite the floating-point evaluation in
    ``dtype`` (docs/theory.md §5).

    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column: the element-wise maximum of the backward
        linear bound and the interval bound; ``(N, J)`` with ``classes``.
    """
    param_balls = by_param_name(param_balls)
    x = x.to(dtype)
    scale = check_batch(x, labels, scale, dtype)
    chunked = _in_chunks_if_large(
        linear_margin_bounds, network, param_balls, x, labels, dtype, scale, cache, boxes, classes, rounding
    )
    if chunked is not None:  # the same bound, a chunk of samples at a time (CHUNK_BYTES)
        return chunked
    if boxes is None:
        params = network.params(dtype=dtype)
        boxes = linear_boxes(network, param_balls, x, params, scale, cache, rounding)
    backward = backward_margin_bounds(
        network, param_balls, x, labels, dtype, scale, cache, boxes=boxes, classes=classes, rounding=rounding
    )
    interval = interval_margin_bounds(
        network, param_balls, x, labels, dtype, scale, cache, boxes=boxes, rounding=rounding
    )
    interval = interval if classes is None else interval.gather(1, classes)
    return torch.maximum(backward, interval)
