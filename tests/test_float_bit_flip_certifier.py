"""BitFlipCertifier(encoding="float"): sound against the exact enumeration of every single flip of the allowed float
bits (both methods, trained and tiny MLPs), no certified prediction broken by real flips of the float32 model or by a
per-sample bit search at k = 2, exponent bits allowed certify fewer, flips to inf / NaN certify nothing, the int
encoding with restricted bits, bad input, the user's model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert.attacks.float_bit_flip import FloatBitFlipAttack
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness
from art_weightpert.float_bits import FloatWeights
from art_weightpert.zoo import make_classifier

METHODS = ("interval", "linear")
LAYERS = ["2", "4"]  # the reference MLP's last two layers: its first layer's 196k float flips are slow to enumerate
SIGN_AND_MANTISSA = tuple(range(23)) + (31,)


def _certify(classifier, x, y, k, method="linear", **kwargs):
    return BitFlipCertifier(classifier, k, method=method, verbose=False, encoding="float", **kwargs).certify(x, y)


def _margins(logits, y):
    m = logits[np.arange(len(y)), y][:, None] - logits
    m[np.arange(len(y)), y] = np.inf
    return m.min(axis=1)


@pytest.fixture(scope="module")
def points(digits):
    _, _, x, y = digits
    return x[:16], y[:16]


@pytest.fixture(scope="module")
def exact_single_flips(trained_digits_mlp, points):
    return single_flip_robustness(trained_digits_mlp, *points, layers=LAYERS, encoding="float")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_k1_certificates_survive_every_single_float_flip(trained_digits_mlp, points, exact_single_flips, dtype):
    x, y = points
    exact = exact_single_flips
    certified = {m: _certify(trained_digits_mlp, x, y, 1, m, layers=LAYERS, dtype=dtype) for m in METHODS}
    for method, cert in certified.items():
        assert not np.any(cert & ~exact), method  # every certified sample survives all single flips
    assert not np.any(certified["interval"] & ~certified["linear"])  # linear is never looser
    assert certified["linear"].mean() >= 0.9 * exact.mean() > 0.5  # measured: both 0.95 on 40 points
    certifier = BitFlipCertifier(trained_digits_mlp, 1, layers=LAYERS, encoding="float", verbose=False)
    assert certifier.bits == SIGN_AND_MANTISSA and isinstance(certifier.weights_, FloatWeights)
    assert "encoding='float'" in repr(certifier)


def test_real_float32_flips_never_break_a_certified_prediction(trained_digits_mlp, points):
    """The float32 model itself, flipped by the bit search on each certified sample and by the sign bits of the
    largest weights: the prediction stays."""
    x, y = points
    cert = _certify(trained_digits_mlp, x, y, 1, layers=LAYERS)
    weights = FloatWeights.from_estimator(trained_digits_mlp, layers=LAYERS, bits=SIGN_AND_MANTISSA)
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=1, bits=SIGN_AND_MANTISSA, layers=LAYERS, verbose=False)
    for i in np.flatnonzero(cert):
        flips = attack.generate(x[i : i + 1], y[i : i + 1])
        assert trained_digits_mlp.predict(x[i : i + 1]).argmax() == y[i]
        assert weights.flip(flips).apply(trained_digits_mlp).predict(x[i : i + 1]).argmax() == y[i]
    biggest = weights.values["4.weight"].abs().flatten().topk(10).indices
    for flat in biggest.tolist():
        flip = weights.flip([_flip("4.weight", flat, (10, 64), 31)])
        assert np.all(flip.apply(trained_digits_mlp).predict(x[cert]).argmax(1) == y[cert])


def _flip(name, flat, shape, bit):
    from art_weightpert.float_bits import FloatBitFlip

    return FloatBitFlip(name, tuple(int(i) for i in np.unravel_index(flat, shape)), bit)


def test_all_layers_of_a_tiny_mlp(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:40], y[:40]
    exact = single_flip_robustness(tiny_mlp_classifier, x, y, encoding="float")
    for method in METHODS:
        cert = _certify(tiny_mlp_classifier, x, y, 1, method)
        assert not np.any(cert & ~exact), method
    assert _certify(tiny_mlp_classifier, x, y, 1).sum() == exact.sum()  # k = 1 exact here


def test_k2_bit_search_never_beats_the_bound(trained_digits_mlp, points):
    x, y = points
    x, y = x[:8], y[:8]
    certifier = BitFlipCertifier(trained_digits_mlp, 2, method="linear", encoding="float", verbose=False)
    bound = certifier.margin_lower_bounds(x, y).min(axis=1)
    assert np.mean(bound > 0) >= 0.5  # certificates to falsify (measured: 0.7 of the test points certified)
    attack = FloatBitFlipAttack(trained_digits_mlp, max_flips=2, bits=SIGN_AND_MANTISSA, top_k=30, verbose=False)
    weights = FloatWeights.from_estimator(trained_digits_mlp, bits=SIGN_AND_MANTISSA)
    clean = _margins(trained_digits_mlp.predict(x), y)
    for i in range(len(x)):
        flips = attack.generate(x[i : i + 1], y[i : i + 1])
        attacked = _margins(weights.flip(flips).apply(trained_digits_mlp).predict(x[i : i + 1]), y[i : i + 1])[0]
        assert attacked < clean[i]  # the search moves the margin
        assert attacked >= bound[i] - 1e-4  # float32 forward against the float64 bound


def test_exponent_bits_certify_fewer_and_infinite_flips_certify_nothing(trained_digits_mlp, points):
    x, y = points
    default = _certify(trained_digits_mlp, x, y, 1, layers=["4"])
    low_exponent = SIGN_AND_MANTISSA + (23, 24)  # ×2, ×4 or ÷2, ÷4: finite, certified soundly
    exact = single_flip_robustness(trained_digits_mlp, x, y, layers=["4"], encoding="float", bits=low_exponent)
    wider = _certify(trained_digits_mlp, x, y, 1, layers=["4"], bits=low_exponent)
    assert not np.any(wider & ~exact) and not np.any(wider & ~default) and wider.sum() < default.sum()
    top = BitFlipCertifier(trained_digits_mlp, 1, layers=["4"], encoding="float", bits=[30], verbose=False)
    assert not top.certify(x, y).any()  # |w| < 1 here: one flip gives about 10^38
    assert np.all(top.margin_lower_bounds(x, y).min(axis=1) < -1e30)
    torch.manual_seed(0)
    linear = make_classifier(nn.Sequential(nn.Linear(64, 10)), (64,))
    with torch.no_grad():
        linear.model[0].weight[3, 5] = 1.5  # its top exponent bit gives NaN
    infinite = BitFlipCertifier(linear, 1, encoding="float", bits=[30, 31], verbose=False)
    assert np.all(infinite.margin_lower_bounds(x, y).min(axis=1) == -np.inf) and not infinite.certify(x).any()
    zero = BitFlipCertifier(linear, 0, encoding="float", bits=[30, 31], verbose=False)
    np.testing.assert_array_equal(zero.certify(x), np.ones(len(x), dtype=bool))  # k = 0: the prediction itself


def test_int_encoding_with_restricted_bits(trained_digits_mlp, points):
    x, y = points
    every = BitFlipCertifier(trained_digits_mlp, 2, method="linear", verbose=False).certify(x, y)
    low = BitFlipCertifier(trained_digits_mlp, 2, method="linear", bits=range(7), verbose=False)
    assert low.bits == tuple(range(7)) and BitFlipCertifier(trained_digits_mlp, verbose=False).bits is None
    certified = low.certify(x, y)
    assert not np.any(every & ~certified) and certified.sum() > every.sum()  # without the sign bit: more certified
    exact = single_flip_robustness(trained_digits_mlp, x, y, layers=["4"], bits=[7])
    sign_only = BitFlipCertifier(trained_digits_mlp, 1, layers=["4"], bits=[7], verbose=False).certify(x, y)
    assert not np.any(sign_only & ~exact)


def test_user_model_untouched(trained_digits_mlp, points):
    x, y = points
    before = {k: v.clone() for k, v in trained_digits_mlp.model.state_dict().items()}
    BitFlipCertifier(trained_digits_mlp, 2, method="linear", encoding="float", verbose=False).certified_flips(x, y)
    assert all(torch.equal(before[k], v) for k, v in trained_digits_mlp.model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"encoding": "fp32"}, ValueError, "encoding"),
        ({"encoding": "float", "bits": [32]}, ValueError, "bits"),
        ({"encoding": "float", "bits": []}, ValueError, "bits"),
        ({"encoding": "float", "layers": ["9"]}, ValueError, "layers"),
        ({"bits": [8]}, ValueError, "bits"),
        ({"bits": 3}, TypeError, "bits"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, word):
    with pytest.raises(error, match=word):
        BitFlipCertifier(tiny_mlp_classifier, **kwargs)


def test_float_encoding_of_integer_weights_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="dtype"):
        BitFlipCertifier(make_classifier(model, (4,), nb_classes=3), encoding="float")
