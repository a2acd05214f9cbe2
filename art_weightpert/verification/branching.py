"""
Bounds of branches and branch and bound over ReLU phases for weight perturbations (docs/theory.md §11).

A *branch* of a sample constrains some pre-activation values of ReLU-like activations to ``z ≥ 0`` or ``z ≤ 0``; on it
the activation is linear. Branches are described by :data:`Splits`, the ``(floor, ceiling)`` clips of
:func:`.interval_preactivation_bounds`: every box is intersected with them before later layers read it, so a branch's
bounds hold for the branch's part of the ball only, and a box emptied by its clips (``lo > hi``) proves the branch
infeasible. The same clips carry the intermediate bounds of the backward passes (:func:`backward_intermediate_splits`),
valid for the whole ball, so every branch starts from them.

One plug point, :data:`BoundFunction`: ``bound(x, labels, splits) -> (margin lower bounds (B, K), boxes)`` on a batch
of branches (``x`` and ``labels`` repeated per branch). :class:`BoxBound` is the default (the registry's ``"linear"``
or ``"interval"`` bound on the clipped interval boxes); the optimized bounds of :mod:`.alpha` plug in the same way
(:func:`make_bound`).

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from art_weightpert.budget import ParameterBall
from art_weightpert.certification.common import BoundCache, Boxes, fill_label, margin_matrix, slice_boxes
from art_weightpert.certification.interval import interval_preactivation_bounds
from art_weightpert.certification.linear import backward_from, linear_margin_bounds, other_classes
from art_weightpert.certification.precision import certification_rtol
from art_weightpert.certification.registry import METHODS
from art_weightpert.certification.weight_terms import BackwardContext
from art_weightpert.network import Network

Splits = dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]
"""Per value index (as :func:`.interval_preactivation_bounds` indexes values), ``(floor, ceiling)`` tensors of the
value's shape ``(B, ...)`` (or ``None``) that its box is clipped to."""

BoundFunction = Callable[[torch.Tensor, torch.Tensor, "Splits | None"], tuple[torch.Tensor, Boxes]]
"""``bound(x, labels, splits) -> (lower bounds (B, K) of every margin f_y − f_i, +inf at the label, boxes)``."""

logger = logging.getLogger(__name__)

SPLITTABLE = ("relu", "leaky_relu")
"""Activation kinds that are linear on each side of 0 (a split at 0 makes them exact)."""

COEFFICIENT_BYTES = 4 * 2**20
"""Bytes of the coefficient tensor of one chunk of an intermediate backward pass (as :data:`.linear.CHUNK_BYTES`)."""


# ---------------------------------------------------------------------------------------------- bounds of branches
def split_values(network: Network) -> list[int]:
    """The value indices read by ReLU-like activations (:data:`SPLITTABLE`), in topological order, without repeats."""
    out = []
    for layer, reads in zip(network.layers, network.inputs):
        kind = getattr(getattr(layer, "function", None), "kind", None)
        if kind in SPLITTABLE and reads[0] not in out:
            out.append(reads[0])
    return out


