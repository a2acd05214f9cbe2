"""BitFlipCertifier.verify: verdicts sound against the exact single-flip enumeration (k = 1) and a per-sample bit
search (k = 2), counterexamples that are real flips (checked by a forward pass of the flipped quantized model, at most
max_flips each), misclassified samples falsified with no flip, the user's weights never modified (also when the search
raises), parameter validation, and the VerificationResult fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_identical, make_classifier, make_cnn, snapshot

from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness
from art_weightpert.certification.verdicts import STATUSES, VerificationResult
from art_weightpert.quantization import BitFlip, QuantizedWeights


@pytest.fixture(scope="module")
def small_cnn(digits_images):
    x_train, y_train, _, _ = digits_images
    clf = make_classifier(make_cnn(seed=0), input_shape=(1, 8, 8), lr=0.02)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=4, verbose=False)
    return clf


def _predictions(clf, x, flips=()):
    return QuantizedWeights.from_estimator(clf).flip(list(flips)).apply(clf).predict(x).argmax(1)


def _check_result(result: VerificationResult, n: int, max_flips: int, clf, x, y) -> None:
    """Fields, shapes, shares, and every counterexample real."""
    assert result.status.shape == (n,) and set(result.status) <= set(STATUSES)
    assert result.lower_bounds.shape == (n,) and result.seconds.shape == (n,)
    assert np.all(result.seconds >= 0)
    shares = result.shares()
    assert set(shares) == set(STATUSES) and abs(sum(shares.values()) - 1) < 1e-9
    assert np.all(result.lower_bounds[result.status == "certified"] > 0)
    assert set(result.counterexamples) == set(np.flatnonzero(result.status == "falsified"))
    clean = _predictions(clf, x)
    for i, flips in result.counterexamples.items():
        assert len(flips) <= max_flips and len(set(flips)) == len(flips)
        assert all(isinstance(f, BitFlip) for f in flips)
        if not flips:
            assert clean[i] != y[i]  # misclassified already
        else:
            assert clean[i] == y[i] and _predictions(clf, x[i : i + 1], flips)[0] != y[i]


def test_verify_k1_matches_exact_enumeration(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:40], y[:40]
    exact = single_flip_robustness(tiny_mlp_classifier, x, y)
    result = BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False).verify(x, y, time_limit=0.5)
    _check_result(result, len(x), 1, tiny_mlp_classifier, x, y)
    assert not np.any((result.status == "certified") & ~exact)  # sound
    assert not np.any((result.status == "falsified") & exact)  # a real flip breaks every falsified sample
    assert np.mean(result.status == "certified") >= 0.9 * exact.mean() > 0
    assert np.mean(result.status == "unknown") <= 0.1


def test_verify_k2_certified_survive_attack_and_counterexamples_real(trained_digits_mlp, digits):
    _, _, x, y = digits
    x, y = x[:16], y[:16]
    clf = trained_digits_mlp
    result = BitFlipCertifier(clf, 2, verbose=False).verify(x, y, time_limit=0.5)
    _check_result(result, len(x), 2, clf, x, y)
    assert (result.status == "certified").any()
    attack = BitFlipAttack(clf, max_flips=2, top_k=30, nb_candidates=5, verbose=False)
    for i in np.flatnonzero(result.status == "certified"):
        flips = attack.generate(x[i : i + 1], y[i : i + 1])
        assert _predictions(clf, x[i : i + 1], flips)[0] == y[i]


def test_verify_k2_falsifies_a_fragile_model(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:20], y[:20]
    result = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False).verify(x, y, time_limit=0.2)
    _check_result(result, len(x), 2, tiny_mlp_classifier, x, y)
    assert np.mean(result.status == "falsified") >= 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_verify_conv_chain(small_cnn, digits_images, dtype):
    _, _, x, y = digits_images
    x, y = x[:6], y[:6]
    exact = single_flip_robustness(small_cnn, x, y)
    result = BitFlipCertifier(small_cnn, 1, verbose=False, dtype=dtype).verify(x, y, time_limit=0.3)
    _check_result(result, len(x), 1, small_cnn, x, y)
    assert not np.any((result.status == "certified") & ~exact)
    assert not np.any((result.status == "falsified") & exact)
    result = BitFlipCertifier(small_cnn, 2, layers=["0", "4"], verbose=False, dtype=dtype).verify(x, y, time_limit=0.3)
    _check_result(result, len(x), 2, small_cnn, x, y)


def test_verify_in_float32_certifies_nothing_that_only_float64_arithmetic_sees():
    """``x ↦ (A + 1 − A)`` with ``A = 1e17``: exactly 1, in float32 and float64 alike 0, so both evaluate class 1
    where the exact network predicts class 0. float64 arithmetic would certify the label 1 (its refinements have no
    rounding terms); a float32 certifier's verdicts hold for the exact network, so it must not."""
    from torch import nn

    a = float(np.float32(1e17))
    first, flip, head = nn.Linear(3, 1, bias=False), nn.Linear(1, 2, bias=False), nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[a, 1.0, -a]])), flip.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]])), head.bias.copy_(torch.tensor([0.0, 0.5]))
    clf = make_classifier(nn.Sequential(first, nn.ReLU(), flip, nn.ReLU(), head), input_shape=(3,), nb_classes=2)
    x, y = np.ones((1, 3), np.float32), np.array([1])
    certifier = BitFlipCertifier(clf, 1, layers=["2"], verbose=False, dtype=torch.float32)
    assert certifier.verify(x, y).status[0] != "certified"
    assert not certifier.certify(x, y)[0]


