"""Tests of the joint weight + input attack, and of the two-stage composition with ART's input-space PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.attacks.evasion import ProjectedGradientDescent

from art_weightpert import JointWeightInputPGD, PerturbationBudget, PyTorchWeightClassifier, WeightPGD
from art_weightpert.attacks import base as attacks_base

WEIGHT_BUDGET = PerturbationBudget(0.005, "inf")  # weight-only PGD leaves ~85% accuracy on the reference MLP


def accuracy(classifier, x, y):
    return float(np.mean(classifier.predict(x).argmax(axis=1) == y))


def input_pgd(classifier, x, y, eps, norm=np.inf):
    attack = ProjectedGradientDescent(classifier, norm=norm, eps=eps, eps_step=eps / 4, max_iter=20, verbose=False)
    return attack.generate(x, y)


@pytest.mark.parametrize(("input_norm", "input_eps"), [(np.inf, 0.05), (2, 0.4)])
def test_joint_attack_beats_weight_only_and_input_only(clf, test_data, input_norm, input_eps):
    x, y = test_data
    weight_only = accuracy(
        clf.with_weight_perturbation(WeightPGD(clf, WEIGHT_BUDGET, verbose=False).generate(x, y)), x, y
    )
    input_only = accuracy(clf, input_pgd(clf, x, y, input_eps, input_norm), y)
    x_adv, delta = JointWeightInputPGD(clf, WEIGHT_BUDGET, input_eps, input_norm=input_norm, verbose=False).generate(
        x, y
    )
    joint = accuracy(clf.with_weight_perturbation(delta), x_adv, y)
    assert joint < weight_only - 0.05 and joint < input_only - 0.05, (joint, weight_only, input_only)


@pytest.mark.parametrize("input_norm", [np.inf, 2, "inf"])
def test_joint_outputs_respect_both_balls_and_the_clip_values(clf, test_data, input_norm):
    x, y = test_data
    x, y = x[:150], y[:150]
    eps = 0.1 if input_norm != 2 else 0.5
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    x_adv, delta = JointWeightInputPGD(
        clf, WEIGHT_BUDGET, eps, input_norm=input_norm, max_iter=5, verbose=False
    ).generate(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    diff = (x_adv - x).reshape(len(x), -1)
    size = np.abs(diff).max(axis=1) if input_norm != 2 else np.linalg.norm(diff, axis=1)
    assert np.all(size <= eps + 1e-5)
    assert size.max() > 0.5 * eps
    assert WEIGHT_BUDGET.contains(delta, clf.base_model) and delta.budget == WEIGHT_BUDGET
    for name, value in clf.model.state_dict().items():
        assert torch.equal(value, before[name])


def test_joint_with_a_zero_input_ball_is_a_weight_attack(clf, test_data):
    x, y = test_data
    x_adv, delta = JointWeightInputPGD(clf, PerturbationBudget(0.01, "inf"), 0.0, verbose=False).generate(x, y)
    np.testing.assert_array_equal(x_adv, x)
    assert accuracy(clf.with_weight_perturbation(delta), x, y) <= accuracy(clf, x, y) - 0.3


def test_composition_weight_pgd_then_art_pgd(clf, test_data):
    """The two-stage path: a perturbed estimator from WeightPGD is an ordinary ART classifier for ART's attacks."""
    x, y = test_data
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    perturbed = WeightPGD(clf, WEIGHT_BUDGET, verbose=False).generate_estimator(x, y)
    assert isinstance(perturbed, PyTorchWeightClassifier)
    weight_only = accuracy(perturbed, x, y)
    input_only = accuracy(clf, input_pgd(clf, x, y, 0.05), y)
    x_adv = input_pgd(perturbed, x, y, 0.05)
    assert np.abs(x_adv - x).max() <= 0.05 + 1e-6
    both = accuracy(perturbed, x_adv, y)
    assert both < weight_only and both < input_only, (both, weight_only, input_only)
    for name, value in clf.model.state_dict().items():
        assert torch.equal(value, before[name])


