"""Certification metrics: certified accuracy and radii agree with the certifier. (The generalization bound's tests are
in tests/test_generalization.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from art_weightpert import PerturbationBudget, WeightPerturbationCertifier
from art_weightpert.metrics import certified_weight_radius, weight_certified_accuracy


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
    with pytest.raises(ValueError, match="`x` is empty"):
        weight_certified_accuracy(tiny_mlp_classifier, x, np.zeros(0, dtype=int), budget)
    with pytest.raises(ValueError, match="`x` is empty"):
        certified_weight_radius(tiny_mlp_classifier, x, np.zeros(0, dtype=int), budget)
    with pytest.raises(ValueError, match="labels `y` are required"):
        weight_certified_accuracy(tiny_mlp_classifier, np.zeros((2, 64), dtype=np.float32), None, budget)