def test_misclassified_are_falsified_without_flips(tiny_mlp_classifier, digits):
    _, _, x, y = digits
    x, y = x[:10], y[:10].copy()
    y[:3] = (y[:3] + 1) % 10
    result = BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False).verify(x, y)
    wrong = _predictions(tiny_mlp_classifier, x) != y
    assert wrong[:3].all()
    assert np.all(result.status[wrong] == "falsified")
    assert all(result.counterexamples[int(i)] == [] for i in np.flatnonzero(wrong))
    assert np.all(np.isneginf(result.lower_bounds[wrong]))


def test_labels_default_to_predictions_and_max_flips_zero(tiny_mlp_classifier, digits):
    _, _, x, _ = digits
    result = BitFlipCertifier(tiny_mlp_classifier, 0, verbose=False).verify(x[:10])
    assert np.all(result.status == "certified")  # no flip: the quantized model's own predictions
    assert result.counterexamples == {}


def test_weights_untouched_also_on_exception(tiny_mlp_classifier, digits, monkeypatch):
    _, _, x, y = digits
    before = snapshot(tiny_mlp_classifier.model)
    certifier = BitFlipCertifier(tiny_mlp_classifier, 2, verbose=False)
    certifier.verify(x[:10], y[:10], time_limit=0.2)
    assert_identical(tiny_mlp_classifier.model, before)

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("art_weightpert.certification.bit_flip.greedy_flip_search", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        certifier.verify(x[:30], y[:30])
    assert_identical(tiny_mlp_classifier.model, before)
    assert all(not t.memo for t in certifier._tables.values())


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)]
)
def test_bad_time_limit(tiny_mlp_classifier, digits, value, error):
    with pytest.raises(error, match="time_limit"):
        BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False).verify(digits[2][:2], time_limit=value)


def test_bad_inputs(tiny_mlp_classifier, digits):
    certifier = BitFlipCertifier(tiny_mlp_classifier, 1, verbose=False)
    with pytest.raises(ValueError, match="x"):
        certifier.verify(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="y"):
        certifier.verify(digits[2][:3], digits[3][:2])


