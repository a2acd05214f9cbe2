"""Frictions a new user met in the library: empty inputs, a wrong ``input_shape``, float64 inputs from ART's own tools,
and the generalization bound's message on a residual network."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from conftest import assert_identical, make_cnn, make_mlp, snapshot
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.attacks import (
    BitFlipAttack,
    PerSampleWeightPGD,
    RandomBitFlips,
    RandomWeightPerturbation,
    WeightPGD,
)
from art_weightpert.certification import BitFlipCertifier, WeightPerturbationCertifier
from art_weightpert.metrics import (
    certified_weight_radius,
    generalization_bound,
    pac_bayes_bound,
    weight_certified_accuracy,
    weight_robustness_curve,
    weight_sharpness,
)
from art_weightpert.network import UnsupportedModelError
from art_weightpert.resnets import digits_resnet

EMPTY = r"`x` is empty .*at least one sample"


# ------------------------------------------------------------------------------------------------ empty inputs
def test_every_family_refuses_an_empty_x(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    clf = tiny_mlp_classifier
    budget = PerturbationBudget(0.01, "inf")
    x, y = x_test[:0], y_test[:0]
    calls = {
        "WeightPGD": lambda: WeightPGD(clf, budget, max_iter=2, verbose=False).generate(x, y),
        "PerSampleWeightPGD": lambda: PerSampleWeightPGD(clf, budget, max_iter=2, verbose=False).generate(x, y),
        # the random draws' generate reads no data (x=None is allowed); their evaluate does
        "RandomWeightPerturbation.evaluate": lambda: RandomWeightPerturbation(
            clf, budget, nb_samples=2, verbose=False
        ).evaluate(x, y),
        "BitFlipAttack": lambda: BitFlipAttack(clf, max_flips=1, verbose=False).generate(x, y),
        "RandomBitFlips.evaluate": lambda: RandomBitFlips(clf, nb_flips=1, nb_samples=2, verbose=False).evaluate(x, y),
        "WeightPerturbationCertifier": lambda: WeightPerturbationCertifier(clf, budget, verbose=False).certify(x, y),
        "WeightPerturbationCertifier.radius": lambda: WeightPerturbationCertifier(
            clf, budget, verbose=False
        ).certified_radius(x, y),
        "BitFlipCertifier": lambda: BitFlipCertifier(clf, max_flips=1, verbose=False).certify(x, y),
        "weight_certified_accuracy": lambda: weight_certified_accuracy(clf, x, y, budget),
        "certified_weight_radius": lambda: certified_weight_radius(clf, x, y, budget),
        "weight_robustness_curve": lambda: weight_robustness_curve(clf, x, y, [budget], methods=["clean", "interval"]),
    }
    silent = []
    for name, call in calls.items():
        try:
            call()
        except ValueError as err:
            assert re.search(EMPTY, str(err)), (name, str(err))
        else:
            silent.append(name)
    assert silent == []
    # one sample is enough: the check refuses emptiness, not small sets
    assert WeightPerturbationCertifier(clf, budget, verbose=False).certify(x_test[:1], y_test[:1]).shape == (1,)


def test_empty_x_names_x_and_its_shape(tiny_mlp_classifier):
    with pytest.raises(ValueError, match=r"`x` is empty \(shape \(0, 64\)\)"):
        tiny_mlp_classifier.check_inputs(np.zeros((0, 64), dtype=np.float32))


# ------------------------------------------------------------------------------------------------ input_shape
def test_a_wrong_input_shape_of_a_conv_model_fails_at_construction():
    model = make_cnn(seed=0).train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`input_shape=\(64,\)` does not fit the model Sequential.*conv2d"):
        PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10)
    with pytest.raises(ValueError, match=r"`input_shape=\(3, 8, 8\)`.*channels"):
        PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (3, 8, 8), 10)
    assert all(m.training for m in model.modules())  # train flags restored
    assert_identical(model, before)
    start = time.perf_counter()
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1, 8, 8), 10)
    assert time.perf_counter() - start < 2.0 and clf.input_shape == (1, 8, 8)


def test_a_wrong_input_shape_of_an_mlp_fails_at_construction():
    with pytest.raises(ValueError, match=r"`input_shape=\(32,\)`.*mat1 and mat2 shapes"):
        PyTorchWeightClassifier(make_mlp(seed=0), nn.CrossEntropyLoss(), (32,), 10)


class NeedsTwoInputs(nn.Module):
    """A model whose forward needs a second argument: the probe cannot run it and must not refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * scale


