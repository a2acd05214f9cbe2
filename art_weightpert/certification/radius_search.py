"""
The certified-radius search of :meth:`.WeightPerturbationCertifier.certified_radius` where no closed form exists.

Per sample, the largest radius factor ``s`` with ``g(s) = min_i lb_i(s) − tol > 0`` is searched on the values of
``g`` at evaluated points only: the invariant is "``lo`` certified (``g(lo) > 0`` evaluated, or ``lo = 0``), ``hi``
not certified (``g(hi) ≤ 0`` evaluated)", so the returned ``lo`` is a radius at which the bound was evaluated
positive even where ``g`` is not monotone (CROWN's adaptive slopes make the linear bound non-monotone in rare cases).

* Bracketing: from the warm start (its radius × 4; the linear radius is 3-10× the interval one on MLPs), secant
  extrapolation through the last certified point and the new one (at most ×1024 per step) upward; regula falsi from
  ``(0, g(0))`` downward (×1/16 after two failures in a row); both 0.1 % past the extrapolated root.
* Refinement: secant steps through the two points evaluated nearest the root (``g`` is nearly affine in the radius
  and piecewise smooth: superlinear), pushed a quarter of the target width past the estimate so that the last two
  steps straddle the root; a bisection where three steps did not halve the bracket (Dekker's safeguard). Stopping
  width: ``hi − lo ≤ 2^-36 · lo`` (the precision of the previous bisection, unchanged): the returned radius is within
  ``2^-36`` (relative) of a root of the bound as evaluated, whose own rounding noise moves that root by ~1e-11.
  float32 certificates stop at ``2^-20`` (:func:`.search_precision`: their radius factors are float32).
  (ITP, used before, stalled here: its perturbation towards the midpoint cost ~9 steps per sample.)
* Only the samples still searching are evaluated (the batch is compacted at every step); with a bound that takes
  ``classes`` (``"linear"``), only the margins predicted to decide (:class:`PrunedEvaluator`), one row per (sample,
  class), and every class at the point that would end the search, so the returned radius is one where every class
  was evaluated certified (:func:`search_pruned` re-evaluates it where that point was not the last).
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
_FIRST_STEP = 4.0  # the first point: this factor above the warm start ("linear" radii: 3-10x the interval ones)
_OVERSHOOT = 1e-3  # relative push past the extrapolated root while bracketing
_LIMIT = 2.0**64  # never broken below 2^64 × the start: reported as an infinite radius

PRUNE_FACTOR = 1.25
"""A class is evaluated during the search when its predicted root is at most this factor above the smallest one."""

Evaluate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(sample indices, radius factors, closing) -> g`` for those samples: ``min_i lb_i(s) − tol``; ``closing``: where
True, the search ends at that point if it is certified (a :class:`PrunedEvaluator` evaluates every class there)."""


def _falsi(lo, glo, hi, ghi):
    """Root of the line through ``(lo, glo)`` (``glo > 0``) and ``(hi, ghi)`` (``ghi ≤ 0``), inside ``[lo, hi]``."""
    return (lo + glo * (hi - lo) / (glo - ghi)).clamp(lo, hi)


