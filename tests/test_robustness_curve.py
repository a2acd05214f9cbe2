"""Tests of the weight robustness curve (clean / random / PGD / certified accuracy over an ε sweep) and its plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.metrics import plot_robustness_curve, weight_robustness_curve

EPS = [0.0, 0.002, 0.005, 0.01]


@pytest.fixture(scope="module")
def test_data(digits):
    """The first 200 test points (the curve evaluates every method at every radius)."""
    _, _, x_test, y_test = digits
    return x_test[:200], y_test[:200]


@pytest.fixture(scope="module")
def curve(clf, test_data):
    x, y = test_data
    return weight_robustness_curve(
        clf, x, y, EPS, norm="inf", random_params={"nb_samples": 5, "seed": 0}, pgd_params={"max_iter": 10}
    )


def test_curve_has_every_method_at_every_eps(curve):
    assert curve["eps"] == EPS
    assert curve["methods"] == ["clean", "random", "pgd", "certified"]
    assert curve["norm"] == "inf" and curve["nb_samples"] == 200
    assert [b["eps"] for b in curve["budgets"]] == EPS
    assert all(PerturbationBudget.from_dict(b).norm == "inf" for b in curve["budgets"])
    for method in curve["methods"]:
        values = curve["accuracies"][method]
        assert len(values) == len(EPS) and all(0.0 <= v <= 1.0 for v in values)
    assert len(curve["random_std"]) == len(curve["random_min"]) == len(curve["random_max"]) == len(EPS)


def test_curve_is_ordered_certified_pgd_random_clean(curve):
    acc = {m: np.asarray(v) for m, v in curve["accuracies"].items()}
    clean = acc["clean"][0]
    assert np.all(acc["clean"] == clean)
    # at ε = 0 every method gives the clean accuracy
    assert acc["random"][0] == pytest.approx(clean)
    assert acc["pgd"][0] == pytest.approx(clean)
    assert acc["certified"][0] == pytest.approx(clean)
    # sound certificates lie below the attack, the attack below random faults
    assert np.all(acc["certified"] <= acc["pgd"] + 1e-12)
    assert np.all(acc["pgd"] <= acc["random"] + 1e-12)
    assert np.all(acc["random"] <= clean + 0.02)
    # the adversary gets stronger with the budget
    assert np.all(np.diff(acc["pgd"]) <= 1e-12)
    assert np.all(np.diff(acc["certified"]) <= 1e-12)
    assert acc["pgd"][-1] < clean - 0.3


def test_plot_writes_an_image(curve, tmp_path):
    path = plot_robustness_curve(curve, tmp_path / "curve.png")
    data = (tmp_path / "curve.png").read_bytes()
    assert path == str(tmp_path / "curve.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    plot_robustness_curve(curve, tmp_path / "curve.svg", title="digits MLP")
    assert "digits MLP" in (tmp_path / "curve.svg").read_text()
    with pytest.raises(ValueError, match="result"):
        plot_robustness_curve({"eps": [0.1]}, tmp_path / "bad.png")


def test_budgets_and_other_norms(clf, test_data):
    x, y = test_data
    budgets = [PerturbationBudget(0.05, "row_l1", relative=True), PerturbationBudget({"2": 0.3}, "l2")]
    result = weight_robustness_curve(clf, x, y, budgets, methods=("pgd", "random"), pgd_params={"max_iter": 5})
    assert result["eps"] == [0.05, 0.3]
    assert result["norm"] == "mixed"
    assert result["budgets"][1]["layers"] == ["2"]
    assert set(result["accuracies"]) == {"pgd", "random"}
    assert all(p <= r for p, r in zip(result["accuracies"]["pgd"], result["accuracies"]["random"]))
    # a plain ART classifier and y=None (agreement with the clean predictions) work too
    plain = PyTorchClassifier(clf.model, nn.CrossEntropyLoss(), (64,), 10)
    single = weight_robustness_curve(plain, x, None, 0.0, methods="clean")
    assert single["accuracies"] == {"clean": [1.0]}


def test_unsupported_model_for_certification_gives_nan_a_note_and_a_reason(test_data):
    from art_weightpert.zoo import make_classifier

    x, y = test_data
    torch.manual_seed(0)
    mish = make_classifier(nn.Sequential(nn.Linear(64, 16), nn.Mish(), nn.Linear(16, 10)), (64,))
    result = weight_robustness_curve(
        mish, x, y, [0.01], methods=("pgd", "certified"), pgd_params={"max_iter": 2}, method="paper"
    )
    assert math.isnan(result["accuracies"]["certified"][0])
    assert not math.isnan(result["accuracies"]["pgd"][0])
    assert any("Mish" in note for note in result["notes"])
    assert "Mish" in result["unavailable"]["certified"]


def test_curve_rejects_bad_arguments(clf, test_data):
    x, y = test_data
    with pytest.raises(ValueError, match="methods"):
        weight_robustness_curve(clf, x, y, [0.01], methods=("clean", "bfa"))
    with pytest.raises(ValueError, match="budgets_or_eps_list"):
        weight_robustness_curve(clf, x, y, [])
    with pytest.raises(ValueError, match="eps"):
        weight_robustness_curve(clf, x, y, [-0.1], methods=("clean",))
    with pytest.raises(ValueError, match="norm"):
        weight_robustness_curve(clf, x, y, [0.1], norm="l1", methods=("clean",))
    with pytest.raises(ValueError, match="`method`"):
        weight_robustness_curve(clf, x, y, [0.1], method="exact")
    with pytest.raises(TypeError, match="classifier"):
        weight_robustness_curve(object(), x, y, [0.1])
    with pytest.raises(ValueError, match="NaN"):
        weight_robustness_curve(clf, np.full_like(x, np.nan), y, [0.1], methods=("clean",))


def test_several_certificates_at_once_match_the_certified_accuracy_metric(clf, test_data):
    from art_weightpert.certification import METHODS as BOUND_METHODS
    from art_weightpert.metrics import weight_certified_accuracy

    x, y = test_data[0][:80], test_data[1][:80]
    methods = ("pgd", *BOUND_METHODS)
    result = weight_robustness_curve(clf, x, y, EPS[1:3], methods=methods, pgd_params={"max_iter": 5}, seed=0)
    assert not result["unavailable"] and set(result["seconds"]) == set(methods)
    for method in BOUND_METHODS:
        expected = [weight_certified_accuracy(clf, x, y, PerturbationBudget(e, "inf"), method=method) for e in EPS[1:3]]
        assert result["accuracies"][method] == pytest.approx(expected, abs=1e-12)
        # each certificate is sound: below the attack at every ε
        assert np.all(np.asarray(result["accuracies"][method]) <= np.asarray(result["accuracies"]["pgd"]) + 1e-12)


def test_random_fault_statistics_are_those_of_random_weight_perturbation(clf, curve, test_data):
    from art_weightpert import RandomWeightPerturbation

    x, y = test_data
    for i, eps in enumerate(EPS):
        low, mean, high = curve["random_min"][i], curve["accuracies"]["random"][i], curve["random_max"][i]
        assert low <= mean <= high and curve["random_std"][i] >= 0
        assert low <= curve["random_quantiles"][i][0.5] <= high
        if eps > 0:
            stats = RandomWeightPerturbation(clf, PerturbationBudget(eps, "inf"), nb_samples=5, seed=0).evaluate(x, y)
            assert (stats["mean"], stats["min"], stats["std"]) == (mean, low, curve["random_std"][i])
        else:  # a zero-radius ball: every draw is the clean model
            assert low == mean == high == curve["clean_accuracy"]


def test_seeded_pgd_does_not_depend_on_the_other_methods(clf, test_data):
    x, y = test_data[0][:80], test_data[1][:80]
    kwargs = {"pgd_params": {"max_iter": 4, "num_random_init": 1}, "seed": 3}
    alone = weight_robustness_curve(clf, x, y, EPS[1:], methods=("pgd",), **kwargs)
    torch.manual_seed(123)  # whatever the global generator's state, the seeded attack repeats itself
    mixed = weight_robustness_curve(clf, x, y, EPS[1:], methods=("random", "pgd", "clean"), **kwargs)
    assert alone["accuracies"]["pgd"] == mixed["accuracies"]["pgd"]


def test_verified_shares_on_the_curve_the_plot_and_the_report(clf, test_data, tmp_path):
    """``"verified"``: the verifier's certified share, at least the linear certificate's, at most the share it could
    not falsify; its falsified and unknown shares beside it; the plot shades the undecided band; the CLI's table
    shows the three shares and the time."""
    from art_weightpert.cli.render import results_table
    from art_weightpert.cli.report import _entry_of_curve

    x, y = test_data[0][:60], test_data[1][:60]
    methods = ["clean", "linear", "verified"]
    curve = weight_robustness_curve(
        clf, x, y, [0.0, 0.005, 0.01], norm="inf", methods=methods, verify_params={"time_limit": 0.2}
    )
    verified, linear = np.asarray(curve["accuracies"]["verified"]), np.asarray(curve["accuracies"]["linear"])
    falsified, unknown = np.asarray(curve["verified_falsified"]), np.asarray(curve["verified_unknown"])
    assert np.all(verified >= linear - 1e-12)
    np.testing.assert_allclose(verified + falsified + unknown, 1.0)
    assert falsified[-1] > falsified[0] and len(curve["verified_seconds_per_sample"]) == 3
    path = plot_robustness_curve(curve, tmp_path / "verified.svg")
    assert "undecided (verifier)" in (tmp_path / "verified.svg").read_text() and path.endswith(".svg")
    entry = _entry_of_curve(curve, methods)
    report = {"models": {"m": entry}, "methods": methods, "eps_grid": [0.0, 0.005, 0.01]}
    header, rows = results_table(report, "m")
    assert "falsified" in rows[-1][-1] and "unknown" in rows[-1][-1] and "s/sample" in rows[-1][-1]
