"""No cached result survives a change it depends on, however the change is made (issue 22): weights edited in place
through ``.data`` (which torch's version counters do not see), a budget or a list of layers mutated in place, new ART
arguments of a perturbed estimator; and the robustness curve's attack keeps the estimator's carried perturbation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from art_weightpert import BitFlipCertifier, PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.estimators.wrapping import effective_estimator
from art_weightpert.metrics import weight_robustness_curve

X = np.random.RandomState(0).randn(40, 4).astype(np.float32)
DELTA = {"2.weight": torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * 0.3}


def _estimator() -> PyTorchWeightClassifier:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    return PyTorchWeightClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(4,), nb_classes=3)


def test_weights_edited_through_data_are_seen():
    estimator = _estimator()
    budget = PerturbationBudget(0.01)
    certifier = WeightPerturbationCertifier(estimator, budget, verbose=False)
    labels = estimator.predict(X).argmax(1)
    assert certifier.certify(X, labels).sum() > 0
    estimator.model[2].weight.data.mul_(1e-3)  # predictions unchanged, margins a thousand times smaller
    estimator.model[2].bias.data.mul_(1e-3)
    fresh = WeightPerturbationCertifier(estimator, budget, verbose=False)
    np.testing.assert_array_equal(certifier.certify(X, labels), fresh.certify(X, labels))
    np.testing.assert_array_equal(certifier.margin_lower_bounds(X, labels), fresh.margin_lower_bounds(X, labels))


def test_a_budget_mutated_in_place_takes_effect():
    estimator = _estimator()
    budget = PerturbationBudget(0.01)
    certifier = WeightPerturbationCertifier(estimator, budget, verbose=False)
    assert certifier.certify(X).sum() > 0
    budget.eps = 1.0
    expected = WeightPerturbationCertifier(estimator, PerturbationBudget(1.0), verbose=False).certify(X)
    np.testing.assert_array_equal(certifier.certify(X), expected)


def test_layers_mutated_in_place_take_effect():
    estimator = _estimator()
    certifier = BitFlipCertifier(estimator, max_flips=1, layers=["2"], verbose=False)
    before = certifier.certify(X)
    certifier.layers.append("0")
    expected = BitFlipCertifier(estimator, max_flips=1, layers=["2", "0"], verbose=False).certify(X)
    np.testing.assert_array_equal(certifier.certify(X), expected)
    assert expected.sum() <= before.sum()


def test_new_art_arguments_of_a_perturbed_estimator_are_seen():
    perturbed = _estimator().with_weight_perturbation(DELTA)
    certifier = BitFlipCertifier(perturbed, max_flips=1, verbose=False)
    certifier.certify(X)
    perturbed.set_params(preprocessing=(np.float32(3.0), np.float32(0.1)))
    expected = BitFlipCertifier(perturbed, max_flips=1, verbose=False).certify(X)
    np.testing.assert_array_equal(certifier.certify(X), expected)


def test_the_curve_attacks_the_effective_weights():
    estimator = _estimator()
    perturbed = estimator.with_weight_perturbation(DELTA)
    labels = estimator.predict(X).argmax(1)
    options = {"methods": ("clean", "pgd"), "seed": 0}
    on_perturbed = weight_robustness_curve(perturbed, X, labels, [0.05], **options)["accuracies"]
    on_effective = weight_robustness_curve(effective_estimator(perturbed), X, labels, [0.05], **options)["accuracies"]
    assert on_perturbed == on_effective
    assert on_perturbed["pgd"][0] <= on_perturbed["clean"][0]