def _bracket(evaluate: Evaluate, g0: torch.Tensor, start: torch.Tensor, lower: torch.Tensor):
    """``(lo, glo, hi, ghi, points)``: ``lo > 0`` certified and ``hi`` not certified wherever possible (``hi = inf``
    where no failure was found below ``_LIMIT · start``, ``lo = 0`` where no certified point was found; ``glo = nan``
    where ``lo`` is ``lower``, not evaluated), and ``points``: the two points evaluated nearest the root (smallest
    ``|g|``, ``(0, g(0))`` included) as ``[s, g(s), s', g(s')]``."""
    lo, glo = lower.clone(), torch.where(lower > 0, math.nan, g0)  # lower: certified without evaluation here
    hi, ghi = torch.full_like(g0, math.inf), torch.full_like(g0, -math.inf)
    s = torch.where(lower > 0, lower * _FIRST_STEP, start)
    anchor, anchor_g = torch.zeros_like(g0), g0.clone()  # the last point evaluated certified (for the secant)
    points = [torch.zeros_like(g0), g0.clone(), torch.zeros_like(g0), torch.full_like(g0, math.inf)]  # (0, g(0))
    limit = start * _LIMIT
    todo = g0 > 0
    failed_before = torch.zeros_like(todo)  # the previous point failed too: falsi from 0 may crawl (convex g)
    for _ in range(_BRACKET_STEPS):
        idx = torch.nonzero(todo & ((lo == 0) | torch.isinf(hi))).squeeze(1)
        if len(idx) == 0:
            break
        g = evaluate(idx, s[idx], torch.zeros_like(idx, dtype=torch.bool))
        ok = g > 0
        # next point: upward along the secant through the last certified point and this one, downward by regula
        # falsi from (0, g(0)); both pushed past the root by _OVERSHOOT (an affine g is bracketed in one step)
        slope = (anchor_g[idx] - g) / (s[idx] - anchor[idx])
        up = torch.where(slope > 0, s[idx] + g / slope.clamp_min(1e-300), s[idx] * _MAX_GROWTH) * (1 + _OVERSHOOT)
        up = torch.minimum(up.clamp_min(s[idx] * (1 + _OVERSHOOT)), s[idx] * _MAX_GROWTH)
        down = _falsi(torch.zeros_like(g), g0[idx], s[idx], g) * (1 - _OVERSHOOT)
        down = torch.where(failed_before[idx], torch.minimum(down, s[idx] / 16), down).clamp_min(s[idx] / _MAX_GROWTH)
        failed_before[idx] = ~ok
        lo[idx] = torch.where(ok, s[idx], lo[idx])
        glo[idx] = torch.where(ok, g, glo[idx])
        hi[idx] = torch.where(ok, hi[idx], s[idx])
        ghi[idx] = torch.where(ok, ghi[idx], g)
        _keep_nearest(*points, idx, s[idx], g)
        s[idx] = torch.where(ok, up, down)
        anchor[idx], anchor_g[idx] = torch.where(ok, lo[idx], anchor[idx]), torch.where(ok, g, anchor_g[idx])
        todo = todo & ~((hi == math.inf) & (lo > limit))
    return lo, glo, hi, ghi, points


def _estimate(lo, glo, hi, ghi, best, gbest, second, gsecond):
    """The root of the secant through the two points evaluated nearest the root (smallest ``|g|``) where it falls
    inside ``(lo, hi)``, else the regula falsi point of the bracket, else (an unevaluated ``lo``, ``glo = nan``) the
    midpoint."""
    secant = best - gbest * (best - second) / (gbest - gsecond)
    falsi = _falsi(lo, glo, hi, ghi)
    inside = torch.isfinite(secant) & (secant > lo) & (secant < hi)
    return torch.where(inside, secant, torch.where(torch.isfinite(falsi), falsi, (lo + hi) / 2))


def _refine(evaluate: Evaluate, lo, glo, hi, ghi, points, relative_width: float, flag: bool) -> torch.Tensor:
    """Shrink every bracket ``[lo, hi]`` with ``0 < lo < hi < inf`` to ``hi − lo ≤ relative_width · lo``; returns
    ``lo``. Each step evaluates the root of the secant through the two points evaluated nearest the root
    (superlinear on the nearly affine bounds, from either side), pushed a quarter of the target width towards the
    farther end of the bracket and kept half a width inside it, so that once the estimate is that precise one or two
    steps close the bracket from both sides. Where three steps did not halve the bracket, the step is a bisection
    (geometric where ``hi > 4 lo``: the radius scale is unknown), so at most about four times the steps of bisection
    in the worst case."""
    best, gbest, second, gsecond = points
    active = (lo > 0) & torch.isfinite(hi)
    widths = [torch.full_like(lo, math.inf)] * 3  # the bracket's width three, two and one steps ago
    while True:
        half = lo * relative_width / 2
        active = active & (hi - lo > 2 * half)
        idx = torch.nonzero(active).squeeze(1)
        if len(idx) == 0:
            return lo
        a, b, fa, fb, t = lo[idx], hi[idx], glo[idx], ghi[idx], half[idx]
        guess = _estimate(a, fa, b, fb, best[idx], gbest[idx], second[idx], gsecond[idx])
        s = guess + torch.where(b - guess > 1.5 * t, t / 2, -t / 2)  # up first, then down to close certified
        s = torch.minimum(torch.maximum(s, a + t), b - t)
        mid = torch.where(b > 4 * a, (a * b).sqrt(), (a + b) / 2)
        s = torch.where(b - a > widths[0][idx] / 2, mid, s)  # three steps without halving the bracket: bisect
        s = torch.where((s > a) & (s < b), s, (a + b) / 2)  # strictly inside (rounding)
        g = evaluate(idx, s, (b - s <= relative_width * s) & flag)  # flag: mark the points that would close
        ok = g > 0
        lo[idx], glo[idx] = torch.where(ok, s, a), torch.where(ok, g, fa)
        hi[idx], ghi[idx] = torch.where(ok, b, s), torch.where(ok, fb, g)
        _keep_nearest(best, gbest, second, gsecond, idx, s, g)
        widths = widths[1:] + [hi - lo]


