"""Tests of the weight attacks: WeightAttack plumbing, WeightPGD and RandomWeightPerturbation (the shared ascent
loop: test_ascent.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from art.exceptions import EstimatorError
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, RandomWeightPerturbation, WeightPGD
from art_weightpert.attacks import base as attacks_base

LAYERS = ["0", "2", "4"]  # the Linear layers of the reference MLP


def accuracy(classifier, x, y, delta=None):
    if delta is not None:
        classifier = classifier.with_weight_perturbation(delta)
    return float(np.mean(classifier.predict(x).argmax(axis=1) == y))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"parameter {name} was modified"
    assert all(p.grad is None for p in model.parameters()), "the attack left gradients on the user's parameters"


# ------------------------------------------------------------------------------------------------ the ball
@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("layers", [None, ["2"]])
def test_every_perturbation_lies_in_its_ball(clf, test_data, norm, relative, layers):
    x, y = test_data
    eps = 0.1 if relative else {"inf": 0.02, "row_l1": 0.3, "l2": 0.5}[norm]
    budget = PerturbationBudget(eps, norm, layers=layers, relative=relative)
    model = clf.base_model
    pgd = WeightPGD(clf, budget, max_iter=4, num_random_init=2, verbose=False).generate(x[:200], y[:200])
    draws = [
        RandomWeightPerturbation(clf, budget, distribution=dist, seed=1, verbose=False).generate()
        for dist in ("uniform", "extreme", "gaussian")
    ]
    for delta in [pgd, *draws]:
        assert delta.budget == budget
        assert budget.contains(delta, model)
        expected = {t.param_name for t in budget.parameter_balls(model)}
        assert set(delta) == expected
    # the attack uses its budget: PGD reaches the boundary of the ball in every perturbed parameter
    for target in budget.parameter_balls(model):
        norm_value = target.ball.norm(torch.as_tensor(pgd[target.param_name], dtype=torch.float64))
        assert float(norm_value) > 0.5 * float(target.radius.max())


def test_biases_stay_in_their_ball(clf, test_data):
    x, y = test_data
    budget = PerturbationBudget(0.02, "inf", include_bias=True)
    delta = WeightPGD(clf, budget, max_iter=3, verbose=False).generate(x[:100], y[:100])
    assert {"0.bias", "2.bias", "4.bias"} <= set(delta)
    assert budget.contains(delta, clf.base_model)
    assert not PerturbationBudget(0.02, "inf").contains(delta, clf.base_model)


def test_conv_model_perturbation_in_ball(digits_images):
    from art_weightpert.zoo import digits_cnn, make_classifier

    x_train, y_train, _, _ = digits_images
    cnn = make_classifier(digits_cnn(seed=0), (1, 8, 8))
    budget = PerturbationBudget(0.05, "row_l1", relative=True)
    before = snapshot(cnn.model)
    delta = WeightPGD(cnn, budget, max_iter=3, verbose=False).generate(x_train[:64], y_train[:64])
    assert budget.contains(delta, cnn.model)
    assert delta["0.weight"].shape == (8, 1, 3, 3)
    assert_unchanged(cnn.model, before)


# ------------------------------------------------------------------------------------------------ weights safe
def test_weights_unchanged_after_generate(clf, test_data):
    x, y = test_data
    model = clf.base_model
    before = snapshot(model)
    model.train()
    try:
        budget = PerturbationBudget(0.02, "inf")
        WeightPGD(clf, budget, max_iter=3, verbose=False).generate(x[:100], y[:100])
        WeightPGD(clf, budget, max_iter=3, verbose=False).generate_estimator(x[:100], y[:100])
        RandomWeightPerturbation(clf, budget, nb_samples=2, verbose=False).evaluate(x[:100], y[:100])
        assert model.training and all(m.training for m in model.modules()), "training flags were not restored"
    finally:
        model.eval()
    assert_unchanged(model, before)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_weights_unchanged_when_the_loss_raises_half_way(clf, test_data, monkeypatch, error):
    x, y = test_data
    model = clf.base_model
    before = snapshot(model)
    calls = {"n": 0}
    real_objective = attacks_base.objective

    def failing_objective(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise error("boom")
        return real_objective(*args, **kwargs)

    monkeypatch.setattr(attacks_base, "objective", failing_objective)
    model.train()
    try:
        attack = WeightPGD(clf, PerturbationBudget(0.05, "inf"), max_iter=10, batch_size=64, verbose=False)
        with pytest.raises(error, match="boom"):
            attack.generate(x[:200], y[:200])
        assert calls["n"] == 6  # it failed half way: second batch of the second iteration (4 batches each)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert_unchanged(model, before)


def test_weights_unchanged_when_random_evaluation_raises(clf, test_data, monkeypatch):
    x, y = test_data
    model = clf.base_model
    before = snapshot(model)
    calls = {"n": 0}
    real_logits = PyTorchWeightClassifier.logits

    def failing_logits(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return real_logits(self, *args, **kwargs)

    monkeypatch.setattr(PyTorchWeightClassifier, "logits", failing_logits)
    with pytest.raises(RuntimeError, match="boom"):
        RandomWeightPerturbation(clf, PerturbationBudget(0.5, "inf"), nb_samples=5, verbose=False).evaluate(x, y)
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ strength
def test_pgd_drops_accuracy_where_random_faults_do_not(clf, test_data):
    x, y = test_data
    budget = PerturbationBudget(0.01, "inf")
    clean = accuracy(clf, x, y)
    random = RandomWeightPerturbation(clf, budget, nb_samples=20, seed=0, verbose=False).evaluate(x, y)
    assert random["clean"] == pytest.approx(clean)
    assert clean - random["mean"] <= 0.05  # random faults of this size are harmless...
    delta = WeightPGD(clf, budget, verbose=False).generate(x, y)
    attacked = accuracy(clf, x, y, delta)
    assert clean - attacked >= 0.30, (clean, random["mean"], attacked)  # ...the adversarial one is not


@pytest.mark.parametrize(
    ("norm", "eps", "relative"),
    [("inf", 0.005, False), ("row_l1", 0.2, False), ("l2", 0.3, False), ("inf", 0.05, True), ("l2", 0.05, True)],
)
def test_pgd_never_above_mean_random_accuracy(clf, test_data, norm, eps, relative):
    x, y = test_data
    budget = PerturbationBudget(eps, norm, relative=relative)
    random = RandomWeightPerturbation(clf, budget, nb_samples=5, seed=0, verbose=False).evaluate(x, y)
    attacked = accuracy(clf, x, y, WeightPGD(clf, budget, max_iter=10, verbose=False).generate(x, y))
    assert attacked <= random["mean"]
    assert attacked <= random["min"]


@pytest.mark.parametrize(("norm", "eps"), [("inf", 0.005), ("row_l1", 0.2), ("l2", 0.3)])
@pytest.mark.parametrize("eps_step", [None, 0.1])
def test_more_iterations_or_restarts_never_weaker(clf, test_data, norm, eps, eps_step):
    x, y = test_data
    budget = PerturbationBudget(eps, norm)

    def run(**kwargs):
        torch.manual_seed(123)  # the attack's random starts are seeded from torch's global generator
        attack = WeightPGD(clf, budget, eps_step=eps_step, verbose=False, **kwargs)
        return accuracy(clf, x, y, attack.generate(x, y))

    short, long = run(max_iter=3), run(max_iter=12)
    assert long <= short
    assert run(max_iter=3, num_random_init=3) <= short
    assert run(max_iter=0) >= short


def test_targeted_mode_raises_the_target_rate(clf, test_data):
    x, y = test_data
    target = 3
    budget = PerturbationBudget(0.01, "inf")
    before = float(np.mean(clf.predict(x).argmax(axis=1) == target))
    targets = np.full(len(x), target)
    delta = WeightPGD(clf, budget, targeted=True, verbose=False).generate(x, targets)
    after = float(np.mean(clf.with_weight_perturbation(delta).predict(x).argmax(axis=1) == target))
    assert after >= before + 0.3, (before, after)
    margin = WeightPGD(clf, budget, targeted=True, loss="margin", verbose=False).generate(x, targets)
    assert float(np.mean(clf.with_weight_perturbation(margin).predict(x).argmax(axis=1) == target)) >= before + 0.3


def test_margin_loss_and_unlabelled_data(clf, test_data):
    x, y = test_data
    budget = PerturbationBudget(0.01, "inf")
    clean = accuracy(clf, x, y)
    assert accuracy(clf, x, y, WeightPGD(clf, budget, loss="margin", verbose=False).generate(x, y)) <= clean - 0.3
    # y=None attacks the model's own predictions
    assert accuracy(clf, x, y, WeightPGD(clf, budget, verbose=False).generate(x)) <= clean - 0.3
    # one-hot labels are accepted
    one_hot = np.eye(10)[y]
    assert budget.contains(WeightPGD(clf, budget, max_iter=2, verbose=False).generate(x, one_hot), clf.base_model)


# ------------------------------------------------------------------------------------------------ ART plumbing
def test_generate_estimator_carries_the_perturbation(clf, test_data):
    x, y = test_data
    budget = PerturbationBudget(0.01, "inf")
    torch.manual_seed(0)
    delta = WeightPGD(clf, budget, max_iter=5, verbose=False).generate(x, y)
    torch.manual_seed(0)
    perturbed = WeightPGD(clf, budget, max_iter=5, verbose=False).generate_estimator(x, y)
    assert isinstance(perturbed, PyTorchWeightClassifier) and perturbed is not clf
    assert clf.weight_perturbation is None
    carried = perturbed.weight_perturbation
    assert set(carried) == set(delta)
    for name in delta:
        np.testing.assert_allclose(carried[name], delta[name], atol=1e-7)
    assert accuracy(perturbed, x, y) == pytest.approx(accuracy(clf, x, y, delta))


def test_any_art_pytorch_classifier_is_wrapped(clf, test_data):
    x, y = test_data
    plain = PyTorchClassifier(clf.model, nn.CrossEntropyLoss(), (64,), 10, clip_values=(0.0, 1.0))
    attack = WeightPGD(plain, PerturbationBudget(0.01, "inf"), max_iter=2, verbose=False)
    assert isinstance(attack.estimator, PyTorchWeightClassifier)
    assert isinstance(attack.generate_estimator(x[:50], y[:50]), PyTorchWeightClassifier)
    with pytest.raises(EstimatorError):
        WeightPGD(object(), PerturbationBudget(0.01, "inf"))


def test_art_input_space_tooling_refuses_a_weight_attack(clf):
    """ART's adversarial training accepts only evasion attacks; a weight attack, whose ``generate`` returns no
    inputs, must be refused there rather than break half way (ART 1.20.1 accepts any EvasionAttack)."""
    from art.defences.trainer import AdversarialTrainer

    with pytest.raises(ValueError, match="EvasionAttack"):
        AdversarialTrainer(clf, WeightPGD(clf, PerturbationBudget(0.01, "inf"), verbose=False))


def test_set_params_validates_before_assigning(clf):
    attack = WeightPGD(clf, PerturbationBudget(0.01, "inf"), max_iter=7, verbose=False)
    with pytest.raises(ValueError, match="max_iter"):
        attack.set_params(max_iter=-1)
    assert attack.max_iter == 7
    with pytest.raises(ValueError, match="eps_step"):
        attack.set_params(max_iter=3, eps_step=0.0)
    assert attack.max_iter == 7 and attack.eps_step is None
    with pytest.raises(ValueError, match="cannot be set"):
        attack.set_params(bogus=1)
    with pytest.raises(ValueError, match="valid layers"):
        attack.set_params(budget=PerturbationBudget(0.01, "inf", layers=["nope"]))
    attack.set_params(max_iter=3, loss="margin")
    assert attack.max_iter == 3 and attack.loss == "margin"


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"eps_step": 0.0}, ValueError, "eps_step"),
        ({"eps_step": -0.1}, ValueError, "eps_step"),
        ({"eps_step": float("nan")}, ValueError, "eps_step"),
        ({"max_iter": -1}, ValueError, "max_iter"),
        ({"max_iter": 2.5}, TypeError, "max_iter"),
        ({"num_random_init": -1}, ValueError, "num_random_init"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"loss": "hinge"}, ValueError, "loss"),
        ({"targeted": "yes"}, TypeError, "targeted"),
        ({"verbose": 1}, TypeError, "verbose"),
    ],
)
def test_bad_parameters_are_rejected(clf, kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightPGD(clf, PerturbationBudget(0.01, "inf"), **kwargs)


def test_bad_budgets_are_rejected(clf):
    with pytest.raises(TypeError, match="budget"):
        WeightPGD(clf, 0.01)
    with pytest.raises(ValueError, match=r"valid layers are \['0', '2', '4'\]"):
        WeightPGD(clf, PerturbationBudget(0.01, "inf", layers=["fc9"]))
    with pytest.raises(ValueError, match="nb_samples"):
        RandomWeightPerturbation(clf, PerturbationBudget(0.01, "inf"), nb_samples=0)
    with pytest.raises(ValueError, match="distribution"):
        RandomWeightPerturbation(clf, PerturbationBudget(0.01, "inf"), distribution="bits")
    with pytest.raises(ValueError, match="seed"):
        RandomWeightPerturbation(clf, PerturbationBudget(0.01, "inf"), seed=-3)


def test_bad_data_is_rejected(clf, test_data):
    x, y = test_data
    x, y = x[:20], y[:20]
    attack = WeightPGD(clf, PerturbationBudget(0.01, "inf"), max_iter=1, verbose=False)
    random = RandomWeightPerturbation(clf, PerturbationBudget(0.01, "inf"), nb_samples=1, verbose=False)
    for run in (attack.generate, random.evaluate):
        with pytest.raises(ValueError, match="labels"):
            run(x, y[:-1])
        with pytest.raises(ValueError, match=r"`y` must have shape"):
            run(x, np.zeros((20, 3)))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
            run(x, y + 10)
        x_nan = x.copy()
        x_nan[3, 5] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            run(x_nan, y)
        with pytest.raises(ValueError, match="shape"):
            run(x[:, :10], y)
    with pytest.raises(ValueError, match="required"):
        WeightPGD(clf, PerturbationBudget(0.01, "inf"), targeted=True, verbose=False).generate(x)


# ------------------------------------------------------------------------------------------------ random faults
def test_random_evaluation_is_reproducible_and_complete(clf, test_data):
    x, y = test_data
    budget = PerturbationBudget(0.05, "inf")
    first = RandomWeightPerturbation(clf, budget, nb_samples=6, seed=7, verbose=False).evaluate(x, y)
    again = RandomWeightPerturbation(clf, budget, nb_samples=6, seed=7, verbose=False).evaluate(x, y)
    other = RandomWeightPerturbation(clf, budget, nb_samples=6, seed=8, verbose=False).evaluate(x, y)
    assert set(first) >= {"mean", "std", "min", "max", "quantiles", "accuracies"}
    np.testing.assert_array_equal(first["accuracies"], again["accuracies"])
    assert not np.array_equal(first["accuracies"], other["accuracies"])
    acc = first["accuracies"]
    assert acc.shape == (6,)
    assert first["mean"] == pytest.approx(acc.mean()) and first["std"] == pytest.approx(acc.std())
    assert first["min"] == acc.min() and first["max"] == acc.max()
    quantiles = first["quantiles"]
    assert sorted(quantiles) == [0.05, 0.25, 0.5, 0.75, 0.95]
    values = [quantiles[q] for q in sorted(quantiles)]
    assert values == sorted(values) and acc.min() <= values[0] and values[-1] <= acc.max()
    # generate() with a seed is the first draw of evaluate()'s stream, and reproducible
    one = RandomWeightPerturbation(clf, budget, seed=7, verbose=False).generate()
    two = RandomWeightPerturbation(clf, budget, seed=7, verbose=False).generate(x)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    assert accuracy(clf, x, y, one) == pytest.approx(acc[0])


def test_extreme_box_faults_sit_on_the_vertices(clf):
    budget = PerturbationBudget(0.01, "inf")
    delta = RandomWeightPerturbation(clf, budget, distribution="extreme", seed=0, verbose=False).generate()
    for value in delta.values():
        np.testing.assert_allclose(np.abs(value), 0.01, rtol=1e-6)
    relative = PerturbationBudget(0.1, "inf", relative=True)
    delta = RandomWeightPerturbation(clf, relative, distribution="extreme", seed=0, verbose=False).generate()
    weight = clf.base_model.get_parameter("2.weight").detach().numpy()
    np.testing.assert_allclose(np.abs(delta["2.weight"]), 0.1 * np.abs(weight), rtol=1e-5)


def test_progress_bars_when_verbose(clf, test_data, capsys):
    x, y = test_data
    budget = PerturbationBudget(0.01, "inf")
    WeightPGD(clf, budget, max_iter=2, verbose=True).generate(x[:50], y[:50])
    RandomWeightPerturbation(clf, budget, nb_samples=2, verbose=True).evaluate(x[:50], y[:50])
    err = capsys.readouterr().err
    assert "WeightPGD" in err and "RandomWeightPerturbation" in err
    WeightPGD(clf, budget, max_iter=2, verbose=False).generate(x[:50], y[:50])
    assert "WeightPGD" not in capsys.readouterr().err
