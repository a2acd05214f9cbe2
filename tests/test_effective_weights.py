"""One rule for an estimator that carries a weight perturbation (issue 22): every attack, certificate and metric starts
from its effective weights ``W + Δ``, the weights it predicts with (docs/certification.md, "Perturbed estimators")."""

from __future__ import annotations

import numpy as np
import pytest
from art.exceptions import EstimatorError
from conftest import make_classifier, make_mlp

from art_weightpert import (
    BitFlipAttack,
    BitFlipCertifier,
    PerturbationBudget,
    QuantizedWeights,
    RandomBitFlips,
    WeightPerturbationCertifier,
    WeightPGD,
    as_weight_classifier,
    effective_estimator,
)
from art_weightpert.metrics import bit_flip_curve, weight_certified_accuracy


def accuracy(estimator, x, y) -> float:
    return float(np.mean(estimator.predict(x).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def clf(digits):
    x_train, y_train, _, _ = digits
    classifier = make_classifier(make_mlp(seed=5), lr=0.02)
    classifier.fit(x_train, y_train, batch_size=128, nb_epochs=6, verbose=False)
    return classifier


@pytest.fixture(scope="module")
def attacked(clf, digits):
    """The quantized estimator after 6 BFA flips (much less accurate than the float one)."""
    _, _, x_test, y_test = digits
    return BitFlipAttack(clf, max_flips=6, verbose=False).generate_estimator(x_test[:128], y_test[:128])


def test_the_effective_estimator_predicts_as_the_estimator(clf, attacked, digits):
    _, _, x_test, _ = digits
    effective = effective_estimator(attacked)
    assert effective.weight_perturbation is None and effective_estimator(clf) is clf
    np.testing.assert_array_equal(effective.predict(x_test).argmax(1), attacked.predict(x_test).argmax(1))
    assert attacked.weight_perturbation is not None  # unchanged


def test_bit_flip_certifier_on_a_bfa_attacked_estimator_reports_its_accuracy(clf, attacked, digits):
    _, _, x_test, y_test = digits
    x, y = x_test[:200], y_test[:200]
    own = accuracy(attacked, x, y)
    assert own < accuracy(clf, x, y) - 0.1
    certifier = BitFlipCertifier(attacked, max_flips=1, method="interval", verbose=False)
    flips = certifier.certified_flips(x, y)
    assert np.mean(flips >= 0) == own  # -1: misclassified by the certified (attacked) model
    certified = certifier.certify(x, y)
    assert not np.any(certified & (attacked.predict(x).argmax(1) != y))
    # its codes are the attacked ones, on the grid of the clean quantization (no re-quantization)
    flipped = QuantizedWeights.from_estimator(clf).flipped_bits(certifier.quantized_)
    assert flipped == 6


@pytest.mark.parametrize("method", ["interval", "linear"])
def test_a_certificate_on_a_perturbed_estimator_never_certifies_what_it_misclassifies(clf, digits, method):
    _, _, x_test, y_test = digits
    x, y = x_test[:120], y_test[:120]
    delta = WeightPGD(clf, PerturbationBudget(0.03, "inf"), max_iter=5, verbose=False).generate(x, y)
    perturbed = clf.with_weight_perturbation(delta)
    wrong = perturbed.predict(x).argmax(1) != y
    assert wrong.sum() > 5
    certified = WeightPerturbationCertifier(perturbed, PerturbationBudget(1e-4, "inf"), method, verbose=False)
    assert not np.any(certified.certify(x, y) & wrong)
    assert weight_certified_accuracy(perturbed, x, y, PerturbationBudget(1e-4, "inf"), method) <= 1 - wrong.mean()


def test_weight_pgd_on_a_quantized_estimator_is_never_more_accurate_than_it(clf, digits):
    _, _, x_test, y_test = digits
    x, y = x_test[:128], y_test[:128]
    quantized = QuantizedWeights.from_estimator(clf, n_bits=3).apply(clf)  # coarse codes: less accurate than clf
    before = accuracy(quantized, x, y)
    for eps in (1e-4, 1e-2):
        for restarts in (0, 1):
            attack = WeightPGD(quantized, PerturbationBudget(eps, "inf"), max_iter=2, num_random_init=restarts,
                               verbose=False)  # fmt: skip
            assert accuracy(attack.generate_estimator(x, y), x, y) <= before


def test_bit_flip_attacks_and_metrics_start_from_the_attacked_model(clf, attacked, digits):
    _, _, x_test, y_test = digits
    x, y = x_test[:200], y_test[:200]
    own = accuracy(attacked, x, y)
    assert RandomBitFlips(attacked, nb_flips=1, nb_samples=2, seed=0, verbose=False).evaluate(x, y)["quantized"] == own
    curve = bit_flip_curve(attacked, x, y, flips=[1], x_attack=x[:64], y_attack=y[:64], nb_samples=1)
    assert curve["clean_accuracy"] == curve["quantized_accuracy"] == own
    again = BitFlipAttack(attacked, max_flips=1, verbose=False)
    assert accuracy(again.generate_estimator(x[:64], y[:64]), x[:64], y[:64]) <= accuracy(attacked, x[:64], y[:64])


def test_one_wrapping_function_one_exception(clf):
    assert as_weight_classifier(clf) is clf
    for make in (
        lambda: as_weight_classifier(object()),
        lambda: WeightPGD(object(), PerturbationBudget(0.1)),
        lambda: BitFlipAttack(object()),
        lambda: WeightPerturbationCertifier(object(), PerturbationBudget(0.1)),
        lambda: BitFlipCertifier(object()),
        lambda: weight_certified_accuracy(object(), np.zeros((1, 64)), np.zeros(1), PerturbationBudget(0.1)),
    ):
        with pytest.raises(EstimatorError, match="must be an ART PyTorchClassifier"):
            make()
    assert issubclass(EstimatorError, TypeError)
