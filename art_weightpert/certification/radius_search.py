"""
The certified-radius search of :meth:`.WeightPerturbationCertifier.certified_radius` where no closed form exists.

Per sample, the largest radius factor ``s`` with ``g(s) = min_i lb_i(s) − tol > 0`` is searched on the values of
``g`` at evaluated points only: the invariant is "``lo`` certified (``g(lo) > 0`` evaluated, or ``lo = 0``), ``hi``
not certified (``g(hi) ≤ 0`` evaluated)", so the returned ``lo`` is a radius at which the bound was evaluated
positive even where ``g`` is not monotone (CROWN's adaptive slopes make the linear bound non-monotone in rare cases).

* Bracketing: from the warm start, secant extrapolation through the last certified point and the new one (at
  most ×1024 per step) upward; regula falsi from ``(0, g(0))`` downward; both 0.1 % past the extrapolated root.
* Refinement: ITP (Oliveira & Takahashi, 2021, "An enhancement of the bisection method average performance
  preserving minmax optimality"): regula falsi steps, perturbed and kept inside a shrinking ball around the midpoint,
  so the bracket reaches the target width in at most one step more than bisection and superlinearly fast on
  piecewise-smooth ``g``. Stopping width: ``2^-36 · lo`` (the precision of the previous bisection).
* Only the samples still searching are evaluated (the batch is compacted at every step); with a bound that takes
  ``classes`` (``"linear"``), only the margins that can still decide (:class:`PrunedEvaluator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from art_weightpert.certification.linear import other_classes

RELATIVE_WIDTH = 2.0**-36
"""Target relative width ``(hi − lo) / lo`` of the final bracket."""

_BRACKET_STEPS = 64  # extrapolation / falsi steps allowed to find the bracket
_MAX_GROWTH = 1024.0  # at most this factor per upward step (2^64 of the start after 7 steps at most)
_OVERSHOOT = 1e-3  # relative push past the extrapolated root while bracketing
_LIMIT = 2.0**64
_KAPPA1 = 0.2  # never broken below 2^64 × the start: reported as an infinite radius

Evaluate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(sample indices, radius factors) -> g`` for those samples: ``min_i lb_i(s) − tol``."""


def _falsi(lo, glo, hi, ghi):
    """Root of the line through ``(lo, glo)`` (``glo > 0``) and ``(hi, ghi)`` (``ghi ≤ 0``), inside ``[lo, hi]``."""
    return (lo + glo * (hi - lo) / (glo - ghi)).clamp(lo, hi)


def _bracket(evaluate: Evaluate, g0: torch.Tensor, start: torch.Tensor, lower: torch.Tensor):
    """``(lo, glo, hi, ghi)`` with ``lo > 0`` certified and ``hi`` not certified wherever possible; ``hi = inf``
    where no failure was found below ``_LIMIT · start``, ``lo = 0`` where no certified point was found."""
    lo, glo = lower.clone(), g0.clone()  # lower: certified without evaluation here (e.g. the interval radius)
    hi, ghi = torch.full_like(g0, math.inf), torch.full_like(g0, -math.inf)
    s = torch.where(lower > 0, lower * 2, start)
    anchor, anchor_g = torch.zeros_like(g0), g0.clone()  # the last point evaluated certified (for the secant)
    limit = start * _LIMIT
    todo = g0 > 0
    for _ in range(_BRACKET_STEPS):
        idx = torch.nonzero(todo & ((lo == 0) | torch.isinf(hi))).squeeze(1)
        if len(idx) == 0:
            break
        g = evaluate(idx, s[idx])
        ok = g > 0
        # next point: upward along the secant through the last certified point and this one, downward by regula
        # falsi from (0, g(0)); both pushed past the root by _OVERSHOOT (an affine g is bracketed in one step)
        slope = (anchor_g[idx] - g) / (s[idx] - anchor[idx])
        up = torch.where(slope > 0, s[idx] + g / slope.clamp_min(1e-300), s[idx] * _MAX_GROWTH) * (1 + _OVERSHOOT)
        up = torch.minimum(up.clamp_min(s[idx] * (1 + _OVERSHOOT)), s[idx] * _MAX_GROWTH)
        down = _falsi(torch.zeros_like(g), g0[idx], s[idx], g) * (1 - _OVERSHOOT)
        down = down.clamp_min(s[idx] / _MAX_GROWTH)
        lo[idx] = torch.where(ok, s[idx], lo[idx])
        glo[idx] = torch.where(ok, g, glo[idx])
        hi[idx] = torch.where(ok, hi[idx], s[idx])
        ghi[idx] = torch.where(ok, ghi[idx], g)
        s[idx] = torch.where(ok, up, down)
        anchor[idx], anchor_g[idx] = torch.where(ok, lo[idx], anchor[idx]), torch.where(ok, g, anchor_g[idx])
        todo = todo & ~((hi == math.inf) & (lo > limit))
    return lo, glo, hi, ghi


