"""PyTorchWeightClassifier: every ART code path sees the perturbation, exactly as if the weights had been changed by
hand, and nothing of the user's is ever modified."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from art.attacks.evasion import CarliniL2Method, FastGradientMethod, ProjectedGradientDescent
from art.defences.trainer import AdversarialTrainer
from art.estimators.classification import PyTorchClassifier
from art.metrics import clever_u
from conftest import make_mlp
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbation
from art_weightpert.estimators import eval_mode, input_warnings


@pytest.fixture(scope="module")
def data(digits):
    _, _, x_test, y_test = digits
    return x_test[:48], y_test[:48]


@pytest.fixture(scope="module")
def snapshot(tiny_mlp_classifier, data):
    """The user's weights and the clean predictions, taken before any perturbed estimator exists."""
    x, _ = data
    state = {k: v.detach().clone() for k, v in tiny_mlp_classifier.model.state_dict().items()}
    return state, tiny_mlp_classifier.predict(x)


@pytest.fixture(scope="module")
def budget():
    return PerturbationBudget(0.3, norm="inf", relative=True, include_bias=True)


@pytest.fixture(scope="module")
def delta(tiny_mlp_classifier, budget):
    return budget.sample(tiny_mlp_classifier.model, "uniform", seed=0)


@pytest.fixture(scope="module")
def perturbed(tiny_mlp_classifier, snapshot, delta):
    return tiny_mlp_classifier.with_weight_perturbation(delta)


def by_hand(classifier: PyTorchWeightClassifier, delta) -> PyTorchClassifier:
    """A plain ART classifier around a deep copy of the user's module whose weights were changed in place."""
    model = copy.deepcopy(classifier.base_model)
    with torch.no_grad():
        for name, d in delta.items():
            p = model.get_parameter(name)
            p.add_(torch.as_tensor(d, dtype=p.dtype, device=p.device))
    return PyTorchClassifier(
        model,
        nn.CrossEntropyLoss(),
        classifier.input_shape,
        classifier.nb_classes,
        optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
        clip_values=classifier.clip_values,
        device_type="gpu" if classifier.device.type == "cuda" else "cpu",
    )


@pytest.fixture(scope="module")
def hand(tiny_mlp_classifier, delta):
    return by_hand(tiny_mlp_classifier, delta)


def one_hot(y, k=10):
    return np.eye(k, dtype=np.float32)[y]


