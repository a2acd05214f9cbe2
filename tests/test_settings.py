"""Settings cannot go stale (issue 22): every public setting of every class that computes a result, changed after a
first call (by ``set_params`` or by assigning the attribute), gives what a fresh object built with the new value
gives; no cache survives a change of settings or of the weights; rejected values leave the object unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_classifier, make_mlp

from art_weightpert import PerturbationBudget, WeightPerturbation
from art_weightpert.attacks import (
    BackdoorResult,
    BitFlipAttack,
    BitFlipBackdoor,
    FloatBitFlipAttack,
    JointWeightInputPGD,
    PerSampleWeightPGD,
    RandomBitFlips,
    RandomFloatBitFlips,
    RandomWeightPerturbation,
    WeightPGD,
)
from art_weightpert.certification import BitFlipCertifier, WeightPerturbationCertifier

BOX = PerturbationBudget(0.002, "inf")
OTHER = PerturbationBudget(0.05, "l2", layers=["2"])


@pytest.fixture(scope="module")
def clf(digits):
    """A private digits MLP 64-16-10 (the tests below change its weights)."""
    x_train, y_train, _, _ = digits
    classifier = make_classifier(make_mlp(seed=3), lr=0.02)
    classifier.fit(x_train, y_train, batch_size=128, nb_epochs=3, verbose=False)
    return classifier


@pytest.fixture(scope="module")
def data(digits):
    _, _, x_test, y_test = digits
    return x_test[:24], y_test[:24]


def _certifier_run(obj, x, y):
    return obj.certify(x, y), obj.margin_lower_bounds(x, y)


def _radius_run(obj, x, y):
    return obj.certified_radius(x[:4], y[:4]), obj.margin_lower_bounds(x, y)


def _flips_run(obj, x, y):
    return obj.certified_flips(x, y), obj.margin_lower_bounds(x, y)


def _generate(obj, x, y):
    return obj.generate(x, y)


def _search(obj, x, y):
    return obj.generate(x, y), obj.history_


def _draws(obj, x, y):
    return obj.generate(), obj.evaluate(x, y)["accuracies"]


def _per_sample(obj, x, y):
    return obj.generate(x, y)["margins"]


# class, constructor keywords, run, {setting: new value} (a tuple of pairs: settings changed together)
CASES = [
    (WeightPerturbationCertifier, {"budget": BOX}, _radius_run,
     [("budget", OTHER), ("method", "interval"), ("batch_size", 5), ("verbose", True), ("dtype", torch.float32)]),
    (BitFlipCertifier, {}, _flips_run,
     [("max_flips", 2), ("n_bits", 4), ("granularity", "channel"), ("layers", ["2"]), ("method", "interval"),
      ("batch_size", 5), ("verbose", True), ("encoding", "float"), ("bits", [0, 1, 7])]),
    (WeightPGD, {"budget": BOX, "max_iter": 3}, _generate,
     [("budget", OTHER), ("max_iter", 5), ("eps_step", 0.3), ("num_random_init", 0), ("targeted", True),
      ("loss", "margin"), ("batch_size", 7), ("verbose", True)]),
    (RandomWeightPerturbation, {"budget": BOX, "nb_samples": 3, "seed": 0}, _draws,
     [("budget", OTHER), ("nb_samples", 5), ("distribution", "extreme"), ("seed", 1), ("batch_size", 7),
      ("verbose", True)]),
    (JointWeightInputPGD, {"budget": BOX, "input_eps": 0.1, "max_iter": 3}, _generate,
     [("budget", OTHER), ("input_eps", 0.2), ("input_norm", 2), ("input_eps_step", 0.05), ("max_iter", 4),
      ("verbose", True), ("weight_eps_step", 0.5), ("loss", "margin"), ("batch_size", 7)]),
    (PerSampleWeightPGD, {"budget": BOX, "max_iter": 3, "num_random_init": 1}, _per_sample,
     [("budget", OTHER), ("max_iter", 4), ("num_random_init", 0), ("eps_step", 0.2), ("batch_size", 5),
      ("float64", False), ("verbose", True)]),
    (BitFlipAttack, {"max_flips": 2, "top_k": 10, "nb_candidates": 2}, _search,
     [("max_flips", 3), ("n_bits", 4), ("granularity", "channel"), ("layers", ["2"]), ("targeted", True),
      ("top_k", 5), ("nb_candidates", 1), ("stop_accuracy", 0.9), ("batch_size", 7), ("verbose", True)]),
    (RandomBitFlips, {"nb_flips": 2, "nb_samples": 3, "seed": 0}, _draws,
     [("nb_flips", 3), (("nb_flips", None), ("ber", 0.01)), ("n_bits", 4), ("granularity", "channel"),
      ("layers", ["2"]), ("bits", [7]), ("nb_samples", 4), ("seed", 1), ("batch_size", 7), ("verbose", True)]),
    (FloatBitFlipAttack, {"max_flips": 2, "top_k": 10, "nb_candidates": 2}, _search,
     [("max_flips", 3), ("bits", [30, 31]), ("layers", ["2"]), ("targeted", True), ("stop_accuracy", 0.9),
      ("top_k", 5), ("nb_candidates", 1), ("batch_size", 7), ("verbose", True)]),
    (RandomFloatBitFlips, {"nb_flips": 2, "nb_samples": 3, "seed": 0}, _draws,
     [("nb_flips", 3), (("nb_flips", None), ("ber", 1e-4)), ("bits", [31]), ("layers", ["2"]), ("nb_samples", 4),
      ("seed", 1), ("distribution", {0: 1.0, 31: 3.0}), ("batch_size", 7), ("verbose", True)]),
    # (a generate costs ~1 s: the settings change in three groups, each still after a call)
    (BitFlipBackdoor, {"target": 2, "max_flips": 1, "trigger_size": 10}, _generate,
     [(("target", 3), ("max_flips", 2), ("batch_size", 7)), (("n_bits", 6), ("trigger_size", 6), ("layers", ["2"])),
      (("encoding", "float"), ("verbose", True))]),
]  # fmt: skip


def _settings_of(cls) -> list[str]:
    return list(getattr(cls, "certifier_params", None) or cls.attack_params)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, BackdoorResult):
        assert a.flips == b.flips and a.target == b.target, where
        probe = np.random.default_rng(0).random((4, 64)).astype(np.float32)
        np.testing.assert_array_equal(a.trigger.apply(probe), b.trigger.apply(probe), err_msg=where)
    elif isinstance(a, (dict, WeightPerturbation)):
        assert set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b or (a != a and b != b), where  # NaN: a float flip that broke the model, in both


def _run(obj, run, x, y):
    torch.manual_seed(0)  # the attacks that draw from torch's generator draw the same
    return run(obj, x, y)


@pytest.mark.parametrize("cls, kwargs, run, changes", CASES, ids=[case[0].__name__ for case in CASES])
def test_every_setting_changed_after_a_call_equals_a_fresh_object(clf, data, cls, kwargs, run, changes):
    x, y = data
    changed = {name for change in changes for name in (dict(change) if isinstance(change[0], tuple) else [change[0]])}
    assert changed == set(_settings_of(cls)), "every public setting must be changed here"
    base = {"verbose": False, **kwargs}
    for i, change in enumerate(changes):
        new = dict(change) if isinstance(change[0], tuple) else dict([change])
        obj = cls(clf, **base)
        _run(obj, run, x, y)  # fills every cache
        if len(new) == 1 and i % 2:
            setattr(obj, *next(iter(new.items())))  # assignment goes through set_params
        else:
            obj.set_params(**new)
        fresh = cls(clf, **{**base, **new})
        for name in new:
            assert getattr(obj, name) == getattr(fresh, name)
        _assert_same(_run(obj, run, x, y), _run(fresh, run, x, y), f"{cls.__name__}.{'/'.join(new)}")


def test_the_issue_measurement_a_larger_budget_certifies_less(clf, data):
    """Issue 22: after ``certifier.budget = PerturbationBudget(10.0)`` the certifier certified what it certified at
    ε = 1e-4."""
    x, y = data
    certifier = WeightPerturbationCertifier(clf, PerturbationBudget(1e-4, "inf"), verbose=False)
    assert certifier.certify(x, y).mean() > 0.5
    certifier.budget = PerturbationBudget(10.0, "inf")
    fresh = WeightPerturbationCertifier(clf, PerturbationBudget(10.0, "inf"), verbose=False)
    assert certifier.certify(x, y).mean() == fresh.certify(x, y).mean() == 0.0
    assert "eps=10.0" in repr(certifier)


@pytest.mark.parametrize("cls, kwargs, bad", [
    (WeightPerturbationCertifier, {"budget": BOX}, {"method": "exact"}),
    (BitFlipCertifier, {}, {"n_bits": 1}),
    (WeightPGD, {"budget": BOX}, {"max_iter": -1}),
    (BitFlipAttack, {}, {"top_k": 0}),
])  # fmt: skip
def test_a_rejected_value_leaves_every_setting_unchanged(clf, cls, kwargs, bad):
    obj = cls(clf, verbose=False, **kwargs)
    before = obj.get_params()
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"`{name}`"):
        setattr(obj, name, value)
    with pytest.raises(ValueError, match=f"`{name}`"):
        obj.set_params(batch_size=3, **bad)
    assert repr(obj.get_params()) == repr(before)
    with pytest.raises(ValueError, match="cannot be set"):
        obj.set_params(no_such_setting=1)
    with pytest.raises(AttributeError):
        obj.estimator = clf


@pytest.mark.parametrize("make, run", [
    (lambda c: WeightPerturbationCertifier(c, BOX, verbose=False), _certifier_run),
    (lambda c: BitFlipCertifier(c, max_flips=1, method="interval", verbose=False), _flips_run),
    (lambda c: RandomBitFlips(c, nb_flips=2, nb_samples=3, seed=0, verbose=False), _draws),
    (lambda c: WeightPGD(c, BOX, max_iter=2, verbose=False), _generate),
], ids=["certifier", "bit-flip certifier", "random flips", "pgd"])  # fmt: skip
def test_no_result_outlives_a_change_of_the_weights(digits, data, make, run):
    x_train, y_train, _, _ = digits
    x, y = data
    own = make_classifier(make_mlp(seed=4), lr=0.02)
    own.fit(x_train, y_train, batch_size=128, nb_epochs=2, verbose=False)
    obj = make(own)
    _run(obj, run, x, y)
    with torch.no_grad():
        own.model[0].weight.mul_(1.5)  # in place: the same tensor, a new version
    _assert_same(_run(obj, run, x, y), _run(make(own), run, x, y), "after an in-place change")
    own.fit(x_train, y_train, batch_size=128, nb_epochs=1, verbose=False)  # the optimizer steps in place too
    _assert_same(_run(obj, run, x, y), _run(make(own), run, x, y), "after training")


def test_renamed_keywords_still_work_with_a_deprecation_warning(clf, data):
    from art_weightpert.metrics import bit_flip_curve, weight_robustness_curve, weight_sharpness

    x, y = data
    curve = {"methods": ("certified",), "budgets_or_eps_list": [0.001]}
    new = weight_robustness_curve(clf, x, y, method="interval", **curve)
    with pytest.warns(DeprecationWarning, match="`certify_method` is deprecated, use `method`"):
        old = weight_robustness_curve(clf, x, y, certify_method="interval", **curve)
    assert old["accuracies"] == new["accuracies"] and old["certify_method"] == "interval"
    with pytest.raises(TypeError, match="both `method` and its deprecated spelling `certify_method`"):
        weight_robustness_curve(clf, x, y, method="paper", certify_method="interval", **curve)
    with pytest.raises(TypeError, match="unexpected keyword"):
        weight_robustness_curve(clf, x, y, certify_methods="interval", **curve)
    with pytest.warns(DeprecationWarning, match="use `method`"):
        flips = bit_flip_curve(clf, x, y, flips=[1], nb_samples=1, certify_method="interval", certify_points=8)
    assert flips["certify_method"] == "interval" and flips["certified_points"] == 8
    sharp = {"kind": "average", "m": 24}
    with pytest.warns(DeprecationWarning, match="`nb_draws` is deprecated, use `nb_samples`"):
        old = weight_sharpness(clf, x, y, 0.05, nb_draws=2, **sharp)
    assert old == weight_sharpness(clf, x, y, 0.05, nb_samples=2, **sharp)