def _refine(evaluate: Evaluate, lo, glo, hi, ghi, relative_width: float) -> torch.Tensor:
    """ITP on every bracket ``[lo, hi]`` with ``0 < lo < hi < inf`` down to the relative width; returns ``lo``."""
    active = (lo > 0) & torch.isfinite(hi)
    eps = (lo * relative_width / 2).clamp_min(torch.finfo(lo.dtype).tiny)
    width0 = (hi - lo).clamp_min(torch.finfo(lo.dtype).tiny)
    n_max = torch.ceil(torch.log2(width0 / (2 * eps))).clamp_min(0) + 1  # one step more than bisection at most
    kappa1 = _KAPPA1 / width0
    step = 0
    while True:
        active = active & (hi - lo > 2 * eps)
        idx = torch.nonzero(active).squeeze(1)
        if len(idx) == 0:
            return lo
        a, b, fa, fb = lo[idx], hi[idx], glo[idx], ghi[idx]
        mid, width = (a + b) / 2, b - a
        radius = eps[idx] * torch.exp2(n_max[idx] - step) - width / 2  # the midpoint ball (shrinks to 0)
        delta = kappa1[idx] * width**2
        falsi = _falsi(a, fa, b, fb)
        sigma = torch.sign(mid - falsi)
        towards = torch.where(delta <= (mid - falsi).abs(), falsi + sigma * delta, mid)
        s = torch.where((towards - mid).abs() <= radius, towards, mid - sigma * radius)
        s = torch.where((s > a) & (s < b), s, mid)  # strictly inside (rounding)
        g = evaluate(idx, s)
        ok = g > 0
        lo[idx], glo[idx] = torch.where(ok, s, a), torch.where(ok, g, fa)
        hi[idx], ghi[idx] = torch.where(ok, b, s), torch.where(ok, fb, g)
        step += 1


def search_radius(
    evaluate: Evaluate,
    g0: torch.Tensor,
    start: float,
    lower: torch.Tensor | None = None,
    relative_width: float = RELATIVE_WIDTH,
) -> torch.Tensor:
    """
    Per sample the largest radius factor found certified: ``0`` where ``g(0) ≤ 0`` or no certified point was found,
    ``inf`` where ``g`` stayed positive up to ``2^64 · start``.

    :param evaluate: ``g`` on a subset of the samples (:data:`Evaluate`).
    :param g0: ``g(0)`` per sample ``(N,)``.
    :param start: the first radius factor tried (the budget's own).
    :param lower: optional certified factors ``(N,)`` to start from (0 where unknown).
    :param relative_width: stop when ``hi − lo ≤ relative_width · lo``.
    :return: ``(N,)`` radius factors.
    """
    lower = torch.zeros_like(g0) if lower is None else lower
    unbroken = (g0 > 0) & torch.isinf(lower)  # never broken for the warm start's bound: nothing to search
    g0 = torch.where(unbroken, -1.0, g0)
    lower = torch.where(g0 > 0, lower, torch.zeros_like(lower))
    begin = torch.full_like(g0, start if start > 0 else 1.0)
    lo, glo, hi, ghi = _bracket(evaluate, g0, begin, lower)
    lo = _refine(evaluate, lo, glo, hi, ghi, relative_width)
    radius = torch.where((g0 > 0) & torch.isinf(hi) & (lo > 0), math.inf, lo)
    return torch.where(unbroken, math.inf, torch.where(g0 > 0, radius, torch.zeros_like(radius)))


