"""Certified radii and the registry's claims: certificates hold just below the certified radius and fail just above
it, the closed form agrees with the bisection where a method declares its bound affine in the radius (and the bounds
are then affine), per-sample radius factors equal scaled budgets, and the bound cache follows in-place weight
changes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from art_weightpert import PerturbationBudget
from art_weightpert.certification import METHODS, WeightPerturbationCertifier
from art_weightpert.certification.certifier import CERTIFICATION_RTOL
from art_weightpert.certification.common import BoundCache
from art_weightpert.network import read_network
from tests.conftest import make_classifier, random_mlp


def _certifier_at(clf, budget: PerturbationBudget, factor: float, method: str) -> WeightPerturbationCertifier:
    scaled = budget.scaled(factor) if isinstance(budget.eps, dict) else budget.with_eps(factor)
    return WeightPerturbationCertifier(clf, scaled, method=method, verbose=False)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(
    "budget",
    [
        PerturbationBudget(0.01, "row_l1"),  # all layers: bisection
        PerturbationBudget(0.01, "inf", layers=["2"]),  # last layer only: closed form for both methods
        PerturbationBudget(0.01, "l2", layers=["0"]),  # first layer: closed form for paper, bisection for interval
        PerturbationBudget({"0": 0.02, "2": 0.01}, "inf", relative=True),  # per-layer dict: a factor
    ],
    ids=["row_l1-all", "inf-last", "l2-first", "dict-relative"],
)
def test_certify_holds_just_below_the_certified_radius(tiny_mlp_classifier, digits, method, budget):
    _, _, x_test, y_test = digits
    x, y = x_test[:12], y_test[:12]
    certifier = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method=method, verbose=False)
    radius = certifier.certified_radius(x, y)
    correct = tiny_mlp_classifier.predict(x).argmax(axis=1) == y
    assert np.all(radius[~correct] == 0)
    assert np.all(np.isfinite(radius)) and np.all(radius >= 0)
    assert (radius > 0).sum() >= 8
    for n in np.flatnonzero(radius > 0):
        below = _certifier_at(tiny_mlp_classifier, budget, 0.99 * radius[n], method)
        above = _certifier_at(tiny_mlp_classifier, budget, 1.01 * radius[n], method)
        assert below.certify(x[n : n + 1], y[n : n + 1])[0]
        assert not above.certify(x[n : n + 1], y[n : n + 1])[0]


@pytest.mark.parametrize("method", ["paper", "interval"])
def test_closed_form_radius_agrees_with_bisection(tiny_mlp_classifier, digits, method):
    """Where the bound is affine in the radius, the closed form and the vectorized bisection give the same radii."""
    _, _, x_test, _ = digits
    x = x_test[:20]
    budget = PerturbationBudget(0.01, "inf", layers=["2"])
    certifier = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method=method, verbose=False)
    assert certifier._method.affine_in_radius(certifier.network, certifier.parameter_balls)
    closed = certifier.certified_radius(x)
    assert (closed > 0).sum() >= 15
    certifier._method = dataclasses.replace(certifier._method, affine_in_radius=lambda network, param_balls: False)
    np.testing.assert_allclose(certifier.certified_radius(x), closed, rtol=1e-9)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("layers", [None, ["0"], ["2"]], ids=["all", "first", "last"])
def test_registry_affinity_claims_hold(method, layers):
    """Where a method declares its bound affine in the radius factor ``s`` (closed-form radius), the bounds at several
    factors lie on the line through ``s = 0`` and ``s = 1``; everywhere they decrease with ``s``."""
    model = random_mlp([6, 5, 4], bias=True, seed=2)
    clf = make_classifier(model, input_shape=(6,), nb_classes=4)
    budget = PerturbationBudget(0.05, "inf", layers=layers, include_bias=True)
    certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False)
    x = np.random.default_rng(4).normal(size=(7, 6)).astype(np.float32)
    factors = [0.0, 0.3, 1.0, 2.5]
    bounds = [certifier.margin_lower_bounds(x, scale=np.full(len(x), s)) for s in factors]
    finite = np.isfinite(bounds[0])
    for low, high in zip(bounds, bounds[1:]):
        assert np.all(high[finite] <= low[finite] + 1e-12)
    if METHODS[method].affine_in_radius(certifier.network, certifier.parameter_balls):
        at0, slope = bounds[0][finite], bounds[0][finite] - bounds[2][finite]
        for s, b in zip(factors, bounds):
            np.testing.assert_allclose(b[finite], at0 - s * slope, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", list(METHODS))
def test_per_sample_scale_equals_the_scaled_budget(method):
    """``margin_lower_bounds(x, scale=s)`` bounds sample ``n`` over the ball scaled by ``s[n]``."""
    model = random_mlp([6, 5, 4], bias=True, seed=3)
    clf = make_classifier(model, input_shape=(6,), nb_classes=4)
    budget = PerturbationBudget({"0": 0.04, "2": 0.02}, "row_l1", relative=True, include_bias=True)
    x = np.random.default_rng(5).normal(size=(5, 6)).astype(np.float32)
    y = np.arange(5) % 4
    scale = np.array([0.0, 0.5, 1.0, 2.0, 0.1])
    got = WeightPerturbationCertifier(clf, budget, method, verbose=False).margin_lower_bounds(x, y, scale=scale)
    for n, s in enumerate(scale):
        one = WeightPerturbationCertifier(clf, budget.scaled(s), method, verbose=False)
        np.testing.assert_allclose(got[n : n + 1], one.margin_lower_bounds(x[n : n + 1], y[n : n + 1]), rtol=1e-12)


@pytest.mark.parametrize("method", list(METHODS))
def test_bound_cache_follows_in_place_weight_changes(method):
    """The cache key (tensor identity and version) suffices: bounds computed through a warm cache after the weights
    changed in place equal bounds computed without a cache."""
    model64 = random_mlp([6, 5, 4], bias=True, seed=6).double().requires_grad_(False)
    network = read_network(model64, (6,))
    bounds = METHODS[method].bounds
    x = torch.randn((5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(5) % 4
    cache = BoundCache()
    for budget in (PerturbationBudget(0.05, "inf", relative=True), PerturbationBudget(0.02, "row_l1")):
        param_balls = budget.parameter_balls(model64, torch.float64)
        before = bounds(network, param_balls, x, labels, torch.float64, None, cache)
        assert len(cache) > 0
        with torch.no_grad():
            for p in model64.parameters():
                p.mul_(1.5)
        warm = bounds(network, param_balls, x, labels, torch.float64, None, cache)
        assert not torch.equal(warm, before)
        torch.testing.assert_close(warm, bounds(network, param_balls, x, labels, torch.float64), rtol=0, atol=0)


def test_radius_is_zero_for_wrong_predictions_and_wrong_predictions_are_never_certified(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    pred = tiny_mlp_classifier.predict(x_test).argmax(axis=1)
    wrong = np.flatnonzero(pred != y_test)[:5]
    assert len(wrong) > 0
    y_wrong = y_test[wrong]
    certifier = WeightPerturbationCertifier(
        tiny_mlp_classifier, PerturbationBudget(0.0, "inf"), "interval", verbose=False
    )
    assert not certifier.certify(x_test[wrong], y_wrong).any()
    assert np.all(certifier.certified_radius(x_test[wrong], y_wrong) == 0)
    # eps = 0: exactly the correctly classified samples (with a non-negligible margin) are certified.
    assert certifier.certify(x_test[wrong]).all()
    assert np.array_equal(certifier.certify(x_test[:50], y_test[:50]), pred[:50] == y_test[:50])


def _old_bisection(certifier: WeightPerturbationCertifier, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The previous search (doubling/halving bracket, then 36 halvings) on the public per-sample scale API: the
    reference the new search is compared with."""
    logits = certifier.estimator.predict(x)
    tol = CERTIFICATION_RTOL * (1 + np.abs(logits).max(axis=1).astype(np.float64))

    def ok(s):
        return certifier.margin_lower_bounds(x, y, scale=s).min(axis=1) > tol

    unit = certifier.budget.eps
    eligible = ok(np.zeros(len(x)))
    lo, hi, s = np.zeros(len(x)), np.full(len(x), np.inf), np.full(len(x), unit)
    for _ in range(64):
        active = eligible & ((lo == 0) | np.isinf(hi))
        if not active.any():
            break
        good = ok(s / unit)
        lo, hi = np.where(active & good, s, lo), np.where(active & ~good, s, hi)
        s = np.where(np.isinf(hi), s * 2, s / 2)
    for _ in range(36):
        mid = np.where(eligible & np.isfinite(hi) & (lo > 0), (lo + hi) / 2, lo)
        good = ok(mid / unit)
        lo, hi = np.where(good, mid, lo), np.where(good, hi, mid)
    return np.where(eligible, lo, 0.0)


