"""
Optimized linear bounds for weight perturbations (docs/theory.md §11, the ``"alpha"`` method: α-CROWN, Xu et al.
ICLR 2021, on top of the backward bound with exact weight absorption of §4b; beyond the paper).

The backward bound of §4b loses only through the relaxations of the activations and the boxes of their inputs. This
module tightens both:

1. **Intermediate boxes by backward passes** (full CROWN, §11): the box of every activation's input is intersected
   with the backward bound of ``±e_k·v`` from that value (:func:`.backward_from`) for the neurons whose relaxation is
   not exact (the unstable ones of a ReLU), in topological order, and the interval boxes of §4 after it are
   propagated again from the tightened ones. The backward passes cost ``O(depth²)``; a budget of coefficient entries
   per sample (``intermediate_budget``) stops the tightening where it would exceed it (deep residual networks).
2. **Optimized lower slopes** (α, §11): any lower slope ``α ∈ [0, 1]`` of an unstable ReLU (``[slope, 1]`` of a
   LeakyReLU) gives a sound bound (:meth:`.ActivationFunction.optimizable_lower`); ``α`` is optimized per sample, per
   specification row and per neuron by projected gradient ascent (Adam) on the margin lower bound, from CROWN's choice
   (``α = 1`` where ``u > −l``). Every iterate is a sound bound, and row ``j`` of the bound depends only on the slopes
   of row ``j``: the best iterate is kept per row.

:func:`alpha_margin_bounds` returns the element-wise maximum of these bounds and the ``"linear"`` bound
(:func:`.linear_margin_bounds`, itself never below ``"interval"``), so it is never looser than ``"linear"``. On a
network without ReLU-family activations step 2 changes nothing and step 1 alone applies.

Branch and bound (§11) calls :func:`optimized_bounds` per branch with ``splits`` (the phases fixed so far, as
:func:`.interval_preactivation_bounds` takes them); it also returns the boxes it used, so that the verifier can score
the unstable neurons. A branch whose boxes are empty (a clipped box with ``lo > hi``) contains no weight of the ball:
its samples get ``+inf`` bounds.

Everything is plain torch, batched over samples and specifications, float64 for certificates (§5). The slopes are
optimized with gradients enabled inside (also under the certifier's ``torch.no_grad()``), taken with
:func:`torch.autograd.grad` with respect to the slopes only: no parameter's ``.grad`` is touched.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch

from art_weightpert.certification.common import (
    BoundCache,
    Boxes,
    CentredBox,
    ParamBalls,
    by_param_name,
    check_batch,
    fill_label,
    margin_matrix,
    slice_boxes,
)
from art_weightpert.certification.interval import interval_margin_bounds, interval_preactivation_bounds
from art_weightpert.certification.linear import (
    _activation_before_pool,
    backward_from,
    linear_margin_bounds,
    other_classes,
)
from art_weightpert.certification.weight_terms import BackwardContext
from art_weightpert.network import Network
from art_weightpert.torch_tools import batch_slices

Splits = Mapping[int, tuple[torch.Tensor | None, torch.Tensor | None]]
"""Branch-and-bound splits: ``{value index: (floor, ceiling)}``, tensors of the value's shape ``(N, ...)`` or
``None`` (:func:`.interval_preactivation_bounds`)."""

ALPHA_STEPS = 20
"""Default gradient steps on the slopes (each one backward pass with gradients)."""

ALPHA_LR = 0.25
"""Default Adam learning rate of the slopes (they live in ``[0, 1]``)."""

INTERMEDIATE_STEPS = 0
"""Default gradient steps on the slopes of each intermediate bound."""

INTERMEDIATE_BUDGET = 30_000_000
"""Default budget of the intermediate backward passes: coefficient entries per sample, summed over the tightened
values (``2·J_v`` rows, ``J_v`` the unstable neurons of value ``v``, times the entries of every value before it)."""

SAMPLES_PER_CHUNK = 32
"""Samples optimized together by :func:`alpha_margin_bounds` (the slopes and coefficients of one chunk)."""

ROW_CHUNK_BYTES = 16 * 2**20
"""Bytes of the largest coefficient tensor of one intermediate backward pass (rows are split to stay below)."""

KINKED = ("relu", "leaky_relu")
"""Activation kinds whose relaxation is exact on a stable box: only their unstable neurons are tightened."""


# ------------------------------------------------------------------------------------------------------ public API
def alpha_margin_bounds(
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
    splits: Splits | None = None,
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    intermediate_budget: int = INTERMEDIATE_BUDGET,
    intermediate_steps: int = INTERMEDIATE_STEPS,
    samples_per_chunk: int = SAMPLES_PER_CHUNK,
    **kwargs,
) -> torch.Tensor:
    """
    Lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball by optimized backward linear bounds
    (docs/theory.md §11), never looser than :func:`.linear_margin_bounds`.

    Arguments as :func:`.linear_margin_bounds` (the signature of every bound, :mod:`.registry`); ``boxes`` (the
    :func:`.interval_preactivation_bounds` at the same ``scale``) are the starting point of the tightening.

    :param splits: branch-and-bound splits (:data:`Splits`); the bounds are then valid for that branch only.
    :param steps: gradient steps on the slopes (0: CROWN with the tightened boxes only).
    :param lr: Adam's learning rate for the slopes.
    :param intermediate_budget: coefficient entries per sample for the intermediate backward passes (0: interval boxes).
    :param intermediate_steps: gradient steps on the slopes of each intermediate bound (0: CROWN's slopes there).
    :param samples_per_chunk: samples optimized together.
    :param kwargs: passed to the ``"linear"`` bound and the backward passes where they accept them (``rounding``).
    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column; ``(N, J)`` with ``classes``.
    """
    param_balls = by_param_name(param_balls)
    x = x.to(dtype)
    scale = check_batch(x, labels, scale, dtype)
    nb_classes = network.layers[-1].module.out_features
    rows = other_classes(labels, nb_classes) if classes is None else classes
    options = dict(
        steps=steps, lr=lr, intermediate_budget=intermediate_budget, intermediate_steps=intermediate_steps, **kwargs
    )
    parts = []
    for chunk in batch_slices(len(x), max(1, samples_per_chunk)):
        part_splits = None if splits is None else {v: _slice_split(s, chunk) for v, s in splits.items()}
        bounds, _ = optimized_bounds(
            network, param_balls, x[chunk], labels[chunk], part_splits, dtype,
            None if scale is None else scale[chunk], cache,
            boxes=None if boxes is None else slice_boxes(boxes, chunk), classes=rows[chunk], **options,
        )  # fmt: skip
        parts.append(bounds)
    out = torch.cat(parts) if parts else x.new_zeros((0, rows.shape[1]))
    if classes is not None:
        return out
    return fill_label(out.new_zeros((len(x), nb_classes)).scatter(1, rows, out), labels)


def optimized_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    labels: torch.Tensor,
    splits: Splits | None = None,
    dtype: torch.dtype = torch.float64,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    *,
    boxes: Boxes | None = None,
    classes: torch.Tensor | None = None,
    steps: int = ALPHA_STEPS,
    lr: float = ALPHA_LR,
    intermediate_budget: int = INTERMEDIATE_BUDGET,
    intermediate_steps: int = INTERMEDIATE_STEPS,
    stop_above: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, Boxes]:
    """
    The optimized bounds of one batch (one branch of branch and bound, docs/theory.md §11) and the boxes they used.

    :param network: the model read by :func:`.read_network`.
    :param param_balls: the budget resolved on the model.
    :param x: inputs ``(N, ...)``.
    :param labels: classes ``(N,)``.
    :param splits: branch-and-bound splits (:data:`Splits`): every box, the tightened ones included, is clipped to
        them; the bounds and boxes are valid for that branch only.
    :param dtype: float64 for certificates.
    :param scale: per-sample radius factors ``(N,)``.
    :param cache: an optional :class:`.BoundCache`.
    :param boxes: interval boxes at the same ``scale`` (without the splits) to start from (their known centres are
        reused); computed when ``None``.
    :param classes: ``(N, J)`` the classes ``i`` of the margins ``f_y − f_i`` to bound (default: every other class).
    :param steps: gradient steps on the slopes.
    :param lr: Adam's learning rate.
    :param intermediate_budget: coefficient entries per sample for the intermediate backward passes.
    :param intermediate_steps: gradient steps on the slopes of each intermediate bound (0: CROWN's slopes there).
    :param stop_above: stop the slope optimization once every row's bound exceeds it (``None``: run every step).
    :param kwargs: passed to the bounds of §4–§4b where they accept them (``rounding``).
    :return: ``(bounds, boxes)``: lower bounds ``(N, J)`` (``+inf`` for samples whose branch is empty), never below
        the ``"linear"`` bound on the same branch; the boxes (as :func:`.interval_preactivation_bounds` indexes them)
        after the tightening, clipped to ``splits``. With gradients enabled (training) the bounds are differentiable
        in the parameters through the final backward pass at the best slopes and through the ``"linear"`` bound; the
        tightened boxes and the slopes are constants there.
    """
    _check_keywords(kwargs)
    param_balls = by_param_name(param_balls)
    x = x.to(dtype)
    scale = check_batch(x, labels, scale, dtype)
    nb_classes = network.layers[-1].module.out_features
    classes = other_classes(labels, nb_classes) if classes is None else classes
    wants_grad = torch.is_grad_enabled()
    params = network.params(dtype=dtype)
    known = {v: box.centre for v, box in enumerate(boxes or []) if isinstance(box, CentredBox)}
    if boxes is None or splits:
        boxes = _interval(network, param_balls, x, params, scale, cache, known, splits, kwargs)
    linear = _call(
        linear_margin_bounds, network, param_balls, x, labels, dtype, scale, cache, boxes=boxes, classes=classes,
        **kwargs,
    )  # fmt: skip
    if len(x) == 0:
        return linear, boxes
    with torch.no_grad():
        detached = {name: p.detach() for name, p in params.items()}
        ctx = _context(detached, param_balls, scale, cache, None, kwargs)
        tight, clipped = tighten_boxes(
            network, param_balls, x, detached, scale, cache, boxes, splits, intermediate_budget, ctx, known, kwargs,
            steps=intermediate_steps, lr=lr,
        )  # fmt: skip
    empty = _empty_branch(tight) | clipped
    spec = margin_matrix(labels, nb_classes, dtype).gather(1, classes.unsqueeze(2).expand(-1, -1, nb_classes))
    slopes = _initial_slopes(network, tight, classes.shape[1])
    best, best_slopes = _optimize_slopes(network, x, spec, tight, ctx, slopes, steps, lr, stop_above)
    if wants_grad and any(p.requires_grad for p in params.values()):  # the graph of the bound at the best slopes
        graph_ctx = _context(params, param_balls, scale, cache, best_slopes, kwargs)
        best = backward_from(network, len(network.layers), spec, x, tight, graph_ctx)
    interval = _call(
        interval_margin_bounds, network, param_balls, x, labels, dtype, scale, cache, boxes=tight, **kwargs
    ).gather(1, classes)
    out = torch.maximum(torch.maximum(best, interval), linear)
    out = torch.where(empty.unsqueeze(1), torch.full_like(out, math.inf), out)
    return out, tight


# ------------------------------------------------------------------------------------------------------ the boxes
def tighten_boxes(
    network: Network,
    param_balls: dict,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    scale: torch.Tensor | None,
    cache: BoundCache | None,
    boxes: Boxes,
    splits: Splits | None,
    budget: int,
    ctx: BackwardContext,
    known: Mapping[int, torch.Tensor] | None = None,
    kwargs: Mapping | None = None,
    steps: int = 0,
    lr: float = ALPHA_LR,
) -> tuple[Boxes, torch.Tensor]:
    """
    Intermediate boxes tightened by backward passes (full CROWN, docs/theory.md §11): for every activation's input in
    topological order, within ``budget`` coefficient entries per sample, the box of each neuron whose relaxation is not
    exact is intersected with the backward bounds of ``±e_k·v``; the interval boxes after it are propagated again
    (through :func:`.interval_preactivation_bounds`, the tightened boxes passed as clips with ``splits``). With
    ``steps``, the lower slopes of the activations before ``v`` are optimized for each of these bounds too (α-CROWN's
    intermediate α, one set of slopes per neuron and side).

    :return: the boxes, and per sample whether a tightened box crossed (``lo > hi`` beyond rounding) where the sample
        has splits: its branch is empty.
    """
    sizes = network.value_sizes(tuple(x.shape[1:]))
    clips: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = dict(splits or {})
    empty = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    # per sample, so that a sample's boxes do not depend on the batch it comes in: its own unstable neurons only, its
    # own spending; a sample stops at the first value that would exceed its budget
    spent = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    going = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for value, kinked in preactivation_values(network):
        lo, hi = boxes[value]
        if lo is hi or _exact_affine_output(network, value, boxes):
            continue
        select = (lo < 0) & (hi > 0) if kinked else lo < hi
        select = select.reshape(len(x), -1)
        cost = 2.0 * select.sum(dim=1) * sum(sizes[:value])
        going &= spent + cost <= budget
        spent += cost
        select &= going.unsqueeze(1)
        width = int(select.sum(dim=1).max()) if select.numel() else 0
        if width == 0:
            if not going.any():
                break
            continue
        lower, upper = _backward_box(network, value, select, width, x, boxes, ctx, steps, lr)
        new_lo, new_hi = torch.maximum(lo, lower), torch.minimum(hi, upper)
        crossed = new_lo > new_hi
        if crossed.any():  # rounding where the box is (nearly) a point; an empty branch where splits say so
            gap = (new_lo - new_hi) > max(1e-9, 1e3 * torch.finfo(x.dtype).eps) * (1 + new_hi.abs())
            if splits:
                empty |= (gap & crossed).reshape(len(x), -1).any(dim=1)
            new_lo, new_hi = torch.where(crossed, lo, new_lo), torch.where(crossed, hi, new_hi)
        floor, ceiling = clips.get(value, (None, None))
        clips[value] = (
            new_lo if floor is None else torch.maximum(new_lo, floor),
            new_hi if ceiling is None else torch.minimum(new_hi, ceiling),
        )
        boxes = _interval(network, param_balls, x, params, scale, cache, known, clips, kwargs or {})
    return boxes, empty


def preactivation_values(network: Network) -> list[tuple[int, bool]]:
    """``(value index, kinked)`` of every value an activation reads, in topological order; ``kinked``: every activation
    reading it is a ReLU or LeakyReLU (exact on stable boxes)."""
    readers: dict[int, list[bool]] = {}
    for layer, reads in zip(network.layers, network.inputs):
        if getattr(layer, "elementwise", False) and hasattr(layer, "function"):
            readers.setdefault(reads[0], []).append(layer.function.kind in KINKED)
    return [(value, all(kinds)) for value, kinds in sorted(readers.items())]


def _exact_affine_output(network: Network, value: int, boxes: Boxes) -> bool:
    """Whether ``value`` is an affine layer's output on an exact input (its box is already the exact range)."""
    if value == 0:
        return False
    layer = network.layers[value - 1]
    lo, hi = boxes[network.inputs[value - 1][0]]
    return layer.weighted and lo is hi


def _backward_box(
    network: Network,
    value: int,
    select: torch.Tensor,
    width: int,
    x: torch.Tensor,
    boxes: Boxes,
    ctx: BackwardContext,
    steps: int = 0,
    lr: float = ALPHA_LR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward lower and upper bounds of the entries of ``value`` chosen by ``select`` ``(N, size)`` (at most
    ``width`` per sample; the others are ``∓inf``), rows in chunks of :data:`ROW_CHUNK_BYTES`; with ``steps``, each
    row's bound optimized over the lower slopes of the activations before ``value``."""
    n, size = select.shape
    shape = boxes[value][0].shape[1:]
    # the selected entries first, then others (their bounds are sound too): `width` distinct entries per sample
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :width]
    lower = torch.full((n, size), -math.inf, dtype=x.dtype, device=x.device)
    upper = torch.full((n, size), math.inf, dtype=x.dtype, device=x.device)
    largest = max(network.value_sizes(tuple(x.shape[1:]))[: value + 1])
    per_row = max(1, n * largest * x.element_size())
    step = max(1, ROW_CHUNK_BYTES // (2 * per_row))
    for start in range(0, width, step):
        idx = order[:, start : start + step]
        j = idx.shape[1]
        a = x.new_zeros((n, 2 * j, size))
        a[:, :j].scatter_(2, idx.unsqueeze(2), 1.0)  # rows e_k, then −e_k (views: scattered in place)
        a[:, j:].scatter_(2, idx.unsqueeze(2), -1.0)
        a = a.reshape((n, 2 * j) + tuple(shape))
        slopes = _initial_slopes(network, boxes, 2 * j, before=value)
        out, _ = _optimize_slopes(network, x, a, boxes, ctx, slopes, steps, lr, None, value=value)
        lower.scatter_(1, idx, out[:, :j])
        upper.scatter_(1, idx, -out[:, j:])
    # only the selected entries: the padding rows' bounds are sound too, but a sample's boxes would then depend on the
    # other samples of the batch (and CROWN's bound is not monotone in the boxes)
    lower = torch.where(select, lower, -math.inf)
    upper = torch.where(select, upper, math.inf)
    return lower.reshape((n,) + tuple(shape)), upper.reshape((n,) + tuple(shape))


def _empty_branch(boxes: Boxes) -> torch.Tensor:
    """Per sample: whether some box is empty (``lo > hi``: a split contradicts the ball)."""
    x = boxes[0][0]
    empty = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for lo, hi in boxes[1:]:
        if lo is not hi:
            empty |= (lo > hi).reshape(len(x), -1).any(dim=1)
    return empty


# ------------------------------------------------------------------------------------------------------ the slopes
def optimizable_activations(network: Network) -> list[int]:
    """Indices of the activation layers with a free lower slope whose backward rule reads it (not the ones fused with
    a following max pooling, :func:`.maxpool_activation_backward`, nor a concave LeakyReLU, ``negative_slope > 1``,
    whose lower line is the chord)."""
    fused = {_activation_before_pool(network, i) for i in range(len(network.layers))}
    return [
        i
        for i, layer in enumerate(network.layers)
        if getattr(layer, "elementwise", False)
        and hasattr(layer, "function")
        and layer.function.kind in KINKED
        and layer.function.lower_through_origin
        and i not in fused
    ]


def _initial_slopes(network: Network, boxes: Boxes, nb_rows: int, before: int | None = None) -> dict[str, torch.Tensor]:
    """CROWN's lower slopes (1 where ``u > −l``, else 0) of every optimizable activation with an unstable neuron
    (``before``: only the layers before that value), ``(N, J) + value shape``."""
    slopes = {}
    for index in optimizable_activations(network):
        if before is not None and index >= before:
            continue
        lo, hi = boxes[network.inputs[index][0]]
        if lo is hi or not ((lo < 0) & (hi > 0)).any():
            continue
        start = (hi > -lo).to(lo.dtype).unsqueeze(1)
        slopes[network.layers[index].name] = start.expand((-1, nb_rows) + tuple(lo.shape[1:])).clone()
    return slopes


def _optimize_slopes(
    network: Network,
    x: torch.Tensor,
    spec: torch.Tensor,
    boxes: Boxes,
    ctx: BackwardContext,
    slopes: dict[str, torch.Tensor],
    steps: int,
    lr: float,
    stop_above: float | None,
    value: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Projected gradient ascent (Adam) of the backward bound of ``spec · v`` in the lower slopes (docs/theory.md
    §11), ``v`` the value ``value`` (default: the logits, the margins' specification). Returns the best bound of every
    row over the iterates and the slopes that gave it (row ``j`` depends only on the slopes of row ``j``)."""
    value = len(network.layers) if value is None else value
    if not slopes or steps <= 0:
        with torch.no_grad():
            bound = backward_from(network, value, spec, x, boxes, _with_slopes(ctx, slopes or None))
        return bound, slopes
    names = list(slopes)
    leaves = [slopes[name].clone().requires_grad_(True) for name in names]
    best_slopes = {name: slopes[name].clone() for name in names}
    optimizer = torch.optim.Adam(leaves, lr=lr)
    best = None
    for step in range(steps + 1):
        with torch.enable_grad():
            bound = backward_from(network, value, spec, x, boxes, _with_slopes(ctx, dict(zip(names, leaves))))
        with torch.no_grad():
            current = bound.detach()
            if best is None:
                best = current.clone()
            better = current > best
            best = torch.where(better, current, best)
            for name, leaf in zip(names, leaves):
                where = better.reshape(better.shape + (1,) * (leaf.dim() - 2))
                best_slopes[name] = torch.where(where, leaf.detach(), best_slopes[name])
        if step == steps or (stop_above is not None and bool((best > stop_above).all())):
            break
        with torch.enable_grad():
            grads = torch.autograd.grad(-bound.sum(), leaves, allow_unused=True)
        optimizer.zero_grad(set_to_none=True)
        for leaf, grad in zip(leaves, grads):
            leaf.grad = None if grad is None else grad.detach()
        optimizer.step()
        with torch.no_grad():
            for leaf in leaves:
                leaf.clamp_(0.0, 1.0)  # the projection onto [0, 1]
    return best, best_slopes


# ------------------------------------------------------------------------------------------------------ plumbing
def _with_slopes(ctx: BackwardContext, slopes: dict[str, torch.Tensor] | None) -> BackwardContext:
    return BackwardContext(ctx.params, ctx.param_balls, ctx.scale, ctx.cache, slopes, **_extra_fields(ctx))


def _extra_fields(ctx: BackwardContext) -> dict:
    """Fields of :class:`.BackwardContext` beyond the first five (e.g. a rounding model added later), copied over."""
    names = list(inspect.signature(BackwardContext).parameters)[5:]
    return {name: getattr(ctx, name) for name in names}


def _context(params, param_balls, scale, cache, slopes, kwargs: Mapping) -> BackwardContext:
    """A :class:`.BackwardContext`, with the keywords of ``kwargs`` it accepts (``rounding``)."""
    accepted = inspect.signature(BackwardContext).parameters
    extra = {k: v for k, v in kwargs.items() if k in accepted}
    return BackwardContext(params, param_balls, scale, cache, slopes, **extra)


def _call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with only the keywords it accepts (``rounding`` where it exists)."""
    accepted = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in accepted})


def _interval(network, param_balls, x, params, scale, cache, known, clips, kwargs: Mapping) -> Boxes:
    """The interval boxes, clipped to ``clips``; with ``rounding`` their affine centres in float64, as the linear
    bound's (:func:`.linear_boxes`)."""
    return _call(
        interval_preactivation_bounds, network, param_balls, x, params, scale, cache, known or None, clips or None,
        **kwargs, float64_centres=bool(kwargs.get("rounding")),
    )  # fmt: skip


PASSED_THROUGH = ("rounding",)
"""Keywords of the bounds of §4–§4b that :func:`optimized_bounds` passes on where they are accepted."""


def _check_keywords(kwargs: Mapping) -> None:
    unknown = sorted(set(kwargs) - set(PASSED_THROUGH))
    if unknown:
        raise TypeError(f"optimized_bounds() got unexpected keyword arguments {unknown}.")


def _slice_split(split: tuple[torch.Tensor | None, torch.Tensor | None], rows: slice):
    return tuple(None if t is None else t[rows] for t in split)
