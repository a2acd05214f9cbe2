"""ActivationClipping (Ranger): bounds from data, unchanged predictions on the calibration data, less damage from faults
that blow up weights, accepted by the attacks and the certificates (the clipped ReLU's interval and linear rules are
sound), bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import zoo
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_faults import RandomWeightPerturbation
from art_weightpert.attacks.weight_pgd import WeightPGD
from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness
from art_weightpert.certification.certifier import WeightPerturbationCertifier
from art_weightpert.defences.transformer import ActivationClipping, ChannelClippedReLU, clip_activations
from art_weightpert.network import read_network
from art_weightpert.operators import UnsupportedModelError
from art_weightpert.operators.hardtanh import clamped


def _accuracy(clf, x, y) -> float:
    return float((np.nan_to_num(clf.predict(x), nan=-np.inf).argmax(1) == y).mean())


@pytest.fixture(scope="module")
def mlp(digits):
    x_train, y_train, x_test, y_test = digits
    clf = zoo.make_classifier(zoo.digits_mlp(), (64,))
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=15)
    return clf, x_train, x_test, y_test


@pytest.fixture(scope="module")
def cnn(digits_images):
    x_train, y_train, x_test, y_test = digits_images
    clf = zoo.make_classifier(zoo.digits_cnn(), (1, 8, 8))
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=8)
    return clf, x_train, x_test, y_test


def _relu_outputs(model: nn.Sequential, x: np.ndarray, index: int) -> torch.Tensor:
    with torch.no_grad():
        return model[: index + 1](torch.as_tensor(x, dtype=torch.float32))


def test_bounds_from_data(mlp, cnn):
    clf, x_train, _, _ = mlp
    transformer = ActivationClipping(clf)
    clipped = transformer(x_train)
    for name in ("1", "3"):
        out = _relu_outputs(clf.model, x_train, int(name))
        assert transformer.bounds_[name] == pytest.approx(float(out.max()), rel=1e-6)
        module = clipped.model.get_submodule(name)
        assert isinstance(module, nn.Hardtanh) and module.min_val == 0.0
        assert module.max_val == transformer.bounds_[name]
    median = ActivationClipping(clf, quantile=0.5)
    median.fit(x_train)
    assert median.bounds_["1"] == pytest.approx(float(torch.quantile(_relu_outputs(clf.model, x_train, 1), 0.5)))
    clf_cnn, x_cnn, _, _ = cnn
    channel = ActivationClipping(clf_cnn, per_channel=True)
    channel.fit(x_cnn)
    out = _relu_outputs(clf_cnn.model, x_cnn, 1)  # (N, 8, 8, 8)
    assert channel.bounds_["1"].shape == (8, 1, 1)
    np.testing.assert_allclose(channel.bounds_["1"].flatten(), out.amax(dim=(0, 2, 3)).double(), rtol=1e-6)
    assert channel.bounds_["6"].shape == (64,)


@pytest.mark.parametrize("fixture,per_channel", [("mlp", False), ("cnn", False), ("cnn", True)])
def test_same_predictions_on_calibration_data(request, fixture, per_channel):
    clf, x_train, _, _ = request.getfixturevalue(fixture)
    before = copy.deepcopy(clf.model.state_dict())
    types = [type(m) for m in clf.model.modules()]
    clipped = clip_activations(clf, x_train, per_channel=per_channel)
    np.testing.assert_array_equal(clipped.predict(x_train), clf.predict(x_train))
    # the user's model is untouched: same modules, same weights
    assert [type(m) for m in clf.model.modules()] == types
    for key, value in clf.model.state_dict().items():
        assert torch.equal(value, before[key])
    expected = ChannelClippedReLU if per_channel else nn.Hardtanh
    assert sum(isinstance(m, expected) for m in clipped.model.modules()) == (3 if fixture == "cnn" else 2)
    assert not any(isinstance(m, nn.ReLU) for m in clipped.model.modules())
    assert clipped.perturbable_parameters == clf.perturbable_parameters
    torch.fx.symbolic_trace(clipped.model)  # standard modules: fx traces the clipped model


def _blown_up(clf, seed: int, nb: int = 3):
    """Faults that blow up weights (as an exponent bit flip of a float32 weight does): ``nb`` random entries of the
    hidden layers' weights multiplied by 2^16."""
    rng = np.random.default_rng(seed)
    names = ["0.weight", "2.weight"] + (["5.weight"] if "5.weight" in clf.perturbable_parameters else [])
    delta = {}
    for _ in range(nb):
        name = names[rng.integers(len(names))]
        w = clf.base_model.get_parameter(name).detach()
        d = delta.setdefault(name, torch.zeros_like(w)).reshape(-1)
        i = int(rng.integers(w.numel()))
        d[i] += w.reshape(-1)[i] * (2.0**16 - 1)
    return delta


def test_lower_fault_damage(mlp, cnn):
    for clf, x_train, x_test, y_test in (mlp, cnn):
        clipped = clip_activations(clf, x_train)
        plain, clip = [], []
        for seed in range(8):
            delta = _blown_up(clf, seed)
            plain.append(_accuracy(clf.with_weight_perturbation(delta), x_test, y_test))
            clip.append(_accuracy(clipped.with_weight_perturbation(delta), x_test, y_test))
        assert np.mean(clip) > np.mean(plain) + 0.05
    # 8-bit random bit flips stay within the quantization range: clipping costs nothing there (and gains little)
    clf, x_train, x_test, y_test = mlp
    clipped = clip_activations(clf, x_train)
    plain = RandomBitFlips(clf, ber=1e-2, nb_samples=5, seed=0, verbose=False).evaluate(x_test, y_test)
    clip = RandomBitFlips(clipped, ber=1e-2, nb_samples=5, seed=0, verbose=False).evaluate(x_test, y_test)
    assert clip["mean"] >= plain["mean"] - 0.01