def assert_same(a, b, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# -------------------------------------------------------------------------------------------------- the basics
def test_perturbable_parameters_and_carried_perturbation(tiny_mlp_classifier, perturbed, delta, budget):
    expected = {"0.weight": (16, 64), "0.bias": (16,), "2.weight": (10, 16), "2.bias": (10,)}
    assert tiny_mlp_classifier.perturbable_parameters == expected
    assert perturbed.perturbable_parameters == expected  # keyed by the base module's names
    assert tiny_mlp_classifier.weight_perturbation is None
    carried = perturbed.weight_perturbation
    assert isinstance(carried, WeightPerturbation) and carried.budget == budget and set(carried) == set(delta)
    for name in delta:
        np.testing.assert_array_equal(carried[name], delta[name].astype(np.float32))
    assert perturbed.base_model is not tiny_mlp_classifier.model
    assert isinstance(perturbed, PyTorchWeightClassifier) and perturbed is not tiny_mlp_classifier


def test_predict_equals_the_hand_perturbed_model(tiny_mlp_classifier, perturbed, hand, data):
    x, _ = data
    p = perturbed.predict(x)
    assert_same(p, hand.predict(x))
    assert not np.allclose(p, tiny_mlp_classifier.predict(x), atol=1e-3)  # the perturbation matters
    assert_same(perturbed.predict(x, batch_size=7), p)


def test_loss_and_class_gradients_equal_the_hand_perturbed_model(perturbed, hand, data):
    x, y = data
    assert_same(perturbed.loss_gradient(x, one_hot(y)), hand.loss_gradient(x, one_hot(y)))
    assert_same(perturbed.loss_gradient(x, y), hand.loss_gradient(x, one_hot(y)))  # integer labels work too
    assert_same(perturbed.class_gradient(x, label=y), hand.class_gradient(x, label=y))
    assert_same(perturbed.class_gradient(x[:5]), hand.class_gradient(x[:5]))
    assert_same(perturbed.compute_loss(x, y), hand.compute_loss(x, one_hot(y)))


def test_art_attacks_on_the_perturbed_estimator_equal_the_hand_perturbed_model(perturbed, hand, data):
    x, y = data
    fgsm = {"eps": 0.1, "batch_size": 64}
    assert_same(FastGradientMethod(perturbed, **fgsm).generate(x), FastGradientMethod(hand, **fgsm).generate(x))
    pgd = {"eps": 0.1, "eps_step": 0.02, "max_iter": 5, "num_random_init": 0, "batch_size": 64, "verbose": False}
    x_pgd = ProjectedGradientDescent(perturbed, **pgd).generate(x, y=one_hot(y))
    assert_same(x_pgd, ProjectedGradientDescent(hand, **pgd).generate(x, y=one_hot(y)))
    assert np.abs(x_pgd - x).max() <= 0.1 + 1e-6 and np.abs(x_pgd - x).max() > 0.05
    cw = {"max_iter": 3, "binary_search_steps": 2, "learning_rate": 0.05, "batch_size": 16, "verbose": False}
    x_cw = CarliniL2Method(perturbed, **cw).generate(x[:16])
    assert_same(x_cw, CarliniL2Method(hand, **cw).generate(x[:16]), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy's Weibull fit inside clever_u
def test_code_that_calls_the_module_directly_sees_the_perturbation(perturbed, hand, data):
    x, _ = data
    x_t = torch.from_numpy(x).to(perturbed.device)
    with torch.no_grad(), eval_mode(perturbed.model), eval_mode(hand.model):
        assert_same(perturbed.model(x_t).cpu().numpy(), hand.model(x_t).cpu().numpy())
    np.random.seed(3)
    score = clever_u(perturbed, x[0], nb_batches=2, batch_size=4, radius=0.3, norm=2, pool_factor=2)
    np.random.seed(3)
    expected = clever_u(hand, x[0], nb_batches=2, batch_size=4, radius=0.3, norm=2, pool_factor=2)
    assert np.isfinite(score) and score == pytest.approx(expected, rel=1e-4)


def test_a_new_perturbation_replaces_the_carried_one(tiny_mlp_classifier, perturbed, data):
    x, _ = data
    other = PerturbationBudget(0.1, norm="row_l1", layers=["2"]).sample(tiny_mlp_classifier.model, seed=5)
    again = perturbed.with_weight_perturbation(other)  # relative to the original weights, not W + delta
    assert set(again.weight_perturbation) == {"2.weight"}
    assert_same(again.predict(x), by_hand(tiny_mlp_classifier, other).predict(x))
    clean = perturbed.with_weight_perturbation(None)
    assert clean.weight_perturbation is None
    assert_same(clean.predict(x), tiny_mlp_classifier.predict(x))
    raw = perturbed.with_weight_perturbation({"2.bias": np.full(10, 0.5, dtype=np.float32)})
    assert raw.weight_perturbation.budget is None
    assert_same(raw.predict(x, batch_size=64), by_hand(tiny_mlp_classifier, {"2.bias": np.full(10, 0.5)}).predict(x))


# ------------------------------------------------------------------------------------------ weight gradients
def test_loss_gradient_weights_matches_hand_autograd(perturbed, hand, data):
    x, y = data
    grads = perturbed.loss_gradient_weights(x, y, batch_size=20)  # accumulated over three batches
    model = hand.model
    model.zero_grad()
    with eval_mode(model):
        loss = nn.functional.cross_entropy(
            model(torch.from_numpy(x).to(hand.device)), torch.from_numpy(y).to(hand.device)
        )
    loss.backward()
    assert set(grads) == set(perturbed.perturbable_parameters)
    for name, g in grads.items():
        assert g.shape == perturbed.perturbable_parameters[name]
        assert_same(g, model.get_parameter(name).grad.cpu().numpy(), rtol=1e-4, atol=1e-6)
    model.zero_grad()
    only = perturbed.loss_gradient_weights(x, one_hot(y), names=["2.weight"])
    assert list(only) == ["2.weight"]
    assert_same(only["2.weight"], grads["2.weight"], rtol=1e-4, atol=1e-6)


def test_loss_gradient_weights_matches_a_finite_difference(tiny_mlp_classifier, delta, data):
    x, y = data
    grads = tiny_mlp_classifier.with_weight_perturbation(delta).loss_gradient_weights(x, y)
    norm = np.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    h = 1e-2

    def loss_at(t):
        moved = {k: delta.get(k, 0) + t * grads[k] / norm for k in grads}
        clf = tiny_mlp_classifier.with_weight_perturbation(moved)
        return float(clf.compute_loss(x, y, reduction="mean"))

    directional = (loss_at(h) - loss_at(-h)) / (2 * h)  # derivative along g/|g| is |g|
    assert directional == pytest.approx(norm, rel=2e-2)


# -------------------------------------------------------------------------------------------- ART machinery
def test_adversarial_trainer_trains_a_perturbed_estimator(tiny_mlp_classifier, snapshot, delta, digits):
    x_train, y_train, x_test, y_test = digits
    model = tiny_mlp_classifier.with_weight_perturbation(delta)
    before = {k: v.detach().clone() for k, v in model.base_model.state_dict().items()}
    trainer = AdversarialTrainer(model, FastGradientMethod(model, eps=0.05), ratio=0.5)
    trainer.fit(x_train[:512], y_train[:512], nb_epochs=1, batch_size=64)
    after = model.base_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    for name in delta:  # the perturbation stayed on top of the trained weights
        np.testing.assert_array_equal(model.weight_perturbation[name], delta[name].astype(np.float32))
    accuracy = (model.predict(x_test).argmax(1) == y_test).mean()
    assert accuracy > 0.5
    state, _ = snapshot
    for name, value in tiny_mlp_classifier.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_fit_on_a_perturbed_estimator_leaves_the_original_alone(tiny_mlp_classifier, snapshot, delta, data):
    x, y = data
    model = tiny_mlp_classifier.with_weight_perturbation(delta)
    model.fit(x, y, nb_epochs=2, batch_size=16, verbose=False)
    state, predictions = snapshot
    np.testing.assert_array_equal(tiny_mlp_classifier.predict(x), predictions)
    for name, value in tiny_mlp_classifier.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_clone_for_refitting_keeps_the_perturbation(perturbed, delta, data):
    x, y = data
    clone = perturbed.clone_for_refitting()
    assert isinstance(clone, PyTorchWeightClassifier)
    for name in delta:
        np.testing.assert_array_equal(clone.weight_perturbation[name], perturbed.weight_perturbation[name])
    assert clone.weight_perturbation.budget == perturbed.weight_perturbation.budget
    assert clone.clip_values is not None and np.array_equal(clone.clip_values, perturbed.clip_values)
    assert clone.base_model is not perturbed.base_model
    reference = perturbed.predict(x)
    clone.fit(x, y, nb_epochs=1, batch_size=16, verbose=False)
    np.testing.assert_array_equal(perturbed.predict(x), reference)  # refitting the clone changes nothing here


def test_pickle_round_trip_keeps_the_perturbation(perturbed, data):
    x, _ = data
    restored = pickle.loads(pickle.dumps(perturbed))
    assert isinstance(restored, PyTorchWeightClassifier)
    np.testing.assert_array_equal(restored.predict(x), perturbed.predict(x))
    assert restored.weight_perturbation.budget == perturbed.weight_perturbation.budget
    for name, value in perturbed.weight_perturbation.items():
        np.testing.assert_array_equal(restored.weight_perturbation[name], value)
    state = restored.model.state_dict()  # the deltas are buffers of the module
    assert any(k.startswith("delta_") for k in state)


def test_get_params_and_set_params(perturbed, data):
    x, _ = data
    model = perturbed.with_weight_perturbation(perturbed.weight_perturbation)
    params = model.get_params()
    assert {"model", "loss", "clip_values", "nb_classes", "input_shape"} <= set(params)
    reference = model.predict(x)
    model.set_params(**params)  # a no-op round trip
    np.testing.assert_array_equal(model.predict(x), reference)
    assert model.weight_perturbation is not None
    model.set_params(clip_values=(0.0, 2.0))
    assert tuple(model.clip_values) == (0.0, 2.0)
    fresh = make_mlp(seed=9)
    model.set_params(model=fresh)
    assert model.base_model is fresh and model.weight_perturbation is None
    with torch.no_grad(), eval_mode(fresh):
        expected = fresh(torch.from_numpy(x).to(model.device)).cpu().numpy()
    assert_same(model.predict(x), expected)
    with pytest.raises(TypeError, match="model"):
        model.set_params(model="a module")


def test_from_classifier(tiny_mlp_classifier, delta, data):
    x, _ = data
    module = copy.deepcopy(tiny_mlp_classifier.model)
    art_clf = PyTorchClassifier(
        module, nn.CrossEntropyLoss(), (64,), 10, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        clip_values=(0.0, 1.0), preprocessing=(0.1, 0.9),
    )  # fmt: skip
    wrapped = PyTorchWeightClassifier.from_classifier(art_clf)
    assert isinstance(wrapped, PyTorchWeightClassifier) and wrapped.model is module  # nothing copied
    assert wrapped.preprocessing is art_clf.preprocessing and wrapped._optimizer is art_clf._optimizer
    np.testing.assert_array_equal(wrapped.predict(x), art_clf.predict(x))
    perturbed = wrapped.with_weight_perturbation(delta)
    hand = by_hand(wrapped, delta)
    hand.set_params(preprocessing=(0.1, 0.9))
    assert_same(perturbed.predict(x), hand.predict(x))
    assert isinstance(perturbed._optimizer, torch.optim.SGD)
    assert PyTorchWeightClassifier.from_classifier(wrapped) is wrapped
    with pytest.raises(TypeError, match="classifier"):
        PyTorchWeightClassifier.from_classifier("not a classifier")


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_perturbations(tiny_mlp_classifier):
    clf = tiny_mlp_classifier
    with pytest.raises(ValueError, match=r"unknown parameter 'fc.weight'; parameters are \['0.weight'"):
        clf.with_weight_perturbation({"fc.weight": np.zeros((16, 64))})
    with pytest.raises(ValueError, match=r"'2.weight' has shape \(16, 10\); the parameter has shape \(10, 16\)"):
        clf.with_weight_perturbation({"2.weight": np.zeros((16, 10))})
    with pytest.raises(ValueError, match="'2.bias' contains NaN or inf"):
        clf.with_weight_perturbation({"2.bias": np.full(10, np.nan)})
    with pytest.raises(TypeError, match="delta"):
        clf.with_weight_perturbation([np.zeros((16, 64))])
    with pytest.raises(TypeError, match="delta"):
        clf.with_weight_perturbation(np.zeros((16, 64)))
    with pytest.raises(TypeError, match="model"):
        PyTorchWeightClassifier("model", nn.CrossEntropyLoss(), (64,), 10)


def test_bad_inputs_and_labels(perturbed, data):
    x, y = data
    with pytest.raises(ValueError, match=r"`x` has shape \(48, 8, 8\); expected \(N, 64\)"):
        perturbed.prepare_inputs(x.reshape(-1, 8, 8))
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="`x` contains NaN or inf"):
        perturbed.loss_gradient_weights(bad, y)
    with pytest.raises(TypeError, match="`x` must be a numpy array"):
        perturbed.prepare_inputs(x.tolist())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        perturbed.loss_gradient_weights(x, np.where(np.arange(48) == 0, 10, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        perturbed.prepare_inputs(x, -np.ones(48, dtype=int))
    with pytest.raises(ValueError, match="47 labels for 48 inputs"):
        perturbed.prepare_inputs(x, y[:47])
    with pytest.raises(ValueError, match="integer class labels"):
        perturbed.prepare_inputs(x, y + 0.5)
    with pytest.raises(ValueError, match=r"`y` must have shape"):
        perturbed.prepare_inputs(x, np.zeros((48, 3)))
    with pytest.raises(ValueError, match="labels `y` are required"):
        perturbed.prepare_inputs(x, None, require_labels=True)
    x_t, y_t = perturbed.prepare_inputs(x, one_hot(y))
    assert x_t.dtype == torch.float32 and y_t.dtype == torch.int64 and torch.equal(y_t.cpu(), torch.from_numpy(y))


# ------------------------------------------------------------------------------------------ likely mistakes
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget the call sites already warned about, and show every warning (the once-per-site rule is ours)."""
    monkeypatch.setattr(input_warnings, "_WARNED_SITES", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def messages(caught, match):
    return [str(w.message) for w in caught if match in str(w.message)]


def test_inputs_outside_clip_values_warn_once_per_call_site(tiny_mlp_classifier, data, fresh_warnings):
    x, _ = data
    assert tiny_mlp_classifier.clip_values is not None
    tiny_mlp_classifier.predict(x)  # inside [0, 1]: silent
    assert messages(fresh_warnings, "clip_values") == []
    for _ in range(3):
        tiny_mlp_classifier.predict(x * 16)  # one call site, three calls: one warning
    found = messages(fresh_warnings, "clip_values")
    assert len(found) == 1 and "[0, 16]" in found[0] and "(0, 1)" in found[0]
    assert fresh_warnings[0].filename == __file__  # attributed to the caller, not to the library
    tiny_mlp_classifier.prepare_inputs(x - 0.5)  # another call site (the library's own entry point): warns again
    assert len(messages(fresh_warnings, "clip_values")) == 2


def test_8bit_images_without_clip_values_warn(data, fresh_warnings):
    x, _ = data
    clf = PyTorchWeightClassifier(make_mlp(seed=0), nn.CrossEntropyLoss(), (64,), 10)
    assert clf.clip_values is None
    clf.predict(x)
    clf.predict((x - 0.5) * 40.0)  # standardized-looking floats: not images, silent
    assert messages(fresh_warnings, "8-bit") == []
    clf.predict(np.round(x * 255.0))
    clf.prepare_inputs(np.round(x * 255.0).astype(np.uint8))
    found = messages(fresh_warnings, "8-bit")
    assert len(found) == 2 and "Divide by 255" in found[0] and "[0, 255]" in found[0]


class FailsOnZeros(nn.Module):
    """A model whose forward cannot run on the probe's zero input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(x.any()):
            raise RuntimeError("needs non-zero inputs")
        return self.fc(x)


def test_nb_classes_that_disagree_with_the_model_are_an_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 5))
    model.train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`nb_classes=10` disagrees with the model, which outputs 5 values"):
        PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10)
    assert all(m.training for m in model.modules())  # train flags as they were
    for name, value in model.state_dict().items():  # weights and running statistics untouched
        assert torch.equal(value, state[name]), name
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 5)
    assert clf.nb_classes == 5 and all(m.training for m in model.modules())
    plain = PyTorchClassifier(model, nn.CrossEntropyLoss(), (64,), 10)  # ART itself does not check
    with pytest.raises(ValueError, match="disagrees"):
        PyTorchWeightClassifier.from_classifier(plain)
    assert PyTorchWeightClassifier(FailsOnZeros(), nn.CrossEntropyLoss(), (64,), 7).nb_classes == 7  # probe skipped


# ------------------------------------------------------------------------------------------------ at the end
def test_user_module_and_original_estimator_are_unchanged(tiny_mlp_classifier, snapshot, delta, data):
    """Runs last in this module: after everything above (and a fresh round here), the user's state dict and the
    original estimator's predictions are bit-identical to the snapshot."""
    x, y = data
    model = tiny_mlp_classifier.with_weight_perturbation(delta)
    model.fit(x, y, nb_epochs=1, batch_size=16, verbose=False)
    FastGradientMethod(model, eps=0.1).generate(x)
    model.loss_gradient_weights(x, y)
    with pytest.raises(RuntimeError):  # a forward pass that fails half way through the perturbed module
        model.predict(x[:, :10])
    state, predictions = snapshot
    current = tiny_mlp_classifier.model.state_dict()
    assert set(current) == set(state)
    for name, value in current.items():
        assert torch.equal(value, state[name]), name
    np.testing.assert_array_equal(tiny_mlp_classifier.predict(x), predictions)
    assert tiny_mlp_classifier.weight_perturbation is None
