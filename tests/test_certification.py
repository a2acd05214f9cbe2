"""WeightPerturbationCertifier: exactness against direct implementations of docs/theory.md §3 (formula B) and §4, the
invariants between methods, the estimator's carried perturbation, and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from art.estimators.classification import PyTorchClassifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, UnsupportedModelError
from art_weightpert.certification import METHODS, WeightPerturbationCertifier
from art_weightpert.certification.certifier import CERTIFICATION_RTOL
from tests.conftest import make_classifier, make_mlp, random_cnn, random_mlp


def classifier(model: nn.Module, input_shape, nb_classes: int) -> PyTorchWeightClassifier:
    return PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), input_shape, nb_classes)


def linear_weights(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray | None]]:
    out = []
    for m in model:
        if isinstance(m, nn.Linear):
            b = None if m.bias is None else m.bias.detach().double().numpy()
            out.append((m.weight.detach().double().numpy(), b))
    return out


# ------------------------------------------------------------------------------------- direct reference formulas
def formula_b(weights: list[np.ndarray], eps: list[float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """docs/theory.md §3 formula B, written out for a bias-free ReLU MLP with row_l1 radii ε_j (0: layer
    unperturbed)."""
    out = np.full((len(x), weights[-1].shape[0]), np.inf)
    a = [np.abs(w).sum(axis=1).max() for w in weights[:-1]]
    a_hat = [aj + ej for aj, ej in zip(a, eps[:-1])]
    w_d = weights[-1]
    for n in range(len(x)):
        h = x[n]
        for w in weights[:-1]:
            h = np.maximum(w @ h, 0)
        logits = w_d @ h
        big_b = np.abs(x[n]).max()
        for i in range(w_d.shape[0]):
            if i == y[n]:
                continue
            dw = np.abs(w_d[y[n]] - w_d[i]).sum()
            eta = dw * (np.prod(a_hat) - np.prod(a)) * big_b + 2 * eps[-1] * np.prod(a_hat) * big_b
            out[n, i] = logits[y[n]] - logits[i] - eta
    return out


def naive_interval(layers, norm: str, eps: float, x: np.ndarray, y: np.ndarray, bias_eps: float = 0.0) -> np.ndarray:
    """docs/theory.md §4 with explicit loops: ReLU MLP with biases, every weight perturbed with absolute radius ``eps``
    and every bias entry by at most ``bias_eps`` (the box of a bias ball, or the entry bound of its ℓ2 ball)."""

    def pert(w: np.ndarray, mag: np.ndarray) -> np.ndarray:
        p = np.zeros(w.shape[0])
        for r in range(w.shape[0]):
            if norm == "inf":  # Σ_c δ_rc m_c
                p[r] = sum(eps * mag[c] for c in range(w.shape[1]))
            elif norm == "row_l1":  # ε_r ‖m‖_∞
                p[r] = eps * max(mag)
            else:  # ε ‖m‖_2
                p[r] = eps * np.sqrt(sum(m * m for m in mag))
            p[r] += bias_eps
        return p

    k_classes = layers[-1][0].shape[0]
    out = np.full((len(x), k_classes), np.inf)
    for n in range(len(x)):
        lo = hi = x[n].astype(np.float64)
        for w, b in layers[:-1]:
            c, r, mag = (lo + hi) / 2, (hi - lo) / 2, np.maximum(np.abs(lo), np.abs(hi))
            center, radius = w @ c + b, np.abs(w) @ r + pert(w, mag)
            lo, hi = np.maximum(center - radius, 0), np.maximum(center + radius, 0)
        w, b = layers[-1]
        c, r, mag = (lo + hi) / 2, (hi - lo) / 2, np.maximum(np.abs(lo), np.abs(hi))
        p = pert(w, mag)
        yn = y[n]
        for i in range(k_classes):
            if i != yn:  # the last layer folded into the margin: (W_y − W_i)·c + b_y − b_i − |W_y − W_i|·r − P_y − P_i
                diff = w[yn] - w[i]
                out[n, i] = diff @ c + b[yn] - b[i] - np.abs(diff) @ r - (p[yn] + p[i])
    return out


def assert_rel_close(got: np.ndarray, expected: np.ndarray, rtol: float = 1e-9) -> None:
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(got))
    scale = np.abs(expected[finite]).max()
    assert np.abs(got[finite] - expected[finite]).max() <= rtol * scale


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("layers", [None, ["0"], ["2"], ["4"]])
def test_paper_matches_formula_b_on_bias_free_relu_mlp(layers):
    model = random_mlp([7, 6, 5, 4], bias=False, seed=3)
    x = np.random.default_rng(0).normal(size=(12, 7)).astype(np.float32)
    budget = PerturbationBudget(0.05, "row_l1", layers=layers)
    certifier = WeightPerturbationCertifier(classifier(model, (7,), 4), budget, method="paper", verbose=False)
    got = certifier.margin_lower_bounds(x)
    weights = [w for w, _ in linear_weights(model)]
    eps = [0.05 if layers is None or name in layers else 0.0 for name in ("0", "2", "4")]
    y = model(torch.as_tensor(x)).argmax(dim=1).numpy()
    expected = formula_b(weights, eps, x.astype(np.float64), y)
    assert_rel_close(got, expected)


def test_paper_single_layer_is_formula_a():
    """Formula A (one hidden layer k perturbed): η = ε_k Δw Π_{j≠k} a_j B, the closed-form radius of §3.1."""
    model = random_mlp([5, 6, 4, 3], bias=False, seed=8)
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    clf = classifier(model, (5,), 3)
    certifier = WeightPerturbationCertifier(
        clf, PerturbationBudget(0.02, "row_l1", layers=["2"]), "paper", verbose=False
    )
    weights = [w for w, _ in linear_weights(model)]
    a = [np.abs(w).sum(axis=1).max() for w in weights]
    logits = np.stack([weights[2] @ np.maximum(weights[1] @ np.maximum(weights[0] @ v, 0), 0) for v in x.astype(float)])
    y = logits.argmax(axis=1)
    radius_expected = []
    for n in range(len(x)):
        b = np.abs(x[n].astype(np.float64)).max()
        ratios = []
        for i in range(3):
            if i != y[n]:
                dw = np.abs(weights[2][y[n]] - weights[2][i]).sum()
                room = logits[n, y[n]] - logits[n, i] - CERTIFICATION_RTOL * (1 + np.abs(logits[n]).max())
                ratios.append(room / (dw * a[0] * b))
        radius_expected.append(min(ratios))
    radius = certifier.certified_radius(x)
    np.testing.assert_allclose(radius, np.array(radius_expected), rtol=1e-9)


@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("include_bias", [False, True])
def test_interval_matches_direct_section4_on_relu_mlp_with_biases(norm, include_bias):
    model = random_mlp([6, 5, 4, 3], bias=True, seed=5)
    x = np.random.default_rng(2).normal(size=(8, 6)).astype(np.float32)
    eps = 0.03
    budget = PerturbationBudget(eps, norm, include_bias=include_bias)
    certifier = WeightPerturbationCertifier(classifier(model, (6,), 3), budget, method="interval", verbose=False)
    y = np.arange(len(x)) % 3
    got = certifier.margin_lower_bounds(x, y)
    expected = naive_interval(linear_weights(model), norm, eps, x.astype(np.float64), y, eps if include_bias else 0.0)
    assert_rel_close(got, expected)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    bias=st.booleans(),
    relative=st.booleans(),
    include_bias=st.booleans(),
    conv=st.booleans(),
    layer_choice=st.integers(0, 3),
)
def test_interval_never_looser_than_paper_on_row_l1(seed, bias, relative, include_bias, conv, layer_choice):
    if conv:
        model, shape, k = random_cnn(seed, final_maxpool=False), (1, 6, 6), 5
    else:
        model, shape, k = random_mlp([5, 6, 4, 3], bias=bias, seed=seed), (5,), 3
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    layers = None if layer_choice == 0 else [names[(layer_choice - 1) % len(names)]]
    budget = PerturbationBudget(0.02, "row_l1", layers=layers, relative=relative, include_bias=include_bias)
    clf = classifier(model, shape, k)
    x = np.random.default_rng(seed).normal(size=(10, *shape)).astype(np.float32)
    y = np.arange(10) % k
    paper = WeightPerturbationCertifier(clf, budget, "paper", verbose=False).margin_lower_bounds(x, y)
    interval = WeightPerturbationCertifier(clf, budget, "interval", verbose=False).margin_lower_bounds(x, y)
    finite = np.isfinite(paper)
    scale = 1 + np.abs(paper[finite]).max()
    assert np.all(interval[finite] >= paper[finite] - 1e-12 * scale)


# ------------------------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("method", list(METHODS))
def test_margin_bounds_shape_label_column_and_prediction_default(tiny_mlp_classifier, digits, method):
    _, _, x_test, _ = digits
    x = x_test[:10]
    certifier = WeightPerturbationCertifier(
        tiny_mlp_classifier, PerturbationBudget(0.001, "inf"), method, verbose=False
    )
    bounds = certifier.margin_lower_bounds(x)
    pred = tiny_mlp_classifier.predict(x).argmax(axis=1)
    assert bounds.shape == (10, 10) and bounds.dtype == np.float64
    assert np.all(np.isinf(bounds[np.arange(10), pred]))
    np.testing.assert_array_equal(bounds, certifier.margin_lower_bounds(x, pred))
    one_hot = np.eye(10)[pred]
    np.testing.assert_array_equal(bounds, certifier.margin_lower_bounds(x, one_hot))
    small_batches = WeightPerturbationCertifier(
        tiny_mlp_classifier, PerturbationBudget(0.001, "inf"), method, batch_size=3, verbose=False
    )
    np.testing.assert_allclose(small_batches.margin_lower_bounds(x), bounds, rtol=1e-12)
    # Lower bounds of the clean margins: below them, and equal to them at eps = 0.
    logits = tiny_mlp_classifier.predict(x).astype(np.float64)
    margins = logits[np.arange(10), pred][:, None] - logits
    assert np.all(bounds[np.isfinite(bounds)] <= margins[np.isfinite(bounds)] + 1e-5)
    zero = WeightPerturbationCertifier(tiny_mlp_classifier, PerturbationBudget(0.0, "inf"), method, verbose=False)
    exact = zero.margin_lower_bounds(x)
    np.testing.assert_allclose(exact[np.isfinite(exact)], margins[np.isfinite(exact)], atol=1e-5)


def test_certificates_are_about_the_estimator_as_it_is(tiny_mlp_classifier, digits):
    """With a carried perturbation the ball is centred at W + Δ (relative radii from W + Δ)."""
    _, _, x_test, _ = digits
    x = x_test[:15]
    base = tiny_mlp_classifier.base_model
    delta = PerturbationBudget(0.02, "inf").sample(base, "uniform", seed=1)
    perturbed = tiny_mlp_classifier.with_weight_perturbation(delta)
    shifted = make_mlp(seed=0)
    with torch.no_grad():
        for name, p in shifted.named_parameters():
            p.copy_(base.get_parameter(name).detach() + torch.as_tensor(delta.get(name, np.zeros(p.shape))))
    reference = make_classifier(shifted)
    for budget in [PerturbationBudget(0.01, "inf", relative=True), PerturbationBudget(0.005, "row_l1")]:
        got = WeightPerturbationCertifier(perturbed, budget, "interval", verbose=False).margin_lower_bounds(x)
        expected = WeightPerturbationCertifier(reference, budget, "interval", verbose=False).margin_lower_bounds(x)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_user_weights_are_never_modified_and_updates_are_seen(digits):
    _, _, x_test, _ = digits
    model = make_mlp(seed=2)
    clf = make_classifier(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    model.train()
    for method in METHODS:
        certifier = WeightPerturbationCertifier(clf, PerturbationBudget(0.01, "row_l1"), method, verbose=False)
        certifier.certify(x_test[:20])
        certifier.certified_radius(x_test[:5])
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    # The certifier follows later changes of the weights (e.g. training).
    certifier = WeightPerturbationCertifier(clf, PerturbationBudget(0.0, "inf"), "paper", verbose=False)
    first = certifier.margin_lower_bounds(x_test[:5])
    with torch.no_grad():
        model[2].weight.mul_(2.0)
        model[2].bias.mul_(2.0)
    np.testing.assert_allclose(certifier.margin_lower_bounds(x_test[:5]), 2 * first, rtol=1e-6)
    with torch.no_grad():
        model[2].weight.div_(2.0)
        model[2].bias.div_(2.0)


def test_accepts_a_plain_art_classifier_and_shows_progress(digits, capsys):
    _, _, x_test, _ = digits
    model = make_mlp(seed=1)
    plain = PyTorchClassifier(model, nn.CrossEntropyLoss(), (64,), 10)
    certifier = WeightPerturbationCertifier(plain, PerturbationBudget(0.001, "inf"), "interval", verbose=True)
    assert isinstance(certifier.estimator, PyTorchWeightClassifier)
    wrapped = WeightPerturbationCertifier(
        make_classifier(model), PerturbationBudget(0.001, "inf"), "interval", verbose=False
    )
    np.testing.assert_array_equal(certifier.certify(x_test[:10]), wrapped.certify(x_test[:10]))
    assert "Weight certificates" in capsys.readouterr().err


def test_certificates_need_a_margin_above_float_rounding():
    """A margin lower bound of exactly 0 or of the order of float64 rounding (1e-12) is not a certificate; a clear
    margin (1e-6) is. A linear model with eps = 0: the bounds are the exact margins, set by the biases."""
    model = nn.Linear(4, 3)
    x = np.ones((1, 4), dtype=np.float32)
    for gap, certified in [(0.0, False), (2.0**-40, False), (2.0**-20, True)]:
        with torch.no_grad():
            model.weight.zero_()
            model.bias.copy_(torch.tensor([0.0, -gap, -1.0]))
        certifier = WeightPerturbationCertifier(classifier(model, (4,), 3), PerturbationBudget(0.0), "interval")
        assert certifier.margin_lower_bounds(x, np.array([0])).min() == gap
        assert certifier.certify(x, np.array([0]))[0] == certified, gap


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method", list(METHODS))
def test_empty_batch_is_an_error(tiny_mlp_classifier, method):
    certifier = WeightPerturbationCertifier(tiny_mlp_classifier, PerturbationBudget(0.01, "inf"), method, verbose=False)
    x = np.zeros((0, 64), dtype=np.float32)
    for call in (certifier.margin_lower_bounds, certifier.certify):
        with pytest.raises(ValueError, match="`x` is empty"):
            call(x)
    with pytest.raises(ValueError, match="`x` is empty"):
        certifier.certified_radius(x, np.zeros(0, dtype=int))


def test_bad_inputs_raise_clear_errors(tiny_mlp_classifier, digits):
    _, _, x_test, y_test = digits
    certifier = WeightPerturbationCertifier(
        tiny_mlp_classifier, PerturbationBudget(0.01, "inf"), "paper", verbose=False
    )
    x = x_test[:4].copy()
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[1, 3] = bad
        for call in (certifier.certify, certifier.margin_lower_bounds, certifier.certified_radius):
            with pytest.raises(ValueError, match="`x` contains NaN or inf"):
                call(x_bad)
    with pytest.raises(ValueError, match="`x` has shape"):
        certifier.certify(x_test[:4, :10])
    with pytest.raises(ValueError, match="labels must lie in"):
        certifier.certify(x, np.array([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="labels for"):
        certifier.margin_lower_bounds(x, y_test[:3])
    with pytest.raises(TypeError, match="`x` must be a numpy array"):
        certifier.certify([[0.0] * 64])


def test_bad_parameters_raise_before_anything_is_assigned(tiny_mlp_classifier):
    budget = PerturbationBudget(0.01, "inf")
    with pytest.raises(ValueError, match="`method` must be one of"):
        WeightPerturbationCertifier(tiny_mlp_classifier, budget, method="crown")
    with pytest.raises(ValueError, match="`batch_size`"):
        WeightPerturbationCertifier(tiny_mlp_classifier, budget, batch_size=0)
    with pytest.raises(TypeError, match="`batch_size`"):
        WeightPerturbationCertifier(tiny_mlp_classifier, budget, batch_size=2.5)
    with pytest.raises(TypeError, match="`verbose`"):
        WeightPerturbationCertifier(tiny_mlp_classifier, budget, verbose="yes")
    with pytest.raises(TypeError, match="`budget`"):
        WeightPerturbationCertifier(tiny_mlp_classifier, 0.01)
    with pytest.raises(TypeError, match="`estimator`"):
        WeightPerturbationCertifier(object(), budget)
    with pytest.raises(ValueError, match="valid layers are"):
        WeightPerturbationCertifier(tiny_mlp_classifier, PerturbationBudget(0.01, "inf", layers=["fc9"]))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.relu(self.fc(x)))


@pytest.mark.parametrize(
    "model, match",
    [
        (_Residual(), "branch"),
        (nn.Sequential(nn.Linear(64, 8), nn.Mish(), nn.Linear(8, 10)), "'1' \\(Mish\\)"),
        (nn.Sequential(nn.Linear(64, 10), nn.ReLU()), "must end with a Linear layer"),
    ],
    ids=["residual", "mish", "no-final-linear"],
)
def test_unsupported_models_raise_naming_the_module(model, match):
    clf = make_classifier(model)
    with pytest.raises(UnsupportedModelError, match=match):
        WeightPerturbationCertifier(clf, PerturbationBudget(0.01, "inf"), method="paper")  # "paper": chains only


def test_class_count_must_match_the_last_layer():
    with pytest.raises(ValueError, match="`nb_classes=12` disagrees with the model, which outputs 10 values"):
        make_classifier(make_mlp(seed=0), nb_classes=12)  # caught when the estimator is built (issue 16)


def test_all_combinations_of_norm_and_method_run_on_a_cnn(digits_images):
    _, _, x_test, y_test = digits_images
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 10)
    )
    clf = make_classifier(model, input_shape=(1, 8, 8))
    for (norm, relative), method in itertools.product([("inf", False), ("row_l1", True), ("l2", False)], METHODS):
        budget = PerturbationBudget(1e-3, norm, relative=relative, include_bias=True)
        certifier = WeightPerturbationCertifier(clf, budget, method, verbose=False)
        bounds = certifier.margin_lower_bounds(x_test[:6], y_test[:6])
        assert bounds.shape == (6, 10) and not np.isnan(bounds).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["linear", "alpha"])
def test_certify_bounds_only_the_margins_the_cheaper_methods_leave_open(digits, method, dtype, monkeypatch):
    # certify runs the never_above chain (interval, then linear, then alpha) on the margins still open: the decisions
    # of the method's full bounds, with fewer (sample, class) rows bounded by the expensive method
    model = make_mlp(seed=2, hidden=32)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10, clip_values=(0.0, 1.0),
                                  optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))  # fmt: skip
    torch.manual_seed(0)
    clf.fit(digits[0], digits[1], batch_size=64, nb_epochs=10, verbose=False)
    x, y = digits[2][:60], digits[3][:60]
    budget = PerturbationBudget(0.02, "inf")  # interval certifies 0.37, linear and alpha 0.40 of the 60 points
    certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=dtype)
    bounds = certifier.margin_lower_bounds(x, y)
    tol = CERTIFICATION_RTOL * (1 + np.abs(clf.predict(x)).max(axis=1))
    full = (bounds.min(axis=1) > tol) & (clf.predict(x).argmax(axis=1) == y)
    rows = []
    original = certifier._bounds

    def counting(x_t, labels, param_balls, *args, **kwargs):
        if kwargs.get("method") in (None, METHODS[method]):
            rows.append(len(x_t) * (9 if "classes" not in kwargs else kwargs["classes"].shape[1]))
        return original(x_t, labels, param_balls, *args, **kwargs)

    monkeypatch.setattr(certifier, "_bounds", counting)
    got = certifier.certify(x, y)
    interval_only = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False, dtype=dtype).certify(
        x, y
    )
    if dtype == torch.float64:
        np.testing.assert_array_equal(got, full)
    else:  # the cheaper bounds' own boxes may decide a margin at the edge: never fewer than either method alone
        assert np.all(got >= full) and np.all(got >= interval_only)
    assert full.mean() > interval_only.mean() > 0  # a case where every step of the cascade decides margins
    assert 0 < sum(rows) < 9 * len(x)  # the expensive method bounded some rows, not every (sample, class) pair
