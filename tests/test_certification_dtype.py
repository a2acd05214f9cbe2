"""``dtype=`` of the weight certificates (issue 23, docs/theory.md §5): float32 certificates with rounding-error terms
are sound for the exact network, close to float64's, validated, and leave the user's model and backend settings as they
were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.certification.precision import check_dtype, radius_in
from art_weightpert.metrics import certified_weight_radius, weight_certified_accuracy
from art_weightpert.rounding import up_cast
from tests.conftest import make_mlp


def _tie_classifier() -> PyTorchWeightClassifier:
    """The example of docs/theory.md §5: rows a = (1, 1, 1), b = (0, 1, 0) and x = (1e8, 1, −1e8) give a·x = b·x = 1
    exactly, but float32 evaluates a·x to 0, so a naive float32 margin says "b beats a by 1"."""
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    return PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (3,), 2)


TIE_X = np.array([[1e8, 1.0, -1e8]], dtype=np.float32)


@pytest.mark.parametrize("method", ["paper", "interval", "linear"])
def test_a_tie_is_never_certified_in_float32(method):
    clf = _tie_classifier()
    assert clf.predict(TIE_X).argmax(axis=1)[0] == 1  # float32 itself predicts b
    budget = PerturbationBudget(1e-30, "inf")  # a ball around the tie, as small as float32 allows
    for dtype in (torch.float32, torch.float64):
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=dtype)
        assert not certifier.certify(TIE_X, np.array([1]))[0], dtype
        assert certifier.margin_lower_bounds(TIE_X, np.array([1]))[0, 0] <= 0, dtype


@pytest.fixture(scope="module")
def trained(digits):
    x_train, y_train, x_test, y_test = digits
    model = make_mlp(seed=2, hidden=32)
    clf = PyTorchWeightClassifier(
        model, nn.CrossEntropyLoss(), (64,), 10, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        clip_values=(0.0, 1.0),
    )  # fmt: skip
    torch.manual_seed(0)
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=10, verbose=False)
    return clf, x_test[:100], y_test[:100]


@pytest.mark.parametrize("method", ["paper", "interval", "linear"])
def test_float32_certifies_what_float64_does_and_survives_the_attack(trained, method):
    clf, x, y = trained
    budget = PerturbationBudget(2e-3, "inf")
    before = {k: v.clone() for k, v in clf.base_model.state_dict().items()}
    certified = {}
    for dtype in (torch.float64, torch.float32):
        certified[dtype] = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=dtype).certify(
            x, y
        )
    assert certified[torch.float64].mean() > 0.2
    assert abs(certified[torch.float32].mean() - certified[torch.float64].mean()) <= 0.01
    attack = PerSampleWeightPGD(clf, budget, max_iter=50, num_random_init=1, verbose=False).generate(x, y)
    assert not np.any(attack["flipped"] & certified[torch.float32])
    assert all(torch.equal(v, clf.base_model.state_dict()[k]) for k, v in before.items())


@pytest.fixture(scope="module")
def warmed_resnet(digits_images):
    from art_weightpert.zoo import digits_resnet, make_classifier
    from tests.test_loading import warmed  # batch-norm statistics of random images

    return make_classifier(warmed(digits_resnet(seed=0), (1, 8, 8)), (1, 8, 8)), digits_images[2][:64]


def test_float32_interval_certify_bounds_the_open_margins_again_on_float64_centres(warmed_resnet):
    # the float32 interval bound keeps float32 centres for its speed; certify bounds the margins it leaves open once
    # more on boxes with float64 centres (docs/theory.md §5): it certifies exactly the samples whose every margin one of
    # the two sound bounds decides, more than the float32 centres alone here, and the attack flips none of them
    from art_weightpert.certification.interval import interval_margin_bounds, interval_preactivation_bounds
    from art_weightpert.certification.precision import certification_rtol

    clf, x = warmed_resnet
    budget = PerturbationBudget(3e-6, "inf")
    certifier = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False, dtype=torch.float32)
    got = certifier.certify(x)
    logits = torch.as_tensor(clf.predict(x))
    labels = logits.argmax(dim=1)
    tol = certification_rtol(torch.float32) * (1 + logits.abs().amax(dim=1, keepdim=True))
    network, balls, x_t = certifier.network, certifier.parameter_balls, torch.as_tensor(x)
    narrow = interval_margin_bounds(network, balls, x_t, labels, torch.float32, rounding=True)
    boxes = interval_preactivation_bounds(
        network, balls, x_t, network.params(dtype=torch.float32), rounding=True, float64_centres=True
    )
    wide = interval_margin_bounds(network, balls, x_t, labels, torch.float32, boxes=boxes, rounding=True)
    np.testing.assert_array_equal(got, ((narrow > tol) | (wide > tol)).all(dim=1).numpy())
    alone = (narrow > tol).all(dim=1).sum()
    assert got.sum() >= alone + 4 and alone > 4  # the second bound decides samples the first left open
    attack = PerSampleWeightPGD(clf, budget, max_iter=30, num_random_init=1, verbose=False).generate(x, labels.numpy())
    assert not np.any(attack["flipped"] & got)


def test_float32_interval_radius_searches_with_the_rule_certify_decides_by(warmed_resnet, monkeypatch):
    # certified_radius and certify agree in float32 interval: a sample certified at a radius has a certified radius
    # at least that large (up to the search's precision); without the second bound in the search some would not
    clf, x = warmed_resnet
    budget = PerturbationBudget(3e-6, "inf")
    certifier = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False, dtype=torch.float32)
    at_budget = certifier.certify(x)
    radius = certifier.certified_radius(x)
    assert at_budget.any() and np.all(radius[at_budget] >= 3e-6 * (1 - 2.0**-18))
    monkeypatch.setattr(certifier, "_refines", lambda method: False)  # the first bound alone
    assert np.any(certifier.certified_radius(x)[at_budget] < 3e-6 * (1 - 2.0**-18))


def test_float32_radius_is_certified_and_close_to_float64(trained):
    clf, x, y = trained
    budget = PerturbationBudget(1e-3, "inf")
    r32 = certified_weight_radius(clf, x[:20], y[:20], budget, method="interval", dtype=torch.float32)
    r64 = certified_weight_radius(clf, x[:20], y[:20], budget, method="interval", dtype=torch.float64)
    assert r32.dtype == np.float64 and np.all(r32 <= r64 * (1 + 1e-4) + 1e-12)
    positive = r32 > 0
    assert positive.mean() > 0.5
    np.testing.assert_allclose(r32[positive], r64[positive], rtol=1e-3)
    certifier = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False, dtype=torch.float32)
    bounds = certifier.margin_lower_bounds(x[:20], y[:20], scale=np.where(positive, r32 / 1e-3, 0))
    assert np.all(bounds[positive].min(axis=1) > 0)


def test_metrics_take_dtype(trained):
    clf, x, y = trained
    budget = PerturbationBudget(2e-3, "inf")
    a32 = weight_certified_accuracy(clf, x, y, budget, method="interval", dtype=torch.float32)
    a64 = weight_certified_accuracy(clf, x, y, budget, method="interval", dtype=torch.float64)
    assert abs(a32 - a64) <= 0.01


def test_dtype_is_validated_and_changeable():
    clf = _tie_classifier()
    budget = PerturbationBudget(1e-3, "inf")
    with pytest.raises(ValueError, match="dtype"):
        WeightPerturbationCertifier(clf, budget, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        WeightPerturbationCertifier(clf, budget, dtype="half")
    with pytest.raises(TypeError, match="dtype"):
        WeightPerturbationCertifier(clf, budget, dtype=np.float32)
    certifier = WeightPerturbationCertifier(clf, budget, dtype="float32", verbose=False)
    assert certifier.dtype == torch.float32 and "dtype=torch.float32" in repr(certifier)
    x = np.array([[0.5, 0.2, -0.1]], dtype=np.float32)
    bounds32 = certifier.margin_lower_bounds(x)
    certifier.set_params(dtype=torch.float64)
    fresh = WeightPerturbationCertifier(clf, budget, dtype=torch.float64, verbose=False)
    np.testing.assert_array_equal(certifier.margin_lower_bounds(x), fresh.margin_lower_bounds(x))
    np.testing.assert_allclose(bounds32, fresh.margin_lower_bounds(x), rtol=1e-5)


def test_float64_weights_not_exact_in_float32_are_refused():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.1  # not a float32 number
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (3,), 2)
    certifier = WeightPerturbationCertifier(clf, PerturbationBudget(1e-3), verbose=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="float64"):
        certifier.certify(np.zeros((1, 3), dtype=np.float32))


def test_radii_are_rounded_up():
    r64 = torch.tensor([0.1, 1e-3, 0.0, 3.0], dtype=torch.float64)
    r32 = radius_in(r64, torch.float32)
    assert r32.dtype == torch.float32 and torch.all(r32.double() >= r64)
    assert torch.equal(radius_in(r64, torch.float64), r64)
    t = torch.tensor([1 / 3], dtype=torch.float64)
    assert up_cast(t, torch.float32).double() >= t and up_cast(t, torch.float32).double() - t < 1e-7
    assert check_dtype(None) in (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ corner cases
# Found by a review of the float32 rounding terms: each once gave a false float32 certificate (a margin lower bound
# above the exact minimum over the ball). The exact values are computed by hand in the comments.
def _certify_all(model, x, label, budget, shape):
    clf = PyTorchWeightClassifier(model.eval().requires_grad_(False), nn.CrossEntropyLoss(), shape, 2)
    out = {}
    for method in ("interval", "linear", "alpha"):
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=torch.float32)
        out[method] = certifier.margin_lower_bounds(x, np.array([label]))[0, 1 - label]
    return out


def test_batch_norm_shift_cancellation_is_covered():
    # β = μ = 2¹⁰⁰ and s = 1/√(var + eps) ≈ 1 − 2⁻⁶²: the exact shift β − μ s ≈ +2.7e11 is lost in float64's μ s
    first, bn, head = nn.Linear(1, 1), nn.BatchNorm1d(1, eps=2.0**-24 - 2.0**-60), nn.Linear(1, 2)
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_()
        (
            bn.running_mean.fill_(2.0**100),
            bn.running_var.fill_(1 - 2.0**-24),
            bn.weight.fill_(1.0),
            bn.bias.fill_(2.0**100),
        )
        head.weight.copy_(torch.tensor([[1.0], [0.0]])), head.bias.copy_(torch.tensor([2.0**38, 0.0]))
    bounds = _certify_all(
        nn.Sequential(first, bn, head), np.zeros((1, 1), np.float32), 0, PerturbationBudget(1e-30), (1,)
    )
    assert all(b <= -2.7e11 for b in bounds.values()), bounds  # the exact margin is −2.749e11


def test_products_below_the_normal_range_are_covered():
    # 5000 units of 1e-20 · 1e37, then a head of 2e-25: the backward coefficients underflow. Exact worst margin over
    # the ball |ΔW_head| ≤ 5e-26: (2e-25 − 1e-25) · 5e-13 − 6e-5 ≈ −1.0e-5.
    l1, l2, head = nn.Linear(1, 5000, bias=False), nn.Linear(5000, 1, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        l1.weight.fill_(1e37), l2.weight.fill_(1e-20)
        head.weight.copy_(torch.tensor([[2e-25], [0.0]])), head.bias.copy_(torch.tensor([-6e-5, 0.0]))
    model = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), head)
    bounds = _certify_all(model, np.ones((1, 1), np.float32), 0, PerturbationBudget({"4": 5e-26}), (1,))
    assert all(b <= -0.99e-5 for b in bounds.values()), bounds


def test_l2_norms_that_underflow_are_covered():
    # x = (1e-25, 1e-25): its squares underflow in float32. Exact worst margin over ‖ΔW₁‖ ≤ 2: 1e25·(2 − 2√2)·1e-25 +
    # 0.5 ≈ −0.33.
    l1, head = nn.Linear(2, 1, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        (
            l1.weight.fill_(1.0),
            head.weight.copy_(torch.tensor([[1e25], [0.0]])),
            head.bias.copy_(torch.tensor([0.5, 0.0])),
        )
    x = np.full((1, 2), 1e-25, np.float32)
    bounds = _certify_all(nn.Sequential(l1, head), x, 0, PerturbationBudget({"0": 2.0}, "l2"), (2,))
    assert all(b <= -0.32 for b in bounds.values()), bounds


def test_gelu_error_relative_to_its_input_is_covered():
    # torch's float32 gelu(−6) is −0.0, the exact value −5.92e-9: the exact margin 1e6·gelu(−6) + 3e-3 is −2.92e-3
    first, head = nn.Linear(1, 1), nn.Linear(1, 2)
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_()
        head.weight.copy_(torch.tensor([[1e6], [0.0]])), head.bias.copy_(torch.tensor([3e-3, 0.0]))
    x = np.full((1, 1), -6.0, np.float32)
    bounds = _certify_all(nn.Sequential(first, nn.GELU(), head), x, 0, PerturbationBudget(1e-30), (1,))
    assert all(b <= -2.9e-3 for b in bounds.values()), bounds


def test_exact_kernels_set_ieee_products_and_restore_the_users_flags():
    from art_weightpert.rounding import _precision_switches, exact_kernels

    switches = _precision_switches()
    before = [getattr(obj, name) for obj, name, _ in switches]
    with pytest.raises(RuntimeError, match="inside"):
        with exact_kernels():
            assert [getattr(obj, name) for obj, name, _ in switches] == [value for _, _, value in switches]
            assert not torch.backends.cudnn.enabled
            raise RuntimeError("inside")
    assert [getattr(obj, name) for obj, name, _ in switches] == before


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("hidden", [False, True])
def test_underflow_inside_a_convolutions_ball_term_is_covered(relative, hidden):
    # Found by an independent review. A 3×3 convolution of weight 1e8 in a box of radius 5e7 (or half of it), inputs
    # 1e-16, a head of ±1e-30: every product λ·patch of the kernel gradient G underflows in float32, so G computes to
    # 0 and the ball's term −Σ δ|G| (≈ −5.8e-36, weighted by the large δ) vanishes. The exact margin at Δ = −δ is
    # −2.24e-36; without the ball term's underflow bound (weight_terms.ball_underflow) float32 gave +3.5e-36.
    from art_weightpert.certification.linear import linear_margin_bounds
    from art_weightpert.network import read_network

    conv_in, conv, head = nn.Conv2d(64, 64, 1, bias=False), nn.Conv2d(64, 1, 3, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        conv_in.weight.copy_(torch.eye(64).reshape(64, 64, 1, 1)), conv.weight.fill_(1e8)
        head.weight.copy_(torch.tensor([[1e-30], [-1e-30]])), head.bias.copy_(torch.tensor([-4e-36, 4e-36]))
    layers = [conv_in, conv] if hidden else [conv]
    model = nn.Sequential(*layers, nn.Flatten(), head).eval().requires_grad_(False)
    name = str(len(layers) - 1)
    eps = {name: 0.5 if relative else 5e7} | ({"0": 1e-30} if hidden else {})
    budget = PerturbationBudget(eps, "inf", relative=relative)
    network = read_network(model, (64, 3, 3))
    x = torch.full((1, 64, 3, 3), 1e-16)
    bound = linear_margin_bounds(network, budget.parameter_balls(model, torch.float32), x, torch.tensor([0]),
                                 torch.float32, rounding=True)[0, 1]  # fmt: skip
    params = {n: p.double() for n, p in model.named_parameters()}
    for ball in budget.parameter_balls(model, torch.float64):  # the worst case: every weight down by its radius
        params[ball.param_name] = params[ball.param_name] - ball.radius.double().expand_as(params[ball.param_name])
    logits = network.forward(x.double(), params)[0]
    exact = float(logits[0] - logits[1])
    assert exact == pytest.approx(-2.24e-36, rel=1e-3)
    assert float(bound) <= exact


@pytest.mark.parametrize("method", ["linear", "alpha"])
def test_float32_radius_search_stops_at_float32_precision(trained, method, monkeypatch):
    """The radius factors of a float32 search are float32 (rounded up): the search stops at a width of a few float32
    ulps (:func:`.search_precision`) instead of evaluating the same float32 factors again down to float64's width, so
    it evaluates fewer points than the float64 search, and its radius stays within that width of a certified one."""
    import art_weightpert.certification.certifier as certifier_module

    clf, x, y = trained
    budget = PerturbationBudget(1e-3, "inf")
    evaluated = {}
    real_factors_in = certifier_module.factors_in

    def counting_factors_in(scale, dtype):
        if scale is not None:
            evaluated[dtype] = evaluated.get(dtype, 0) + len(scale)
        return real_factors_in(scale, dtype)

    monkeypatch.setattr(certifier_module, "factors_in", counting_factors_in)
    radii = {}
    for dtype in (torch.float64, torch.float32):
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=dtype)
        radii[dtype] = certifier.certified_radius(x[:10], y[:10])
    assert evaluated[torch.float32] < evaluated[torch.float64]
    positive = radii[torch.float32] > 0
    assert positive.mean() > 0.5
    np.testing.assert_allclose(radii[torch.float32][positive], radii[torch.float64][positive], rtol=1e-3)
    scale = np.where(positive, radii[torch.float32] / 1e-3, 0)
    bounds = certifier.margin_lower_bounds(x[:10], y[:10], scale=scale)
    assert np.all(bounds[positive].min(axis=1) > 0)


def test_a_certificate_runs_with_gradual_underflow_and_restores_flushing():
    """The underflow terms of docs/theory.md §5 count an absolute error of at most 2⁻¹⁴⁹ per float32 operation; a
    CPU that flushes subnormals to zero (``torch.set_flush_denormal(True)``, or a library built with ``-ffast-math``)
    loses up to 2⁻¹²⁶. A certificate turns flushing off while it runs and back on after: the convolution case above,
    through the certifier with flushing on, stays below its exact margin (with flushing left on it certified +3.5e-36
    against an exact −2.24e-36)."""
    from art_weightpert.rounding import flushes_denormals

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    conv, head = nn.Conv2d(64, 1, 3, bias=False), nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.fill_(1e8)
        head.weight.copy_(torch.tensor([[1e-30], [-1e-30]])), head.bias.copy_(torch.tensor([-4e-36, 4e-36]))
    model = nn.Sequential(conv, nn.Flatten(), head).eval().requires_grad_(False)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64, 3, 3), 2)
    x = np.full((1, 64, 3, 3), 1e-16, np.float32)
    bounds = {}
    try:
        torch.set_flush_denormal(True)
        for method in ("linear", "alpha"):
            certifier = WeightPerturbationCertifier(
                clf, PerturbationBudget({"0": 5e7}), method=method, verbose=False, dtype=torch.float32
            )
            bounds[method] = certifier.margin_lower_bounds(x, np.array([0]))[0, 1]
            assert flushes_denormals(), "the user's mode is restored"
    finally:
        torch.set_flush_denormal(False)
    assert all(b <= -2.2e-36 for b in bounds.values()), bounds


@pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="this torch has no NNPACK")
def test_a_certificate_never_runs_nnpack_convolutions():
    """With oneDNN disabled (``torch.backends.mkldnn.enabled = False``) torch runs float32 convolutions of batches of
    16 or more through NNPACK, whose Winograd transforms mix a 3×3 kernel's zero taps' inputs into every output: here
    the centre tap alone reads a 1 among values of 1e8, and NNPACK errs by up to 368, where the dot product's error
    bound of docs/theory.md §5 is 6e-7. A certificate turns NNPACK off (and restores the user's flags): before, 16 of
    these 32 samples of exact margin −0.001 were certified."""
    conv, head = nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Linear(64, 2)
    with torch.no_grad():
        conv.weight.zero_(), conv.weight[0, 0, 1, 1].fill_(1.0)
        head.weight.zero_(), head.weight[0, 9].fill_(1.0), head.bias.copy_(torch.tensor([-1.001, 0.0]))
    model = nn.Sequential(conv, nn.Flatten(), head).eval().requires_grad_(False)
    x = (torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e8).numpy()
    x[:, :, 1, 1] = 1.0  # the exact margin f_0 − f_1 is 1 − 1.001 for every sample
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1, 8, 8), 2)
    mkldnn = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = False
        for method in ("interval", "linear"):
            certifier = WeightPerturbationCertifier(
                clf, PerturbationBudget({"2": 1e-30}), method=method, verbose=False, dtype=torch.float32
            )
            bounds = certifier.margin_lower_bounds(x, np.zeros(32, dtype=int))[:, 1]
            assert np.all(bounds <= -0.001), method
            assert not certifier.certify(x, np.zeros(32, dtype=int)).any(), method
            assert torch._C._get_nnpack_enabled(), "the user's NNPACK flag is restored"
    finally:
        torch.backends.mkldnn.enabled = mkldnn


def test_a_certificate_inside_autocast_computes_in_float32():
    """A certificate called inside ``torch.autocast`` (bfloat16 on the CPU) would run its products in bfloat16, whose
    rounding (2⁻⁹ relative) the float32 terms do not cover: the weight 1 + 2⁻⁸ + 2⁻¹⁴ rounds up to 1 + 2⁻⁷ and the
    bias −3.0167 up to −3.015625. A certificate turns autocast off: its bounds are those computed outside, and the
    exact margin −4.8e-3 is not certified (before: a bound of +7.8e-3, certified)."""
    lin = nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1 + 2.0**-8 + 2.0**-14], [0.0]])), lin.bias.copy_(torch.tensor([-3.0167, 0.0]))
    clf = PyTorchWeightClassifier(nn.Sequential(lin), nn.CrossEntropyLoss(), (1,), 2, clip_values=(0.0, 4.0))
    x, y = np.array([[3.0]], np.float32), np.array([0])
    exact = (1 + 2.0**-8 + 2.0**-14) * 3.0 + float(np.float32(-3.0167))
    assert exact == pytest.approx(-4.8e-3, rel=1e-2)
    for method in ("interval", "linear", "alpha"):
        certifier = WeightPerturbationCertifier(clf, PerturbationBudget(1e-30), method=method, verbose=False,
                                                dtype=torch.float32)  # fmt: skip
        outside = certifier.margin_lower_bounds(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = certifier.margin_lower_bounds(x, y)
            assert not certifier.certify(x, y)[0], method
        np.testing.assert_array_equal(inside, outside)
        assert inside[0, 1] <= exact, method
