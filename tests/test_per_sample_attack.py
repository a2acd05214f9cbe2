"""Tests of the per-sample weight attack (:class:`.PerSampleWeightPGD`) and of the batched per-sample forward of a read
network (:meth:`.Network.forward` with ``sample_deltas``) that it runs on. Its use against certificates is in
test_certification_soundness.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.attacks import PerSampleWeightPGD, WeightAttack
from art_weightpert.attacks import per_sample as per_sample_module
from art_weightpert.network import read_network
from tests.conftest import random_mlp

MLP_SIZES = (8, 10, 8, 5)


def grouped_cnn(seed: int) -> nn.Sequential:
    """A CNN on 1×8×8 inputs with batch norm (random eval statistics), a grouped strided conv and average pooling."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def mlp_classifier(seed: int) -> PyTorchWeightClassifier:
    return PyTorchWeightClassifier(random_mlp(MLP_SIZES, True, seed=seed), nn.CrossEntropyLoss(), (8,), 5)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def per_sample_logits(model: nn.Module, params: dict, deltas: dict, x: torch.Tensor) -> torch.Tensor:
    """The module mapped over the samples, sample ``n`` with the parameters ``params + deltas[.][n]``."""

    def one(sample_deltas, x_n):
        p = dict(params)
        for name, value in sample_deltas.items():
            p[name] = params[name] + value
        return functional_call(model, p, (x_n.unsqueeze(0),)).squeeze(0)

    return vmap(one)(deltas, x)