def test_accepted_by_the_attacks(mlp):
    clf, x_train, x_test, y_test = mlp
    clipped = clip_activations(clf, x_train)
    x, y = x_test[:64], y_test[:64]
    budget = PerturbationBudget(0.05, norm="inf", relative=True)
    delta = WeightPGD(clipped, budget, max_iter=3, verbose=False).generate(x, y)
    assert set(delta) <= set(clipped.perturbable_parameters)
    flips = BitFlipAttack(clipped, max_flips=2, verbose=False).generate(x, y)
    assert len(flips) == 2
    assert 0 <= RandomBitFlips(clipped, nb_flips=10, nb_samples=2, seed=0, verbose=False).evaluate(x, y)["mean"] <= 1
    assert 0 <= RandomWeightPerturbation(clipped, budget, nb_samples=2, seed=0, verbose=False).evaluate(x, y)["mean"]


def test_certificates_read_the_clipped_relu_soundly(mlp):
    clf, x_train, x_test, y_test = mlp
    clipped = clip_activations(clf, x_train, quantile=0.9)  # tight bounds: the clipping is active
    network = read_network(clipped.model, (64,))
    kinds = [(layer.kind, layer.min_val) for layer in network.layers if hasattr(layer, "kind")]
    assert kinds == [("hardtanh", 0.0), ("hardtanh", 0.0)]
    x, y = x_test[:40], y_test[:40]
    budget = PerturbationBudget(0.02, norm="inf", relative=True)
    for method in ("interval", "linear"):
        certifier = WeightPerturbationCertifier(clipped, budget, method=method, verbose=False)
        bounds = certifier.margin_lower_bounds(x, y)
        # sampled perturbations (vertices of the box) never push a margin below its bound
        for seed in range(10):
            gen = torch.Generator().manual_seed(seed)
            delta = {}
            for name, shape in clipped.perturbable_parameters.items():
                if name.endswith("weight"):
                    w = clipped.base_model.get_parameter(name).detach()
                    sign = torch.randint(0, 2, shape, generator=gen).float() * 2 - 1
                    delta[name] = 0.02 * w.abs() * sign
            logits = clipped.with_weight_perturbation(delta).predict(x).astype(np.float64)
            margins = logits[np.arange(len(y)), y][:, None] - logits
            mask = np.isfinite(bounds)
            assert np.all(margins[mask] >= bounds[mask] - 1e-5)
        assert certifier.certify(x, y).mean() > 0
    # the k-flip certificate reads it too, and certifies no sample that one flipped bit breaks (exact enumeration)
    certified = BitFlipCertifier(clipped, max_flips=1, method="linear", verbose=False).certify(x[:16], y[:16])
    assert certified.mean() > 0 and not np.any(certified & ~single_flip_robustness(clipped, x[:16], y[:16]))
    channel = clip_activations(clf, x_train, per_channel=True)
    with pytest.raises(UnsupportedModelError):
        WeightPerturbationCertifier(channel, budget, method="interval", verbose=False).certify(x[:2], y[:2])


def test_clamped_relaxation_is_sound():
    gen = torch.Generator().manual_seed(0)
    for a, b in ((0.0, 1.0), (-1.0, 1.0), (0.0, 0.2), (-0.5, 3.0)):
        lo = torch.randn(5000, generator=gen, dtype=torch.float64) * 2
        hi = lo + torch.rand(5000, generator=gen, dtype=torch.float64) * 3
        hi[:50] = lo[:50]  # point boxes
        (l_slope, l_icpt), (u_slope, u_icpt) = clamped(lo, hi, a, b)
        z = lo + torch.rand(64, 1, generator=gen, dtype=torch.float64) * (hi - lo)
        f = z.clamp(a, b)
        assert torch.all(l_slope * z + l_icpt <= f + 1e-12)
        assert torch.all(u_slope * z + u_icpt >= f - 1e-12)
        stable = (hi <= a) | (lo >= b) | ((lo >= a) & (hi <= b))
        gap = (u_slope - l_slope) * z + (u_icpt - l_icpt)
        assert torch.all(gap[:, stable].abs() <= 1e-12)  # exact on the stable pieces


def test_reader_rules():
    assert read_network(nn.Sequential(nn.Linear(4, 3), nn.ReLU6(), nn.Linear(3, 2)), (4,)).layers[1].max_val == 6.0
    with pytest.raises(UnsupportedModelError, match="Hardtanh"):
        read_network(nn.Sequential(nn.Linear(4, 3), nn.Hardtanh(0.5, 1.0), nn.Linear(3, 2)), (4,))


def test_bad_inputs(mlp):
    clf, x_train, _, _ = mlp
    with pytest.raises(ValueError, match="empty"):
        clip_activations(clf, x_train[:0])
    for quantile in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="quantile"):
            ActivationClipping(clf, quantile=quantile)
    no_relu = zoo.make_classifier(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)), (64,))
    with pytest.raises(ValueError, match="no nn.ReLU"):
        clip_activations(no_relu, x_train)
    transformer = ActivationClipping(clf)
    with pytest.raises(ValueError, match="not fitted"):
        transformer()
    with pytest.raises(ValueError, match="quantile"):
        transformer.set_params(quantile=2.0)
    assert transformer.quantile == 1.0  # validated before being applied
    with pytest.raises(ValueError, match="shape"):
        clip_activations(clf, x_train.reshape(-1, 1, 8, 8))
