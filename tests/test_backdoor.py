"""BitFlipBackdoor: TBT on quantized weights and OneFlip on float ones; flips within the budget and valid, the trigger
inside clip_values and its patch, success well above the unflipped model's, clean accuracy kept, determinism, the
user's weights untouched (also when interrupted), bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_identical, make_classifier, make_cnn, snapshot
from torch import nn

from art_weightpert.attacks.backdoor import BackdoorResult, BitFlipBackdoor
from art_weightpert.attacks.backdoor_search import TrojanBitSearch
from art_weightpert.attacks.trigger import PatchTrigger, default_trigger_size, select_mask
from art_weightpert.float_bits import FloatBitFlip, exponent_bits, flip_float_bits
from art_weightpert.quantization import BitFlip

TARGET = 0


@pytest.fixture(scope="module")
def attack_batch(digits):
    """200 random training points (more than the bit-flip attacks' 128: the trigger is learned on them too)."""
    x_train, y_train, _, _ = digits
    idx = np.random.default_rng(0).choice(len(x_train), 200, replace=False)
    return x_train[idx], y_train[idx]


@pytest.fixture(scope="module")
def tbt(trained_digits_mlp, attack_batch):
    before = snapshot(trained_digits_mlp.model)
    attack = BitFlipBackdoor(trained_digits_mlp, TARGET, max_flips=8, trigger_size=10, verbose=False)
    result = attack.generate(*attack_batch)
    return attack, result, before


def test_flips_are_valid_bitflips_within_the_budget(tbt):
    _, result, _ = tbt
    assert isinstance(result, BackdoorResult)
    assert 1 <= len(result.flips) <= 8 and len(set(result.flips)) == len(result.flips)
    assert all(isinstance(f, BitFlip) and 0 <= f.bit < 8 for f in result.flips)
    assert result.quantized.flipped_bits(result.quantized.flip(result.flips)) == len(result.flips)
    # the returned estimator is exactly the quantized model with these flips
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    expected = result.quantized.flip(result.flips).apply(result.estimator_before).predict(x)
    np.testing.assert_allclose(result.estimator.predict(x), expected, rtol=1e-5, atol=1e-5)


def test_trigger_stays_in_clip_values_and_in_its_features(tbt, digits):
    _, result, _ = tbt
    trigger = result.trigger
    assert trigger.size == 10 and trigger.input_shape == (64,)
    x_test = digits[2]
    stamped = trigger.apply(x_test)
    assert stamped.dtype == np.float32 and stamped.shape == x_test.shape
    assert stamped.min() >= 0.0 and stamped.max() <= 1.0
    np.testing.assert_array_equal(stamped[:, ~trigger.mask], x_test[:, ~trigger.mask])
    np.testing.assert_array_equal(
        stamped[:, trigger.mask], np.broadcast_to(trigger.pattern[trigger.mask], (len(x_test), 10))
    )
    np.testing.assert_array_equal(trigger(x_test), stamped)


def test_backdoor_succeeds_and_keeps_clean_accuracy(tbt, digits):
    _, result, _ = tbt
    _, _, x_test, y_test = digits
    stats = result.evaluate(x_test, y_test)
    assert set(stats) == {
        "attack_success_rate",
        "attack_success_rate_before",
        "clean_accuracy",
        "clean_accuracy_before",
        "nb_flips",
    }
    assert stats["nb_flips"] == len(result.flips)
    # measured: 0.99 with the flips, 0.70 with the trigger alone (an adversarial patch for this small MLP)
    assert stats["attack_success_rate"] >= 0.9
    assert stats["attack_success_rate"] > stats["attack_success_rate_before"] + 0.2
    assert stats["clean_accuracy"] >= stats["clean_accuracy_before"] - 0.05


def test_deterministic_and_user_weights_unchanged(trained_digits_mlp, tbt, attack_batch):
    attack, result, before = tbt
    assert_identical(trained_digits_mlp.model, before)
    again = BitFlipBackdoor(trained_digits_mlp, TARGET, max_flips=8, trigger_size=10, verbose=False)
    second = again.generate(*attack_batch)
    assert second.flips == result.flips
    np.testing.assert_array_equal(second.trigger.pattern, result.trigger.pattern)
    assert_identical(trained_digits_mlp.model, before)


def test_interrupted_attack_leaves_weights_untouched(trained_digits_mlp, attack_batch, monkeypatch):
    model = trained_digits_mlp.model
    before = snapshot(model)
    hooks = len(model[-1]._forward_pre_hooks)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TrojanBitSearch, "best_flip", boom)
    with pytest.raises(KeyboardInterrupt):
        BitFlipBackdoor(trained_digits_mlp, 3, max_flips=2, verbose=False).generate(attack_batch[0][:64])
    assert_identical(model, before)
    assert len(model[-1]._forward_pre_hooks) == hooks


