"""WeightIntegrityDetector (RADAR-style integrity checks of quantized weights): detection of BFA's flips, no false
alarm, group bookkeeping, recovery, the secret interleaving, the adaptive cancelling pair, bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from art_weightpert import zoo
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.defences.detector import WeightIntegrityDetector
from art_weightpert.quantization import BitFlip, QuantizedWeights


def _accuracy(clf, x, y) -> float:
    return float((clf.predict(x).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_test, y_test = digits
    clf = zoo.make_classifier(zoo.digits_mlp(), (64,))
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=20)
    return clf, x_test, y_test


@pytest.fixture(scope="module")
def attacked(trained):
    """A 10-flip BFA run on 128 test points: (flips, the flipped quantized estimator)."""
    clf, x, y = trained
    idx = np.random.default_rng(0).choice(len(x), 128, replace=False)
    attack = BitFlipAttack(clf, max_flips=10, verbose=False)
    flips = attack.generate(x[idx], y[idx])
    return flips, attack.quantized_.flip(flips).apply(clf)


def test_no_false_alarm(trained):
    clf, _, _ = trained
    for checksum in ("keyed", "radar"):
        detector = WeightIntegrityDetector(clf, group_size=16, checksum=checksum)
        quantized = QuantizedWeights.from_estimator(clf)
        for deployed in (clf, quantized, quantized.apply(clf)):
            report = detector.detect(deployed)
            assert report["tampered"] is False and report["groups"] == []
    per_channel = WeightIntegrityDetector(clf, granularity="channel")
    codes = QuantizedWeights.from_estimator(clf, granularity="channel")
    assert not per_channel.detect(codes.apply(clf))["tampered"]
    flipped = codes.flip([BitFlip("2.weight", (5, 7), 7)]).apply(clf)
    assert per_channel.detect(flipped)["groups"] == [("2.weight", per_channel.group_of("2.weight", (5, 7)))]


def test_detects_bfa_flips_and_recovers(trained, attacked):
    clf, x, y = trained
    flips, flipped = attacked
    assert len(flips) == 10
    detector = WeightIntegrityDetector(clf)
    report = detector.detect(flipped)
    assert report["tampered"]
    flagged = set(report["groups"])
    detected = [(f.param_name, detector.group_of(f.param_name, f.index)) in flagged for f in flips]
    assert np.mean(detected) >= 0.95
    # every flagged group holds a flip (no false alarm on the untouched groups)
    assert flagged <= {(f.param_name, detector.group_of(f.param_name, f.index)) for f in flips}
    clean = _accuracy(QuantizedWeights.from_estimator(clf).apply(clf), x, y)
    restored = detector.recover(flipped, mode="restore")
    assert abs(_accuracy(restored, x, y) - clean) <= 0.05
    assert not detector.detect(restored)["tampered"]
    # RADAR's zeroing: the zeroed groups read as tampered afterwards, and with small groups it repairs the damage
    small = WeightIntegrityDetector(clf, group_size=16)
    zeroed = small.recover(flipped, mode="zero")
    assert _accuracy(zeroed, x, y) > _accuracy(flipped, x, y)
    for name, group in small.detect(flipped)["groups"]:
        mask = small._groups[name] == group  # noqa: SLF001 - the recovered group must be all zeros
        value = zeroed.base_model.get_parameter(name) + zeroed.current_deltas()[name]
        assert torch.all(value.detach().reshape(-1)[mask] == 0)


def test_correct_mode_undoes_bfa_flips_from_the_signatures_alone(trained, attacked):
    """BFA's sign-bit flips, several per group, are located by the keyed syndrome and undone exactly; a group with
    more flipped weights than the syndrome can explain is zeroed instead."""
    clf, _, _ = trained
    flips, flipped = attacked
    detector = WeightIntegrityDetector(clf)
    assert len(detector.detect(flipped)["groups"]) < len(flips)  # several flips share a group
    clean = QuantizedWeights.from_estimator(clf).dequantize()
    corrected = detector.recover(flipped)
    assert not detector.detect(corrected)["tampered"]
    for name, value in clean.items():
        effective = corrected.base_model.get_parameter(name) + corrected.current_deltas()[name]
        torch.testing.assert_close(effective.detach().double(), value, rtol=0, atol=1e-6)
    # eight sign flips in one group: beyond MAX_CORRECTED, so the group is zeroed
    name = "4.weight"
    members = [i for i in range(640) if detector.group_of(name, i) == 0][:8]
    many = QuantizedWeights.from_estimator(clf).flip([BitFlip(name, divmod(i, 64), 7) for i in members])
    zeroed = detector.recover(many.apply(clf))
    effective = (zeroed.base_model.get_parameter(name) + zeroed.current_deltas()[name]).detach().reshape(-1)
    in_group = torch.tensor([detector.group_of(name, i) == 0 for i in range(640)])
    assert torch.all(effective[in_group] == 0) and torch.any(effective[~in_group] != 0)


def test_recover_from_quantized_weights(trained, attacked):
    clf, x, _ = trained
    flips, flipped = attacked
    detector = WeightIntegrityDetector(clf)
    codes = QuantizedWeights.from_estimator(clf).flip(flips)
    from_codes = detector.recover(codes, mode="restore")
    from_estimator = detector.recover(flipped, mode="restore")
    np.testing.assert_allclose(from_codes.predict(x[:50]), from_estimator.predict(x[:50]), atol=1e-5)


def test_group_of_consistent_with_detect(trained):
    clf, _, _ = trained
    detector = WeightIntegrityDetector(clf, group_size=64)
    quantized = QuantizedWeights.from_estimator(clf)
    rng = np.random.default_rng(1)
    for name, codes in quantized.codes.items():
        shape = tuple(codes.shape)
        groups = [detector.group_of(name, i) for i in range(codes.numel())]
        counts = np.bincount(groups)
        assert len(counts) == -(-codes.numel() // 64) and counts.max() == 64  # groups of 64, the last may be smaller
        index = tuple(int(i) for i in np.unravel_index(rng.integers(codes.numel()), shape))
        flat = int(np.ravel_multi_index(index, shape))
        assert detector.group_of(name, index) == detector.group_of(name, flat)
        for bit in (7, 6):
            report = detector.detect(quantized.flip([BitFlip(name, index, bit)]))
            assert report["groups"] == [(name, detector.group_of(name, index))]
    assert not detector.detect(quantized.flip([BitFlip("0.weight", (0, 0), 0)]))["tampered"]  # low bits: not covered
    assert WeightIntegrityDetector(clf, msb=8).detect(quantized.flip([BitFlip("0.weight", (0, 0), 0)]))["tampered"]


def test_interleaving_depends_on_seed(trained):
    clf, _, _ = trained
    a, b, c = (WeightIntegrityDetector(clf, seed=s) for s in (0, 0, 1))
    entries = [(i, j) for i in range(8) for j in range(64)]
    ga, gb, gc = ([d.group_of("0.weight", e) for e in entries] for d in (a, b, c))
    assert ga == gb and ga != gc
    assert len(set(ga[:64])) > 1  # interleaved: neighbouring weights land in different groups


def test_user_weights_unchanged(trained, attacked):
    clf, _, _ = trained
    _, flipped = attacked
    before = copy.deepcopy(clf.model.state_dict())
    flipped_before = {k: v.clone() for k, v in flipped.current_deltas().items()}
    detector = WeightIntegrityDetector(clf)
    detector.detect(flipped)
    recovered = detector.recover(flipped)
    for key, value in clf.model.state_dict().items():
        assert torch.equal(value, before[key])
    for key, value in flipped.current_deltas().items():
        assert torch.equal(value, flipped_before[key])
    assert recovered.base_model is not clf.model and recovered.base_model is not flipped.base_model


def test_adaptive_cancelling_pair(trained):
    """Two sign-bit flips in one group, one 0→1 and one 1→0: RADAR's 2-bit sum cancels, the keyed sum does not."""
    clf, _, _ = trained
    quantized = QuantizedWeights.from_estimator(clf)
    codes = quantized.codes["2.weight"].reshape(-1)
    results = {}
    for checksum in ("radar", "keyed"):
        detector = WeightIntegrityDetector(clf, checksum=checksum, seed=3)
        missed = 0
        groups = np.array([detector.group_of("2.weight", i) for i in range(codes.numel())])
        for group in range(20):  # the attacker knows the grouping here (worst case for the interleaving)
            members = np.flatnonzero(groups == group)
            positive = next(i for i in members if codes[i] >= 0)
            negative = next(i for i in members if codes[i] < 0)
            pair = [BitFlip("2.weight", np.unravel_index(i, (64, 128)), 7) for i in (positive, negative)]
            missed += not detector.detect(quantized.flip(pair))["tampered"]
        results[checksum] = missed
    assert results["radar"] == 20  # every cancelling pair evades the plain sum
    assert results["keyed"] == 0


