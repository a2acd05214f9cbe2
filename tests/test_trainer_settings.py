"""The trainers' settings cannot go stale either (issue 22): every public setting of `WeightRobustTrainer` and
`BitFlipRobustTrainer`, changed after a first `fit` (by `set_params` or by assigning the attribute), trains exactly as
a fresh trainer built with the new values on the same weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod
from torch import nn

from art_weightpert import BitFlipRobustTrainer, PerturbationBudget, PyTorchWeightClassifier, WeightRobustTrainer


def _classifier(model: nn.Module) -> PyTorchWeightClassifier:
    """SGD without momentum: no optimizer state, so a fresh optimizer continues exactly as the used one."""
    return PyTorchWeightClassifier(
        model, nn.CrossEntropyLoss(), (64,), 10, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        clip_values=(0.0, 1.0),
    )  # fmt: skip


def _fit(trainer, x, y) -> dict:
    torch.manual_seed(0)
    return trainer.fit(x, y, batch_size=32, nb_epochs=2)


def _same(history_a: dict, history_b: dict, model_a: nn.Module, model_b: nn.Module) -> None:
    for key in ("loss", "ce", "accuracy"):
        np.testing.assert_array_equal(history_a[key], history_b[key], err_msg=key)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _changed_settings(kind: str, classifier: PyTorchWeightClassifier) -> dict:
    if kind == "weight":
        attack = FastGradientMethod(classifier, eps=0.02)
        return {
            "budget": PerturbationBudget(0.05, "row_l1", layers=["2"]), "lam": 0.5, "mu": 0.01, "kappa": 0.1,
            "method": "linear", "warmup": 1, "ramp_eps": False, "collapse_patience": 5, "stop_on_collapse": False,
            "batch_norm": "train", "attack": attack, "ratio": 0.25, "verbose": False,
        }  # fmt: skip
    return {"n_bits": 4, "method": "clustering", "lam": 0.3, "adv_flips": 2, "granularity": "channel",
            "layers": ["0"], "verbose": False}  # fmt: skip


def _trainer(kind: str, classifier: PyTorchWeightClassifier, **settings):
    if kind == "weight":
        settings.setdefault("budget", PerturbationBudget(0.02, "inf"))
        return WeightRobustTrainer(classifier, **{"verbose": False, **settings})
    return BitFlipRobustTrainer(classifier, **{"verbose": False, **settings})


@pytest.mark.parametrize("kind", ["weight", "bit_flip"])
@pytest.mark.parametrize("how", ["set_params", "assignment"])
def test_every_setting_changed_after_fit_equals_a_fresh_trainer(kind, how, digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:96], y_train[:96]
    torch.manual_seed(0)
    used = _classifier(nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)))
    trainer = _trainer(kind, used)
    _fit(trainer, x, y)  # a first call with the old settings
    fresh_model = copy.deepcopy(used.model)
    fresh_classifier = _classifier(fresh_model)
    changed = _changed_settings(kind, used)
    if how == "set_params":
        trainer.set_params(**changed)
    else:
        for name, value in changed.items():
            setattr(trainer, name, value)
    if kind == "weight":  # the fresh trainer's attack runs on its own classifier
        changed = {**changed, "attack": FastGradientMethod(fresh_classifier, eps=0.02)}
    fresh = _trainer(kind, fresh_classifier, **changed)
    _same(_fit(trainer, x, y), _fit(fresh, x, y), used.model, fresh_model)
