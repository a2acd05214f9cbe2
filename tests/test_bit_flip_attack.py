"""BitFlipAttack: beats random flips by a wide margin, targeted mode, max_flips / stop_accuracy, determinism, the
user's weights untouched (also when interrupted), bad input, ART interop; and the bit_flip_curve metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from conftest import accuracy, assert_identical, make_classifier, make_cnn, snapshot
from torch import nn

from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.metrics.bit_flips import bit_flip_curve
from art_weightpert.quantization import QuantizedWeights


@pytest.fixture(scope="module")
def mlp_attack(trained_digits_mlp, attack_batch):
    """One 20-flip untargeted attack on the reference MLP, shared by the tests that only read it."""
    attack = BitFlipAttack(trained_digits_mlp, max_flips=20, verbose=False)
    flips = attack.generate(*attack_batch)
    return attack, flips


def test_bfa_beats_random_flips_by_a_wide_margin(trained_digits_mlp, mlp_attack, digits):
    _, _, x_test, y_test = digits
    attack, flips = mlp_attack
    attacked = attack.quantized_.flip(flips).apply(trained_digits_mlp)
    random = RandomBitFlips(trained_digits_mlp, nb_flips=20, nb_samples=10, seed=0, verbose=False)
    stats = random.evaluate(x_test, y_test, per_bit=False)
    assert stats["quantized"] > 0.9 and stats["mean"] > 0.9
    assert accuracy(attacked, x_test, y_test) < stats["mean"] - 0.3  # measured: 0.56 against 0.97


def test_flips_are_distinct_within_max_flips_and_history_matches(trained_digits_mlp, mlp_attack, attack_batch):
    attack, flips = mlp_attack
    assert len(flips) == 20 == len(attack.history_)
    assert len(set(flips)) == 20
    assert attack.quantized_.flipped_bits(attack.quantized_.flip(flips)) == 20
    # the history is measured on the attack batch, and the last entry is the final model
    final = attack.quantized_.flip(flips).apply(trained_digits_mlp)
    assert attack.history_[-1]["accuracy"] == pytest.approx(accuracy(final, *attack_batch))
    assert attack.history_[-1]["accuracy"] < attack.history_[0]["accuracy"]
    assert all(set(h) == {"loss", "accuracy"} for h in attack.history_)


def test_attack_is_deterministic_and_leaves_weights_untouched(trained_digits_mlp, mlp_attack, attack_batch):
    before = snapshot(trained_digits_mlp.model)
    x, y = attack_batch
    prediction = trained_digits_mlp.predict(x)
    flips = BitFlipAttack(trained_digits_mlp, max_flips=20, verbose=False).generate(x, y)
    assert flips == mlp_attack[1]
    assert_identical(trained_digits_mlp.model, before)
    np.testing.assert_array_equal(trained_digits_mlp.predict(x), prediction)


def test_generate_estimator_returns_flipped_quantized_model(trained_digits_mlp, attack_batch):
    x, y = attack_batch
    attack = BitFlipAttack(trained_digits_mlp, max_flips=3, verbose=False)
    attacked = attack.generate_estimator(x, y)
    flips = attack.generate(x, y)
    expected = attack.quantized_.flip(flips).apply(trained_digits_mlp)
    np.testing.assert_allclose(attacked.predict(x), expected.predict(x), atol=1e-6)
    assert attacked is not trained_digits_mlp and trained_digits_mlp.weight_perturbation is None


def test_stop_accuracy_stops_after_first_flip_below_it(trained_digits_mlp, attack_batch):
    attack = BitFlipAttack(trained_digits_mlp, max_flips=30, stop_accuracy=0.5, verbose=False)
    flips = attack.generate(*attack_batch)
    accuracies = [h["accuracy"] for h in attack.history_]
    assert 0 < len(flips) < 30
    assert accuracies[-1] <= 0.5 and all(a > 0.5 for a in accuracies[:-1])
    assert BitFlipAttack(trained_digits_mlp, max_flips=0, verbose=False).generate(*attack_batch) == []


def test_targeted_attack_raises_the_target_rate(trained_digits_mlp, attack_batch, digits):
    _, _, x_test, _ = digits
    x, _ = attack_batch
    attack = BitFlipAttack(trained_digits_mlp, max_flips=10, targeted=True, verbose=False)
    attacked = attack.generate_estimator(x, 3)  # every input to class 3
    before = np.mean(trained_digits_mlp.predict(x_test).argmax(1) == 3)
    after = np.mean(attacked.predict(x_test).argmax(1) == 3)
    assert before < 0.15 and after > 0.3  # measured: 0.10 -> 0.42
    assert attack.history_[-1]["accuracy"] > 0.3  # targeted: share of the attack batch at its target


def test_targeted_attack_with_per_input_targets(trained_digits_mlp, digits):
    """T-BFA's stealthy 1-to-1 mode: inputs of class 1 to class 7, every other input keeps its label."""
    x_train, y_train, x_test, y_test = digits
    idx = np.concatenate([np.flatnonzero(y_train == 1)[:64], np.flatnonzero(y_train != 1)[:64]])
    x, y = x_train[idx], y_train[idx]
    targets = np.where(y == 1, 7, y)
    attack = BitFlipAttack(trained_digits_mlp, max_flips=10, targeted=True, verbose=False)
    attacked = attack.generate_estimator(x, np.eye(10)[targets])
    ones, others = y_test == 1, y_test != 1
    assert np.mean(trained_digits_mlp.predict(x_test[ones]).argmax(1) == 7) < 0.1
    assert np.mean(attacked.predict(x_test[ones]).argmax(1) == 7) > 0.5
    assert accuracy(attacked, x_test[others], y_test[others]) > 0.85
    with pytest.raises(ValueError, match="target"):
        attack.generate(x)


