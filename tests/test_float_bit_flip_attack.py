"""FloatBitFlipAttack: one flip breaks the float digits MLP (far below random flips), flips stay within max_flips and
the allowed bits, mantissa flips are mild, flips to inf / NaN are ranked by their actual loss, targeted mode,
stop_accuracy, determinism, the user's weights untouched (also when interrupted), bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import accuracy, assert_identical, snapshot
from torch import nn

from art_weightpert.attacks.bit_search import BitSearchAttack
from art_weightpert.attacks.float_bit_flip import FloatBitFlipAttack
from art_weightpert.attacks.random_float_bit_flips import RandomFloatBitFlips
from art_weightpert.float_bits import FloatBitFlip, FloatWeights
from art_weightpert.zoo import make_classifier

MANTISSA_AND_SIGN = list(range(23)) + [31]


def test_one_flip_breaks_the_model_far_below_random_flips(trained_digits_mlp, attack_batch, digits):
    _, _, x_test, y_test = digits
    before = snapshot(trained_digits_mlp.model)
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=1, verbose=False)
    flips = attack.generate(*attack_batch)
    assert len(flips) == 1 and len(attack.history_) == 1
    attacked = attack.weights_.flip(flips).apply(trained_digits_mlp)
    broken = accuracy(attacked, x_test, y_test)
    assert broken <= 0.2  # Terminal Brain Damage: one exponent bit (measured: 0.15 against 0.97)
    random = RandomFloatBitFlips(trained_digits_mlp, nb_flips=1, nb_samples=10, seed=0, verbose=False)
    stats = random.evaluate(x_test, y_test, per_bit=False)
    assert stats["mean"] > broken + 0.5  # one random bit is almost always a mantissa bit or a harmless one
    assert_identical(trained_digits_mlp.model, before)
    assert trained_digits_mlp.weight_perturbation is None
    longer = FloatBitFlipAttack(trained_digits_mlp, max_flips=3, verbose=False)
    assert longer.generate(*attack_batch) == flips  # the outputs are inf / NaN: no further flip is measurable
    assert not np.isfinite(longer.history_[0]["loss"])


def test_flips_within_max_flips_and_bits_history_and_determinism(trained_digits_mlp, attack_batch, digits):
    _, _, x_test, y_test = digits
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=5, bits=range(23), verbose=False)
    flips = attack.generate(*attack_batch)
    assert len(flips) == 5 == len(set(flips)) == len(attack.history_)
    assert all(isinstance(f, FloatBitFlip) and f.bit < 23 for f in flips)
    assert attack.generate(*attack_batch) == flips  # deterministic
    attacked = attack.generate_estimator(*attack_batch)
    assert accuracy(attacked, *attack_batch) == pytest.approx(attack.history_[-1]["accuracy"])
    assert accuracy(attacked, x_test, y_test) >= accuracy(trained_digits_mlp, x_test, y_test) - 0.05  # mantissa: mild
    losses = [h["loss"] for h in attack.history_]
    assert losses == sorted(losses)  # every committed flip raised the loss
    weights = FloatWeights.from_estimator(trained_digits_mlp)
    assert weights.flipped_bits(weights.flip(flips)) == 5


def test_flips_to_inf_or_nan_are_ranked_by_their_actual_loss(trained_digits_mlp, attack_batch):
    """Only the top exponent bit may flip: most candidates become 10^38, inf or NaN; the attack still commits the
    flip that breaks the batch, and reports its real accuracy."""
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=1, bits=[30], layers=["4"], verbose=False)
    flips = attack.generate(*attack_batch)
    assert len(flips) == 1 and flips[0].bit == 30 and flips[0].param_name == "4.weight"
    attacked = attack.generate_estimator(*attack_batch)
    assert accuracy(attacked, *attack_batch) == pytest.approx(attack.history_[0]["accuracy"])
    assert attack.history_[0]["accuracy"] <= 0.2


def test_stop_accuracy_and_targeted(trained_digits_mlp, attack_batch):
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=5, stop_accuracy=0.5, verbose=False)
    flips = attack.generate(*attack_batch)
    assert len(flips) == 1 and attack.history_[0]["accuracy"] <= 0.5
    x, _ = attack_batch
    targeted = FloatBitFlipAttack(trained_digits_mlp, max_flips=1, targeted=True, verbose=False)
    clean_rate = float(np.mean(trained_digits_mlp.predict(x).argmax(1) == 3))
    assert len(targeted.generate(x, 3)) == 1
    rate = float(np.mean(targeted.generate_estimator(x, 3).predict(x).argmax(1) == 3))
    assert rate == pytest.approx(targeted.history_[0]["accuracy"])
    assert rate > clean_rate + 0.5  # measured: 1.0 (one exponent flip) against 0.09
    with pytest.raises(ValueError, match="y"):
        targeted.generate(x)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_attack_leaves_model_and_estimator_bit_identical(
    trained_digits_mlp, attack_batch, monkeypatch, error
):
    model = trained_digits_mlp.model
    before, prediction = snapshot(model), trained_digits_mlp.predict(attack_batch[0])
    calls = []
    original = BitSearchAttack._evaluate

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # in the middle of the second flip, after one committed
            raise error("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BitSearchAttack, "_evaluate", interrupted)
    with pytest.raises(error, match="interrupted"):
        attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=3, bits=MANTISSA_AND_SIGN, verbose=False)
        attack.generate(*attack_batch)
    assert len(calls) == 2
    assert_identical(model, before)
    assert trained_digits_mlp.model is model and trained_digits_mlp.weight_perturbation is None
    np.testing.assert_array_equal(trained_digits_mlp.predict(attack_batch[0]), prediction)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_flips": -1}, ValueError, "max_flips"),
        ({"max_flips": 2.0}, TypeError, "max_flips"),
        ({"bits": [32]}, ValueError, "bits"),
        ({"bits": []}, ValueError, "bits"),
        ({"layers": ["7"]}, ValueError, "layers"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"nb_candidates": 0}, ValueError, "nb_candidates"),
        ({"stop_accuracy": 1.5}, ValueError, "stop_accuracy"),
        ({"targeted": 1}, TypeError, "targeted"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        FloatBitFlipAttack(tiny_mlp_classifier, verbose=False, **kwargs)


def test_set_params_validates_before_assigning(tiny_mlp_classifier):
    attack = FloatBitFlipAttack(tiny_mlp_classifier, max_flips=4, verbose=False)
    with pytest.raises(ValueError, match="bits"):
        attack.set_params(bits=[40])
    assert attack.bits is None
    attack.set_params(max_flips=6, bits=[31])
    assert attack.max_flips == 6 and attack.bits == [31] and "max_flips=6" in repr(attack)


def test_models_without_float_or_linear_weights_are_rejected():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="dtype"):
        FloatBitFlipAttack(make_classifier(model, (4,), nb_classes=3), verbose=False)
    no_layer = make_classifier(nn.Sequential(nn.BatchNorm1d(10)), (10,))
    with pytest.raises(ValueError, match="no Linear or Conv"):
        FloatBitFlipAttack(no_layer, verbose=False)
