"""
Certified training of residual networks with batch norm (docs/theory.md §13, docs/training.md): batch norm frozen in
eval mode while :class:`.WeightRobustTrainer` trains (flags and running statistics kept, also after an exception), the
bound's gradient reaching γ and β, the zoo's digits ResNet recipe certifying soundly what a plain model does not, and
a collapsed run raising instead of returning a chance model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, WeightPerturbationCertifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.defences.trainer import TrainingCollapsedError, WeightRobustTrainer, raise_if_collapsed
from art_weightpert.defences.trainer.batch_norm import (
    batch_norm_modules,
    fold_batch_norm_statistics,
    frozen_batch_norm,
    resolve_batch_norm,
)
from art_weightpert.network import BatchNorm, read_network
from art_weightpert.zoo import digits_resnet, make_classifier, train_digits_resnet

BOX = PerturbationBudget(1e-4, norm="inf")  # a plainly trained digits ResNet certifies nothing here


def resnet_classifier(seed: int = 0, lr: float = 3e-3):
    return make_classifier(digits_resnet(seed=seed), (1, 8, 8), lr=lr)


def statistics(model: nn.Module) -> list[torch.Tensor]:
    return [
        b.clone() for m in batch_norm_modules(model) for b in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def mixed_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """Train mode, with one batch norm and one block in eval mode: flags that ``fit`` must give back as they were."""
    model.train()
    model.bn1.eval()
    model.layer2.eval()
    return {m: m.training for m in model.modules()}


def test_frozen_fit_keeps_the_running_statistics_and_restores_every_flag(digits_images):
    x, y, _, _ = digits_images
    clf = resnet_classifier()
    model = clf.base_model
    flags, before = mixed_flags(model), statistics(model)
    trainer = WeightRobustTrainer(clf, BOX, warmup=0, batch_norm="frozen", verbose=False)
    trainer.fit(x[:128], y[:128], batch_size=64, nb_epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(before, statistics(model)))
    assert {m: m.training for m in model.modules()} == flags
    assert all("train" not in m.__dict__ for m in batch_norm_modules(model))  # the overrides are gone


def test_batch_statistics_when_asked_and_flags_restored_after_an_exception(digits_images, monkeypatch):
    x, y, _, _ = digits_images
    clf = resnet_classifier()
    model = clf.base_model
    flags, before = mixed_flags(model), statistics(model)
    trainer = WeightRobustTrainer(clf, BOX, warmup=0, batch_norm="train", verbose=False)
    trainer.fit(x[:64], y[:64], batch_size=64, nb_epochs=1)
    changed = [not torch.equal(a, b) for a, b in zip(before, statistics(model))]
    assert any(changed)  # the cross-entropy ran the modules in train mode on batch statistics
    assert {m: m.training for m in model.modules()} == flags

    trainer.set_params(batch_norm="frozen")
    real_epoch = trainer._epoch

    def failing_epoch(*args):
        assert not any(m.training for m in batch_norm_modules(model))
        real_epoch(*args)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(trainer, "_epoch", failing_epoch)
    frozen_before = statistics(model)
    with pytest.raises(RuntimeError, match="interrupted"):
        trainer.fit(x[:64], y[:64], batch_size=64, nb_epochs=2)
    assert {m: m.training for m in model.modules()} == flags
    assert all("train" not in m.__dict__ for m in batch_norm_modules(model))
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, statistics(model)))


def test_model_train_keeps_frozen_batch_norm_in_eval_mode():
    model = digits_resnet()
    with frozen_batch_norm(model):
        model.train()
        assert model.training and model.layer1[0].conv1.training
        assert not any(m.training for m in batch_norm_modules(model))
    assert all(m.training for m in model.modules())  # a fresh module: everything in train mode again
    model.train()
    assert all(m.training for m in batch_norm_modules(model))


@pytest.mark.parametrize(
    "mode, lam, has_batch_norm, want",
    [("auto", 1.0, True, "frozen"), ("auto", 0.0, True, "train"), ("auto", 1.0, False, "train"),
     ("train", 1.0, True, "train"), ("frozen", 0.0, True, "frozen")],
)  # fmt: skip
def test_auto_freezes_batch_norm_exactly_for_robust_training(mode, lam, has_batch_norm, want):
    assert resolve_batch_norm(mode, has_batch_norm, lam) == want


def test_the_bound_trains_gamma_and_beta_when_frozen_and_reads_the_certifiers_map():
    torch.manual_seed(0)
    clf = resnet_classifier()
    model = clf.base_model
    with torch.no_grad():  # statistics and affine parameters away from their initial values
        for m in batch_norm_modules(model):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
    x, labels = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    gammas = [m.weight for m in batch_norm_modules(model)] + [m.bias for m in batch_norm_modules(model)]
    for mode, reaches in (("frozen", True), ("train", False)):
        trainer = WeightRobustTrainer(clf, BOX.scaled(100), batch_norm=mode, verbose=False)
        model.eval()  # the same forward in both modes: only the bound's reading of batch norm differs
        robust = trainer.loss_terms(x, labels)["robust"]
        assert robust > 0
        grads = torch.autograd.grad(robust, gammas, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == reaches, mode
    live = [layer for layer in trainer._reading.now(True).layers if isinstance(layer, BatchNorm)]
    read = [layer for layer in read_network(model, (1, 8, 8)).layers if isinstance(layer, BatchNorm)]
    for a, b in zip(live, read):  # the frozen reading is the certifier's (eval mode) map
        torch.testing.assert_close(a.scale.double(), b.scale, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.shift.double(), b.shift, rtol=1e-6, atol=1e-7)


def test_folding_the_statistics_keeps_the_eval_function():
    torch.manual_seed(1)
    model = digits_resnet().eval()
    with torch.no_grad():
        for m in batch_norm_modules(model):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.01, 3.0)
    x = torch.rand(5, 1, 8, 8)
    before = model(x).detach()
    fold_batch_norm_statistics(model)
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in batch_norm_modules(model))


def test_raise_if_collapsed():
    labels = np.repeat(np.arange(10), 10)
    raise_if_collapsed({"accuracy": [0.5, 0.9], "collapsed": False, "warnings": []}, labels)
    with pytest.raises(TrainingCollapsedError, match="collapsed"):
        raise_if_collapsed({"accuracy": [0.9, 0.1], "collapsed": True, "warnings": ["robust training collapsed"]},
                           labels)  # fmt: skip
    with pytest.raises(TrainingCollapsedError, match="chance") as error:
        raise_if_collapsed({"accuracy": [0.12, 0.15], "collapsed": False, "warnings": []}, np.eye(10)[labels])
    assert isinstance(error.value, RuntimeError)
    with pytest.raises(TrainingCollapsedError, match="eval mode"):  # high train-mode accuracy, chance in eval mode
        raise_if_collapsed({"accuracy": [0.9, 0.93], "collapsed": False, "warnings": []}, labels, np.zeros(100))


@pytest.mark.filterwarnings("ignore:robust training:UserWarning")
def test_zoo_recipe_raises_on_collapse_instead_of_returning_a_chance_model(digits_images):
    x, y, _, _ = digits_images
    with pytest.raises(TrainingCollapsedError):
        train_digits_resnet(x[:192], y[:192], nb_epochs=4, budget=PerturbationBudget(1.0, norm="inf"))


@pytest.fixture(scope="module")
def resnets(digits_images):
    x, y, x_test, y_test = digits_images
    plain = train_digits_resnet(x, y, nb_epochs=6)
    robust = train_digits_resnet(x, y, nb_epochs=6, budget=BOX, warmup=2)  # (40 epochs in the recipe)
    return plain, robust, x_test[:60], y_test[:60]


def test_robust_resnet_certifies_more_than_the_plain_one_and_soundly(resnets):
    plain, robust, x, y = resnets
    certified = {}
    for name, clf, clean in (("plain", plain, 0.9), ("robust", robust, 0.6)):
        assert np.mean(clf.predict(x).argmax(1) == y) >= clean, name
        certified[name] = WeightPerturbationCertifier(clf, BOX, method="linear", verbose=False).certify(x, y)
    assert certified["robust"].mean() >= certified["plain"].mean() + 0.5
    points = certified["robust"]
    attack = PerSampleWeightPGD(robust, BOX, max_iter=30, num_random_init=1, batch_size=64, verbose=False)
    result = attack.generate(x[points], y[points])
    assert not result["flipped"].any() and (result["worst_margin"] > 0).all()
    model = robust.base_model
    for seed in range(10):  # random extreme points of the box: no certified prediction changes
        delta = BOX.sample(model, "extreme", seed=seed)
        assert (robust.with_weight_perturbation(delta).predict(x[points]).argmax(1) == y[points]).all()
