"""Generalization measures under weight perturbation: sharpness (worst ≥ average ≥ 0, the ball is respected, the noise
has the stated standard deviation), PAC-Bayes σ (hits the target accuracy drop within its tolerance, checked with
independent draws) and bound (its terms, computed here), the Rademacher bound of docs/theory.md §6 (moved from
test_metrics_certification.py), seeds, untouched weights and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from art_weightpert import (
    PerturbationBudget,
    PyTorchWeightClassifier,
    UnsupportedModelError,
    WeightPerturbationCertifier,
)
from art_weightpert.metrics import generalization_bound, pac_bayes_bound, pac_bayes_sigma, weight_sharpness
from art_weightpert.metrics.generalization import ball_size
from tests.conftest import make_classifier


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bias_free_classifier(digits):
    """A bias-free digits MLP 64-16-10 trained briefly (the setting of docs/theory.md §6)."""
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16, bias=False), nn.ReLU(), nn.Linear(16, 10, bias=False))
    clf = make_classifier(model)
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=5, verbose=False)
    return clf


def test_generalization_bound_terms_follow_section_6(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    eps, gamma, delta = 0.01, 2.0, 0.05
    budget = PerturbationBudget(eps, "row_l1")
    out = generalization_bound(
        bias_free_classifier, x_train, y_train, budget, margin=gamma, delta=delta, method="paper"
    )
    model = bias_free_classifier.model
    weights = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    norms = [float(w.abs().sum(dim=1).max()) for w in weights]
    n, n0, k, d = len(x_train), 64, 10, 2
    big_b = float(np.abs(x_train).max())
    rademacher = 2 ** (d - 1) * math.prod(m + eps for m in norms) * big_b * math.sqrt(2 * math.log(2 * n0) / n)
    w1, w2 = (w.numpy() for w in weights)
    logits = np.maximum(x_train.astype(np.float64) @ w1.T, 0) @ w2.T
    own = logits[np.arange(n), y_train]
    others = np.where(np.eye(k, dtype=bool)[y_train], -np.inf, logits).max(axis=1)
    empirical = float(np.mean(own - others <= gamma))
    assert out["operator_norms"] == pytest.approx(norms, rel=1e-12)
    assert out["eps"] == pytest.approx([eps, eps])
    assert out["depth"] == d and out["input_dim"] == n0 and out["n_samples"] == n and out["nb_classes"] == k
    assert out["rademacher_complexity"] == pytest.approx(rademacher, rel=1e-12)
    assert out["margin_factor"] == pytest.approx(4 * k / gamma)
    assert out["rademacher_term"] == pytest.approx(4 * k / gamma * rademacher, rel=1e-12)
    assert out["confidence_term"] == pytest.approx(math.sqrt(math.log(1 / delta) / (2 * n)))
    assert out["empirical_margin_loss"] == pytest.approx(empirical)
    assert out["total"] == pytest.approx(empirical + out["rademacher_term"] + out["confidence_term"])
    # The certified margin (worst network in the ball) is below the clean one: its loss is at least as large.
    assert out["certified_margin_loss"] >= out["empirical_margin_loss"]
    assert out["total_certified"] >= out["total"]
    certifier = WeightPerturbationCertifier(bias_free_classifier, budget, method="paper", verbose=False)
    certified_margin = certifier.margin_lower_bounds(x_train, y_train).min(axis=1)
    assert out["certified_margin_loss"] == pytest.approx(float(np.mean(certified_margin <= gamma)))


def test_generalization_bound_at_zero_radius_and_growing_radius(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    x, y = x_train[:300], y_train[:300]
    zero = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(0.0, "inf"), margin=1.0)
    assert zero["certified_margin_loss"] == pytest.approx(zero["empirical_margin_loss"])
    assert zero["total_certified"] == pytest.approx(zero["total"])
    small = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(1e-3, "inf"), margin=1.0)
    large = generalization_bound(bias_free_classifier, x, y, PerturbationBudget(1e-2, "inf"), margin=1.0)
    assert zero["rademacher_term"] < small["rademacher_term"] < large["rademacher_term"]
    assert small["certified_margin_loss"] <= large["certified_margin_loss"]
    # Box radius δ enters through the inclusion box δ ⊆ row_l1 (n·δ), n the fan-in (docs/theory.md §2).
    assert small["eps"] == pytest.approx([64 * 1e-3, 16 * 1e-3])


def test_generalization_bound_with_biases_uses_the_constant_feature(tiny_mlp_classifier, digits):
    x_train, y_train, _, _ = digits
    out = generalization_bound(tiny_mlp_classifier, x_train[:200], y_train[:200], PerturbationBudget(0.01, "row_l1"))
    assert out["input_dim"] == 65 and out["input_bound"] >= 1.0
    layers = [m for m in tiny_mlp_classifier.model if isinstance(m, nn.Linear)]
    expected = [
        max(1.0, float((m.weight.detach().double().abs().sum(dim=1) + m.bias.detach().double().abs()).max()))
        for m in layers
    ]
    assert out["operator_norms"] == pytest.approx(expected, rel=1e-12)


def test_generalization_bound_rejects_bad_arguments_and_models(bias_free_classifier, digits):
    x_train, y_train, _, _ = digits
    budget = PerturbationBudget(0.01, "row_l1")
    x, y = x_train[:20], y_train[:20]
    with pytest.raises(ValueError, match="`margin`"):
        generalization_bound(bias_free_classifier, x, y, budget, margin=0.0)
    with pytest.raises(ValueError, match="`delta`"):
        generalization_bound(bias_free_classifier, x, y, budget, delta=1.5)
    with pytest.raises(TypeError, match="`margin`"):
        generalization_bound(bias_free_classifier, x, y, budget, margin="1")
    with pytest.raises(ValueError, match="labels `y` are required"):
        generalization_bound(bias_free_classifier, x, None, budget)
    with pytest.raises(ValueError, match="at least one sample"):
        generalization_bound(bias_free_classifier, x[:0], y[:0], budget)
    sigmoid = make_classifier(nn.Sequential(nn.Linear(64, 8, bias=False), nn.Sigmoid(), nn.Linear(8, 10, bias=False)))
    with pytest.raises(UnsupportedModelError, match="σ\\(0\\) = 0"):
        generalization_bound(sigmoid, x, y, budget)
    batchnorm = make_classifier(nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)))
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        generalization_bound(batchnorm, x, y, budget)


# ------------------------------------------------------------------------------------------------ sharpness
@pytest.fixture(scope="module")
def train_subset(digits):
    x_train, y_train, _, _ = digits
    return x_train[:400], y_train[:400]


def _weights(classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in classifier.base_model.state_dict().items()}


def test_worst_sharpness_exceeds_average_sharpness_on_a_trained_model(trained_digits_mlp, train_subset):
    x, y = train_subset
    worst = weight_sharpness(trained_digits_mlp, x, y, 0.05, norm="inf", kind="worst", m=200)
    average = weight_sharpness(trained_digits_mlp, x, y, 0.05, norm="inf", kind="average", m=200, nb_samples=4)
    assert worst["clean_loss"] == pytest.approx(average["clean_loss"])
    assert worst["loss_increase"] > average["loss_increase"] >= 0.0
    assert worst["error_increase"] >= average["error_increase"] >= 0.0
    assert worst["loss_increase"] > 0.01  # the ascent really moves the loss
    assert worst["perturbed_loss"] == pytest.approx(worst["clean_loss"] + worst["loss_increase"])
    json.dumps(worst)  # the report can use the dict as it is
    zero = weight_sharpness(trained_digits_mlp, x, y, 0.0, kind="worst", m=200)
    assert zero["loss_increase"] == 0.0 and zero["error_increase"] == 0.0 and zero["perturbation_norm"] == 0.0


@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_worst_case_perturbation_stays_in_its_adaptive_ball(trained_digits_mlp, train_subset, norm):
    x, y = train_subset
    rho = 0.03
    out = weight_sharpness(trained_digits_mlp, x, y, rho, norm=norm, kind="worst", m=100, max_iter=5)
    assert out["n_batches"] == 4
    assert out["perturbation_norm_max"] <= rho * (1 + 1e-5)
    assert out["perturbation_norm"] >= 0.5 * rho  # the ascent uses the ball, it does not stay near 0


def test_ball_size_is_the_relative_norm_of_the_perturbation(trained_digits_mlp):
    model = trained_digits_mlp.base_model
    params = {n: p.detach() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    deltas = {n: 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    for norm, expected in (
        ("inf", max(float((d.abs() / params[n].abs()).max()) for n, d in deltas.items())),
        ("l2", max(float(d.norm() / params[n].norm()) for n, d in deltas.items())),
    ):
        unit = PerturbationBudget(1.0, norm, relative=True, include_bias=True).parameter_balls(model, torch.float64)
        assert ball_size(unit, deltas) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_average_case_noise_has_standard_deviation_rho(trained_digits_mlp, train_subset, adaptive):
    """The pitfall of the reference scripts: N(0, ρ²) needs ρ as torch's standard deviation, not ρ²."""
    x, y = train_subset
    rho = 0.2
    out = weight_sharpness(
        trained_digits_mlp, x, y, rho, norm="l2", adaptive=adaptive, kind="average", m=400, include_bias=False
    )
    if adaptive:  # δ = ρ·|w|·z: ‖δ‖_F / ‖W‖_F ≈ ρ for every tensor (the largest of three, so a little above ρ)
        assert out["perturbation_norm"] == pytest.approx(rho, rel=0.2)
    else:  # δ = ρ·z: ‖δ‖_F ≈ ρ·sqrt(numel) for the largest tensor (128 × 64)
        assert out["perturbation_norm"] == pytest.approx(rho * math.sqrt(128 * 64), rel=0.05)