class BoxBound:
    """
    The default :data:`BoundFunction`: a registry bound (``"linear"`` or ``"interval"``, :data:`.METHODS`) on the
    interval boxes clipped to the branch's splits (:func:`.interval_preactivation_bounds`).

    :param network: the model read by :func:`.read_network` (centre weights in ``dtype``).
    :param param_balls: the budget resolved on it (radii in ``dtype``, rounded up: :func:`.balls_in`).
    :param method: ``"linear"`` or ``"interval"``.
    :param cache: a :class:`.BoundCache` shared by the calls.
    :param dtype: the bounds' precision: float64, or float32 with the rounding-error terms of docs/theory.md §5 (the
        boxes, the backward passes and the intermediate bounds; the boxes with float64 centres where the method takes
        them, :attr:`.BoundMethod.float64_centres`).
    """

    def __init__(
        self,
        network: Network,
        param_balls: Mapping[str, ParameterBall],
        method: str = "linear",
        cache=None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if not METHODS[method].takes_boxes:
            raise ValueError(f"method {method!r} does not take boxes; branch and bound needs one that does.")
        self.network, self.param_balls, self.method = network, dict(param_balls), METHODS[method]
        self.cache = BoundCache() if cache is None else cache
        self.dtype, self.rounding = dtype, dtype != torch.float64
        self.params = network.params(dtype=dtype)

    def boxes(self, x: torch.Tensor, splits: Splits | None = None) -> Boxes:
        """The interval boxes of ``x`` clipped to ``splits``."""
        wide = self.rounding and self.method.float64_centres
        return interval_preactivation_bounds(
            self.network, self.param_balls, x, self.params, None, self.cache, splits=splits, rounding=self.rounding,
            float64_centres=wide,
        )  # fmt: skip

    tighten: list[int] | None = None
    """Values whose boxes are tightened again by backward passes under every branch's splits
    (:func:`backward_intermediate_splits`; the split information then reaches the later layers' boxes), or ``None``."""
    depth: int | None = None
    """The depth of those backward passes."""

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, splits: Splits | None = None):
        lb, boxes, _ = self._split_bounds(x, labels, splits)
        return lb, boxes

    def _split_bounds(self, x: torch.Tensor, labels: torch.Tensor, splits: Splits | None):
        """``(lower bounds, boxes, splits)`` under ``splits``, tightened by backward passes where :attr:`tighten` asks
        (the splits returned are those tightened ones)."""
        if splits and self.tighten:
            splits = backward_intermediate_splits(
                self.network, self.param_balls, x, self.tighten, splits, self.cache, self.depth, self.rounding
            )  # fmt: skip
        with torch.no_grad():
            boxes = self.boxes(x, splits)
            lb = self.method.bounds(
                self.network, self.param_balls, x, labels, self.dtype, None, self.cache, boxes=boxes,
                **({"rounding": True} if self.rounding else {}),
            )  # fmt: skip
        return lb, boxes, splits


BETA_STEPS = 10
"""Gradient steps on the multipliers of the split constraints (:class:`BetaBound`)."""
BETA_LR = 0.1
"""Adam's learning rate on those multipliers."""


def split_signs(splits: Splits, values: list[int]) -> dict[int, torch.Tensor]:
    """Per split value, ``(B,) + shape`` signs ``s``: ``+1`` where the clips imply ``z ≥ 0`` (floor ≥ 0), ``−1`` where
    they imply ``z ≤ 0`` (ceiling ≤ 0), else 0; values without such a constraint are left out."""
    out = {}
    for v in values:
        floor, ceiling = splits.get(v, (None, None))
        sign = None
        if floor is not None:
            sign = (floor >= 0).to(floor.dtype)
        if ceiling is not None:
            down = (ceiling <= 0).to(ceiling.dtype)
            sign = -down if sign is None else torch.where(down > 0, -down, sign)
        if sign is not None and bool(sign.any()):
            out[v] = sign
    return out