def _keep_nearest(best, gbest, second, gsecond, idx, s, g) -> None:
    """Of the two points kept and the new one ``(s, g)``, keep the two with the smallest ``|g|`` (in place)."""
    b, gb, c, gc = best[idx], gbest[idx], second[idx], gsecond[idx]
    new_best = g.abs() < gb.abs()
    new_second = ~new_best & (g.abs() < gc.abs())
    second[idx] = torch.where(new_best, b, torch.where(new_second, s, c))
    gsecond[idx] = torch.where(new_best, gb, torch.where(new_second, g, gc))
    best[idx], gbest[idx] = torch.where(new_best, s, b), torch.where(new_best, g, gb)


def search_radius(
    evaluate: Evaluate,
    g0: torch.Tensor,
    start: float,
    lower: torch.Tensor | None = None,
    relative_width: float = RELATIVE_WIDTH,
    flag_closing: bool = False,
) -> torch.Tensor:
    """
    Per sample the largest radius factor found certified: ``0`` where ``g(0) ≤ 0`` or no certified point was found,
    ``inf`` where ``g`` stayed positive up to ``2^64 · start``.

    :param evaluate: ``g`` on a subset of the samples (:data:`Evaluate`).
    :param g0: ``g(0)`` per sample ``(N,)``.
    :param start: the first radius factor tried (the budget's own).
    :param lower: optional certified factors ``(N,)`` to start from (0 where unknown).
    :param relative_width: stop when ``hi − lo ≤ relative_width · lo``.
    :param flag_closing: pass ``closing`` True to ``evaluate`` at the points that end the search if certified
        (else always False).
    :return: ``(N,)`` radius factors.
    """
    lower = torch.zeros_like(g0) if lower is None else lower
    unbroken = (g0 > 0) & torch.isinf(lower)  # never broken for the warm start's bound: nothing to search
    g0 = torch.where(unbroken, -1.0, g0)
    lower = torch.where(g0 > 0, lower, torch.zeros_like(lower))
    begin = torch.full_like(g0, start if start > 0 else 1.0)
    state = _bracket(evaluate, g0, begin, lower)
    lo = _refine(evaluate, *state, relative_width, flag_closing)
    hi = state[2]
    radius = torch.where((g0 > 0) & torch.isinf(hi) & (lo > 0), math.inf, lo)
    return torch.where(unbroken, math.inf, torch.where(g0 > 0, radius, torch.zeros_like(radius)))


