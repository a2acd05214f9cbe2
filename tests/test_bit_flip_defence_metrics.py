"""The metrics that measure bit-flip attacks and defences against each other (``metrics.bit_flip_defences``, the float
curve of ``metrics.bit_flips``): each number checked against a direct computation with the objects it summarises."""

from __future__ import annotations

import numpy as np
import pytest

from art_weightpert.defences.transformer import clip_activations
from art_weightpert.metrics.bit_flip_defences import clipping_evaluation, flips_to_accuracy, integrity_evaluation
from art_weightpert.metrics.bit_flips import float_bit_flip_curve
from art_weightpert.quantization import QuantizedWeights


def _accuracy(classifier, x, y) -> float:
    return float(np.mean(classifier.predict(x).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def setting(trained_digits_mlp, digits):
    x_train, y_train, x_test, y_test = digits
    return trained_digits_mlp, x_test[:200], y_test[:200], x_train[:128], y_train[:128]


def test_flips_to_accuracy_is_the_first_flip_at_the_level(setting):
    clf, x, y, xa, ya = setting
    result = flips_to_accuracy(clf, x, y, xa, ya, level=0.5, max_flips=30)
    curve, k = result["curve"], result["flips"]
    assert curve[0] == pytest.approx(_accuracy(QuantizedWeights.from_estimator(clf).apply(clf), x, y))
    assert k is not None and curve[k] <= 0.5 and all(a > 0.5 for a in curve[:k])
    assert len(curve) <= 31


def test_integrity_evaluation_detects_and_corrects_bfa(setting):
    clf, x, y, xa, ya = setting
    result = integrity_evaluation(clf, x, y, xa, ya, max_flips=5)
    assert result["nb_flips"] == 5 and result["detected_flips"] == 5 and result["detection_rate"] == 1.0
    assert not result["false_alarm"] and 1 <= result["flagged_groups"] <= 5
    assert result["attacked_accuracy"] < result["quantized_accuracy"]
    assert result["recovered_accuracy"] == pytest.approx(result["quantized_accuracy"])  # BFA's sign flips undone


def test_clipping_evaluation_compares_the_same_draws_with_and_without_clipping(setting):
    clf, x, y, xa, _ = setting
    result = clipping_evaluation(clf, x, y, xa, nb_flips=(3,), nb_samples=3)
    assert result["nb_flips"] == [3] and result["n_bits"] == 8
    assert result["float"]["plain_clean"] == pytest.approx(_accuracy(clf, x, y))
    assert result["float"]["clipped_clean"] == pytest.approx(_accuracy(clip_activations(clf, xa), x, y))
    assert result["quantized"]["plain_clean"] == pytest.approx(
        _accuracy(QuantizedWeights.from_estimator(clf).apply(clf), x, y)
    )
    for encoding in ("float", "quantized"):
        assert all(0 <= v <= 1 for key in ("plain_mean", "clipped_mean") for v in result[encoding][key])


def test_float_curve_attack_beats_random_and_protection_helps(setting):
    clf, x, y, xa, ya = setting
    curve = float_bit_flip_curve(clf, x, y, flips=(1, 2), x_attack=xa, y_attack=ya, nb_samples=3)
    assert curve["dtype"] == "float32" and curve["clean_accuracy"] == pytest.approx(_accuracy(clf, x, y))
    assert curve["attack_accuracy"][0] <= 0.3 < curve["random_mean"][0]  # one exponent flip breaks the model
    assert all(p >= a for p, a in zip(curve["protected_attack_accuracy"], curve["attack_accuracy"]))
    assert 1 <= len(curve["attack_flips"]) <= 2 and 23 <= curve["attack_flips"][0]["bit"] <= 30
