"""Tests of WeightRobustTrainer: the loss of docs/theory.md §7, ART's trainer plumbing, parameter checks."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod
from art.data_generators import NumpyDataGenerator, PyTorchDataGenerator
from art.defences.trainer import Trainer
from art.estimators.classification import PyTorchClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.certification import METHODS
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.defences.trainer import WeightRobustTrainer
from art_weightpert.defences.trainer.batches import ShuffledIndexBatches
from art_weightpert.defences.trainer.weight_robust_trainer import HISTORY_KEYS, operator_norm_sum, robust_term
from art_weightpert.network import read_network

N_TRAIN = 256  # a small training set keeps every test fast


def mlp(seed: int = 0, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias), nn.ReLU(),
                         nn.Linear(16, 10, bias=bias))  # fmt: skip


def classifier(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, lr: float = 3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr) if optimizer is None else optimizer
    return PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10, optimizer=optimizer, clip_values=(0.0, 1.0))


@pytest.fixture(scope="module")
def data(digits):
    x_train, y_train, x_test, y_test = digits
    return x_train[:N_TRAIN], y_train[:N_TRAIN], x_test[:200], y_test[:200]


@pytest.fixture(scope="module")
def budget():
    return PerturbationBudget(0.03, norm="row_l1")


@pytest.fixture(scope="module")
def trained(data, budget):
    """A small MLP trained robustly for a few epochs (many but not all training points certified)."""
    x, y, _, _ = data
    clf = classifier(mlp(seed=1))
    torch.manual_seed(0)
    WeightRobustTrainer(clf, budget, lam=1.0, warmup=3, verbose=False).fit(x, y, nb_epochs=10, batch_size=32)
    return clf


# ------------------------------------------------------------------------------------------------ plain training
def test_is_an_art_trainer(data, budget):
    clf = classifier(mlp())
    trainer = WeightRobustTrainer(clf, budget, verbose=False)
    assert isinstance(trainer, Trainer)
    assert trainer.get_classifier() is clf


def test_zero_lambda_and_mu_reproduce_a_hand_written_torch_loop(data, budget):
    x, y, _, _ = data
    clf = classifier(mlp(seed=3))
    torch.manual_seed(7)
    history = WeightRobustTrainer(clf, budget, lam=0.0, mu=0.0, verbose=False).fit(x, y, batch_size=64, nb_epochs=4)

    model = mlp(seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    x_t, y_t = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(7)
    loader = DataLoader(TensorDataset(torch.arange(len(x))), batch_size=64, shuffle=True)  # the same batch order
    curve = []
    for _ in range(4):
        total = 0.0
        for (idx,) in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x_t[idx]), y_t[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        curve.append(total / len(x))
    np.testing.assert_allclose(history["loss"], curve, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history["ce"], curve, rtol=1e-5, atol=1e-6)
    assert all(math.isnan(r) for r in history["robust"])  # λ = 0: the robust term is not computed
    for p, q in zip(clf.model.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n, batch_size", [(130, 64), (128, 64), (5, 64), (1, 1)])
def test_shuffled_index_batches_draw_the_data_loaders_order(n, batch_size):
    """The trainer's batch order is ``DataLoader(shuffle=True)``'s, epoch after epoch, and leaves torch's global
    generator where the loader leaves it."""
    loader = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=True)
    ours = ShuffledIndexBatches(n, batch_size)
    assert len(ours) == len(loader)
    torch.manual_seed(5)
    expected = [[idx.clone() for (idx,) in loader] for _ in range(3)] + [torch.rand(3)]
    torch.manual_seed(5)
    got = [list(ours) for _ in range(3)] + [torch.rand(3)]
    for want, have in zip(expected[:3], got[:3]):
        assert len(want) == len(have) and all(torch.equal(a, b) for a, b in zip(want, have))
    assert torch.equal(expected[3], got[3])


def test_zero_lambda_and_mu_reproduce_art_fit(data, budget):
    x, y, _, _ = data
    ours, art = classifier(mlp(seed=4)), classifier(mlp(seed=4))
    torch.manual_seed(11)
    WeightRobustTrainer(ours, budget, lam=0.0, verbose=False).fit(x, y, batch_size=50, nb_epochs=3)
    torch.manual_seed(11)
    art.fit(x, y, batch_size=50, nb_epochs=3)
    for p, q in zip(ours.model.parameters(), art.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_one_hot_labels_give_the_same_training(data, budget):
    x, y, _, _ = data
    a, b = classifier(mlp(seed=5)), classifier(mlp(seed=5))
    torch.manual_seed(0)
    ha = WeightRobustTrainer(a, budget, lam=0.5, warmup=1, verbose=False).fit(x, y, nb_epochs=2, batch_size=64)
    torch.manual_seed(0)
    hb = WeightRobustTrainer(b, budget, lam=0.5, warmup=1, verbose=False).fit(
        x, np.eye(10, dtype=np.float32)[y], nb_epochs=2, batch_size=64
    )
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("bound", list(METHODS))
def test_loss_is_finite_and_differentiable_at_initialisation(data, budget, bound):
    x, y, _, _ = data
    clf = classifier(mlp(seed=0, bias=True))
    trainer = WeightRobustTrainer(clf, budget, lam=1.0, mu=0.1, kappa=0.1, method=bound, verbose=False)
    x_t, y_t = clf.prepare_inputs(x[:64], y[:64])
    terms = trainer.loss_terms(x_t, y_t)
    assert all(torch.isfinite(t) for t in terms.values())
    assert float(terms["robust"].detach()) > 0  # an untrained network certifies nothing at this radius
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["robust"] + 0.1 * terms["norm"])
    grads = torch.autograd.grad(terms["loss"], [p for p in clf.model.parameters()])
    for g in grads:
        assert torch.isfinite(g).all()
        assert g.abs().sum() > 0
    # the robust term alone carries gradient to every weight
    robust_grads = torch.autograd.grad(trainer.loss_terms(x_t, y_t)["robust"], list(clf.model.parameters()))
    assert all(g.abs().sum() > 0 for g in robust_grads[::2])


def test_norm_term_is_the_sum_of_max_row_l1_norms():
    model = mlp(seed=2)
    expected = sum(float(m.weight.detach().abs().sum(dim=1).max()) for m in model if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert float(operator_norm_sum(read_network(model, (64,)))) == pytest.approx(expected, rel=1e-6)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10))
    with torch.no_grad():
        expected = float(conv[0].weight.abs().sum(dim=(1, 2, 3)).max() + conv[3].weight.abs().sum(dim=1).max())
        assert float(operator_norm_sum(read_network(conv, (1, 8, 8)))) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kappa", [0.0, 0.1])
def test_robust_term_is_zero_exactly_when_every_sample_is_certified_with_margin_kappa(data, budget, trained, kappa):
    x, y, _, _ = data
    trainer = WeightRobustTrainer(trained, budget, lam=1.0, kappa=kappa, verbose=False)
    x_t, y_t = trained.prepare_inputs(x, y)
    network = read_network(trained.model, (64,))
    with torch.no_grad():
        lower = interval_margin_bounds(network, budget.parameter_balls(trained.model), x_t, y_t, torch.float32)
    worst = lower.min(dim=1).values  # "certified with margin κ": every margin lower bound ≥ κ
    good, bad = torch.nonzero(worst >= kappa).flatten(), torch.nonzero(worst < kappa).flatten()
    assert len(good) >= 10 and len(bad) >= 1, "the fixture must have both kinds of samples"
    with torch.no_grad():
        # every sample of the batch certified with margin κ: the term is exactly zero
        assert float(trainer.loss_terms(x_t[good], y_t[good])["robust"]) == 0.0
        # one sample that is not: the term is positive, and equals its shortfall averaged over the batch
        batch = torch.cat([good[:10], bad[:1]])
        term = float(trainer.loss_terms(x_t[batch], y_t[batch])["robust"])
        assert term > 0
        assert term == pytest.approx(float(kappa - worst[bad[0]]) / 11, rel=1e-4)
    per_sample = robust_term(lower, kappa)
    assert torch.equal(per_sample == 0, worst >= kappa)


def test_zero_robust_term_at_kappa_zero_agrees_with_the_certifier(data, budget, trained):
    x, y, _, _ = data
    trainer = WeightRobustTrainer(trained, budget, lam=1.0, verbose=False)
    x_t, y_t = trained.prepare_inputs(x, y)
    with torch.no_grad():
        network = read_network(trained.model, (64,))
        per_sample = robust_term(interval_margin_bounds(network, trainer._param_balls(), x_t, y_t, torch.float32), 0.0)
    certified = WeightPerturbationCertifier(trained, budget, method="interval", verbose=False).certify(x, y)
    assert 0.2 < certified.mean() < 0.9
    agree = np.mean((per_sample.numpy() == 0) == certified)
    assert agree >= 0.99  # float32 vs float64 + tolerance may differ on samples at the boundary


@pytest.mark.filterwarnings("ignore:robust training collapsed")  # λ = 2 on 256 points: a real, reported collapse
def test_warmup_ramps_lambda_and_eps_linearly_per_step(data, budget):
    x, y, _, _ = data
    history = WeightRobustTrainer(classifier(mlp()), budget, lam=2.0, warmup=4, verbose=False).fit(
        x, y, batch_size=64, nb_epochs=6
    )
    steps = 4  # 256 samples / 64 per batch
    ramp = [min(1.0, (steps * (e + 1) - 1) / (4 * steps)) for e in range(6)]
    np.testing.assert_allclose(history["lam"], 2.0 * np.array(ramp))
    np.testing.assert_allclose(history["eps_scale"], ramp)
    lam_only = WeightRobustTrainer(classifier(mlp()), budget, lam=2.0, warmup=4, ramp_eps=False, verbose=False).fit(
        x, y, batch_size=64, nb_epochs=2
    )
    assert lam_only["eps_scale"] == [1.0, 1.0] and lam_only["lam"] == pytest.approx(2.0 * np.array(ramp[:2]))
    no_warmup = WeightRobustTrainer(classifier(mlp()), budget, lam=2.0, warmup=0, verbose=False).fit(
        x, y, batch_size=64, nb_epochs=1
    )
    assert no_warmup["lam"] == [2.0] and no_warmup["eps_scale"] == [1.0]


@pytest.mark.parametrize("bound", ["interval", "paper"])
def test_eps_scale_scales_the_ball_of_the_robust_term(data, budget, trained, bound):
    """ε scale 0 leaves the plain margins (the robust term is the hinge on the network's own margins); scale s gives
    the robust term of the budget scaled by s."""
    x, y, _, _ = data
    trainer = WeightRobustTrainer(trained, budget, method=bound, kappa=0.5, verbose=False)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    with torch.no_grad():
        logits = trained.logits(xt)
        margins = logits.gather(1, yt[:, None]) - logits
        margins[torch.arange(len(yt)), yt] = float("inf")
        plain = torch.relu(0.5 - margins).amax(dim=1).mean()
        assert float(trainer.loss_terms(xt, yt, eps_scale=0.0)["robust"]) == pytest.approx(float(plain), rel=1e-5)
        half = trainer.loss_terms(xt, yt, eps_scale=0.5)["robust"]
        trainer.set_params(budget=budget.scaled(0.5))
        assert float(half) == pytest.approx(float(trainer.loss_terms(xt, yt)["robust"]), rel=1e-6)


def test_mu_shrinks_operator_norms(data, budget):
    x, y, _, _ = data
    norms = []
    for mu in (0.0, 0.05):
        clf = classifier(mlp(seed=0))
        torch.manual_seed(0)
        history = WeightRobustTrainer(clf, budget, lam=0.0, mu=mu, verbose=False).fit(x, y, nb_epochs=3)
        norms.append(history["norm"][-1])
    assert norms[1] < norms[0]


# ------------------------------------------------------------------------------------------------ ART plumbing
def test_the_users_optimizer_takes_the_steps(data, budget):
    x, y, _, _ = data

    class CountingSGD(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            CountingSGD.steps += 1
            return super().step(closure)

    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    clf = classifier(model, optimizer=CountingSGD(model.parameters(), lr=0.05, momentum=0.9))
    WeightRobustTrainer(clf, budget, lam=1.0, warmup=1, verbose=False).fit(x, y, batch_size=100, nb_epochs=2)
    assert CountingSGD.steps == 2 * 3  # ceil(256 / 100) steps per epoch
    state = clf._optimizer.state
    assert all("momentum_buffer" in state[p] for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_schedulers_are_stepped_once_per_epoch(data, budget):
    x, y, _, _ = data
    clf = classifier(mlp(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(clf._optimizer, step_size=1, gamma=0.5)
    history = WeightRobustTrainer(clf, budget, verbose=False).fit(x, y, nb_epochs=3, scheduler=scheduler)
    np.testing.assert_allclose(history["lr"], [0.005, 0.0025, 0.00125])
    clf = classifier(mlp(), lr=0.01)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(clf._optimizer, patience=0, factor=0.1, threshold=10.0)
    history = WeightRobustTrainer(clf, budget, lam=0.0, verbose=False).fit(x, y, nb_epochs=3, scheduler=plateau)
    assert history["lr"][-1] < 0.01  # the loss never improves by the huge threshold: the rate is cut


def test_scheduler_checks(data, budget):
    x, y, _, _ = data
    clf = classifier(mlp())
    trainer = WeightRobustTrainer(clf, budget, verbose=False)
    with pytest.raises(TypeError, match="scheduler"):
        trainer.fit(x, y, nb_epochs=1, scheduler="cosine")
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scheduler"):
        trainer.fit(x, y, nb_epochs=1, scheduler=torch.optim.lr_scheduler.StepLR(other, 1))


def test_fit_generator_with_numpy_and_pytorch_generators(data, budget):
    x, y, x_test, y_test = data
    clf = classifier(mlp(seed=2))
    trainer = WeightRobustTrainer(clf, budget, lam=0.5, warmup=1, verbose=False)
    history = trainer.fit_generator(NumpyDataGenerator(x, y, batch_size=64, shuffle=True), nb_epochs=3)
    assert len(history["loss"]) == 3 and history["loss"][-1] < history["loss"][0]
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=64, shuffle=True)
    history = trainer.fit_generator(PyTorchDataGenerator(loader, size=len(x), batch_size=64), nb_epochs=2)
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])
    assert np.mean(clf.predict(x_test).argmax(1) == y_test) > 0.3  # chance is 0.1
    with pytest.raises(TypeError, match="generator"):
        trainer.fit_generator((x, y))


def test_validation_history_and_nothing_written_to_disk(data, budget, tmp_path):
    import art.config

    x, y, x_test, y_test = data
    old = art.config.ART_DATA_PATH
    art.config.set_data_path(str(tmp_path))
    try:
        clf = classifier(mlp())
        history = WeightRobustTrainer(clf, budget, warmup=1, verbose=False).fit(
            x, y, validation_data=(x_test, y_test), nb_epochs=2
        )
    finally:
        art.config.set_data_path(old)
    assert os.listdir(tmp_path) == []
    for key in (*HISTORY_KEYS, "val_accuracy", "val_certified_accuracy"):
        assert len(history[key]) == 2, key
    assert history["collapsed"] is False and history["warnings"] == []
    predicted = clf.predict(x_test).argmax(1)
    assert history["val_accuracy"][-1] == pytest.approx(np.mean(predicted == y_test))
    certified = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False).certify(x_test, y_test)
    assert history["val_certified_accuracy"][-1] == pytest.approx(certified.mean())


def test_model_mode_is_restored_and_plain_art_classifier_is_accepted(data, budget):
    x, y, _, _ = data
    model = mlp()
    clf = PyTorchClassifier(model, nn.CrossEntropyLoss(), (64,), 10, optimizer=torch.optim.Adam(model.parameters()))
    model.eval()
    trainer = WeightRobustTrainer(clf, budget, verbose=False)
    trainer.fit(x, y, nb_epochs=1)
    assert not model.training
    assert trainer.get_classifier() is clf


def test_input_attack_replaces_a_ratio_of_each_batch(data, budget):
    x, y, _, _ = data
    clf = classifier(mlp())
    sizes = []

    class CountingFGM(FastGradientMethod):
        def generate(self, x, y=None, **kwargs):
            sizes.append(len(x))
            assert y is not None and y.shape == (len(x), 10)
            return super().generate(x, y, **kwargs)

    attack = CountingFGM(clf, eps=0.1)
    history = WeightRobustTrainer(clf, budget, attack=attack, ratio=0.25, verbose=False).fit(
        x, y, batch_size=64, nb_epochs=1
    )
    assert sizes == [16, 16, 16, 16]
    assert math.isfinite(history["loss"][0])


def test_batchnorm_cnn_trains_with_eval_semantics_bounds_and_batch_statistics(digits_images):
    x, y, _, _ = digits_images
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10))  # fmt: skip
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1, 8, 8), 10, optimizer=torch.optim.Adam(
        model.parameters(), lr=3e-3))  # fmt: skip
    mean_before = model[1].running_mean.clone()
    trainer = WeightRobustTrainer(clf, PerturbationBudget(0.01, "row_l1"), warmup=1, batch_norm="train", verbose=False)
    history = trainer.fit(x[:128], y[:128], nb_epochs=2, batch_size=64)
    assert all(math.isfinite(v) for v in history["loss"] + history["robust"])
    assert not torch.equal(mean_before, model[1].running_mean)  # CE ran batch norm in train mode


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lam": -1.0}, ValueError, "lam"),
        ({"lam": float("nan")}, ValueError, "lam"),
        ({"mu": float("inf")}, ValueError, "mu"),
        ({"kappa": -0.1}, ValueError, "kappa"),
        ({"lam": "1"}, TypeError, "lam"),
        ({"method": "crown"}, ValueError, "method"),
        ({"warmup": -1}, ValueError, "warmup"),
        ({"warmup": 1.5}, TypeError, "warmup"),
        ({"ramp_eps": 1}, TypeError, "ramp_eps"),
        ({"collapse_patience": 0}, ValueError, "collapse_patience"),
        ({"stop_on_collapse": None}, TypeError, "stop_on_collapse"),
        ({"ratio": 1.5}, ValueError, "ratio"),
        ({"attack": "pgd"}, TypeError, "attack"),
        ({"budget": 0.1}, TypeError, "budget"),
        ({"budget": PerturbationBudget(0.1, layers=["fc9"])}, ValueError, "valid layers"),
        ({"verbose": 1}, TypeError, "verbose"),
        ({"batch_norm": "fold"}, ValueError, "batch_norm"),
    ],
)
def test_bad_parameters_are_rejected(budget, kwargs, error, match):
    clf = classifier(mlp())
    params = {"budget": budget, **kwargs}
    with pytest.raises(error, match=match):
        WeightRobustTrainer(clf, **params)


def test_set_params_validates_before_assigning(budget):
    trainer = WeightRobustTrainer(classifier(mlp()), budget, lam=2.0, verbose=False)
    with pytest.raises(ValueError, match="ratio"):
        trainer.set_params(lam=3.0, ratio=2.0)
    assert trainer.lam == 2.0 and trainer.ratio == 0.5
    trainer.set_params(lam=3.0, method="paper")
    assert trainer.lam == 3.0 and trainer.method == "paper"
    with pytest.raises(ValueError, match="gamma"):
        trainer.set_params(gamma=1.0)
    trainer.lam = 5.0  # a public setting assigned directly goes through set_params: validated, kept
    assert trainer.lam == 5.0
    with pytest.raises(ValueError, match="lam"):
        trainer.lam = -1.0
    assert trainer.lam == 5.0


def test_bound_is_the_deprecated_spelling_of_method(budget):
    with pytest.warns(DeprecationWarning, match="use `method`"):
        trainer = WeightRobustTrainer(classifier(mlp()), budget, bound="paper", verbose=False)
    assert trainer.method == "paper"
    with pytest.raises(TypeError, match="both"):
        WeightRobustTrainer(classifier(mlp()), budget, bound="paper", method="linear", verbose=False)


def test_bad_classifiers_and_fit_arguments(data, budget):
    x, y, _, _ = data
    model = mlp()
    with pytest.raises(ValueError, match="optimizer"):
        WeightRobustTrainer(PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10), budget)
    with pytest.raises(TypeError, match="classifier"):
        WeightRobustTrainer(model, budget)
    clf = classifier(model)
    perturbed = clf.with_weight_perturbation(budget.sample(model, seed=0))
    with pytest.raises(ValueError, match="perturbation"):
        WeightRobustTrainer(perturbed, budget)
    trainer = WeightRobustTrainer(clf, budget, verbose=False)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.fit(x, y, batch_size=0)
    with pytest.raises(ValueError, match="nb_epochs"):
        trainer.fit(x, y, nb_epochs=0)
    with pytest.raises(ValueError, match="labels"):
        trainer.fit(x, y + 10, nb_epochs=1)
    with pytest.raises(ValueError, match="x"):
        trainer.fit(x[:, :10], y, nb_epochs=1)
    with pytest.raises(ValueError, match="validation_data"):
        trainer.fit(x, y, nb_epochs=1, validation_data=x)


def test_epoch_totals_equal_the_running_sums_and_handle_an_empty_epoch():
    from art_weightpert.defences.trainer.monitoring import EpochTotals

    gen = torch.Generator().manual_seed(0)
    totals, running = EpochTotals(4, torch.device("cpu")), torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(4, dtype=torch.long)
    for size in (5, 3, 7, 1):
        terms = {key: torch.rand((), generator=gen) for key in EpochTotals.TERMS}
        labels = torch.randint(0, 4, (size,), generator=gen)
        totals.add(terms, labels)
        running += torch.stack([terms[key] for key in EpochTotals.TERMS]).double() * size  # the previous running sum
        counts += torch.bincount(labels, minlength=4)
    sums, label_counts = totals.totals()
    np.testing.assert_allclose(list(sums.values()), running.numpy(), rtol=1e-15)
    np.testing.assert_array_equal(label_counts, counts.numpy())
    empty_sums, empty_counts = EpochTotals(4, torch.device("cpu")).totals()
    assert empty_sums == dict.fromkeys(EpochTotals.TERMS, 0.0)
    assert empty_counts.dtype == np.int64 and not empty_counts.any()