# ------------------------------------------------------------------------------------------------ batched forward
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_network_forward_with_sample_deltas_matches_the_module_per_sample(which):
    """One batched forward of the read network equals the module evaluated per sample with its own weights, for an
    MLP with biases and a CNN with batch norm, a grouped strided conv and pooling; without deltas it is the plain
    forward."""
    model, shape = (random_mlp(MLP_SIZES, True, seed=3), (8,)) if which == "mlp" else (grouped_cnn(4), (1, 8, 8))
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    params.update({k: v.double() for k, v in model.named_buffers() if v.is_floating_point()})
    x = torch.randn((5, *shape), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    deltas = {
        k: 0.1 * torch.randn((5, *v.shape), generator=gen, dtype=torch.float64)
        for k, v in model.named_parameters()
        if isinstance(model.get_submodule(k.rsplit(".", 1)[0]), (nn.Linear, nn.Conv2d))
    }
    network = read_network(model, shape)
    expected = per_sample_logits(model, params, deltas, x)
    got = network.forward(x, params, sample_deltas=deltas)
    np.testing.assert_allclose(got.numpy(), expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    zero = {k: torch.zeros_like(v) for k, v in deltas.items()}
    np.testing.assert_allclose(
        network.forward(x, params, sample_deltas=zero).numpy(), network.forward(x, params).numpy(), atol=1e-14
    )
    assert not np.allclose(got.numpy(), network.forward(x, params).numpy())


def test_network_forward_rejects_deltas_of_unknown_parameters():
    model = random_mlp(MLP_SIZES, True, seed=3)
    network = read_network(model, (8,))
    with pytest.raises(ValueError, match="sample_deltas"):
        network.forward(torch.zeros(2, 8), sample_deltas={"9.weight": torch.zeros(2, 5, 8)})


# ------------------------------------------------------------------------------------------------ the attack
def test_not_a_weight_attack_and_its_own_contract():
    """The per-sample attack returns margins, not a WeightPerturbation of the base weights, so it must not pass for a
    WeightAttack; its ball is centred at the estimator as it is (carried perturbation included): at scale 0 it sees
    exactly the perturbed model's margins."""
    clf = mlp_classifier(seed=5)
    budget = PerturbationBudget(0.05, "inf")
    assert not isinstance(PerSampleWeightPGD(clf, budget, verbose=False), WeightAttack)
    carried = budget.sample(clf.base_model, "extreme", seed=1)
    perturbed = clf.with_weight_perturbation(carried)
    x = inputs(6)
    result = PerSampleWeightPGD(perturbed, budget, max_iter=3, verbose=False).generate(x, scale=np.zeros(6))
    logits = perturbed.predict(x).astype(np.float64)
    np.testing.assert_array_equal(result["labels"], logits.argmax(axis=1))
    clean = logits[np.arange(6), result["labels"]][:, None] - logits
    finite = np.isfinite(result["margins"])
    np.testing.assert_allclose(result["margins"][finite], clean[finite], atol=1e-5)
    assert not result["flipped"].any()


def test_validates_and_leaves_the_model_alone():
    clf = mlp_classifier(seed=5)
    model = clf.base_model
    budget = PerturbationBudget(0.05, "row_l1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`max_iter`"):
        PerSampleWeightPGD(clf, budget, max_iter=0)
    with pytest.raises(TypeError, match="`float64`"):
        PerSampleWeightPGD(clf, budget, float64="yes")
    attack = PerSampleWeightPGD(clf, budget, max_iter=10, num_random_init=2, verbose=False)
    with pytest.raises(ValueError, match="`num_random_init`"):
        attack.set_params(max_iter=3, num_random_init=-1)
    assert attack.max_iter == 10 and attack.num_random_init == 2
    x = inputs(6)
    with pytest.raises(ValueError, match="`scale`"):
        attack.generate(x, scale=np.ones(5))
    with pytest.raises(ValueError, match="`scale`"):
        attack.generate(x, scale=-np.ones(6))
    with pytest.raises(ValueError, match="`x` is empty"):
        attack.generate(x[:0])
    result = attack.generate(x)
    assert result["margins"].shape == (6, 5) and np.all(np.isinf(result["margins"][np.arange(6), result["labels"]]))
    assert np.array_equal(result["worst_margin"], result["margins"].min(axis=1))
    # A sample counts as flipped exactly when some observed margin is negative.
    np.testing.assert_array_equal(result["flipped"], result["worst_margin"] < 0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_robust_accuracy_is_at_most_the_clean_accuracy():
    clf = mlp_classifier(seed=7)
    x = inputs(40, seed=1)
    y = np.random.default_rng(2).integers(0, 5, 40)  # random labels: many samples are wrong from the start
    clean = float(np.mean(clf.predict(x).argmax(axis=1) == y))
    attack = PerSampleWeightPGD(clf, PerturbationBudget(0.2, "inf"), max_iter=10, num_random_init=1, verbose=False)
    robust = attack.robust_accuracy(x, y)
    assert robust <= clean
    assert robust == pytest.approx(1 - attack.generate(x, y)["flipped"].mean())
    assert robust < clean  # the ball is large enough to flip some correct samples


@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
def test_more_restarts_never_weaker(norm):
    """Restarts run in a fixed order from one seeded stream, so a run with more restarts repeats a shorter one first:
    every observed margin can only go down."""
    clf = mlp_classifier(seed=8)
    budget = PerturbationBudget({"inf": 0.05, "row_l1": 0.3, "l2": 0.3}[norm], norm, include_bias=True)
    x = inputs(12, seed=3)

    def margins(restarts: int) -> np.ndarray:
        return PerSampleWeightPGD(clf, budget, max_iter=6, num_random_init=restarts, verbose=False).generate(x)[
            "margins"
        ]

    one, three = margins(1), margins(3)
    assert np.all(three <= one)
    assert np.all(margins(0) >= one)


@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
def test_beats_random_points_of_the_ball(norm):
    """The attack's worst margin per sample is below the worst over 64 random extreme points of the same ball."""
    clf = mlp_classifier(seed=9)
    model = clf.base_model
    budget = PerturbationBudget({"inf": 0.05, "row_l1": 0.3, "l2": 0.3}[norm], norm)
    x = inputs(16, seed=4)
    result = PerSampleWeightPGD(clf, budget, max_iter=30, num_random_init=1, verbose=False).generate(x)
    network = read_network(model, (8,))
    params = network.params(dtype=torch.float64)
    labels = torch.as_tensor(result["labels"]).unsqueeze(1)
    x64 = torch.as_tensor(x, dtype=torch.float64)
    random_worst = torch.full((len(x),), np.inf, dtype=torch.float64)
    with torch.no_grad():
        for seed in range(64):
            draw = budget.sample(model, "extreme", seed)
            shifted = {
                k: p + torch.as_tensor(draw[k], dtype=torch.float64) if k in draw else p for k, p in params.items()
            }
            logits = network.forward(x64, shifted)
            margins = (logits.gather(1, labels) - logits).scatter(1, labels, np.inf)
            random_worst = torch.minimum(random_worst, margins.amin(dim=1))
    attack_worst = result["worst_margin"]
    assert np.all(attack_worst <= random_worst.numpy() + 1e-9)
    assert attack_worst.mean() < random_worst.numpy().mean() - 0.01


def test_weights_and_modes_unchanged_when_interrupted(monkeypatch):
    clf = mlp_classifier(seed=10)
    model = clf.base_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = per_sample_module.objective

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(per_sample_module, "objective", failing)
    model.train()
    attack = PerSampleWeightPGD(clf, PerturbationBudget(0.1, "l2"), max_iter=10, verbose=False)
    with pytest.raises(KeyboardInterrupt):
        attack.generate(inputs(8))
    assert calls["n"] == 4
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_models_the_reader_refuses_are_attacked_per_sample():
    """A model outside the reader (Conv1d) takes the vmap path; at scale 0 it reproduces the clean margins and in
    the ball it lowers them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1, 8), 4)
    x = inputs(6).reshape(6, 1, 8)
    attack = PerSampleWeightPGD(clf, PerturbationBudget(0.2, "l2", include_bias=True), max_iter=5, verbose=False)
    zero = attack.generate(x, scale=np.zeros(6))
    full = attack.generate(x)
    logits = clf.predict(x).astype(np.float64)
    clean = logits[np.arange(6), zero["labels"]][:, None] - logits
    finite = np.isfinite(zero["margins"])
    np.testing.assert_allclose(zero["margins"][finite], clean[finite], atol=1e-5)
    assert np.all(full["worst_margin"] < zero["worst_margin"])
