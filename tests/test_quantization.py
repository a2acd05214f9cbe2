"""QuantizedWeights and BitFlip: quantization against a numpy reference, two's complement flip arithmetic
(docs/theory.md §8), Hamming distance, the perturbation onto the quantized values, bad input, ART interop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod
from conftest import make_classifier, make_cnn, make_mlp
from torch import nn

from art_weightpert.estimators import PyTorchWeightClassifier
from art_weightpert.quantization import BitFlip, QuantizedWeights


def reference_codes(w: np.ndarray, n_bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric uniform quantization in numpy: scale max|W| / (2^(n-1) - 1), codes round(W / scale)."""
    level = 2 ** (n_bits - 1) - 1
    w = w.astype(np.float64)
    if per_channel:
        scale = np.abs(w).reshape(len(w), -1).max(axis=1) / level
        s = scale.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        scale = s = np.abs(w).max() / level
    return np.clip(np.round(w / np.where(s > 0, s, 1.0)), -level, level).astype(np.int64), np.asarray(scale)


def twos_complement_value(bits: np.ndarray) -> int:
    """Value of a bit vector (least significant first) as a two's complement integer."""
    n = len(bits)
    return int(-(2 ** (n - 1)) * bits[-1] + sum(2**b * bits[b] for b in range(n - 1)))


@pytest.fixture(scope="module")
def cnn_classifier():
    return make_classifier(make_cnn(seed=1), input_shape=(1, 8, 8))