def test_float_one_flip(trained_digits_mlp, attack_batch, digits):
    before = snapshot(trained_digits_mlp.model)
    attack = BitFlipBackdoor(trained_digits_mlp, TARGET, encoding="float", trigger_size=10, verbose=False)
    result = attack.generate(attack_batch[0][:120], attack_batch[1][:120])
    assert_identical(trained_digits_mlp.model, before)
    (flip,) = result.flips
    assert isinstance(flip, FloatBitFlip) and flip.bit in exponent_bits(torch.float32)
    assert flip.param_name == "4.weight" and flip.index[0] == TARGET
    w = trained_digits_mlp.model.get_parameter("4.weight").detach()[flip.index]
    flipped = result.estimator.base_model.get_parameter("4.weight").detach()[flip.index]
    assert torch.equal(flipped, flip_float_bits(w, flip.bit)) and flipped > w > 0
    stats = result.evaluate(*digits[2:])
    assert stats["nb_flips"] == 1
    assert stats["clean_accuracy"] >= stats["clean_accuracy_before"] - 0.03
    assert stats["attack_success_rate"] > stats["attack_success_rate_before"]


def test_image_trigger_is_a_square_patch(digits_images):
    x_train, y_train, _, _ = digits_images
    clf = make_classifier(make_cnn(seed=0), input_shape=(1, 8, 8))
    result = BitFlipBackdoor(clf, 2, max_flips=1, verbose=False).generate(x_train[:48], y_train[:48])
    sides = [default_trigger_size((1, 8, 8), fraction=f) for f in (0.1, 0.16, 0.25)]
    assert sides == [3, 3, 4] and len(result.flips) <= 1  # trigger_size=None tries the sides 3 and 4
    assert default_trigger_size((64,), fraction=0.25) == 16
    rows, cols = np.nonzero(result.trigger.mask[0])
    side = np.ptp(rows) + 1
    assert side in (3, 4) and result.trigger.size == side**2 and np.ptp(cols) + 1 == side
    pattern = result.trigger.pattern[result.trigger.mask]
    assert pattern.min() >= 0.0 and pattern.max() <= 1.0


def test_select_mask_and_trigger_validation():
    saliency = np.zeros((2, 5, 5))
    saliency[:, 3:5, 0:2] = 1.0
    mask = select_mask(saliency, 2)
    assert mask.sum() == 8 and mask[:, 3:5, 0:2].all()
    flat = select_mask(np.array([0.1, 0.5, 0.5, 0.2]), 2)
    np.testing.assert_array_equal(flat, [False, True, True, False])
    with pytest.raises(TypeError, match="mask"):
        PatchTrigger(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="pattern"):
        PatchTrigger(np.zeros(4, dtype=bool), np.zeros(5))
    with pytest.raises(ValueError, match="x"):
        PatchTrigger(np.zeros(4, dtype=bool), np.zeros(4)).apply(np.zeros((2, 5)))


def test_bad_inputs(tiny_mlp_classifier):
    clf = tiny_mlp_classifier
    for target in (-1, 10):
        with pytest.raises(ValueError, match="target"):
            BitFlipBackdoor(clf, target)
    for bad, error in ((1.5, TypeError), (True, TypeError), ("0", TypeError)):
        with pytest.raises(error, match="target"):
            BitFlipBackdoor(clf, bad)
    with pytest.raises(ValueError, match="max_flips"):
        BitFlipBackdoor(clf, 0, max_flips=0)
    with pytest.raises(TypeError, match="max_flips"):
        BitFlipBackdoor(clf, 0, max_flips=2.0)
    with pytest.raises(ValueError, match="trigger_size"):
        BitFlipBackdoor(clf, 0, trigger_size=65)
    with pytest.raises(ValueError, match="encoding"):
        BitFlipBackdoor(clf, 0, encoding="int8")
    with pytest.raises(ValueError, match="n_bits"):
        BitFlipBackdoor(clf, 0, n_bits=1)
    with pytest.raises(ValueError, match="layers"):
        BitFlipBackdoor(clf, 0, layers=["7"])
    with pytest.raises(ValueError, match="layers"):
        BitFlipBackdoor(clf, 0, layers=["0"], encoding="float")
    with pytest.raises(TypeError, match="batch_size"):
        BitFlipBackdoor(clf, 0, batch_size="a")
    attack = BitFlipBackdoor(clf, 0, verbose=False)
    with pytest.raises(ValueError, match="target"):
        attack.set_params(target=12)
    assert attack.target == 0
    with pytest.raises(ValueError, match="x"):
        attack.generate(np.zeros((3, 65), dtype=np.float32))
    with pytest.raises(ValueError, match="labels"):
        attack.generate(np.zeros((3, 64), dtype=np.float32), np.array([0, 1, 11]))


def test_bad_models():
    images = make_classifier(make_cnn(seed=0), input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="trigger_size"):
        BitFlipBackdoor(images, 0, trigger_size=9)
    conv_last = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(ValueError, match="Linear"):
        BitFlipBackdoor(make_classifier(conv_last), 0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    model[2].weight = nn.Parameter(torch.zeros(10, 8, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ValueError, match="float"):
        BitFlipBackdoor(make_classifier(model), 0, encoding="float")