def test_sharpness_is_reproducible_by_seed(trained_digits_mlp, train_subset):
    x, y = train_subset
    for kind in ("worst", "average"):
        a = weight_sharpness(trained_digits_mlp, x, y, 0.05, kind=kind, m=200, max_iter=3, nb_samples=2, seed=1)
        b = weight_sharpness(trained_digits_mlp, x, y, 0.05, kind=kind, m=200, max_iter=3, nb_samples=2, seed=1)
        c = weight_sharpness(trained_digits_mlp, x, y, 0.05, kind=kind, m=200, max_iter=3, nb_samples=2, seed=2)
        assert a == b
        assert a["perturbed_loss"] != c["perturbed_loss"]


# ------------------------------------------------------------------------------------------------ PAC-Bayes
def _independent_drop(classifier, x, y, std_of, nb_draws: int = 30, seed: int = 123) -> tuple[float, float]:
    """Mean accuracy drop (and its standard error) under Gaussian noise drawn here with torch.normal(0, std)."""
    model = classifier.base_model
    names = list(classifier.perturbable_parameters)
    x_t, y_t = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(seed)
    with torch.no_grad():
        clean = float((model(x_t).argmax(1) == y_t).double().mean())
        accs = []
        for _ in range(nb_draws):
            params = {n: model.get_parameter(n) + torch.normal(0.0, std_of(model.get_parameter(n))) for n in names}
            accs.append(float((functional_call(model, params, (x_t,)).argmax(1) == y_t).double().mean()))
    return clean - float(np.mean(accs)), float(np.std(accs, ddof=1) / math.sqrt(nb_draws))


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_moves_the_accuracy_by_the_target_deviation(trained_digits_mlp, train_subset, magnitude_aware):
    x, y = train_subset
    target, tol = 0.1, 0.01
    sigma = pac_bayes_sigma(trained_digits_mlp, x, y, target, magnitude_aware=magnitude_aware, tolerance=tol)
    # With the function's own seeded draws, the drop lies in [target − tol, target] (the stated guarantee) ...
    out = pac_bayes_bound(trained_digits_mlp, x, y, sigma=sigma, magnitude_aware=magnitude_aware)
    assert target - tol <= out["expected_error"] - out["clean_error"] <= target
    # ... and fresh noise drawn independently here moves the accuracy by the target up to Monte Carlo error.
    if magnitude_aware:
        std_of = lambda p: torch.sqrt(sigma**2 * p**2 + 1e-3**2)  # noqa: E731
    else:
        std_of = lambda p: torch.full_like(p, sigma)  # noqa: E731
    drop, stderr = _independent_drop(trained_digits_mlp, x, y, std_of)
    assert abs(drop - target) <= tol + 4 * stderr