def test_models_the_probe_cannot_run_are_still_accepted():
    assert PyTorchWeightClassifier(NeedsTwoInputs(), nn.CrossEntropyLoss(), (64,), 10).nb_classes == 10


# ------------------------------------------------------------------------------------------------ float64 inputs
@pytest.fixture(scope="module")
def image_classifier(digits_images):
    x_train, y_train, x_test, y_test = digits_images
    torch.manual_seed(0)
    model = make_cnn(seed=0)
    clf = PyTorchWeightClassifier(
        model,
        nn.CrossEntropyLoss(),
        (1, 8, 8),
        10,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.02),
        clip_values=(0.0, 1.0),
    )
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=4, verbose=False)
    return clf, x_test[:40], y_test[:40]


def test_float64_inputs_reach_the_model_as_its_dtype(image_classifier):
    clf, x, y = image_classifier
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(clf.predict(x64), clf.predict(x), rtol=1e-5, atol=1e-6)
    assert clf.loss_gradient(x64[:4], y[:4]).shape == (4, 1, 8, 8)
    assert clf.class_gradient(x64[:2], label=0).shape == (2, 1, 1, 8, 8)


@pytest.mark.parametrize("tool", ["HopSkipJump", "BoundaryAttack"])
def test_art_decision_attacks_run_on_the_estimator(image_classifier, tool):
    from art.attacks.evasion import BoundaryAttack, HopSkipJump

    clf, x, _ = image_classifier
    x64 = x[:2].astype(np.float64)  # what these attacks feed the estimator internally
    if tool == "HopSkipJump":
        attack = HopSkipJump(clf, max_iter=2, max_eval=40, init_eval=10, verbose=False)
    else:
        attack = BoundaryAttack(
            clf, targeted=False, max_iter=3, num_trial=5, sample_size=5, init_size=20, verbose=False
        )
    start = time.perf_counter()
    adv = attack.generate(x64)
    assert time.perf_counter() - start < 10.0
    assert adv.shape == x64.shape and np.all(np.isfinite(adv))


def test_art_feature_squeezing_runs_on_the_estimator(image_classifier):
    from art.defences.preprocessor import FeatureSqueezing

    clf, x, y = image_classifier
    squeezed = PyTorchWeightClassifier(
        clf.model,
        nn.CrossEntropyLoss(),
        (1, 8, 8),
        10,
        clip_values=(0.0, 1.0),
        preprocessing_defences=[FeatureSqueezing(clip_values=(0.0, 1.0), bit_depth=3)],
    )
    accuracy = float(np.mean(squeezed.predict(x).argmax(1) == y))
    assert accuracy > 0.5
    assert squeezed.loss_gradient(x[:3], y[:3]).dtype == np.float32


# ------------------------------------------------------------------------------------------------ residual networks
def test_generalization_bound_on_a_residual_network_says_what_works(digits_images):
    _, _, x_test, y_test = digits_images
    clf = PyTorchWeightClassifier(digits_resnet(widths=(4, 8)), nn.CrossEntropyLoss(), (1, 8, 8), 10)
    x, y = x_test[:8], y_test[:8]
    budget = PerturbationBudget(0.001, "row_l1")
    for method in ("paper", "interval", "linear"):
        with pytest.raises(UnsupportedModelError, match="with every method") as info:
            generalization_bound(clf, x, y, budget, method=method)
        assert "use method" not in str(info.value)  # no suggestion that refuses too
    # what the message says works does work on this model
    for method in ("interval", "linear"):
        assert 0.0 <= weight_certified_accuracy(clf, x, y, budget, method=method) <= 1.0
    assert np.isfinite(weight_sharpness(clf, x, y, 0.05)["loss_increase"])
    assert np.isfinite(pac_bayes_bound(clf, x, y, 0.01)["bound"])
