"""The numbers a report derives from the library's results (metrics.summaries), the ε scaled to the input width and
the one table of norms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.budget import NORM_LABELS, NORMS, eps_for_inputs
from art_weightpert.metrics import summaries
from art_weightpert.metrics.bit_flips import estimator_accuracy
from art_weightpert.metrics.plots import BALL_LABELS
from tests.conftest import make_mlp


def test_default_eps_grid_is_fractions_of_the_typical_weight_size():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -2.0]]))
    sizes = {"inf": 2.0, "row_l1": 6.0, "l2": math.sqrt(34.0)}  # mean |W|, mean row ℓ1 norm, Frobenius norm
    for norm, size in sizes.items():
        budget = PerturbationBudget(0.3, norm)
        assert summaries.typical_weight_size(model, budget) == pytest.approx(size)
        expected = [float(f"{f * size:.3g}") for f in summaries.EPS_FRACTIONS]
        assert summaries.default_eps_grid(model, budget) == expected
    relative = PerturbationBudget(0.3, "inf", relative=True)
    assert summaries.default_eps_grid(model, relative) == list(summaries.EPS_FRACTIONS)
    assert summaries.multiples_grid(0.1, (0.0, 0.5, 1.5, 2.0)) == [0.0, 0.05, 0.15, 0.2]


def test_radius_summary():
    summary = summaries.radius_summary(np.array([0.0, 0.2, 0.4, np.inf]))
    assert summary["mean"] == pytest.approx(0.2) and summary["max"] == 0.4
    assert summary["median"] == pytest.approx(0.3) and summary["median_certified"] == 0.4
    assert summary["fraction_positive"] == 0.75 and summary["infinite"] == 1
    assert summary["values"] == [0.0, 0.2, 0.4, None]
    empty = summaries.radius_summary([])
    assert math.isnan(empty["mean"]) and empty["median_certified"] == 0.0 and empty["values"] == []


def test_bit_flip_numbers():
    assert summaries.flips_to_halve([0.9, 0.6, 0.4], 0.9) == 3
    assert summaries.flips_to_halve([0.9, 0.8], 0.9) is None
    assert summaries.flip_counts(20) == [1, 2, 5, 10, 20]
    assert summaries.flip_counts(3) == [1, 2, 3]
    assert summaries.flip_counts(1) == [1]


def test_accuracies_counts_and_the_generalization_gap(digits):
    x_train, y_train, x_test, y_test = (a[:120] for a in digits)
    model = make_mlp(seed=4).eval()
    model[0].train()
    expected = float(np.mean(model(torch.as_tensor(x_test)).argmax(1).numpy() == y_test))
    assert summaries.module_accuracy(model, x_test, y_test, batch_size=50) == expected
    assert model[0].training and not model[1].training  # each module's flag as it was
    assert summaries.parameter_count(model) == 64 * 16 + 16 + 16 * 10 + 10
    assert summaries.classes_seen(np.array([0, 3]), None, np.array([5])) == 6
    assert summaries.classes_seen() == 0
    clf = PyTorchWeightClassifier(make_mlp(seed=4), nn.CrossEntropyLoss(), (64,), 10)
    assert estimator_accuracy(clf, x_test, y_test) == expected  # train's test accuracy
    gap = summaries.generalization_gap(clf, (x_train, y_train), (x_test, y_test), batch_size=32)
    assert gap["test_error"] == pytest.approx(1.0 - expected)
    assert gap["error_gap"] == gap["test_error"] - gap["train_error"]
    assert gap["loss_gap"] == gap["test_loss"] - gap["train_loss"]


def test_eps_for_inputs_and_the_norm_table():
    assert eps_for_inputs(0.1, (64,), 64) == 0.1
    assert eps_for_inputs(0.1, (16,), 64) == 0.1  # at most the reference ε
    assert eps_for_inputs(0.1, (3, 32, 32), 64) == 0.0144
    assert tuple(NORM_LABELS) == NORMS == ("inf", "row_l1", "l2")
    assert all(BALL_LABELS[norm] == NORM_LABELS[norm] for norm in NORMS) and "mixed" in BALL_LABELS
