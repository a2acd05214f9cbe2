"""
Robust training cannot collapse unnoticed (issue 16): on learnable 3x32x32 images a small CNN trained at the README's
row-ℓ1 ε = 0.05 ends well above chance thanks to the ε warm-up, and a run at an ε no model can certify is reported
(``history["collapsed"]``, ``history["warnings"]``, a ``UserWarning``) and stopped, not finished silently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, WeightRobustTrainer
from art_weightpert.defences.trainer.schedule import CollapseDetector, ramp_factor, scale_param_balls
from art_weightpert.zoo import make_classifier

pytestmark = pytest.mark.filterwarnings("ignore:robust training:UserWarning")


def learnable_images(n: int, seed: int, nb_classes: int = 10, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(3, 32, 32)`` in [0, 1]: a fixed coarse random pattern per class (4x4 blocks of 8x8 pixels,
    shared by every split) plus Gaussian pixel noise."""
    coarse = np.random.default_rng(1234).uniform(-1, 1, size=(nb_classes, 3, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, 8, 8)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, nb_classes, n)
    x = 0.5 + 0.15 * patterns[y] + rng.normal(0.0, noise, size=(n, 3, 32, 32))
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Two stride-2 convolutions and a linear layer on 3x32x32 inputs (784-input last layer)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def images():
    x, y = learnable_images(300, seed=0)
    x_test, y_test = learnable_images(200, seed=1)
    return x, y, x_test, y_test


def train(images, eps: float, nb_epochs: int = 6, **kwargs):
    x, y, x_test, y_test = images
    classifier = make_classifier(small_cnn(), (3, 32, 32), 10, lr=3e-3)
    trainer = WeightRobustTrainer(classifier, PerturbationBudget(eps, norm="row_l1"), verbose=False, **kwargs)
    torch.manual_seed(0)
    history = trainer.fit(x, y, batch_size=64, nb_epochs=nb_epochs)
    accuracy = float(np.mean(classifier.predict(x_test).argmax(1) == y_test))
    return history, accuracy


def test_readme_eps_on_a_3x32x32_cnn_ends_well_above_chance(images):
    """The README's `train` ε with the trainer's defaults (λ = 1, warm-up of λ and ε over 10 epochs)."""
    history, accuracy = train(images, 0.05, nb_epochs=12)
    assert accuracy >= 0.6  # chance: 0.1
    assert not history["collapsed"] and history["warnings"] == []
    assert history["eps_scale"][-1] == 1.0  # trained at the full ε in the end


def test_full_eps_from_the_first_step_fails_and_is_reported(images):
    """The issue's failure (λ ramped at the full ε) is reproduced, and now it is reported instead of silent."""
    with pytest.warns(UserWarning, match="robust training is stuck at chance|robust training collapsed"):
        history, accuracy = train(images, 0.05, nb_epochs=8, warmup=5, ramp_eps=False)
    assert accuracy <= 0.25
    assert history["collapsed"] and "smaller ε" in history["warnings"][0]


def test_impossible_eps_is_reported_and_training_stops(images, caplog):
    with pytest.warns(UserWarning, match="stuck at chance") as record:
        history, accuracy = train(images, 1.0, nb_epochs=12, warmup=2)
    assert len(record) == 1  # reported once, not once per epoch
    assert history["collapsed"] and len(history["warnings"]) == 1
    message = history["warnings"][0]
    assert "row_l1 ε = 1.0" in message and "smaller ε" in message and "stopped" in message
    assert message in caplog.text  # also in the logs
    assert len(history["epoch"]) == 5 < 12  # warm-up 2 + patience 3 epochs, then stopped
    assert accuracy <= 0.25


def test_a_collapse_is_reported_but_training_continues_when_asked(images):
    with pytest.warns(UserWarning, match="stuck at chance"):
        history, _ = train(images, 1.0, nb_epochs=7, warmup=1, stop_on_collapse=False)
    assert history["collapsed"] and len(history["epoch"]) == 7
    assert "stopped" not in history["warnings"][0]


def test_plain_training_is_never_called_a_collapse(images):
    history, accuracy = train(images, 1.0, nb_epochs=4, lam=0.0)  # λ = μ = 0: not a robust run
    assert not history["collapsed"] and history["warnings"] == []
    assert history["lam"] == [0.0] * 4 and accuracy > 0.15


def test_detector_tells_a_collapse_from_a_stuck_run_and_a_slow_start():
    learned_then_lost = CollapseDetector(patience=2)
    verdicts = [learned_then_lost.update(a, 0.1) for a in (0.15, 0.6, 0.12, 0.11)]
    assert verdicts == [None, None, None, "collapsed"]
    stuck = CollapseDetector(patience=2, warmup=2)
    assert [stuck.update(a, 0.1) for a in (0.1, 0.11, 0.12, 0.1)] == [None, None, None, "stuck"]
    slow = CollapseDetector(patience=2, warmup=2)
    assert [slow.update(a, 0.1) for a in (0.1, 0.11, 0.5, 0.9)] == [None] * 4
    short = CollapseDetector(patience=3)
    assert short.update(0.5, 0.1) is None and short.update(0.1, 0.1, final=True) == "collapsed"
    assert CollapseDetector(patience=3).update(0.1, 0.1, final=True) is None  # one epoch: too short to judge
    three = CollapseDetector(patience=3, warmup=5)
    assert [three.update(0.1, 0.1, final=final) for final in (False, False, True)] == [None, None, "stuck"]
    assert CollapseDetector(patience=3).update(0.9, 0.1, final=True) is None


def test_warmup_ramp_and_scaled_balls():
    assert [ramp_factor(s, 4) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert ramp_factor(0, 0) == 1.0
    budget = PerturbationBudget(0.2, norm="row_l1")
    balls = {b.param_name: b for b in budget.parameter_balls(small_cnn())}
    half = scale_param_balls(balls, 0.5)
    half_budget = {b.param_name: b for b in budget.scaled(0.5).parameter_balls(small_cnn())}
    for name, ball in half.items():
        assert torch.allclose(ball.radius, half_budget[name].radius) and ball.eps == pytest.approx(0.1)
    assert scale_param_balls(balls, 1.0) is balls
