"""BitFlipCertifier: sound against the exact single-flip enumeration (trained MLP, random MLP, small CNN, both
methods, per tensor and per channel), never beaten by a per-sample bit search for k >= 2, linear at least as tight as
interval, certified_flips consistent with certify, -1 on misclassified inputs, bad input, the user's model
untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_classifier, make_cnn, random_mlp

from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness
from art_weightpert.metrics import bit_flip_curve
from art_weightpert.quantization import BitFlip, QuantizedWeights

METHODS = ("interval", "linear")


@pytest.fixture(scope="module")
def small_cnn(digits_images):
    x_train, y_train, _, _ = digits_images
    clf = make_classifier(make_cnn(seed=0), input_shape=(1, 8, 8), lr=0.02)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=6, verbose=False)
    return clf


@pytest.fixture(scope="module")
def random_classifier():
    return make_classifier(random_mlp([64, 24, 16, 10], bias=True, seed=3))


def _case(request, name, digits, digits_images):
    """(classifier, x, y) of a named model, 60 test points."""
    if name == "cnn":
        _, _, x, y = digits_images
        return request.getfixturevalue("small_cnn"), x[:60], y[:60]
    _, _, x, y = digits
    if name == "random_mlp":  # labels: its own predictions (it is right on 15% of the digits only)
        return request.getfixturevalue("random_classifier"), x[:60], None
    return request.getfixturevalue("tiny_mlp_classifier"), x[:60], y[:60]


def _quantized_logits(clf, x, flips=(), **quant):
    quantized = QuantizedWeights.from_estimator(clf, **quant)
    return quantized.flip(list(flips)).apply(clf).predict(x)


def _margins(logits, y):
    m = logits[np.arange(len(y)), y][:, None] - logits
    m[np.arange(len(y)), y] = np.inf
    return m.min(axis=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["trained_mlp", "random_mlp", "cnn", "cnn_row_split"])
def test_k1_certificates_survive_every_single_flip(request, monkeypatch, name, digits, digits_images, dtype):
    if name == "cnn_row_split":  # the small conv's flips are otherwise enumerated exactly inside the certifier
        monkeypatch.setattr("art_weightpert.certification.bit_flip_cases.MAX_ENUMERATED_FLIPS", 0)
    clf, x, y = _case(request, name.replace("_row_split", ""), digits, digits_images)
    exact = single_flip_robustness(clf, x, y)
    certified = {m: BitFlipCertifier(clf, 1, method=m, verbose=False, dtype=dtype).certify(x, y) for m in METHODS}
    for method, cert in certified.items():
        assert not np.any(cert & ~exact), method  # every certified sample survives all single flips
    assert not np.any(certified["interval"] & ~certified["linear"])  # linear is never looser
    assert certified["linear"].mean() >= (0.25 if name == "cnn_row_split" else 0.9) * exact.mean() > 0


def test_enumeration_matches_real_flips(tiny_mlp_classifier, digits):
    """The reference itself: a sample it calls robust keeps its label under real single flips of the model."""
    _, _, x, y = digits
    x, y = x[:40], y[:40]
    robust = single_flip_robustness(tiny_mlp_classifier, x, y)
    quantized = QuantizedWeights.from_estimator(tiny_mlp_classifier)
    rng = np.random.default_rng(0)
    broken_any = np.zeros(len(x), dtype=bool)
    for name, codes in quantized.codes.items():  # sign bits of the largest weights hurt most, then random bits
        order = np.argsort(-np.abs(codes.numpy()).ravel())[:15]
        picks = [(int(i), 7) for i in order] + [
            (int(rng.integers(codes.numel())), int(rng.integers(8))) for _ in range(10)
        ]
        for flat, bit in picks:
            flip = BitFlip(name, tuple(int(i) for i in np.unravel_index(flat, codes.shape)), bit)
            pred = _quantized_logits(tiny_mlp_classifier, x, [flip]).argmax(1)
            broken_any |= pred != y
    assert not np.any(robust & broken_any)
    assert broken_any.any()  # the sampled flips do break something: the check can fail


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("layers", [None, ["2"]])
def test_k1_sound_per_channel_and_per_layer(tiny_mlp_classifier, digits, granularity, layers):
    _, _, x, y = digits
    x, y = x[:60], y[:60]
    exact = single_flip_robustness(tiny_mlp_classifier, x, y, granularity=granularity, layers=layers)
    cert = BitFlipCertifier(
        tiny_mlp_classifier, 1, granularity=granularity, layers=layers, method="linear", verbose=False
    ).certify(x, y)
    assert not np.any(cert & ~exact)
    assert cert.mean() >= 0.9 * exact.mean()


@pytest.mark.parametrize(
    "k, dtype",
    [(2, torch.float64), (4, torch.float64), (2, torch.float32)],
    ids=["2-float64", "4-float64", "2-float32"],
)
def test_bit_search_never_beats_the_bound(trained_digits_mlp, digits, k, dtype):
    """Per sample, BFA's k flips leave every margin above the certified lower bound (and so never break a
    certificate)."""
    _, _, x, y = digits
    x, y = x[:12], y[:12]
    bounds = {
        m: BitFlipCertifier(trained_digits_mlp, k, method=m, verbose=False, dtype=dtype)
        .margin_lower_bounds(x, y)
        .min(axis=1)
        for m in METHODS
    }
    assert np.all(bounds["linear"] >= bounds["interval"] - 1e-9)
    attack = BitFlipAttack(trained_digits_mlp, max_flips=k, top_k=30, nb_candidates=5, verbose=False)
    clean = _margins(_quantized_logits(trained_digits_mlp, x), y)
    for i in range(len(x)):
        flips = attack.generate(x[i : i + 1], y[i : i + 1])
        attacked = _margins(_quantized_logits(trained_digits_mlp, x[i : i + 1], flips), y[i : i + 1])[0]
        assert attacked < clean[i]  # the search moves the margin
        assert attacked >= bounds["linear"][i] - 1e-4  # float32 forward against the float64 bound
    assert np.mean(bounds["linear"] > 0) >= (0.5 if k == 2 else 0.0)  # k = 2: certificates to falsify


def test_certified_flips_consistent_with_certify(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:80].copy(), y[:80].copy()
    y[:5] = (y[:5] + 1) % 10  # wrong labels: the quantized prediction is wrong there
    flips = BitFlipCertifier(tiny_mlp_classifier, 3, method="linear", verbose=False).certified_flips(x, y)
    assert flips.dtype == np.int64 and flips.min() >= -1 and flips.max() <= 3
    pred = _quantized_logits(tiny_mlp_classifier, x).argmax(1)
    np.testing.assert_array_equal(flips == -1, pred != y)
    for k in (1, 2, 3):
        cert = BitFlipCertifier(tiny_mlp_classifier, k, method="linear", verbose=False).certify(x, y)
        np.testing.assert_array_equal(cert, flips >= k)  # monotone: certified at k iff certified_flips >= k
    assert (flips >= 1).any()


def test_user_model_untouched(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    before = {k: v.clone() for k, v in tiny_mlp_classifier.model.state_dict().items()}
    BitFlipCertifier(tiny_mlp_classifier, 2, method="linear", verbose=False).certified_flips(x[:10], y[:10])
    after = tiny_mlp_classifier.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"max_flips": -1}, ValueError, "max_flips"),
        ({"max_flips": 1.5}, TypeError, "max_flips"),
        ({"method": "paper"}, ValueError, "method"),
        ({"n_bits": 1}, ValueError, "n_bits"),
        ({"granularity": "row"}, ValueError, "granularity"),
        ({"layers": ["nope"]}, ValueError, "layers"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"verbose": "yes"}, TypeError, "verbose"),
    ],
)
def test_bad_arguments_name_the_argument(tiny_mlp_classifier, kwargs, error, word):
    with pytest.raises(error, match=word):
        BitFlipCertifier(tiny_mlp_classifier, **kwargs)


def test_bad_estimator_and_inputs(tiny_mlp_classifier, digits):
    with pytest.raises(TypeError, match="estimator"):
        BitFlipCertifier(object())
    certifier = BitFlipCertifier(tiny_mlp_classifier, verbose=False)
    with pytest.raises(ValueError, match="x"):
        certifier.certify(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="y"):
        certifier.certify(digits[2][:3], digits[3][:2])


@pytest.fixture(scope="module")
def conv_chain(digits_images):
    """The zoo's conv-ReLU-conv-ReLU-linear-ReLU-linear CNN, small and briefly trained: the sparse case bound for
    convolutions feeding convolutions runs on it."""
    from art_weightpert import zoo

    x_train, y_train, _, _ = digits_images
    clf = zoo.make_classifier(zoo.digits_cnn(channels=(4, 8), seed=1), (1, 8, 8), lr=0.01)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=4, verbose=False)
    return clf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("k", [1, 2])
def test_conv_chain_bound_below_attacked_and_random_flips(conv_chain, digits_images, monkeypatch, k, dtype):
    """Row split (k = 1, enumeration switched off) and the sparse channel bound (k = 2) on a conv chain: every margin
    after BFA's flips or random sign-bit flips stays above the certified lower bound."""
    monkeypatch.setattr("art_weightpert.certification.bit_flip_cases.MAX_ENUMERATED_FLIPS", 0)
    _, _, x, y = digits_images
    x, y = x[:8], y[:8]
    certifier = BitFlipCertifier(conv_chain, k, method="linear", verbose=False, dtype=dtype)
    bound = certifier.margin_lower_bounds(x, y).min(axis=1)
    if k == 1:
        exact = single_flip_robustness(conv_chain, x, y)
        assert not np.any((bound > 1e-9) & ~exact)
    attack = BitFlipAttack(conv_chain, max_flips=k, top_k=30, nb_candidates=5, verbose=False)
    codes = QuantizedWeights.from_estimator(conv_chain).codes
    rng = np.random.default_rng(k)
    for i in range(len(x)):
        flip_sets = [attack.generate(x[i : i + 1], y[i : i + 1])]
        for _ in range(5):
            names = rng.choice(list(codes), size=k)
            flip_sets.append([BitFlip(n, tuple(int(rng.integers(s)) for s in codes[n].shape), 7) for n in names])
        for flips in flip_sets:
            attacked = _margins(_quantized_logits(conv_chain, x[i : i + 1], flips), y[i : i + 1])[0]
            assert attacked >= bound[i] - 1e-4