def test_out_of_range_weight_is_flagged(trained):
    clf, _, _ = trained
    detector = WeightIntegrityDetector(clf)
    w = clf.model.get_parameter("0.weight").detach()
    delta = torch.zeros_like(w)
    delta[3, 5] = 100 * w.abs().max()  # beyond the n_bits range: not a valid code
    report = detector.detect(clf.with_weight_perturbation({"0.weight": delta}))
    assert report["groups"] == [("0.weight", detector.group_of("0.weight", (3, 5)))]


def test_bad_inputs(trained):
    clf, _, _ = trained
    with pytest.raises(ValueError, match="group_size"):
        WeightIntegrityDetector(clf, group_size=0)
    with pytest.raises(ValueError, match="checksum"):
        WeightIntegrityDetector(clf, checksum="crc")
    with pytest.raises(ValueError, match="msb"):
        WeightIntegrityDetector(clf, msb=9)
    with pytest.raises(ValueError, match="layers"):
        WeightIntegrityDetector(clf, layers=["7"])
    detector = WeightIntegrityDetector(clf, layers=["0"])
    assert detector.quantized_.param_names == ["0.weight"]
    with pytest.raises(TypeError, match="estimator"):
        detector.detect(np.zeros(3))
    other = zoo.make_classifier(zoo.digits_mlp(hidden=(32,)), (64,))
    with pytest.raises(ValueError, match="0.weight"):
        detector.detect(other)
    with pytest.raises(ValueError, match="mode"):
        detector.recover(clf, mode="erase")
    with pytest.raises(ValueError, match="not protected"):
        detector.group_of("2.weight", 0)
    with pytest.raises(ValueError, match="outside"):
        detector.group_of("0.weight", (128, 0))
    with pytest.raises(AttributeError, match="group_size"):
        detector.group_size = 8