def test_magnitude_aware_sigma_differs_and_seeds_reproduce(trained_digits_mlp, train_subset):
    x, y = train_subset
    plain = pac_bayes_sigma(trained_digits_mlp, x, y, nb_samples=4, seed=5)
    aware = pac_bayes_sigma(trained_digits_mlp, x, y, nb_samples=4, magnitude_aware=True, seed=5)
    assert plain > 0 and aware > 0 and abs(plain - aware) > 0.1 * min(plain, aware)
    assert pac_bayes_sigma(trained_digits_mlp, x, y, nb_samples=4, seed=5) == plain


def test_pac_bayes_bound_terms(trained_digits_mlp, train_subset):
    x, y = train_subset
    sigma, delta = 0.05, 0.05
    model = trained_digits_mlp.base_model
    w = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    out = pac_bayes_bound(trained_digits_mlp, x, y, sigma=sigma, delta=delta, nb_samples=3)
    m = len(x)
    assert out["n_parameters"] == w.numel() and out["n_samples"] == m
    assert out["kl"] == pytest.approx(float(w.pow(2).sum()) / (2 * sigma**2), rel=1e-9)
    assert out["complexity_term"] == pytest.approx(math.sqrt((out["kl"] + math.log(m / delta)) / (2 * (m - 1))))
    assert out["bound"] == pytest.approx(out["expected_error"] + out["complexity_term"])
    assert out["jiang_measure"] == pytest.approx(float(w.pow(2).sum()) / (4 * sigma**2) + math.log(m / delta) + 10)
    assert out["flatness"] == pytest.approx(1 / sigma**2)
    json.dumps(out)
    # Magnitude-aware: Jiang et al.'s closed form 1/4 Σ ln((ε² + (σ² + 1)‖w‖²/ω) / (ε² + σ² w_i²)) is KL/2.
    mag = pac_bayes_bound(trained_digits_mlp, x, y, sigma=0.5, magnitude_aware=True, nb_samples=2)
    eps, omega = 1e-3, w.numel()
    jiang = 0.25 * float(torch.log((eps**2 + 1.25 * w.pow(2).sum() / omega) / (eps**2 + 0.25 * w.pow(2))).sum())
    assert mag["kl"] / 2 == pytest.approx(jiang, rel=1e-6)
    # A prior centred on the trained weights costs nothing.
    at_w = {n: p.detach().numpy() for n, p in model.named_parameters()}
    assert pac_bayes_bound(trained_digits_mlp, x, y, sigma=sigma, initial_weights=at_w, nb_samples=2)["kl"] == 0.0