def test_result_shares_and_validation():
    result = VerificationResult(np.zeros(0, dtype=object), np.zeros(0))
    assert all(np.isnan(v) for v in result.shares().values()) and len(result) == 0
    result = VerificationResult(np.array(["certified", "unknown"]), np.array([1.0, -1.0]), {}, np.zeros(2))
    assert result.shares() == {"certified": 0.5, "falsified": 0.0, "unknown": 0.5}
    assert "certified=0.500" in repr(result)
    with pytest.raises(ValueError, match="status"):
        VerificationResult(np.array(["proved"]), np.zeros(1))
    with pytest.raises(ValueError, match="lower_bounds"):
        VerificationResult(np.array(["unknown"]), np.zeros(2))


def _tiny_conv_chain(seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 10),
    )


def _exhaustive_two_flips_robust(certifier, x, y) -> np.ndarray:
    """Per sample, whether every set of at most two flips of the certifier's layers keeps the label: for every single
    flip (loop), the flipped model's exact single-flip margins of every layer at or after it (float64)."""
    import torch

    from art_weightpert.certification.bit_flip_enumeration import _step, single_flip_margins

    certifier._refresh()
    net, params, tables = certifier._network, certifier._params, certifier._tables
    x_t, y_t = certifier.estimator.prepare_inputs(x, y)
    x64, labels = x_t.to(torch.float64), y_t
    layers = [i for i, layer in enumerate(net.layers) if layer.weighted and layer.weight_name in tables]

    def changes_of(index):
        name = net.layers[index].weight_name
        c = tables[name].changes  # (rows, fan_in, bits)
        return c.permute(2, 0, 1).reshape((c.shape[2],) + tuple(params[name].shape)).clone()

    def inputs(p):
        hs, h = [], x64
        for i in range(len(net.layers)):
            hs.append(h)
            h = _step(net, p, h, i)
        return hs

    alive = torch.ones(len(x64), dtype=torch.bool)
    with torch.no_grad():
        for a in layers:
            name = net.layers[a].weight_name
            ca = changes_of(a)
            for bit, flat in ca.reshape(len(ca), -1).nonzero().tolist():
                p = dict(params)
                w = p[name].clone()
                w.view(-1)[flat] += ca.reshape(len(ca), -1)[bit, flat]
                p[name] = w
                hs = inputs(p)
                for b in layers:
                    if b < a:
                        continue
                    cb = changes_of(b)
                    if b == a:
                        cb.reshape(len(cb), -1)[bit, flat] = 0  # the same bit flipped twice is no flip
                    m = single_flip_margins(net, p, b, cb, hs[b], labels)
                    alive &= (m.scatter(1, labels.unsqueeze(1), float("inf")) > 0).all(dim=1)
    return alive.numpy()


def test_verify_k2_first_layer_pairs_sound_against_exhaustive_flips(digits_images, monkeypatch):
    """The enumerated flips of the first convolution (bit_flip_first_layer): no certified sample falls to any set of
    at most two flips of the two convolutions, enumerated exhaustively in float64."""
    import art_weightpert.certification.bit_flip_first_layer as first_layer

    x_train, y_train, x, y = digits_images
    clf = make_classifier(_tiny_conv_chain(), input_shape=(1, 8, 8), lr=0.02)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=6, verbose=False)
    x, y = x[:24], y[:24]
    calls = []
    original = first_layer.first_layer_margins
    monkeypatch.setattr(first_layer, "NB_POINTS", 16)  # small: the groups of small flips are exercised too

    def counted(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr("art_weightpert.certification.bit_flip_cases.first_layer_margins", counted)
    certifier = BitFlipCertifier(clf, 2, layers=["0", "2"], bits=[0, 1, 2, 3, 4], verbose=False)
    result = certifier.verify(x, y, time_limit=0.5)
    _check_result(result, len(x), 2, clf, x, y)
    assert any(case["0.weight"] == 2 for case in calls) and any(case["0.weight"] == 1 for case in calls)
    exact = _exhaustive_two_flips_robust(certifier, x, y)
    certified = result.status == "certified"
    assert not np.any(certified & ~exact)  # sound
    assert not np.any((result.status == "falsified") & exact)
    assert certified.any()