def backward_with_injections(
    network: Network,
    x: torch.Tensor,
    labels: torch.Tensor,
    boxes: Boxes,
    ctx: BackwardContext,
    injections: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """
    The backward linear bound of the margins (docs/theory.md §4b) of every class but the label, ``(B, K − 1)``, where
    the coefficients reaching value ``v`` get ``injections[v]`` ``(B, K − 1) + value shape`` added first: with
    ``−β s`` there, the bound of ``f − Σ β s z``, a lower bound of the margins on the branch where ``s z ≥ 0``
    (β-CROWN's Lagrangian of the split constraints, Wang et al. 2021), for every ``β ≥ 0``; with
    :attr:`.BackwardContext.rounding`, sound for the exact network (the injections' sums are joins of §5).
    """
    nb_classes = network.layers[-1].module.out_features
    classes = other_classes(labels, nb_classes)
    a = margin_matrix(labels, nb_classes, x.dtype).gather(1, classes.unsqueeze(2).expand(-1, -1, nb_classes))
    return backward_from(network, len(network.layers), a, x, boxes, ctx, injections=injections)


class BetaBound(BoxBound):
    """
    :class:`BoxBound` with the split constraints in the bound (β-CROWN, docs/theory.md §11): on a branch where
    ``s_j z_j ≥ 0``, ``f ≥ f − Σ_j β_j s_j z_j`` for every ``β ≥ 0``, and the backward bound of the right-hand side is
    maximized over β (per specification row) by projected Adam steps. Every iterate is a sound bound; the best is kept,
    and never below the :class:`BoxBound` on the same branch (β = 0). Only ``"linear"``.

    :param steps: gradient steps on β (0: :class:`BoxBound`).
    :param lr: Adam's learning rate.
    :param target: rows whose worst bound already exceeds it are not optimized (default: the certificates' relative
        tolerance times 1000, :func:`.certification_rtol`: above it a bound certifies for logits up to about 1000; 1e-6
        in float64).
    """

    def __init__(
        self, network, param_balls, cache=None, steps: int = BETA_STEPS, lr: float = BETA_LR, target=None,
        dtype: torch.dtype = torch.float64,
    ) -> None:  # fmt: skip
        super().__init__(network, param_balls, "linear", cache, dtype)
        target = certification_rtol(dtype) * 1e3 if target is None else target
        self.steps, self.lr, self.target = int(steps), float(lr), float(target)
        self.values = split_values(network)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, splits: Splits | None = None):
        lb, boxes, splits = self._split_bounds(x, labels, splits)
        if not splits or self.steps == 0:
            return lb, boxes
        signs = split_signs(splits, self.values)
        rows = torch.nonzero((lb.amin(dim=1) <= self.target) & ~infeasible(boxes, self.values)).squeeze(1)
        if not signs or len(rows) == 0:
            return lb, boxes
        improved = self._optimized(
            x[rows], labels[rows], slice_boxes(boxes, rows), {v: s[rows] for v, s in signs.items()}
        )
        lb = lb.clone()
        lb[rows] = torch.maximum(lb[rows], improved)
        return lb, boxes

    def _optimized(self, x, labels, boxes, signs) -> torch.Tensor:
        """The best β bound ``(B, K)`` (``+inf`` at the label) of the branches ``x`` over the steps."""
        nb_classes = self.network.layers[-1].module.out_features
        ctx = BackwardContext(
            params=self.params, param_balls=self.param_balls, cache=self.cache, rounding=self.rounding
        )
        betas = {
            v: torch.zeros(
                (len(x), nb_classes - 1) + tuple(s.shape[1:]), dtype=x.dtype, device=x.device, requires_grad=True
            )
            for v, s in signs.items()
        }
        moments = {v: (torch.zeros_like(beta), torch.zeros_like(beta)) for v, beta in betas.items()}
        best = None
        for step in range(self.steps + 1):
            with torch.enable_grad():
                injections = {v: -(beta * signs[v].unsqueeze(1)) for v, beta in betas.items()}
                out = backward_with_injections(self.network, x, labels, boxes, ctx, injections)
                total = out.sum() if step < self.steps else None  # with a graph, also under the caller's no_grad
            best = out.detach() if best is None else torch.maximum(best, out.detach())
            if step == self.steps:
                break
            grads = torch.autograd.grad(total, list(betas.values()))
            with torch.no_grad():  # Adam's ascent step (torch.optim would import torch._dynamo: seconds), projected
                for (v, beta), g in zip(betas.items(), grads):
                    m, s2 = moments[v]
                    m.mul_(0.9).add_(g, alpha=0.1)
                    s2.mul_(0.999).addcmul_(g, g, value=0.001)
                    m_hat, s_hat = m / (1 - 0.9 ** (step + 1)), s2 / (1 - 0.999 ** (step + 1))
                    beta.add_(self.lr * m_hat / (s_hat.sqrt() + 1e-8)).clamp_(min=0)
        classes = other_classes(labels, nb_classes)
        return fill_label(best.new_zeros((len(x), nb_classes)).scatter(1, classes, best), labels)


