"""Float bit flips: exact IEEE bit arithmetic (float32, float16, bfloat16, float64) against known values, the layout
table, FloatWeights (single-flip changes, flips, Hamming distance, deltas, apply with NaN and inf, bad input), and
RandomFloatBitFlips (counts, bit error rate, positions, a per-position distribution, evaluate's keys, the user's
weights untouched, bad input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert.attacks.random_float_bit_flips import RandomFloatBitFlips
from art_weightpert.float_bits import (
    LAYOUTS,
    FloatBitFlip,
    FloatWeights,
    exponent_bits,
    flip_float_bits,
    float_layout,
    mantissa_bits,
    sign_bit,
)
from art_weightpert.quantization import BitFlip
from art_weightpert.zoo import make_classifier

INF = float("inf")


def _values(dtype, *values):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    "dtype, value, bit, expected",
    [
        (torch.float32, 1.5, 31, -1.5),
        (torch.float32, -2.0, 31, 2.0),
        (torch.float32, 0.0, 31, -0.0),
        (torch.float32, 1.0, 30, INF),  # exponent 127 -> 255, mantissa 0
        (torch.float32, 0.5, 30, 2.0**127),  # exponent 126 -> 254
        (torch.float32, 3.0, 30, 2.0**-127),  # exponent 128 -> 0: the subnormal 0.5 · 2^-126
        (torch.float32, 1.0, 23, 0.5),  # lowest exponent bit: halves or doubles
        (torch.float32, 0.5, 23, 1.0),
        (torch.float32, 1.0, 22, 1.5),  # top mantissa bit
        (torch.float32, 1.0, 0, 1.0 + 2.0**-23),
        (torch.float32, 0.0, 0, 2.0**-149),  # the smallest subnormal
        (torch.float16, 1.0, 15, -1.0),
        (torch.float16, 1.0, 14, INF),
        (torch.float16, 0.5, 14, 2.0**15),
        (torch.float16, 1.0, 9, 1.5),
        (torch.float16, 1.0, 10, 0.5),
        (torch.bfloat16, 1.0, 15, -1.0),
        (torch.bfloat16, 0.5, 14, 2.0**127),
        (torch.bfloat16, 1.0, 6, 1.5),
        (torch.bfloat16, 1.0, 7, 0.5),
        (torch.float64, 1.0, 63, -1.0),
        (torch.float64, 1.0, 51, 1.5),
        (torch.float64, 0.5, 62, 2.0**1023),
    ],
)
def test_known_flips(dtype, value, bit, expected):
    out = flip_float_bits(_values(dtype, value), bit)
    assert out.dtype == dtype
    assert out.item() == expected and np.signbit(out.item()) == np.signbit(expected)


def test_nan_results_and_flipping_twice_restores_every_pattern():
    assert torch.isnan(flip_float_bits(_values(torch.float32, 1.5), 30)).all()  # exponent 255, mantissa ≠ 0
    assert torch.isnan(flip_float_bits(_values(torch.float16, 1.5), 14)).all()
    for dtype, layout in LAYOUTS.items():
        values = torch.randn(500, dtype=torch.float64).to(dtype) * 3
        bits = torch.randint(0, layout.width, (500,))
        twice = flip_float_bits(flip_float_bits(values, bits), bits)
        assert torch.equal(twice.view(layout.int_dtype), values.view(layout.int_dtype)), dtype
        once = flip_float_bits(values, bits).view(layout.int_dtype) ^ values.view(layout.int_dtype)
        assert torch.equal(once, layout.masks[bits])  # exactly one bit differs: the named one


def test_layouts_and_helpers():
    assert sign_bit(torch.float32) == 31 and exponent_bits(torch.float32) == tuple(range(23, 31))
    assert mantissa_bits(torch.float32) == tuple(range(23))
    assert (sign_bit(torch.float16), exponent_bits(torch.float16), mantissa_bits(torch.float16)) == (
        15, tuple(range(10, 15)), tuple(range(10))
    )  # fmt: skip
    assert exponent_bits(torch.bfloat16) == tuple(range(7, 15)) and mantissa_bits(torch.bfloat16) == tuple(range(7))
    assert float_layout(torch.float64).int_dtype == torch.int64 and sign_bit(torch.float64) == 63
    with pytest.raises(TypeError, match="dtype"):
        float_layout(torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        flip_float_bits(torch.zeros(2, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="bits"):
        flip_float_bits(torch.zeros(2), 32)
    with pytest.raises(ValueError, match="bits"):
        flip_float_bits(torch.zeros(2, dtype=torch.float16), torch.tensor([3, 16]))
    with pytest.raises(TypeError, match="bits"):
        flip_float_bits(torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="bit"):
        FloatBitFlip("w", (0,), 64)
    assert FloatBitFlip("w", 3, 40).index == (3,) and FloatBitFlip("w", (1, 2), 3) != BitFlip("w", (1, 2), 3)


def test_float_weights_changes_flips_and_distance():
    weights = FloatWeights({"w": torch.tensor([[0.5, -1.25], [3.0, 0.0]])}, bits=[31, 30, 22])
    assert weights.bits == (22, 30, 31) and weights.dtype == torch.float32 and weights.param_names == ["w"]
    changes = weights.bit_changes("w")
    assert changes.dtype == torch.float64 and changes.shape == (3, 2, 2)
    np.testing.assert_array_equal(changes[2], [[-1.0, 2.5], [-6.0, 0.0]])  # sign: −2w
    np.testing.assert_array_equal(changes[0], [[0.25, -0.5], [-1.0, 2.0**-127]])  # top mantissa bit
    assert changes[1, 0, 0] == 2.0**127 - 0.5 and torch.isnan(changes[1, 0, 1])  # −1.25 -> NaN
    np.testing.assert_array_equal(weights.bit_changes("w", torch.tensor([3, 0])), changes.reshape(3, -1)[:, [3, 0]])
    flipped = weights.flip([FloatBitFlip("w", (0, 1), 30), FloatBitFlip("w", (1, 0), 31)])
    assert torch.isnan(flipped.values["w"][0, 1]) and flipped.values["w"][1, 0] == -3.0
    assert flipped.flipped_bits(weights) == 2 and weights.flipped_bits(weights) == 0
    assert weights.values["w"][1, 0] == 3.0  # immutable
    same = weights.flip([FloatBitFlip("w", (0, 0), 22)] * 2)  # a bit named twice flips back
    assert torch.equal(same.values["w"], weights.values["w"])
    with pytest.raises(ValueError, match="allowed"):
        weights.flip([FloatBitFlip("w", (0, 0), 5)])  # bits outside `bits` never flip
    with pytest.raises(ValueError, match="index"):
        weights.flip([FloatBitFlip("w", (2, 0), 31)])
    with pytest.raises(ValueError, match="may not flip"):
        weights.flip([FloatBitFlip("v", (0, 0), 31)])
    with pytest.raises(TypeError, match="FloatBitFlip"):
        weights.flip([BitFlip("w", (0, 0), 3)])
    with pytest.raises(ValueError, match="allowed"):
        weights.xor({"w": torch.full((2, 2), 1 << 5)})


@pytest.mark.parametrize(
    "values, bits, error, match",
    [
        ({"w": torch.zeros(2)}, [32], ValueError, "bits"),
        ({"w": torch.zeros(2, dtype=torch.float16)}, [16], ValueError, "bits"),
        ({"w": torch.zeros(2)}, [], ValueError, "bits"),
        ({"w": torch.zeros(2)}, "31", TypeError, "bits"),
        ({"w": torch.zeros(2, dtype=torch.int32)}, None, TypeError, "dtype"),
        ({"w": torch.zeros(2), "v": torch.zeros(2, dtype=torch.float16)}, None, TypeError, "one dtype"),
        ({"w": torch.tensor([1.0, float("nan")])}, None, ValueError, "NaN"),
        ({}, None, ValueError, "values"),
    ],
)
def test_float_weights_bad_input(values, bits, error, match):
    with pytest.raises(error, match=match):
        FloatWeights(values, bits)


def test_deltas_apply_and_perturbation_keep_the_user_model(tiny_mlp_classifier, digits):
    _, _, x, _ = digits
    model = tiny_mlp_classifier.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = FloatWeights.from_estimator(tiny_mlp_classifier, layers=["2"])
    assert weights.param_names == ["2.weight"] and len(weights.bits) == 32
    w = model.get_parameter("2.weight").detach()
    flips = [FloatBitFlip("2.weight", (1, 2), 31), FloatBitFlip("2.weight", (3, 4), 22)]
    flipped = weights.flip(flips)
    deltas = flipped.deltas(tiny_mlp_classifier)
    assert torch.equal(w + deltas["2.weight"], flipped.values["2.weight"])  # sign and mantissa: W + Δ exact
    attacked = flipped.apply(tiny_mlp_classifier)
    assert torch.equal(attacked.model.get_parameter("2.weight"), flipped.values["2.weight"])
    via_delta = tiny_mlp_classifier.with_weight_perturbation(flipped.perturbation(tiny_mlp_classifier))
    np.testing.assert_array_equal(via_delta.predict(x[:50]), attacked.predict(x[:50]))
    broken = weights.flip([FloatBitFlip("2.weight", (0, 0), 30)])  # |w| < 2: about 10^38, or inf / NaN
    value = broken.values["2.weight"][0, 0].item()
    assert not np.isfinite(value) or abs(value) > 1e37
    assert broken.apply(tiny_mlp_classifier).model.get_parameter("2.weight")[0, 0].item() == pytest.approx(
        value, nan_ok=True
    )
    if not np.isfinite(value):
        with pytest.raises(ValueError, match="NaN or inf"):
            broken.perturbation(tiny_mlp_classifier)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="layers"):
        FloatWeights.from_estimator(tiny_mlp_classifier, layers=["9"])


def test_half_precision_weights(digits):
    _, _, x, _ = digits
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).to(dtype)
        weights = FloatWeights.from_estimator(make_classifier(model, (64,)), bits=[15])
        assert weights.dtype == dtype and weights.bits == (15,)
        changes = weights.bit_changes("2.weight")
        np.testing.assert_array_equal(changes[0], -2 * model[2].weight.detach().to(torch.float64))
        flipped = weights.flip([FloatBitFlip("0.weight", (0, 0), 15)])
        assert flipped.perturbation(make_classifier(model, (64,)))["0.weight"].dtype == np.float32


def test_random_flips_count_positions_and_reproducibility(tiny_mlp_classifier):
    attack = RandomFloatBitFlips(tiny_mlp_classifier, nb_flips=30, seed=3, verbose=False)
    flips = attack.generate()
    assert len(flips) == 30 == len(set(flips)) and all(isinstance(f, FloatBitFlip) for f in flips)
    assert attack.generate() == flips
    weights = FloatWeights.from_estimator(tiny_mlp_classifier)
    assert weights.flipped_bits(weights.flip(flips)) == 30
    chosen = RandomFloatBitFlips(
        tiny_mlp_classifier, nb_flips=40, layers=["2"], bits=[0, 31], seed=0, verbose=False
    ).generate()
    assert {f.param_name for f in chosen} == {"2.weight"} and {f.bit for f in chosen} == {0, 31}
    every = RandomFloatBitFlips(tiny_mlp_classifier, nb_flips=320, layers=["2"], bits=[0, 31], seed=0, verbose=False)
    assert len(every.generate()) == 320  # all 160 weights × 2 positions
    every.set_params(nb_flips=321)
    with pytest.raises(ValueError, match="nb_flips"):
        every.generate()


def test_bit_error_rate_and_distribution(tiny_mlp_classifier):
    entries = 64 * 16 + 16 * 10
    assert RandomFloatBitFlips(tiny_mlp_classifier, ber=0.0, seed=0, verbose=False).generate() == []
    counts = [
        len(RandomFloatBitFlips(tiny_mlp_classifier, ber=0.002, seed=s, verbose=False).generate()) for s in range(10)
    ]
    assert abs(np.mean(counts) - 0.002 * 32 * entries) < 4 * np.sqrt(0.002 * 32 * entries / 10)
    weighted = RandomFloatBitFlips(
        tiny_mlp_classifier, nb_flips=200, bits=[3, 22, 31], distribution={22: 3.0, 31: 1.0}, seed=0, verbose=False
    )
    bits = [f.bit for f in weighted.generate()]
    assert set(bits) == {22, 31} and 100 < bits.count(22) < 190  # about 150: weight 3 against 1, none on bit 3
    array = np.zeros(32)
    array[31] = 1.0
    rate = RandomFloatBitFlips(tiny_mlp_classifier, ber=0.01, distribution=array, seed=1, verbose=False)
    drawn = rate.generate()
    assert {f.bit for f in drawn} == {31}  # every fault on the sign bit, at rate 0.01 · 32 per sign bit
    assert abs(len(drawn) - 0.32 * entries) < 5 * np.sqrt(0.32 * entries)
    with pytest.raises(ValueError, match="ber"):
        RandomFloatBitFlips(tiny_mlp_classifier, ber=0.05, distribution=array, verbose=False)  # rate 1.6 > 1


def test_evaluate_statistics_and_the_weights_untouched(trained_digits_mlp, digits):
    _, _, x_test, y_test = digits
    model = trained_digits_mlp.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attack = RandomFloatBitFlips(trained_digits_mlp, nb_flips=3, bits=[0, 22, 30, 31], nb_samples=4, seed=0,
                                 verbose=False)  # fmt: skip
    stats = attack.evaluate(x_test[:300], y_test[:300])
    assert set(stats) == {"mean", "std", "min", "max", "quantiles", "accuracies", "clean", "nb_flips", "per_bit"}
    assert stats["accuracies"].shape == (4,) and list(stats["nb_flips"]) == [3] * 4 and stats["clean"] > 0.9
    assert stats["min"] <= stats["mean"] <= stats["max"] <= stats["clean"] + 1e-12
    assert set(stats["per_bit"]) == {0, 22, 30, 31}
    assert stats["per_bit"][0]["mean"] == pytest.approx(stats["clean"])  # the lowest mantissa bit: harmless
    assert stats["per_bit"][30]["mean"] < stats["per_bit"][0]["mean"] - 0.2  # the top exponent bit: catastrophic
    assert "per_bit" not in attack.evaluate(x_test[:50], y_test[:50], per_bit=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({}, ValueError, "nb_flips"),
        ({"nb_flips": 1, "ber": 0.1}, ValueError, "nb_flips"),
        ({"nb_flips": -1}, ValueError, "nb_flips"),
        ({"ber": 1.5}, ValueError, "ber"),
        ({"nb_flips": 1, "bits": [32]}, ValueError, "bits"),
        ({"nb_flips": 1, "layers": ["7"]}, ValueError, "layers"),
        ({"nb_flips": 1, "nb_samples": 0}, ValueError, "nb_samples"),
        ({"nb_flips": 1, "seed": -1}, ValueError, "seed"),
        ({"nb_flips": 1, "distribution": {40: 1.0}}, ValueError, "distribution"),
        ({"nb_flips": 1, "distribution": [1.0, 2.0]}, ValueError, "distribution"),
        ({"nb_flips": 1, "distribution": {3: -1.0}}, ValueError, "distribution"),
        ({"nb_flips": 1, "bits": [3], "distribution": {4: 1.0}}, ValueError, "distribution"),
        ({"nb_flips": 1, "batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_random_flips_bad_arguments(tiny_mlp_classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomFloatBitFlips(tiny_mlp_classifier, verbose=False, **kwargs)


def test_model_whose_weights_are_not_float_is_rejected():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int32), requires_grad=False)
    classifier = make_classifier(model, (4,), nb_classes=3)
    with pytest.raises(TypeError, match="dtype"):
        RandomFloatBitFlips(classifier, nb_flips=1, verbose=False)