class PrunedEvaluator:
    """
    ``g`` of a bound that accepts ``classes`` (:func:`.linear_margin_bounds`), evaluating only the margins that can
    still decide: every class but the label until the sample's first failing point ``s_f``, then only the classes
    that failed there (``lb_i(s_f) ≤ tol``). Every later point of the search lies below ``s_f``, where a class certified
    at ``s_f`` is certified too *if* its bound decreases with the radius — usual, not guaranteed (CROWN's adaptive
    slopes): :func:`search_pruned` therefore re-evaluates every class at the radius found and, where one fails,
    searches again from the largest radius evaluated certified with every class.

    :param bounds: ``(sample indices, radius factors, classes (n, J)) -> (n, J)`` margin lower bounds minus the
        tolerance.
    :param labels: ``(N,)`` labels.
    :param nb_classes: ``K``.
    :param lower: ``(N,)`` radius factors certified for every class without evaluation (the warm start), or zeros.
    """

    def __init__(self, bounds, labels: torch.Tensor, nb_classes: int, lower: torch.Tensor) -> None:
        self._bounds = bounds
        n = len(labels)
        self._others = other_classes(labels, nb_classes)  # the label's row dropped
        self._critical = torch.zeros((n, nb_classes), dtype=torch.bool, device=labels.device)
        self._pruned = torch.zeros(n, dtype=torch.bool, device=labels.device)
        self.verified = torch.where(torch.isfinite(lower), lower, torch.zeros_like(lower)).clone()

    def _every_class(self, idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        lb = self._bounds(idx, s, self._others[idx])
        g = lb.amin(dim=1)
        self.verified[idx] = torch.where(g > 0, torch.maximum(self.verified[idx], s), self.verified[idx])
        return g, lb

    def __call__(self, idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        g = torch.empty_like(s)
        full = ~self._pruned[idx]
        if bool(full.any()):
            sub = idx[full]
            g[full], lb = self._every_class(sub, s[full])
            failed = g[full] <= 0
            critical = torch.zeros_like(self._critical[sub]).scatter(1, self._others[sub], lb <= 0)
            self._critical[sub[failed]] = critical[failed]
            self._pruned[sub[failed]] = True
        if not bool(full.all()):
            sub = idx[~full]
            critical = self._critical[sub]
            count = critical.sum(dim=1, keepdim=True)
            order = torch.argsort(critical.to(torch.int8), dim=1, descending=True, stable=True)[:, : int(count.max())]
            present = torch.arange(order.shape[1], device=order.device) < count
            classes = torch.where(present, order, order[:, :1])  # padded with the first critical class
            g[~full] = self._bounds(sub, s[~full], classes).amin(dim=1)
        return g

    def failures(self, radius: torch.Tensor) -> torch.Tensor:
        """Evaluate every class at ``radius`` where only some were; ``(N,)`` True where one fails there (its failing
        classes join the sample's critical ones)."""
        todo = self._pruned & (radius > self.verified) & torch.isfinite(radius)
        idx = torch.nonzero(todo).squeeze(1)
        failed = torch.zeros_like(todo)
        if len(idx) > 0:
            g, lb = self._every_class(idx, radius[idx])
            failed[idx] = g <= 0
            critical = torch.zeros_like(self._critical[idx]).scatter(1, self._others[idx], lb <= 0)
            self._critical[idx] |= critical & failed[idx].unsqueeze(1)
        return failed


def search_pruned(
    evaluate: PrunedEvaluator, g0: torch.Tensor, start: float, lower: torch.Tensor, rounds: int = 3
) -> torch.Tensor:
    """:func:`search_radius` with a :class:`PrunedEvaluator`, then every class evaluated at the radius found; where
    one fails (a non-monotone bound) the search runs again from the largest radius certified with every class, with
    that class kept, up to ``rounds`` times, after which that largest radius is returned."""
    radius = search_radius(evaluate, g0, start, lower)
    for _ in range(rounds):
        failed = evaluate.failures(radius)
        if not bool(failed.any()):
            return radius
        idx = torch.nonzero(failed).squeeze(1)
        subset = lambda sub, s, idx=idx: evaluate(idx[sub], s)  # noqa: E731
        again = search_radius(subset, g0[idx], start, evaluate.verified[idx].clone())
        radius = radius.clone()
        radius[idx] = again
    failed = evaluate.failures(radius)
    return torch.where(failed, evaluate.verified, radius)