def make_bound(
    method: str,
    network: Network,
    param_balls: Mapping[str, ParameterBall],
    cache: BoundCache | None = None,
    beta_steps: int = BETA_STEPS,
    dtype: torch.dtype = torch.float64,
) -> BoundFunction:
    """
    The :data:`BoundFunction` of a method: ``"linear"`` or ``"interval"`` (:class:`BoxBound`), or ``"alpha"`` (the
    optimized bounds of :func:`art_weightpert.certification.alpha.optimized_bounds`, which take ``splits`` and return
    ``(bounds, boxes)`` themselves). ``"linear"`` with ``beta_steps > 0``: :class:`BetaBound`. ``dtype``: float64, or
    float32 with the rounding-error terms of docs/theory.md §5.
    """
    if method == "alpha":
        optimized = importlib.import_module("art_weightpert.certification.alpha").optimized_bounds
        rounding = {"rounding": True} if dtype != torch.float64 else {}

        def alpha(x: torch.Tensor, labels: torch.Tensor, splits: Splits | None = None):
            lb, boxes = optimized(network, param_balls, x, labels, splits=splits, dtype=dtype, cache=cache, **rounding)
            return lb.detach(), boxes

        return alpha
    if method == "linear" and beta_steps > 0:
        return BetaBound(network, param_balls, cache, steps=beta_steps, dtype=dtype)
    return BoxBound(network, param_balls, method, cache, dtype)


def infeasible(boxes: Boxes, values: list[int]) -> torch.Tensor:
    """``(B,)`` bool: some box among ``values`` is empty (``lo > hi``: no point of the ball lies in the branch)."""
    out = torch.zeros(len(boxes[0][0]), dtype=torch.bool, device=boxes[0][0].device)
    for v in values:
        lo, hi = boxes[v]
        if lo is not hi:
            out |= (lo > hi).flatten(1).any(dim=1)
    return out


def split_readers(network: Network) -> dict[int, int]:
    """Per split value (:func:`split_values`), the index of the first ReLU-like layer reading it."""
    out: dict[int, int] = {}
    for index, (layer, reads) in enumerate(zip(network.layers, network.inputs)):
        kind = getattr(getattr(layer, "function", None), "kind", None)
        if kind in SPLITTABLE:
            out.setdefault(reads[0], index)
    return out


