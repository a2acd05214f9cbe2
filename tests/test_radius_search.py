"""The certified-radius search (:mod:`.radius_search`) on functions with a known root: the returned radius is a point
evaluated certified, within the stated relative width of the root, found in far fewer evaluations than bisection;
classes wrongly predicted not to decide are caught and searched again."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from art_weightpert import PerturbationBudget
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.certification.certifier import CERTIFICATION_RTOL
from art_weightpert.certification.radius_search import RELATIVE_WIDTH, PrunedEvaluator, search_pruned, search_radius
from tests.conftest import make_classifier, random_mlp

ROOTS = torch.tensor([1e-7, 3e-4, 0.02, 1.0, 7.5, 4e3], dtype=torch.float64)

SHAPES = {
    "affine": lambda s, r: 1 - s / r,
    "concave": lambda s, r: 1 - s / r - 0.3 * (s / r) ** 2 + 0.3 * s / r,  # like the linear bound's curvature
    "convex": lambda s, r: torch.exp(-3 * s / r) - math.exp(-3.0),
    "kinked": lambda s, r: torch.minimum(1 - s / r, 0.5 * (1 - s / r)) + 1e-14 * torch.sin(1e9 * s / r),
}


class Recorder:
    """An :data:`.Evaluate` that records every point it evaluates."""

    def __init__(self, shape):
        self.shape, self.points, self.calls = shape, [], 0

    def __call__(self, idx, s, closing):
        self.calls += 1
        g = self.shape(s, ROOTS[idx])
        self.points += [(int(i), float(si), float(gi)) for i, si, gi in zip(idx, s, g)]
        return g


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("lower", [False, True], ids=["cold", "warm"])
def test_search_returns_an_evaluated_certified_point_next_to_the_root(name, lower):
    shape = SHAPES[name]
    evaluate = Recorder(shape)
    g0 = shape(torch.zeros_like(ROOTS), ROOTS)
    warm = ROOTS / 7 if lower else None  # a certified lower radius, as the interval warm start gives
    radius = search_radius(evaluate, g0, 1.0, warm)
    for n, (r, root) in enumerate(zip(radius.tolist(), ROOTS.tolist())):
        positive = [s for i, s, g in evaluate.points if i == n and g > 0]
        negative = [s for i, s, g in evaluate.points if i == n and g <= 0]
        assert r in positive  # evaluated there, certified
        assert min(s for s in negative if s > r) - r <= RELATIVE_WIDTH * r  # a failing point just above
        assert abs(r - root) <= 4 * RELATIVE_WIDTH * root + 1e-13 * root  # the root (up to the kinked one's noise)
        assert len(positive) + len(negative) <= (12 if lower else 24)  # bisection from the bracket alone: ≥ 36


def test_search_handles_unbroken_and_uncertified_samples():
    g0 = torch.tensor([1.0, -1.0, 0.0, 1.0], dtype=torch.float64)
    never = lambda idx, s, closing: torch.where(idx == 0, 1.0, 1 - s).to(torch.float64)  # noqa: E731
    radius = search_radius(never, g0, 1.0)
    assert radius[0] == math.inf and radius[1] == 0 and radius[2] == 0
    assert abs(float(radius[3]) - 1) <= RELATIVE_WIDTH


def test_pruned_search_catches_a_class_wrongly_predicted_not_to_decide():
    """The warm start's per-class bounds predict class 1 alone decides; class 2 fails first. The point that would end
    the search is evaluated with every class, so class 2 joins and the radius is its root, certified for both."""

    def margins(s):  # label 0; class 1: root 1, class 2: root 0.5
        return torch.stack([torch.full_like(s, math.inf), 1 - s, 1 - 2 * s], dim=1)

    calls = []

    def bounds(idx, s, classes):
        calls.append(classes.shape)
        return margins(s).gather(1, classes)

    labels = torch.zeros(3, dtype=torch.long)
    lower = torch.full((3,), 0.1, dtype=torch.float64)
    evaluate = PrunedEvaluator(bounds, labels, 3, lower, margins(torch.zeros(3, dtype=torch.float64)))
    wrong = torch.tensor([[math.inf, 0.9, 1.0]] * 3, dtype=torch.float64)  # class 2 looks safe at 0.1
    evaluate.predict(torch.arange(3), lower, wrong)
    radius = search_pruned(evaluate, torch.ones(3, dtype=torch.float64), 1.0, lower)
    assert torch.all((radius - 0.5).abs() <= RELATIVE_WIDTH)
    assert torch.all(margins(radius)[:, 1:].amin(dim=1) > 0)
    assert calls[0] == (3, 1)  # the first point evaluated the predicted class only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_radius_on_random_models_is_certified_and_within_the_width_of_a_bisection(seed):
    """On random deeper models with an absolute box budget: the radius is certified for every class (re-evaluated in
    another batch composition) and agrees with a plain bisection on the public API to 1e-9: the search's width
    (RELATIVE_WIDTH) plus the rounding noise of the bound itself, whose root moves by ~1e-11-1e-10 (relative) with the
    batch composition and the search's safety margin."""
    model = random_mlp([10, 24, 24, 16, 6], bias=True, seed=seed)
    clf = make_classifier(model, input_shape=(10,), nb_classes=6)
    x = np.random.default_rng(seed).random((12, 10), dtype=np.float32)
    y = clf.predict(x).argmax(axis=1)
    certifier = WeightPerturbationCertifier(clf, PerturbationBudget(1e-3, "inf"), method="linear", verbose=False)
    radius = certifier.certified_radius(x, y)
    assert np.all(np.isfinite(radius)) and np.all(radius > 0)
    tol = CERTIFICATION_RTOL * (1 + np.abs(clf.predict(x)).max(axis=1).astype(np.float64))
    for n in range(len(x)):  # one sample at a time: another batch composition than the search's
        bound = certifier.margin_lower_bounds(x[n : n + 1], y[n : n + 1], scale=radius[n : n + 1] / 1e-3)
        assert bound.min() > tol[n]

    def certified(s):
        return certifier.margin_lower_bounds(x, y, scale=s / 1e-3).min(axis=1) > tol

    lo, hi = np.zeros(len(x)), radius * 4
    assert not certified(hi).any()
    for _ in range(45):  # bisection to 4 · 2^-45 < 1.2e-13 of the radius
        mid = (lo + hi) / 2
        ok = certified(mid)
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    np.testing.assert_allclose(radius, lo, rtol=1e-9)