def test_cnn_per_channel_and_art_classifier(digits_images):
    x_train, y_train, _, _ = digits_images
    clf = make_classifier(make_cnn(seed=0), input_shape=(1, 8, 8), lr=0.02)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=4, verbose=False)
    art_clf = PyTorchClassifier(clf.model, nn.CrossEntropyLoss(), (1, 8, 8), 10, clip_values=(0.0, 1.0))
    x, y = x_train[:128], y_train[:128]
    attack = BitFlipAttack(art_clf, max_flips=5, granularity="channel", layers=["0"], verbose=False)
    flips = attack.generate(x, y)
    assert flips and all(f.param_name == "0.weight" for f in flips)
    assert attack.history_[-1]["accuracy"] < accuracy(clf, x, y) - 0.1


class InterruptingLayer(nn.Module):
    """Identity that raises on its ``fail_at``-th call (an interrupt in the middle of an attack)."""

    def __init__(self, fail_at: int, error: type[BaseException]) -> None:
        super().__init__()
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("interrupted")
        return x


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_attack_leaves_model_and_estimator_bit_identical(tiny_mlp_classifier, attack_batch, error):
    layer = InterruptingLayer(fail_at=10**9, error=error)
    model = nn.Sequential(*tiny_mlp_classifier.model, layer)
    clf = make_classifier(model)
    x, y = attack_batch
    before, prediction = snapshot(model), clf.predict(x)
    estimator_model = clf.model
    layer.calls, layer.fail_at = 0, 6  # in the middle of the second iteration
    with pytest.raises(error, match="interrupted"):
        BitFlipAttack(clf, max_flips=5, verbose=False).generate(x, y)
    assert layer.calls == 6
    layer.fail_at = 10**9
    assert_identical(model, before)
    assert clf.model is estimator_model and clf.weight_perturbation is None
    np.testing.assert_array_equal(clf.predict(x), prediction)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_flips": -1}, ValueError, "max_flips"),
        ({"max_flips": 2.0}, TypeError, "max_flips"),
        ({"n_bits": 1}, ValueError, "n_bits"),
        ({"n_bits": 17}, ValueError, "n_bits"),
        ({"granularity": "layer"}, ValueError, "granularity"),
        ({"layers": ["7"]}, ValueError, r"layers.*\['7'\].*valid|layers.*\['7'\].*\['0', '2'\]"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"nb_candidates": 0}, ValueError, "nb_candidates"),
        ({"stop_accuracy": 1.5}, ValueError, "stop_accuracy"),
        ({"targeted": 1}, TypeError, "targeted"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        BitFlipAttack(tiny_mlp_classifier, verbose=False, **kwargs)


def test_set_params_validates_before_assigning(tiny_mlp_classifier):
    attack = BitFlipAttack(tiny_mlp_classifier, max_flips=4, verbose=False)
    with pytest.raises(ValueError, match="max_flips"):
        attack.set_params(max_flips=-2)
    assert attack.max_flips == 4
    attack.set_params(max_flips=6, top_k=5)
    assert attack.max_flips == 6 and attack.top_k == 5 and "max_flips=6" in repr(attack)


def test_model_without_linear_or_conv_is_rejected():
    from art_weightpert.estimators import PyTorchWeightClassifier

    clf = PyTorchWeightClassifier(nn.Sequential(nn.BatchNorm1d(10)), nn.CrossEntropyLoss(), (10,), 10)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        BitFlipAttack(clf, verbose=False)


def test_bit_flip_curve_is_json_able_and_consistent(tiny_mlp_classifier, digits):
    x_train, y_train, x_test, y_test = digits
    result = bit_flip_curve(
        tiny_mlp_classifier,
        x_test[:200],
        y_test[:200],
        flips=(1, 3),
        x_attack=x_train[:128],
        y_attack=y_train[:128],
        n_bits=8,
        nb_samples=3,
    )
    json.dumps(result)
    assert result["flips"] == [1, 3] and len(result["bfa_accuracy"]) == 2 == len(result["random_mean"])
    assert result["bfa_accuracy"][1] < result["random_mean"][1]
    assert len(result["bfa_flips"]) == 3 and set(result["bit_sensitivity"]) == set(range(8))
    q = QuantizedWeights.from_estimator(tiny_mlp_classifier)
    first = result["bfa_flips"][0]
    assert first["old_code"] == int(q.codes[first["param"]][tuple(first["index"])])
    assert abs(first["new_code"] - first["old_code"]) == 2 ** first["bit"]