# ------------------------------------------------------------------------------------------------ safety and input
def test_weights_are_untouched_also_after_an_interrupt(trained_digits_mlp, train_subset, monkeypatch):
    x, y = train_subset
    before = _weights(trained_digits_mlp)
    weight_sharpness(trained_digits_mlp, x, y, 0.1, kind="worst", m=400, max_iter=2)
    pac_bayes_sigma(trained_digits_mlp, x, y, nb_samples=2)
    calls = {"n": 0}
    original = PyTorchWeightClassifier.logits

    def interrupted(self, x_t, deltas=None):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original(self, x_t, deltas)

    monkeypatch.setattr(PyTorchWeightClassifier, "logits", interrupted)
    for run in (
        lambda: weight_sharpness(trained_digits_mlp, x, y, 0.1, kind="worst", m=400),
        lambda: weight_sharpness(trained_digits_mlp, x, y, 0.1, kind="average", m=400),
        lambda: pac_bayes_sigma(trained_digits_mlp, x, y),
    ):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            run()
    after = _weights(trained_digits_mlp)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_measures_reject_bad_input(trained_digits_mlp, train_subset):
    x, y = train_subset
    clf = trained_digits_mlp
    with pytest.raises(ValueError, match="`rho`"):
        weight_sharpness(clf, x, y, -0.1)
    with pytest.raises(ValueError, match="`m`"):
        weight_sharpness(clf, x, y, 0.1, m=0)
    with pytest.raises(ValueError, match="`norm`"):
        weight_sharpness(clf, x, y, 0.1, norm="row_l1")
    with pytest.raises(ValueError, match="`kind`"):
        weight_sharpness(clf, x, y, 0.1, kind="best")
    with pytest.raises(ValueError, match="at least one sample"):
        weight_sharpness(clf, x[:0], y[:0], 0.1)
    with pytest.raises(ValueError, match="at least one sample"):
        pac_bayes_sigma(clf, x[:0], y[:0])
    with pytest.raises(ValueError, match="unknown layer"):
        weight_sharpness(clf, x, y, 0.1, layers=["nope"])
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="`target_deviation`"):
            pac_bayes_sigma(clf, x, y, target_deviation=bad)
    with pytest.raises(ValueError, match="`tolerance`"):
        pac_bayes_sigma(clf, x, y, target_deviation=0.05, tolerance=0.1)
    with pytest.raises(ValueError, match="`target_deviation`"):  # more than the clean accuracy can drop
        pac_bayes_sigma(clf, x, (y + 1) % 10, target_deviation=0.5)
    with pytest.raises(ValueError, match="`sigma`"):
        pac_bayes_bound(clf, x, y, sigma=-1.0)
    with pytest.raises(ValueError, match="initial_weights"):
        pac_bayes_bound(clf, x, y, sigma=0.1, initial_weights={})
    with pytest.raises(ValueError, match="labels `y` are required"):
        pac_bayes_sigma(clf, x, None)


def test_generalization_bound_is_re_exported_where_it_was():
    from art_weightpert.metrics import generalization_bound as from_metrics
    from art_weightpert.metrics.certification import generalization_bound as from_certification
    from art_weightpert.metrics.generalization import generalization_bound

    assert from_metrics is generalization_bound and from_certification is generalization_bound


def test_generalization_example_runs_end_to_end(tmp_path):
    """The experiment's script (examples/generalization_measures.py) in its smallest setting: models, τ table, plot."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "generalization_measures.py"
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Kendall's τ with the gap (2 models)" in result.stdout
    assert (tmp_path / "generalization_measures_quick.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["models"]) == 2 and "pac_bayes_sigma" in saved["kendall_tau"]