@pytest.mark.parametrize(
    "budget",
    [PerturbationBudget(0.01, "row_l1"), PerturbationBudget(0.02, "inf", relative=True, include_bias=True)],
    ids=["row_l1", "inf-relative-bias"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_linear_radius_is_certified_and_beats_the_interval_radius(budget, seed):
    """The searched ``"linear"`` radius is certified there (every margin bound above the tolerance), at least the
    ``"interval"`` radius (its warm start), and equal to the previous bisection's to its precision."""
    model = random_mlp([8, 16, 12, 5], bias=True, seed=seed)
    clf = make_classifier(model, input_shape=(8,), nb_classes=5)
    x = np.random.default_rng(seed).random((16, 8), dtype=np.float32)
    y = clf.predict(x).argmax(axis=1)
    linear = WeightPerturbationCertifier(clf, budget, method="linear", verbose=False)
    radius = linear.certified_radius(x, y)
    interval = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False).certified_radius(x, y)
    assert np.all(np.isfinite(radius)) and (radius > 0).sum() >= 12
    assert np.all(radius >= interval * (1 - 1e-9))
    tol = CERTIFICATION_RTOL * (1 + np.abs(clf.predict(x)).max(axis=1).astype(np.float64))
    bounds = linear.margin_lower_bounds(x, y, scale=radius / budget.eps)
    assert np.all(bounds.min(axis=1)[radius > 0] > tol[radius > 0])
    old = _old_bisection(linear, x, y)
    np.testing.assert_allclose(radius, old, rtol=1e-9)


def test_pruned_search_falls_back_where_a_pruned_class_is_not_monotone():
    """The linear radius search drops the classes certified at the first failing radius; where one of them fails
    below it (a non-monotone bound), the verification returns a radius evaluated certified for every class."""
    from art_weightpert.certification.radius_search import PrunedEvaluator, search_pruned, search_radius

    def margins(s):  # (n, 3): label 0; class 1 certified below 1; class 2 fails only on [0.9, 1.5)
        other = torch.where((s >= 0.9) & (s < 1.5), -1.0, 1.0)
        return torch.stack([torch.full_like(s, math.inf), 1 - s, other], dim=1)

    def bounds(idx, s, classes):
        return margins(s).gather(1, classes)

    labels = torch.zeros(2, dtype=torch.long)
    evaluate = PrunedEvaluator(bounds, labels, 3, torch.zeros(2, dtype=torch.float64))
    g0 = torch.ones(2, dtype=torch.float64)
    found = search_radius(evaluate, g0, start=2.0)
    assert torch.allclose(found, torch.ones(2, dtype=torch.float64))  # class 2 pruned at s = 2, where it passes
    assert evaluate.failures(found).all()  # ... and fails at 1
    evaluate = PrunedEvaluator(bounds, labels, 3, torch.zeros(2, dtype=torch.float64))
    radius = search_pruned(evaluate, g0, 2.0, torch.zeros(2, dtype=torch.float64))
    assert torch.all(radius < 0.9) and torch.all(radius > 0.9 * (1 - 1e-9))
    assert torch.all(margins(radius)[:, 1:].amin(dim=1) > 0)