def backward_intermediate_splits(
    network: Network,
    param_balls: Mapping[str, ParameterBall],
    x: torch.Tensor,
    values: list[int],
    splits: Splits | None = None,
    cache: BoundCache | None = None,
    depth: int | None = None,
    rounding: bool = False,
) -> Splits:
    """
    Intermediate bounds by backward passes (full CROWN, docs/theory.md §11) of the values ``values``, in topological
    order: for each, the neurons whose current box crosses 0 are bounded by the backward linear pass of §4b from that
    value (with the boxes of the earlier values already tightened), and the result is returned as clips valid for the
    whole ball (the tighter of the interval box and the backward bound).

    :param x: inputs ``(N, ...)`` in the bounds' dtype (float64, or float32 with ``rounding``).
    :param splits: clips to start from (kept, and tightened).
    :param depth: back-substitute through the last ``depth`` activations before the value only (its stage), and
        concretize on the boxes there (``stop=`` of :func:`.backward_from`); ``None``: to the input.
    :param rounding: the boxes and backward passes with the rounding-error terms of docs/theory.md §5 (the boxes with
        float64 centres, as the linear bound takes them), so that the clips hold for the exact network.
    :return: the clips, ``{value: (floor, ceiling)}`` of shape ``(N,) + value shape``.
    """
    params = network.params(dtype=x.dtype)
    ctx = BackwardContext(params=params, param_balls=dict(param_balls), cache=cache, rounding=rounding)
    splits = dict(splits or {})
    n = len(x)
    readers = split_readers(network)
    for position, v in enumerate(values):
        earlier = position - depth if depth is not None else -1
        stop = readers[values[earlier]] + 1 if earlier >= 0 else 0
        with torch.no_grad():
            boxes = interval_preactivation_bounds(
                network, param_balls, x, params, None, cache, splits=splits, rounding=rounding, float64_centres=rounding
            )  # fmt: skip
            lo, hi = boxes[v]
            if lo is hi:
                continue
            flat_lo, flat_hi = lo.reshape(n, -1), hi.reshape(n, -1)
            crossing = (flat_lo < 0) & (flat_hi > 0)
            width = int(crossing.sum(dim=1).max())
            if width == 0:
                continue
            order = torch.argsort(crossing.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
            valid = crossing.gather(1, order)
            size = flat_lo.shape[1]
            counts = crossing.sum(dim=1)
            new_lo = torch.full((n, width), -math.inf, dtype=lo.dtype, device=lo.device)
            new_hi = torch.full((n, width), math.inf, dtype=lo.dtype, device=lo.device)
            by_count = torch.argsort(counts, descending=True)  # chunks of samples with similar numbers of rows
            start = 0
            while start < n and counts[by_count[start]] > 0:
                w = int(counts[by_count[start]])  # the widest sample of the chunk comes first
                m = max(1, COEFFICIENT_BYTES // (2 * w * size * lo.element_size()))
                rows = by_count[start : start + m]
                rows = rows[counts[rows] > 0]
                start += m
                m = len(rows)
                idx = order[rows, :w]
                a = lo.new_zeros((m, 2 * w, size))
                rows_idx = torch.arange(m, device=lo.device).unsqueeze(1).expand(m, w)
                cols = torch.arange(w, device=lo.device).unsqueeze(0).expand(m, w)
                a[rows_idx, cols, idx] = 1.0
                a[rows_idx, cols + w, idx] = -1.0
                a = a.reshape((m, 2 * w) + tuple(lo.shape[1:]))
                out = backward_from(network, v, a, x[rows], slice_boxes(boxes, rows), ctx.rows(rows), stop=stop)
                new_lo[rows, :w], new_hi[rows, :w] = out[:, :w], -out[:, w:]
            inf = torch.tensor(math.inf, dtype=lo.dtype, device=lo.device)
            floor = flat_lo.clone().scatter_(
                1, order, torch.where(valid, new_lo, -inf).maximum(flat_lo.gather(1, order))
            )
            ceiling = flat_hi.clone().scatter_(
                1, order, torch.where(valid, new_hi, inf).minimum(flat_hi.gather(1, order))
            )
            crossed = floor > ceiling  # rounding where a box is (nearly) a point, never an empty root: keep the box
            floor, ceiling = torch.where(crossed, flat_lo, floor), torch.where(crossed, flat_hi, ceiling)
            splits[v] = (floor.reshape(lo.shape), ceiling.reshape(hi.shape))
    return splits


# ------------------------------------------------------------------------------------------------- branching score
class GradientScore:
    """
    Branching score of every crossing neuron of a batch of branches (BaBSR-like, docs/theory.md §11): the first-order
    gain of the worst margin's backward linear bound when the neuron's box is cut at 0 on each side,
    ``−∂L/∂l · l`` (the ``z ≥ 0`` branch) plus ``−∂L/∂u · u`` (``z ≤ 0``), with the gradients of the bound in the box
    ends; neurons whose gain is zero fall back to the area of their relaxation, ``−l u / (u − l)``, times ``1e-9``.
    """

    def __init__(self, network: Network, param_balls: Mapping[str, ParameterBall], cache=None) -> None:
        self.network, self.param_balls, self.cache = network, dict(param_balls), cache

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, boxes: Boxes, values: list[int]) -> torch.Tensor:
        """``(B, S)`` scores over the flattened ``values`` (``-inf`` where the neuron's box does not cross 0)."""
        boxes = list(boxes)
        leaves = []
        for v in values:
            lo, hi = boxes[v]
            lo, hi = lo.detach().clone().requires_grad_(True), hi.detach().clone().requires_grad_(True)
            boxes[v] = (lo, hi)
            leaves += [lo, hi]
        with torch.enable_grad():
            lb = linear_margin_bounds(  # a heuristic: in the boxes' dtype, without rounding terms
                self.network, self.param_balls, x, labels, x.dtype, None, self.cache, boxes=boxes
            )
            worst = lb.amin(dim=1)
            grads = torch.autograd.grad(worst[torch.isfinite(worst)].sum(), leaves, allow_unused=True)
        scores = []
        for k, v in enumerate(values):
            lo, hi = (t.detach().flatten(1) for t in boxes[v])
            g_lo, g_hi = grads[2 * k], grads[2 * k + 1]
            g_lo = torch.zeros_like(lo) if g_lo is None else g_lo.flatten(1)
            g_hi = torch.zeros_like(hi) if g_hi is None else g_hi.flatten(1)
            gain = (-g_lo * lo).clamp_min(0) + (-g_hi * hi).clamp_min(0)
            area = -lo * hi / (hi - lo).clamp_min(torch.finfo(lo.dtype).tiny)
            crossing = (lo < 0) & (hi > 0)
            scores.append(torch.where(crossing, torch.nan_to_num(gain) + 1e-9 * area, -math.inf))
        return torch.cat(scores, dim=1)


# ------------------------------------------------------------------------------------------------- branch and bound
@dataclass(order=True)
class _Leaf:
    bound: float
    order: int
    phases: torch.Tensor = field(compare=False)  # (S,) int8: +1 z ≥ 0, −1 z ≤ 0, 0 free
    choice: int = field(compare=False, default=-1)  # flat index of the neuron to split next (−1: none left)


@dataclass
class SampleState:
    """Branch and bound state of one sample: the open leaves (worst bound first) and the smallest closed bound."""

    leaves: list = field(default_factory=list)
    closed_min: float = math.inf
    stuck: bool = False  # a leaf with no neuron left to split has a bound ≤ the tolerance

    @property
    def lower_bound(self) -> float:
        open_min = self.leaves[0].bound if self.leaves else math.inf
        return min(open_min, self.closed_min)


class BranchAndBound:
    """
    Branch and bound over the phases of ReLU-like activations for a batch of samples (docs/theory.md §11): the worst
    open leaves of every sample are split on their best-scored crossing neuron (:class:`GradientScore`), the children
    of many leaves of many samples are bounded in one call of ``bound``, a leaf closes when its worst margin bound
    exceeds the sample's tolerance or its boxes are empty, and a sample is certified when no leaf is open. Every
    sample has its own wall-clock budget.

    :param bound: the :data:`BoundFunction`.
    :param score: the branching score (:class:`GradientScore`).
    :param values: the split values (:func:`split_values`).
    :param max_branches: branches per call of ``bound``.
    """

    def __init__(self, bound: BoundFunction, score: GradientScore, values: list[int], max_branches: int = 256):
        self.bound, self.score, self.values, self.max_branches = bound, score, values, int(max_branches)
        self._counter = itertools.count()

    def _splits(self, root: Splits, rows: torch.Tensor, phases: torch.Tensor, shapes: list, dtype) -> Splits:
        """The clips of branches (in the boxes' ``dtype``): the root clips of their samples ``rows``, cut at 0 where
        ``phases`` says."""
        out: Splits = {}
        offset = 0
        for v, shape in zip(self.values, shapes):
            size = math.prod(shape)
            phase = phases[:, offset : offset + size].reshape((len(rows),) + tuple(shape))
            offset += size
            floor, ceiling = root.get(v, (None, None))
            floor = None if floor is None else floor[rows]
            ceiling = None if ceiling is None else ceiling[rows]
            zero = torch.zeros(phase.shape, dtype=dtype, device=phase.device)
            if bool((phase > 0).any()):
                cut = torch.where(phase > 0, zero, -math.inf)
                floor = cut if floor is None else torch.maximum(floor, cut)
            if bool((phase < 0).any()):
                cut = torch.where(phase < 0, zero, math.inf)
                ceiling = cut if ceiling is None else torch.minimum(ceiling, cut)
            if floor is not None or ceiling is not None:
                out[v] = (floor, ceiling)
        return out

    def run(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        tol: torch.Tensor,
        root: Splits,
        root_boxes: Boxes,
        root_bounds: torch.Tensor,
        spent: list[float],
        time_limit: float,
        on_round: Callable[[], None] | None = None,
    ) -> tuple[list[str], list[float]]:
        """
        Branch and bound of the samples ``x`` (all undecided at the root).

        :param x: ``(N, ...)`` inputs in the bounds' dtype; ``labels`` ``(N,)``; ``tol`` ``(N,)`` certification
            tolerances.
        :param root: the clips valid for the whole ball (intermediate bounds); ``root_boxes``, ``root_bounds`` ``(N,)``:
            the root's boxes and worst margin bounds.
        :param spent: ``(N,)`` seconds already spent per sample (updated in place with the share of each round).
        :param time_limit: seconds per sample, in total.
        :return: per sample ``"certified"`` or ``"unknown"``, and the smallest leaf bound.
        """
        n = len(x)
        shapes = [tuple(root_boxes[v][0].shape[1:]) for v in self.values]
        size = sum(math.prod(s) for s in shapes)
        states = [SampleState() for _ in range(n)]
        choices = self._choices(x, labels, root_boxes)
        for i in range(n):
            leaf = _Leaf(
                float(root_bounds[i]),
                next(self._counter),
                torch.zeros(size, dtype=torch.int8, device=x.device),
                int(choices[i]),
            )
            self._push(states[i], leaf, float(tol[i]))
        cost = 0.0  # seconds per branch in the last round: no sample starts a round it cannot pay for
        while True:
            active = [
                i for i in range(n) if states[i].leaves and not states[i].stuck and time_limit - spent[i] > 2 * cost
            ]
            if not active:
                break
            start = time.perf_counter()
            per_sample = max(1, self.max_branches // (2 * len(active)))
            parents, rows = [], []
            for i in active:
                affordable = per_sample if cost == 0 else max(1, int((time_limit - spent[i]) / (2 * cost)))
                for _ in range(min(per_sample, affordable, len(states[i].leaves))):
                    parents.append((i, heapq.heappop(states[i].leaves)))
            phases = []
            for i, leaf in parents:
                for side in (1, -1):
                    child = leaf.phases.clone()
                    child[leaf.choice] = side
                    phases.append(child)
                    rows.append(i)
            rows_t = torch.as_tensor(rows)
            phases_t = torch.stack(phases).to(x.device)
            splits = self._splits(root, rows_t, phases_t, shapes, x.dtype)
            lb, boxes = self.bound(x[rows_t], labels[rows_t], splits)
            worst = lb.amin(dim=1)
            worst = torch.where(infeasible(boxes, self.values), math.inf, worst)
            still_open = torch.nonzero(worst <= tol[rows_t]).squeeze(1)
            choice = torch.full((len(rows),), -1, dtype=torch.long)
            if len(still_open):
                sub = slice_boxes(boxes, still_open)
                choice[still_open] = self._choices(x[rows_t[still_open]], labels[rows_t[still_open]], sub)
            for k, i in enumerate(rows):
                self._push(
                    states[i], _Leaf(float(worst[k]), next(self._counter), phases_t[k], int(choice[k])), float(tol[i])
                )
            elapsed = time.perf_counter() - start
            cost = elapsed / len(rows)
            counts = {i: rows.count(i) for i in set(rows)}
            for i, c in counts.items():
                spent[i] += elapsed * c / len(rows)
            if on_round is not None:
                on_round()
        logger.debug(
            "branch and bound: %s",
            [(len(s.leaves), s.stuck, round(spent[i], 2), round(s.lower_bound, 4)) for i, s in enumerate(states)],
        )
        status = ["certified" if not s.leaves else "unknown" for s in states]
        return status, [s.lower_bound for s in states]

    def _choices(self, x: torch.Tensor, labels: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        """The flat index of the best-scored crossing neuron per branch (``−1`` where none crosses 0)."""
        scores = self.score(x, labels, boxes, self.values)
        best, index = scores.max(dim=1)
        return torch.where(torch.isfinite(best), index, -1)

    @staticmethod
    def _push(state: SampleState, leaf: _Leaf, tol: float) -> None:
        if leaf.bound > tol:
            state.closed_min = min(state.closed_min, leaf.bound)
            return
        if leaf.choice < 0:
            state.stuck = True
        heapq.heappush(state.leaves, leaf)
