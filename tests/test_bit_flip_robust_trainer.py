"""Tests of :class:`BitFlipRobustTrainer`: training that makes the bit-flip attack need more flips."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from art.defences.trainer.trainer import Trainer

from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.defences.trainer.bit_flip_robust_trainer import (
    BitFlipRobustTrainer,
    adversarial_flip_deltas,
    clustering_penalty,
)
from art_weightpert.quantization import QuantizedWeights
from art_weightpert.zoo import digits_mlp, make_classifier

EPOCHS = 10


def _mlp_classifier(seed: int = 0):
    return make_classifier(digits_mlp(hidden=(64,), seed=seed), (64,))


def _accuracy(classifier, x, y) -> float:
    return float(np.mean(np.argmax(classifier.predict(x), axis=1) == y))


@pytest.fixture(scope="module")
def plain(digits):
    """A digits MLP 64-64-10 trained plainly (ART's fit, same seed and batches as the defended one)."""
    x_train, y_train, _, _ = digits
    classifier = _mlp_classifier()
    torch.manual_seed(1)
    classifier.fit(x_train, y_train, batch_size=64, nb_epochs=EPOCHS, verbose=False)
    return classifier


@pytest.fixture(scope="module")
def defended(digits):
    """The same MLP trained by binarization-aware training with adversarial flips, and its history."""
    x_train, y_train, x_test, y_test = digits
    classifier = _mlp_classifier()
    initial = classifier.base_model[0].weight.detach().clone()
    trainer = BitFlipRobustTrainer(classifier, method="binarization", adv_flips=5, verbose=False)
    torch.manual_seed(1)
    history = trainer.fit(x_train, y_train, validation_data=(x_test, y_test), batch_size=64, nb_epochs=EPOCHS)
    assert trainer.get_classifier() is classifier
    assert not torch.equal(classifier.base_model[0].weight.detach(), initial)  # trained in place
    return trainer, history


def test_fit_trains_in_place_and_keeps_clean_accuracy(digits, plain, defended):
    _, _, x_test, y_test = digits
    trainer, history = defended
    classifier = trainer.get_classifier()
    accuracy = _accuracy(classifier, x_test, y_test)
    assert accuracy >= 0.9
    assert accuracy >= _accuracy(plain, x_test, y_test) - 0.05
    assert history["epoch"] == list(range(1, EPOCHS + 1))
    assert {"loss", "ce", "adv", "cluster", "accuracy", "lr", "time", "val_accuracy"} <= set(history)
    assert history["val_accuracy"][-1] == pytest.approx(accuracy)  # validated with the deployed weights
    assert np.isfinite(history["adv"]).all() and np.isnan(history["cluster"]).all()


def test_binarized_model_deploys_two_values_per_layer(defended):
    trainer, _ = defended
    model = trainer.get_classifier().base_model
    for name in trainer.weight_names:
        values = torch.unique(model.get_parameter(name).detach())
        assert len(values) == 2 and torch.allclose(values[0], -values[1])
    quantized = QuantizedWeights.from_estimator(trainer.get_classifier(), n_bits=8)
    for name, codes in quantized.codes.items():
        assert set(torch.unique(codes).tolist()) == {-127, 127}  # no flip can enlarge a weight
        assert torch.equal(codes, trainer.quantized_weights().codes[name])


def test_bfa_needs_more_flips_on_the_defended_model(digits, plain, defended):
    x_train, y_train, _, _ = digits
    x, y = x_train[:128], y_train[:128]
    flips = {}
    for name, classifier in (("plain", plain), ("defended", defended[0].get_classifier())):
        attack = BitFlipAttack(classifier, max_flips=30, n_bits=8, stop_accuracy=0.5, verbose=False)
        flips[name] = len(attack.generate(x, y))
        flips[name + "_accuracy"] = attack.history_[-1]["accuracy"]
    assert flips["plain_accuracy"] <= 0.5  # BFA halves the plain model's accuracy within 30 flips (about 10) ...
    assert flips["defended"] >= 2 * flips["plain"]  # ... and needs far more on the defended one (30: not reached)
    assert flips["defended_accuracy"] > flips["plain_accuracy"]


def test_quantization_aware_training_deploys_the_trained_codes(digits):
    x_train, y_train, x_test, y_test = digits
    classifier = _mlp_classifier()
    trainer = BitFlipRobustTrainer(classifier, n_bits=4, method="quantization", granularity="channel", verbose=False)
    history = trainer.fit(x_train, y_train, validation_data=(x_test, y_test), batch_size=64, nb_epochs=3)
    quantized = QuantizedWeights.from_estimator(classifier, n_bits=4, granularity="channel")
    model = classifier.base_model
    for name, value in quantized.dequantize().items():  # the weights already are their 4-bit values
        assert torch.allclose(model.get_parameter(name).detach().double(), value, atol=1e-6)
    assert history["val_accuracy"][-1] == pytest.approx(_accuracy(classifier, x_test, y_test))


def test_clustering_gathers_each_sign_near_its_mean(digits):
    x_train, y_train, _, _ = digits
    spreads = {}
    for lam in (0.0, 10.0):
        classifier = _mlp_classifier()
        trainer = BitFlipRobustTrainer(classifier, method="clustering", lam=lam, verbose=False)
        torch.manual_seed(1)
        history = trainer.fit(x_train, y_train, batch_size=64, nb_epochs=4)
        assert np.isfinite(history["cluster"]).all()
        weights = [classifier.base_model.get_parameter(n).detach() for n in trainer.weight_names]
        spreads[lam] = float(clustering_penalty(weights))
    assert spreads[10.0] < 0.5 * spreads[0.0]


def test_clustering_penalty_is_zero_for_two_values():
    w = torch.tensor([[0.3, -0.1, 0.3], [-0.1, 0.3, 0.0]], requires_grad=True)
    assert float(clustering_penalty([w]).detach()) == pytest.approx(0.0)
    spread = torch.tensor([0.1, 0.3, -0.2, -0.4], requires_grad=True)
    penalty = clustering_penalty([spread])  # (0.01·4) / (4 · 0.25²)
    assert float(penalty.detach()) == pytest.approx(0.04 / (4 * 0.0625))
    penalty.backward()
    assert torch.allclose(spread.grad, torch.tensor([-0.2, 0.2, 0.2, -0.2]) / (4 * 0.0625))


@pytest.mark.parametrize("nb_flips", [1, 3, 40])
def test_adversarial_flips_are_the_top_first_order_bit_flips(nb_flips):
    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(20, 30), "b.weight": torch.randn(10, 20) * 3}
    grads = {name: torch.randn_like(w) for name, w in weights.items()}
    codes = {n: torch.round(w / w.abs().max() * 127).long() for n, w in weights.items()}
    scales = {n: w.abs().max().double() / 127 for n, w in weights.items()}
    quantized = QuantizedWeights(codes, scales, 8, "tensor")
    deltas = adversarial_flip_deltas(quantized, grads, nb_flips)
    assert sum(int((d != 0).sum()) for d in deltas.values()) == nb_flips  # at most one flip per weight
    for name, delta in deltas.items():  # each change is one bit flip of its weight
        changed = delta != 0
        assert torch.isclose(delta[changed].double().unsqueeze(0), quantized.bit_changes(name)[:, changed]).any(0).all()
    exhaustive = torch.cat(  # the best flip of every weight, by brute force
        [(grads[n].double().unsqueeze(0) * quantized.bit_changes(n)).amax(dim=0).reshape(-1) for n in weights]
    )
    chosen = sum(float((grads[n].double() * deltas[n].double()).sum()) for n in weights)
    assert chosen == pytest.approx(float(torch.topk(exhaustive, nb_flips).values.sum()), rel=1e-5)
    assert all(not d.any() for d in adversarial_flip_deltas(quantized, grads, 0).values())


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"n_bits": 1}, ValueError),
        ({"n_bits": 17}, ValueError),
        ({"n_bits": 8.0}, TypeError),
        ({"method": "pruning"}, ValueError),
        ({"lam": -0.1}, ValueError),
        ({"adv_flips": -1}, ValueError),
        ({"granularity": "row"}, ValueError),
        ({"layers": ["9"]}, ValueError),
        ({"verbose": "yes"}, TypeError),
    ],
)
def test_bad_parameters_raise(kwargs, error):
    with pytest.raises(error):
        BitFlipRobustTrainer(_mlp_classifier(), **kwargs)