def test_bit_flip_curve_certified_matches_certify_and_stays_below_the_attack(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    x, y = x_test[:60], y_test[:60]
    curve = bit_flip_curve(tiny_mlp_classifier, x, y, flips=[1, 2, 3], x_attack=x, y_attack=y, nb_samples=2,
                           method="linear", certify_points=100)  # fmt: skip
    assert curve["certify_method"] == "linear" and curve["certified_points"] == len(x)
    for k, certified, bfa, random in zip(
        curve["flips"], curve["certified_accuracy"], curve["bfa_accuracy"], curve["random_mean"]
    ):
        expected = BitFlipCertifier(tiny_mlp_classifier, k, method="linear", verbose=False).certify(x, y).mean()
        assert certified == pytest.approx(expected, abs=1e-12), k
        assert certified <= bfa and certified <= random, k  # the certificate lies below the attack and random flips
    histogram = curve["certified_flips_histogram"]
    assert list(histogram) == [-1, 0, 1, 2, 3] and sum(histogram.values()) == len(x)
    assert histogram[-1] == round((1 - curve["quantized_accuracy"]) * len(x))
    assert curve["certified_accuracy"][0] > 0  # something is certified: the comparison above is not vacuous
    fewer = bit_flip_curve(tiny_mlp_classifier, x, y, flips=[1], x_attack=x, y_attack=y, nb_samples=1,
                           method="interval", certify_points=25)  # fmt: skip
    assert fewer["certified_points"] == 25 and sum(fewer["certified_flips_histogram"].values()) == 25
    single = bit_flip_curve(tiny_mlp_classifier, x, y, flips=[2], x_attack=x, y_attack=y, nb_samples=1,
                            method="linear", dtype=torch.float32)  # fmt: skip
    flips32 = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False, dtype=torch.float32).certified_flips(x, y)
    assert single["certified_flips_histogram"] == {k: int(np.sum(flips32 == k)) for k in range(-1, 3)}
    assert "certified_accuracy" not in bit_flip_curve(tiny_mlp_classifier, x, y, flips=[1], nb_samples=1)
    with pytest.raises(ValueError, match="`method`"):
        bit_flip_curve(tiny_mlp_classifier, x, y, flips=[1], method="exact")
    with pytest.raises(ValueError, match="certify_points"):
        bit_flip_curve(tiny_mlp_classifier, x, y, flips=[1], method="linear", certify_points=0)


def test_a_network_with_branches_is_refused_not_read_as_a_chain():
    from art_weightpert.network import UnsupportedModelError
    from art_weightpert.zoo import digits_resnet, make_classifier

    classifier = make_classifier(digits_resnet(seed=0), (1, 8, 8))
    before = {k: v.clone() for k, v in classifier.model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match="chains of layers only"):
        BitFlipCertifier(classifier, max_flips=1)
    with pytest.raises(UnsupportedModelError, match="chains of layers only"):
        single_flip_robustness(classifier, np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, int))
    assert all(torch.equal(v, before[k]) for k, v in classifier.model.state_dict().items())