def test_joint_keeps_weights_when_interrupted(clf, test_data, monkeypatch):
    x, y = test_data
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    calls = {"n": 0}
    real = attacks_base.objective

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attacks_base, "objective", failing)
    with pytest.raises(KeyboardInterrupt):
        JointWeightInputPGD(clf, WEIGHT_BUDGET, 0.1, batch_size=64, verbose=False).generate(x[:256], y[:256])
    for name, value in clf.model.state_dict().items():
        assert torch.equal(value, before[name])
    assert not clf.model.training


@pytest.mark.parametrize("input_norm", [np.inf, 2])
def test_step_units_weights_relative_inputs_absolute(clf, test_data, input_norm):
    """``weight_eps_step`` is a fraction of each weight radius, ``input_eps_step`` an absolute input step, and without
    it the input step is ``input_eps`` times the weight fraction: after one step the sizes show the units (up to the
    clipping of the inputs to [0, 1], which shortens some ℓ2 steps)."""
    x, y = test_data
    x, y = x[:100], y[:100]
    budget = PerturbationBudget(0.01, "inf")
    input_eps = 0.2 if input_norm == np.inf else 1.0

    def one_step(**steps):
        attack = JointWeightInputPGD(clf, budget, input_eps, input_norm=input_norm, max_iter=1, verbose=False, **steps)
        x_adv, delta = attack.generate(x, y)
        diff = (x_adv - x).reshape(len(x), -1)
        size = np.abs(diff).max(axis=1) if input_norm == np.inf else np.linalg.norm(diff, axis=1)
        return size.max(), max(np.abs(v).max() for v in delta.values())

    input_size, weight_size = one_step(weight_eps_step=0.25, input_eps_step=0.03)
    assert input_size == pytest.approx(0.03, rel=0.05) and weight_size == pytest.approx(0.0025, rel=1e-4)
    input_size, weight_size = one_step(weight_eps_step=0.5)
    assert input_size == pytest.approx(0.5 * input_eps, rel=0.05) and weight_size == pytest.approx(0.005, rel=1e-4)


def test_joint_more_iterations_never_weaker(clf, test_data):
    x, y = test_data
    x, y = x[:300], y[:300]

    def joint_accuracy(max_iter):
        attack = JointWeightInputPGD(clf, WEIGHT_BUDGET, 0.03, max_iter=max_iter, verbose=False)
        x_adv, delta = attack.generate(x, y)
        return accuracy(clf.with_weight_perturbation(delta), x_adv, y)

    short, long = joint_accuracy(3), joint_accuracy(10)
    assert long <= short < accuracy(clf, x, y)
    assert joint_accuracy(0) == accuracy(clf, x, y)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_eps": -0.1}, ValueError, "input_eps"),
        ({"input_eps": float("nan")}, ValueError, "input_eps"),
        ({"input_eps": "0.1"}, TypeError, "input_eps"),
        ({"input_eps": 0.1, "input_norm": 1}, ValueError, "input_norm"),
        ({"input_eps": 0.1, "input_eps_step": 0}, ValueError, "input_eps_step"),
        ({"input_eps": 0.1, "weight_eps_step": -1.0}, ValueError, "weight_eps_step"),
        ({"input_eps": 0.1, "max_iter": -2}, ValueError, "max_iter"),
    ],
)
def test_joint_rejects_bad_parameters(clf, kwargs, error, match):
    with pytest.raises(error, match=match):
        JointWeightInputPGD(clf, WEIGHT_BUDGET, **kwargs)


def test_joint_rejects_bad_data(clf, test_data):
    x, y = test_data
    attack = JointWeightInputPGD(clf, WEIGHT_BUDGET, 0.1, max_iter=1, verbose=False)
    x_nan = x[:10].copy()
    x_nan[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        attack.generate(x_nan, y[:10])
    with pytest.raises(ValueError, match="labels"):
        attack.generate(x[:10], y[:9])