def test_classifier_must_be_trainable():
    with pytest.raises(TypeError, match="PyTorchClassifier"):
        BitFlipRobustTrainer(digits_mlp())
    classifier = _mlp_classifier()
    classifier._optimizer = None  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="optimizer"):
        BitFlipRobustTrainer(classifier)


def test_set_params_validates_before_assigning():
    trainer = BitFlipRobustTrainer(_mlp_classifier(), method="clustering", lam=1.0, verbose=False)
    with pytest.raises(ValueError, match="method"):
        trainer.set_params(lam=5.0, method="pruning")
    assert trainer.lam == 1.0 and trainer.method == "clustering"
    with pytest.raises(ValueError, match="eps"):
        trainer.set_params(eps=0.1)
    trainer.set_params(lam=2, n_bits=4, layers="2")
    assert trainer.lam == 2.0 and isinstance(trainer.lam, float) and trainer.n_bits == 4
    assert trainer.layers == ["2"] and trainer.weight_names == ["2.weight"]
    with pytest.raises(ValueError, match="method"):  # assigned directly: validated as by set_params, not kept
        trainer.method = "pruning"
    assert trainer.method == "clustering"


def test_art_trainer_interface(digits):
    x_train, y_train, _, _ = digits
    classifier = _mlp_classifier()
    trainer = BitFlipRobustTrainer(classifier, n_bits=8, method="binarization", verbose=False)
    assert isinstance(trainer, Trainer) and trainer.get_classifier() is classifier
    parameters = inspect.signature(trainer.fit).parameters
    assert list(parameters)[:6] == ["x", "y", "validation_data", "batch_size", "nb_epochs", "scheduler"]
    assert parameters["batch_size"].default == 128 and parameters["nb_epochs"].default == 20
    scheduler = torch.optim.lr_scheduler.StepLR(classifier.optimizer, step_size=1, gamma=0.5)
    history = trainer.fit(x_train[:256], np.eye(10)[y_train[:256]], batch_size=64, nb_epochs=2, scheduler=scheduler)
    assert history["lr"] == pytest.approx([1.5e-3, 7.5e-4])
    with pytest.raises(ValueError, match="optimizer"):
        other = torch.optim.SGD(classifier.base_model.parameters(), lr=0.1)
        trainer.fit(x_train[:64], y_train[:64], scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_binarization_per_channel_deploys_one_scale_per_output_channel(digits):
    x_train, y_train, _, _ = digits
    classifier = _mlp_classifier()
    trainer = BitFlipRobustTrainer(classifier, n_bits=6, granularity="channel", layers=["0"], verbose=False)
    trainer.fit(x_train[:256], y_train[:256], batch_size=64, nb_epochs=1)
    quantized = QuantizedWeights.from_estimator(classifier, n_bits=6, granularity="channel", layers=["0"])
    assert set(torch.unique(quantized.codes["0.weight"]).tolist()) == {-31, 31}
    assert torch.equal(quantized.codes["0.weight"], trainer.quantized_weights().codes["0.weight"])
    assert len(torch.unique(classifier.base_model[2].weight.detach())) > 2  # layer "2" trained plainly, stays float
