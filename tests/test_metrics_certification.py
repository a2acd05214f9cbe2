"""Certification metrics: certified accuracy and radii agree with the certifier; the generalization bound's terms are
those of THEORY.md §6, computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, UnsupportedModelError, WeightPerturbationCertifier
from art_weightpert.metrics import certified_weight_radius, generalization_bound, weight_certified_accuracy
from tests.conftest import make_classifier


@pytest.fixture(scope="module")
def bias_free_classifier(digits):
    """A bias-free digits MLP 64-16-10 trained briefly (the setting of THEORY.md §6)."""
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    clf = make_classifier(model)
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=5, verbose=False)
    return clf


@pytest.mark.parametrize("method", ["paper", "interval"])
def test_certified_accuracy_and_radius_agree_with_the_certifier(tiny_mlp_classifier, digits, method):
    _, _, x_test, y_test = digits
    x, y = x_test[:60], y_test[:60]
    budget = PerturbationBudget(0.01, "row_l1")
    certifier = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method=method, verbose=False)
    accuracy = weight_certified_accuracy(tiny_mlp_classifier, x, y, budget, method=method)
    assert accuracy == pytest.approx(certifier.certify(x, y).mean())
    assert 0.0 < accuracy <= 1.0
    radius = certified_weight_radius(tiny_mlp_classifier, x[:10], y[:10], budget, method=method)
    np.testing.assert_allclose(radius, certifier.certified_radius(x[:10], y[:10]), rtol=1e-12)
    # Certified accuracy never increases with the radius; at a radius above every certified one it is 0.
    grid = [0.0, 0.005, 0.02, 0.08]
    curve = [weight_certified_accuracy(tiny_mlp_classifier, x, y, budget.with_eps(e), method=method) for e in grid]
    assert all(a >= b for a, b in zip(curve, curve[1:]))
    clean = (tiny_mlp_classifier.predict(x).argmax(axis=1) == y).mean()
    assert curve[0] == pytest.approx(clean)
    top = float(certified_weight_radius(tiny_mlp_classifier, x, y, budget, method=method).max())
    assert weight_certified_accuracy(tiny_mlp_classifier, x, y, budget.with_eps(1.01 * top), method=method) == 0.0


def test_metrics_require_labels_and_handle_empty_sets(tiny_mlp_classifier):
    budget = PerturbationBudget(0.01, "inf")
    x = np.zeros((0, 64), dtype=np.float32)
    assert math.isnan(weight_certified_accuracy(tiny_mlp_classifier, x, np.zeros(0, dtype=int), budget))
    assert certified_weight_radius(tiny_mlp_classifier, x, np.zeros(0, dtype=int), budget).shape == (0,)
    with pytest.raises(ValueError, match="labels `y` are required"):
        weight_certified_accuracy(tiny_mlp_classifier, np.zeros((2, 64), dtype=np.float32), None, budget)


def test_generalization_bound_terms_follow_section_6(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    eps, gamma, delta = 0.01, 2.0, 0.05
    budget = PerturbationBudget(eps, "row_l1")
    out = generalization_bound(bias_free_classifier, x_train, y_train, budget, margin=gamma, delta=delta)
    model = bias_free_classifier.model
    weights = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    norms = [float(w.abs().sum(dim=1).max()) for w in weights]
    n, n0, k, d = len(x_train), 64, 10, 2
    big_b = float(np.abs(x_train).max())
    rademacher = 2 ** (d - 1) * math.prod(m + eps for m in norms) * big_b * math.sqrt(2 * math.log(2 * n0) / n)
    w1, w2 = (w.numpy() for w in weights)
    logits = np.maximum(x_train.astype(np.float64) @ w1.T, 0) @ w2.T
    own = logits[np.arange(n), y_train]
    others = np.where(np.eye(k, dtype=bool)[y_train], -np.inf, logits).max(axis=1)
    empirical = float(np.mean(own - others <= gamma))
    assert out["operator_norms"] == pytest.approx(norms, rel=1e-12)
    assert out["eps"] == pytest.approx([eps, eps])
    assert out["depth"] == d and out["input_dim"] == n0 and out["n_samples"] == n and out["nb_classes"] == k
    assert out["rademacher_complexity"] == pytest.approx(rademacher, rel=1e-12)
    assert out["margin_factor"] == pytest.approx(4 * k / gamma)
    assert out["rademacher_term"] == pytest.approx(4 * k / gamma * rademacher, rel=1e-12)
    assert out["confidence_term"] == pytest.approx(math.sqrt(math.log(1 / delta) / (2 * n)))
    assert out["empirical_margin_loss"] == pytest.approx(empirical)
    assert out["total"] == pytest.approx(empirical + out["rademacher_term"] + out["confidence_term"])
    # The certified margin (worst network in the ball) is below the clean one: its loss is at least as large.
    assert out["certified_margin_loss"] >= out["empirical_margin_loss"]
    assert out["total_certified"] >= out["total"]
    certifier = WeightPerturbationCertifier(bias_free_classifier, budget, method="paper", verbose=False)
    certified_margin = certifier.margin_lower_bounds(x_train, y_train).min(axis=1)
    assert out["certified_margin_loss"] == pytest.approx(float(np.mean(certified_margin <= gamma)))


def test_generalization_bound_at_zero_radius_and_growing_radius(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:300], y_train[:300]
    zero = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(0.0, "inf"), margin=1.0)
    assert zero["certified_margin_loss"] == pytest.approx(zero["empirical_margin_loss"])
    assert zero["total_certified"] == pytest.approx(zero["total"])
    small = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(1e-3, "inf"), margin=1.0)
    large = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(1e-2, "inf"), margin=1.0)
    assert zero["rademacher_term"] < small["rademacher_term"] < large["rademacher_term"]
    assert small["certified_margin_loss"] <= large["certified_margin_loss"]
    # Box radius δ enters through the inclusion box δ ⊆ row_l1 (n·δ), n the fan-in (THEORY.md §2).
    assert small["eps"] == pytest.approx([64 * 1e-3, 16 * 1e-3])


def test_generalization_bound_with_biases_uses_the_constant_feature(tiny_mlp_classifier, digits):
    x_train, y_train, _, _ = digits
    out = generalization_bound(tiny_mlp_classifier, x_train[:200], y_train[:200], PerturbationBudget(0.01, "row_l1"))
    assert out["input_dim"] == 65 and out["input_bound"] >= 1.0
    layers = [m for m in tiny_mlp_classifier.model if isinstance(m, nn.Linear)]
    expected = [
        max(1.0, float((m.weight.detach().double().abs().sum(dim=1) + m.bias.detach().double().abs()).max()))
        for m in layers
    ]
    assert out["operator_norms"] == pytest.approx(expected, rel=1e-12)


def test_generalization_bound_rejects_bad_arguments_and_models(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    budget = PerturbationBudget(0.01, "row_l1")
    x, y = x_train[:20], y_train[:20]
    with pytest.raises(ValueError, match="`margin`"):
        generalization_bound(bias_free_classifier, x, y, budget, margin=0.0)
    with pytest.raises(ValueError, match="`delta`"):
        generalization_bound(bias_free_classifier, x, y, budget, delta=1.5)
    with pytest.raises(TypeError, match="`margin`"):
        generalization_bound(bias_free_classifier, x, y, budget, margin="1")
    with pytest.raises(ValueError, match="labels `y` are required"):
        generalization_bound(bias_free_classifier, x, None, budget)
    with pytest.raises(ValueError, match="at least one sample"):
        generalization_bound(bias_free_classifier, x[:0], y[:0], budget)
    sigmoid = make_classifier(nn.Sequential(nn.Linear(64, 8, bias=False), nn.Sigmoid(), nn.Linear(8, 10, bias=False)))
    with pytest.raises(UnsupportedModelError, match="σ\\(0\\) = 0"):
        generalization_bound(sigmoid, x, y, budget)
    batchnorm = make_classifier(nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)))
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        generalization_bound(batchnorm, x, y, budget)
