"""RandomBitFlips: exactly nb_flips distinct bits or a bit error rate, restricted to bit positions and layers,
reproducible by seed; evaluate's statistics and the accuracy per bit position; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_faults import RandomWeightPerturbation
from art_weightpert.budget import PerturbationBudget
from art_weightpert.quantization import QuantizedWeights


def test_nb_flips_gives_that_many_distinct_bits_reproducibly(tiny_mlp_classifier):
    attack = RandomBitFlips(tiny_mlp_classifier, nb_flips=25, seed=3, verbose=False)
    flips = attack.generate()
    assert len(flips) == 25 == len(set(flips))
    assert attack.generate() == flips
    assert RandomBitFlips(tiny_mlp_classifier, nb_flips=25, seed=4, verbose=False).generate() != flips
    q = QuantizedWeights.from_estimator(tiny_mlp_classifier)
    assert q.flipped_bits(q.flip(flips)) == 25
    torch.manual_seed(1)
    first = RandomBitFlips(tiny_mlp_classifier, nb_flips=5, verbose=False).generate()
    torch.manual_seed(1)
    assert RandomBitFlips(tiny_mlp_classifier, nb_flips=5, verbose=False).generate() == first


def test_flips_stay_in_the_chosen_layers_and_bits(tiny_mlp_classifier):
    attack = RandomBitFlips(
        tiny_mlp_classifier, nb_flips=40, n_bits=6, layers=["2"], bits=[0, 5], seed=0, verbose=False
    )
    flips = attack.generate()
    assert len(flips) == 40
    assert {f.param_name for f in flips} == {"2.weight"} and {f.bit for f in flips} == {0, 5}
    every_bit = RandomBitFlips(tiny_mlp_classifier, nb_flips=160 * 2, layers=["2"], bits=[0, 5], seed=0, verbose=False)
    assert len(every_bit.generate()) == 320  # all 160 weights × 2 positions
    with pytest.raises(ValueError, match="nb_flips"):
        every_bit.set_params(nb_flips=321)
        every_bit.generate()


def test_bit_error_rate(tiny_mlp_classifier):
    total = 8 * (64 * 16 + 16 * 10)
    assert RandomBitFlips(tiny_mlp_classifier, ber=0.0, seed=0, verbose=False).generate() == []
    assert len(RandomBitFlips(tiny_mlp_classifier, ber=1.0, seed=0, verbose=False).generate()) == total
    counts = [len(RandomBitFlips(tiny_mlp_classifier, ber=0.01, seed=s, verbose=False).generate()) for s in range(20)]
    assert abs(np.mean(counts) - 0.01 * total) < 4 * np.sqrt(0.01 * total / 20)


def test_evaluate_has_random_weight_perturbation_keys_and_sign_bits_matter_most(trained_digits_mlp, digits):
    _, _, x_test, y_test = digits
    attack = RandomBitFlips(trained_digits_mlp, nb_flips=300, nb_samples=5, seed=0, verbose=False)
    stats = attack.evaluate(x_test, y_test)
    reference = RandomWeightPerturbation(trained_digits_mlp, PerturbationBudget(0.0), nb_samples=2, verbose=False)
    assert set(reference.evaluate(x_test[:10], y_test[:10])) <= set(stats)
    assert stats["accuracies"].shape == (5,) and np.all(stats["nb_flips"] == 300)
    assert stats["min"] <= stats["mean"] <= stats["max"] and stats["quantized"] > 0.9
    assert set(stats["per_bit"]) == set(range(8))
    assert stats["per_bit"][0]["mean"] == pytest.approx(stats["quantized"], abs=0.01)
    assert stats["per_bit"][7]["mean"] < stats["per_bit"][0]["mean"] - 0.01
    again = attack.evaluate(x_test, y_test, per_bit=False)
    np.testing.assert_array_equal(again["accuracies"], stats["accuracies"])
    assert "per_bit" not in again


def test_weights_are_untouched(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    before = {k: v.clone() for k, v in tiny_mlp_classifier.model.state_dict().items()}
    RandomBitFlips(tiny_mlp_classifier, ber=0.01, nb_samples=2, seed=0, verbose=False).evaluate(x_test, y_test)
    for k, v in tiny_mlp_classifier.model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "exactly one of `nb_flips` and `ber`"),
        ({"nb_flips": 2, "ber": 0.1}, ValueError, "exactly one"),
        ({"ber": 1.5}, ValueError, "ber"),
        ({"ber": -0.1}, ValueError, "ber"),
        ({"nb_flips": -1}, ValueError, "nb_flips"),
        ({"nb_flips": 1.0}, TypeError, "nb_flips"),
        ({"nb_flips": 1, "bits": [8]}, ValueError, "bits"),
        ({"nb_flips": 1, "n_bits": 4, "bits": [4]}, ValueError, "bits"),
        ({"nb_flips": 1, "bits": 3}, TypeError, "bits"),
        ({"nb_flips": 1, "n_bits": 20}, ValueError, "n_bits"),
        ({"nb_flips": 1, "granularity": "row"}, ValueError, "granularity"),
        ({"nb_flips": 1, "layers": ["x"]}, ValueError, r"\['x'\].*\['0', '2'\]"),
        ({"nb_flips": 1, "nb_samples": 0}, ValueError, "nb_samples"),
        ({"nb_flips": 1, "seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomBitFlips(tiny_mlp_classifier, verbose=False, **kwargs)