class PrunedEvaluator:
    """
    ``g`` of a bound that accepts ``classes`` (:func:`.linear_margin_bounds`), evaluating only the margins that can
    decide: every class but the label at a sample's first point ``s_1``, then only the classes whose root predicted by
    the secant through ``(0, lb_i(0))`` and ``(s_1, lb_i(s_1))`` lies within :data:`PRUNE_FACTOR` of the smallest
    predicted root (the bounds are nearly affine in the radius: the predictions are a few per cent off). That the
    other classes stay certified at the radius found is a prediction, not a guarantee: :func:`search_pruned` therefore
    re-evaluates every class at the radius found and, where one fails, searches again with it.

    :param bounds: ``(sample indices, radius factors, classes (n, J)) -> (n, J)`` margin lower bounds minus the
        tolerance.
    :param labels: ``(N,)`` labels.
    :param nb_classes: ``K``.
    :param lower: ``(N,)`` radius factors certified for every class without evaluation (the warm start), or zeros.
    :param at_zero: ``(N, K)`` the bounds minus the tolerance at radius 0 (the exact margins), ``+inf`` at the label;
        ``None``: evaluated where needed.
    """

    def __init__(
        self, bounds, labels: torch.Tensor, nb_classes: int, lower: torch.Tensor, at_zero: torch.Tensor | None = None
    ) -> None:
        self._bounds = bounds
        n = len(labels)
        self._others = other_classes(labels, nb_classes)  # the label's row dropped
        self._at_zero = None if at_zero is None else at_zero.gather(1, self._others)
        self._critical = torch.zeros((n, nb_classes), dtype=torch.bool, device=labels.device)
        self._pruned = torch.zeros(n, dtype=torch.bool, device=labels.device)
        self.verified = torch.where(torch.isfinite(lower), lower, torch.zeros_like(lower)).clone()

    def _every_class(self, idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        lb = self._bounds(idx, s, self._others[idx])
        g = lb.amin(dim=1)
        self.verified[idx] = torch.where(g > 0, torch.maximum(self.verified[idx], s), self.verified[idx])
        return g, lb

    def _prune(self, idx: torch.Tensor, s: torch.Tensor, lb: torch.Tensor) -> None:
        """The critical classes of the samples ``idx`` from their bounds ``lb`` at ``s`` (every class)."""
        if self._at_zero is None:
            self._at_zero = torch.full_like(self._others, math.inf, dtype=lb.dtype)
        at_zero = self._at_zero[idx]
        unknown = torch.isinf(at_zero[:, 0])
        if bool(unknown.any()):
            at_zero[unknown] = self._bounds(idx[unknown], torch.zeros_like(s[unknown]), self._others[idx[unknown]])
            self._at_zero[idx] = at_zero
        drop = at_zero - lb
        root = torch.where(drop > 0, s.unsqueeze(1) * at_zero / drop.clamp_min(torch.finfo(lb.dtype).tiny), math.inf)
        keep = root <= PRUNE_FACTOR * root.amin(dim=1, keepdim=True)
        self._critical[idx] = torch.zeros_like(self._critical[idx]).scatter(1, self._others[idx], keep)
        self._pruned[idx] = True

    def predict(self, idx: torch.Tensor, s: torch.Tensor, bounds: torch.Tensor) -> None:
        """Choose the critical classes of the samples ``idx`` from ``(n, K)`` bounds minus the tolerance at ``s``
        of another sound method (the warm start's), so that their first point evaluates only those."""
        self._prune(idx, s, bounds.gather(1, self._others[idx]))

    def __call__(self, idx: torch.Tensor, s: torch.Tensor, closing: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.empty_like(s)
        full = ~self._pruned[idx] if closing is None else ~self._pruned[idx] | closing
        if bool(full.any()):
            sub = idx[full]
            g[full], lb = self._every_class(sub, s[full])
            first = ~self._pruned[sub]
            failing = torch.zeros_like(self._critical[sub]).scatter(1, self._others[sub], lb <= 0)
            self._critical[sub] |= failing & ~first.unsqueeze(1)  # a class predicted to pass that failed joins
            if bool(first.any()):
                self._prune(sub[first], s[full][first], lb[first])
        if not bool(full.all()):
            # one row per (sample, critical class): no padding to the largest number of critical classes
            sub = idx[~full]
            row, cls = torch.nonzero(self._critical[sub], as_tuple=True)
            lb = self._bounds(sub[row], s[~full][row], cls.unsqueeze(1))[:, 0]
            g[~full] = torch.full_like(s[~full], math.inf).scatter_reduce(0, row, lb, "amin")
        return g

    def at_zero(self, g0: torch.Tensor) -> torch.Tensor:
        """``g(0)`` of the function searched: the minimum over the critical classes where they are chosen (the
        intercept the secant steps start from; ``≥ g0``), ``g0`` elsewhere."""
        if self._at_zero is None:
            return g0
        critical = self._critical.gather(1, self._others)
        mine = torch.where(critical, self._at_zero, math.inf).amin(dim=1)
        return torch.where(self._pruned & (g0 > 0), mine, g0)

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
    evaluate: PrunedEvaluator,
    g0: torch.Tensor,
    start: float,
    lower: torch.Tensor,
    rounds: int = 3,
    relative_width: float = RELATIVE_WIDTH,
) -> torch.Tensor:
    """:func:`search_radius` with a :class:`PrunedEvaluator`, then every class evaluated at the radius found; where
    one fails (a non-monotone bound) the search runs again from the largest radius certified with every class, with
    that class kept, up to ``rounds`` times, after which that largest radius is returned (``relative_width``: as
    :func:`search_radius`)."""
    radius = search_radius(evaluate, evaluate.at_zero(g0), start, lower, relative_width, flag_closing=True)
    for _ in range(rounds):
        failed = evaluate.failures(radius)
        if not bool(failed.any()):
            return radius
        idx = torch.nonzero(failed).squeeze(1)
        subset = lambda sub, s, closing, idx=idx: evaluate(idx[sub], s, closing)  # noqa: E731
        anchor = evaluate.at_zero(g0)[idx]
        again = search_radius(subset, anchor, start, evaluate.verified[idx].clone(), relative_width, flag_closing=True)
        radius = radius.clone()
        radius[idx] = again
    failed = evaluate.failures(radius)
    return torch.where(failed, evaluate.verified, radius)