@pytest.mark.parametrize("n_bits", [2, 4, 8, 16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_codes_match_numpy_reference_and_round_trip(cnn_classifier, n_bits, granularity):
    q = QuantizedWeights.from_estimator(cnn_classifier, n_bits=n_bits, granularity=granularity)
    assert q.param_names == ["0.weight", "4.weight"] and q.n_bits == n_bits
    values = q.dequantize()
    for name in q.param_names:
        w = cnn_classifier.model.get_parameter(name).detach().numpy()
        codes, scale = reference_codes(w, n_bits, granularity == "channel")
        np.testing.assert_array_equal(q.codes[name].numpy(), codes)
        np.testing.assert_allclose(q.scales[name].numpy(), scale, rtol=1e-12)
        step = scale.reshape((-1,) + (1,) * (w.ndim - 1)) if granularity == "channel" else scale
        assert np.all(np.abs(values[name].numpy() - w) <= step / 2 + 1e-7)


def test_flip_arithmetic_follows_twos_complement():
    codes = torch.tensor([[5, -3, 0, 127], [-127, 64, -1, 1]])
    q = QuantizedWeights({"w": codes}, {"w": torch.tensor(0.5)}, n_bits=8, granularity="tensor")
    changes = q.bit_changes("w") / 0.5  # (8, 2, 4) code changes d_b(c)
    for index in [(0, 0), (0, 1), (0, 3), (1, 0), (1, 2)]:
        c = int(codes[index])
        bits = np.array([(c & 0xFF) >> b & 1 for b in range(8)])
        assert twos_complement_value(bits) == c
        for b in range(8):
            flipped = bits.copy()
            flipped[b] ^= 1
            new = int(q.flip([BitFlip("w", index, b)]).codes["w"][index])
            assert new == twos_complement_value(flipped)
            assert new - c == int(changes[(b,) + index])
    # the sign bit moves a code by ∓2^(n-1); distinct bits of one weight add
    assert int(q.flip([BitFlip("w", (0, 0), 7)]).codes["w"][0, 0]) == 5 - 128
    both = q.flip([BitFlip("w", (0, 1), 2), BitFlip("w", (0, 1), 7)])
    assert int(both.codes["w"][0, 1]) == -3 + int(changes[2, 0, 1]) + int(changes[7, 0, 1])


def test_flip_returns_new_object_and_double_flip_cancels():
    q = QuantizedWeights({"w": torch.tensor([3, -4])}, {"w": torch.tensor(1.0)}, n_bits=4, granularity="tensor")
    flip = BitFlip("w", (1,), 0)
    flipped = q.flip([flip])
    assert q.codes["w"].tolist() == [3, -4] and flipped.codes["w"].tolist() == [3, -3]
    assert q.flip([flip, flip]).codes["w"].tolist() == [3, -4]
    assert q.flipped_bits(flipped) == 1 and q.flipped_bits(q.flip([flip, flip])) == 0


def test_hamming_distance_counts_distinct_flipped_bits(cnn_classifier):
    q = QuantizedWeights.from_estimator(cnn_classifier)
    flips = [BitFlip("0.weight", (0, 0, 1, 1), b) for b in (0, 3, 7)] + [BitFlip("4.weight", (9, 63), 5)]
    assert q.flipped_bits(q.flip(flips)) == 4
    assert q.flip(flips).flipped_bits(q) == 4
    with pytest.raises(ValueError, match="same weights"):
        q.flipped_bits(QuantizedWeights.from_estimator(cnn_classifier, n_bits=4))


def test_all_zero_tensor_and_channel_get_scale_zero():
    model = make_mlp(seed=0)
    with torch.no_grad():
        model[0].weight[3].zero_()
        model[2].weight.zero_()
    clf = make_classifier(model)
    per_channel = QuantizedWeights.from_estimator(clf, granularity="channel")
    assert float(per_channel.scales["0.weight"][3]) == 0 and per_channel.codes["0.weight"][3].abs().sum() == 0
    per_tensor = QuantizedWeights.from_estimator(clf)
    assert float(per_tensor.scales["2.weight"]) == 0
    flipped = per_tensor.flip([BitFlip("2.weight", (0, 0), 7)])
    assert torch.equal(flipped.dequantize()["2.weight"], per_tensor.dequantize()["2.weight"])


def test_apply_moves_estimator_onto_quantized_values_and_leaves_model_alone(tiny_mlp_classifier, digits):
    _, _, x_test, _ = digits
    before = {k: v.clone() for k, v in tiny_mlp_classifier.model.state_dict().items()}
    q = QuantizedWeights.from_estimator(tiny_mlp_classifier, n_bits=4, layers=["0"])
    delta = q.perturbation(tiny_mlp_classifier)
    assert delta.budget is None and list(delta) == ["0.weight"]
    quantized = q.apply(tiny_mlp_classifier)
    reference = make_mlp(seed=0)
    reference.load_state_dict(tiny_mlp_classifier.model.state_dict())
    with torch.no_grad():
        reference[0].weight.copy_(q.dequantize()["0.weight"])
        expected = reference(torch.as_tensor(x_test[:50])).numpy()
    np.testing.assert_allclose(quantized.predict(x_test[:50]), expected, atol=1e-5)
    for k, v in tiny_mlp_classifier.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_art_fgsm_runs_on_quantized_estimator(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    quantized = QuantizedWeights.from_estimator(tiny_mlp_classifier, n_bits=6).apply(tiny_mlp_classifier)
    clean = np.mean(quantized.predict(x_test).argmax(1) == y_test)
    x_adv = FastGradientMethod(quantized, eps=0.2).generate(x_test, np.eye(10)[y_test])
    adversarial = np.mean(quantized.predict(x_adv).argmax(1) == y_test)
    assert clean > 0.85 and adversarial < clean - 0.3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_bits": 1}, ValueError, "n_bits"),
        ({"n_bits": 17}, ValueError, "n_bits"),
        ({"n_bits": 8.0}, TypeError, "n_bits"),
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"layers": ["0", "9"]}, ValueError, r"layers.*\['9'\].*\['0', '2'\]"),
        ({"layers": []}, ValueError, "layers"),
    ],
)
def test_bad_quantization_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, match):
    with pytest.raises(error, match=match):
        QuantizedWeights.from_estimator(tiny_mlp_classifier, **kwargs)


def test_model_without_linear_or_conv_is_rejected():
    clf = PyTorchWeightClassifier(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(10)), nn.CrossEntropyLoss(), (10,), 10)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        QuantizedWeights.from_estimator(clf)
    with pytest.raises(TypeError, match="estimator"):
        QuantizedWeights.from_estimator(nn.Linear(2, 2))


def test_bad_flips_are_rejected(tiny_mlp_classifier):
    q = QuantizedWeights.from_estimator(tiny_mlp_classifier, n_bits=4)
    with pytest.raises(ValueError, match="not quantized"):
        q.flip([BitFlip("0.bias", (0,), 0)])
    with pytest.raises(ValueError, match="outside"):
        q.flip([BitFlip("0.weight", (16, 0), 0)])
    with pytest.raises(ValueError, match="bit 4"):
        q.flip([BitFlip("0.weight", (0, 0), 4)])
    with pytest.raises(TypeError, match="BitFlip"):
        q.flip([("0.weight", (0, 0), 1)])
    with pytest.raises(ValueError, match="index"):
        BitFlip("0.weight", (-1, 0), 0)
    with pytest.raises(TypeError, match="param_name"):
        BitFlip(0, (0, 0), 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BitFlip("0.weight", (0, 0), 0).bit = 1
