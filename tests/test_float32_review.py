"""False float32 certificates found by an independent review (issue 23, docs/theory.md §5), each now covered: smooth
activations whose float32 error is relative to their input (SiLU, Softplus with β ≠ 1), box centres that overflow
(an overflowed box or margin never certifies), and the per-sample radius factors of a folded relative box, which
scaled the rounding term too. Each case's exact margin is computed in float64 (or closed form) and must stay at or
above every method's float32 lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier

METHODS = ("interval", "linear", "alpha", "paper")


def _bounds(model, x, budget, shape, methods=METHODS):
    clf = PyTorchWeightClassifier(model.eval().requires_grad_(False), nn.CrossEntropyLoss(), shape, 2)
    out = {}
    for method in methods:
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=torch.float32)
        out[method] = (certifier.margin_lower_bounds(x, np.array([0]))[0, 1], bool(certifier.certify(x, [0])[0]))
    return out


def _head(weight, bias=(0.0, 0.0)) -> nn.Linear:
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[weight[0]], [weight[1]]])), head.bias.copy_(torch.tensor(bias))
    return head


def _identity() -> nn.Linear:
    first = nn.Linear(1, 1)
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_()
    return first


@pytest.mark.parametrize(
    "activation, x, head_weight, exact",
    [
        # silu(−89) is −0.0 in float32 (σ underflows), −1.98e-37 exactly: margin 1e37·silu(−89) + 1
        (nn.SiLU(), -89.0, 1e37, 1e37 * -89.0 / (1 + math.exp(89.0)) + 1),
        # softplus_β(x) = log(1 + e^{βx})/β with β = 1e-20, βx = −104: 0 in float32, e^{−104}/β = 6.8e-26 exactly
        (nn.Softplus(beta=1e-20), -1.04e22, -1e26, float(np.float32(-1e26)) * math.exp(-104.0) / 1e-20 + 1),
    ],
    ids=["silu", "softplus_small_beta"],
)
def test_smooth_activations_with_errors_relative_to_their_input(activation, x, head_weight, exact):
    model = nn.Sequential(_identity(), activation, _head((head_weight, 0.0), (1.0, 0.0)))
    assert exact < 0
    for method, (bound, certified) in _bounds(model, np.full((1, 1), x, np.float32), PerturbationBudget(1e-30),
                                              (1,)).items():  # fmt: skip
        assert bound <= exact and not certified, (method, bound)


def test_a_margin_whose_centre_overflows_is_not_certified():
    # the folded last layer's centre (W/2)(lo + hi) at c = 1.75e38: lo + hi overflows, the margin was +inf (then
    # 3.4e38 after rounding down) and the certified radius inf; the exact worst margin in the ball is −3.5
    first = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        first.weight.fill_(1.0)
    model = nn.Sequential(first, _head((1e-38, -1e-38)))
    x = np.full((1, 1), 1.75e38, np.float32)
    worst = 2 * (float(np.float32(1e-38)) - float(np.float32(2e-38))) * float(x[0, 0])
    budget = PerturbationBudget({"1": 2e-38})
    for method, (bound, certified) in _bounds(model, x, budget, (1,)).items():
        assert bound <= worst and not certified, (method, bound)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1,), 2)
    radius = WeightPerturbationCertifier(clf, budget, "linear", verbose=False, dtype=torch.float32).certified_radius(
        x, np.array([0])
    )
    assert radius[0] < 1  # the budget's own radius breaks it


def test_a_hidden_box_that_overflows_is_not_turned_finite_by_a_saturating_activation():
    # the hidden centre (W/2)(lo + hi) overflowed to [inf, inf] and tanh made it [1, 1]: certified, though W₂ + ΔW₂ = 0
    # is in the ball and gives the margin tanh(0) − 0.99 = −0.99
    first, second = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        first.weight.fill_(1.0), second.weight.fill_(2e-38)
    model = nn.Sequential(first, second, nn.Tanh(), _head((1.0, 0.0), (-0.99, 0.0)))
    bounds = _bounds(model, np.full((1, 1), 1.75e38, np.float32), PerturbationBudget({"1": 2e-38}), (1,))
    for method, (bound, certified) in bounds.items():
        assert bound <= -0.99 and not certified, (method, bound)


def test_a_first_layer_sum_that_overflows_is_not_certified():
    # W x = 2·(−3e38) + 2·(3.0000002e38) is +4.06e31 exactly; float32 (a batch of 8, fused multiply-adds) accumulates
    # −inf: the box was [−inf, −inf], tanh gave −1 where the exact value is +1, and the margin −1.5 was certified
    first = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.fill_(2.0)
    model = nn.Sequential(first, nn.Tanh(), _head((-1.0, 0.0), (-0.5, 0.0)))
    x = np.tile(np.array([[-3e38, np.nextafter(np.float32(3e38), np.float32(np.inf))]], np.float32), (8, 1))
    clf = PyTorchWeightClassifier(model.eval().requires_grad_(False), nn.CrossEntropyLoss(), (2,), 2)
    for method in METHODS:
        certifier = WeightPerturbationCertifier(clf, PerturbationBudget({"2": 1e-3}), method, verbose=False,
                                                dtype=torch.float32)  # fmt: skip
        bounds = certifier.margin_lower_bounds(x, np.zeros(8, dtype=int))[:, 1]
        assert np.all(bounds <= -1.5), (method, bounds)
        assert not certifier.certify(x, np.zeros(8, dtype=int)).any(), method


def test_radius_factors_scale_the_folded_ball_but_not_the_rounding_term():
    # a relative box folded into |W| (ε|W|m): the per-sample factor s multiplied the rounding term g|W|m as well, so at
    # s < 1 the centre's rounding (here ~600u, 20000 terms that each round the sum up) was not covered
    from fractions import Fraction

    from art_weightpert.certification.interval import interval_margin_bounds
    from art_weightpert.certification.linear import linear_margin_bounds
    from art_weightpert.network import read_network

    n = 20000
    c = torch.full((n,), 2.0**-24 * 1.01)
    c[:32] = 1.0
    l1, l2 = nn.Linear(1, n, bias=False), nn.Linear(n, 1, bias=False)
    z_exact = sum(Fraction(float(v)) for v in c)
    b = float(torch.tensor(-float(z_exact) - 2e-4))
    with torch.no_grad():
        l1.weight.copy_(c.reshape(n, 1)), l2.weight.fill_(1.0)
    model = nn.Sequential(l1, l2, _head((1.0, 0.0), (b, 0.0))).eval().requires_grad_(False)
    network = read_network(model, (1,))
    balls = PerturbationBudget({"1": 2.0**-10}, "inf", relative=True).parameter_balls(model, torch.float32)
    for s in (1e-3, 0.0):
        worst = float(z_exact + Fraction(b)) - s * 2.0**-10 * float(z_exact)
        for fn in (interval_margin_bounds, linear_margin_bounds):
            bound = fn(network, balls, torch.ones((1, 1)), torch.tensor([0]), torch.float32, scale=torch.tensor([s]),
                       rounding=True)[0, 1]  # fmt: skip
            assert float(bound) <= worst, (fn.__name__, s, float(bound), worst)


def _rule_error(op, a: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """``(Σ |a_in − exact a_in|·|h|, −constant)`` of ``op``'s float32 backward rule with rounding at the point box
    ``h``: the constant must cover the rounding of the coefficients it returns (docs/theory.md §5)."""
    from types import SimpleNamespace

    a_in, const = op.backward(a, h, h, SimpleNamespace(rounding=True))
    exact, _ = op.backward(a.double(), h.double(), h.double())
    return float(((a_in.double() - exact).abs() * h.double().abs()).sum()), -float(const.sum())


def test_an_upsampling_adaptive_average_pooling_counts_the_windows_of_each_input():
    # a 1×1 map pooled to 64×64: the coefficient of the one input sums 4096 windows, 1 then 4095 × −0.49u, which
    # float32 absorbs (it stays 1, exactly 1 − 2006.6u); the error term counted the map's one entry, not the windows
    from art_weightpert.operators.pooling import AvgPool

    a = torch.full((1, 1, 1, 64, 64), -0.49 * 2.0**-24)
    a[0, 0, 0, 0, 0] = 1.0
    error, covered = _rule_error(AvgPool("pool", nn.AdaptiveAvgPool2d(64)), a, torch.ones((1, 1, 1, 1)))
    assert error > 1e-4 and covered >= error


def test_overlapping_max_pooling_rounds_the_sum_of_an_inputs_windows():
    # a 31×31 map whose centre is its maximum, max pooling 16×16 at stride 1: the centre is the maximum of all 256
    # windows, and its folded coefficient sums 1 then 255 × −0.49u, which float32 absorbs (exactly 1 − 125u); the
    # coefficients were said exact
    from art_weightpert.operators.max_pool import MaxPool

    a = torch.full((1, 1, 1, 16, 16), -0.49 * 2.0**-24)
    a[0, 0, 0, 15, 15] = 1.0  # the window that F.fold adds first
    h = torch.zeros((1, 1, 31, 31))
    h[0, 0, 15, 15] = 1.0
    error, covered = _rule_error(MaxPool.from_module("pool", nn.MaxPool2d(16, stride=1)), a, h)
    assert error > 5e-6 and covered >= error


# ------------------------------------------------------------- the review of the float64 centres (subnormal weights)
def _subnormal_weight_model() -> nn.Sequential:
    """``1e30 x → ReLU → 2⁻¹⁴⁹ · → ReLU → head (0; 2e20)`` with biases ``(3e5, 0)``: exact margin at ``x = 1``
    ``3e5 − 2e20 · 2⁻¹⁴⁹ · 1e30 = 19740.3``, the hidden weight a float32 subnormal."""
    first, middle = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        first.weight.fill_(1e30), middle.weight.fill_(2.0**-149)
    return nn.Sequential(first, nn.ReLU(), middle, nn.ReLU(), _head((0.0, 2e20), (3e5, 0.0)))


def test_a_subnormal_weight_is_not_halved_to_zero():
    # the centre W c = (W/2)(l + u) took W/2 in float32: 2⁻¹⁴⁹ halves to 0, so the hidden layer's centre was 0 while
    # its input is 1e30, and every float32 method certified a radius 15 times the float64 one (0.254 against 0.0171)
    model = _subnormal_weight_model()
    x, y = np.ones((1, 1), np.float32), np.array([0])
    clf = PyTorchWeightClassifier(model.eval().requires_grad_(False), nn.CrossEntropyLoss(), (1,), 2)
    budget = PerturbationBudget(0.1, "inf", relative=True, include_bias=True)
    worst = 3e5 * 0.9 - 2e20 * 1.1 * (2.0**-149 * 1.1) * (1e30 * 1.1)  # every weight up, the label's bias down
    exact_radius = WeightPerturbationCertifier(clf, budget, verbose=False).certified_radius(x, y)[0]
    for method in ("interval", "linear", "alpha"):
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=torch.float32)
        assert certifier.margin_lower_bounds(x, y)[0, 1] <= worst, method
        assert certifier.certified_radius(x, y)[0] <= exact_radius * (1 + 1e-6), method
        exact = WeightPerturbationCertifier(
            clf, PerturbationBudget(0.0), method=method, verbose=False, dtype=torch.float32
        )
        assert exact.margin_lower_bounds(x, y)[0, 1] <= 3e5 - 2e20 * 2.0**-149 * 1e30, method


@pytest.mark.parametrize("float64_centre", [False, True])
def test_an_underflowing_centre_term_is_covered(float64_centre):
    # a degenerate box (lo equal to hi, an unknown input) of magnitudes 3·2⁻¹⁴⁹ and 2⁻¹⁰² under weights 2¹⁰⁰ and 1:
    # the centre's rounding term 2g·m underflowed to 0 before |W| scaled it up, and the box missed the exact value
    from fractions import Fraction

    from art_weightpert.certification.interval import rounded_affine_interval
    from art_weightpert.network import read_network

    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0**100, 1.0]]))
    network = read_network(nn.Sequential(layer, nn.Linear(1, 2)), (2,))
    c = torch.tensor([[3 * 2.0**-149, -(2.0**-102)]])
    lo, hi = rounded_affine_interval(network.layers[0], network.params(dtype=torch.float32), c, c.clone(), {},
                                     float64_centre=float64_centre)  # fmt: skip
    exact = Fraction(2) ** 100 * 3 * Fraction(2) ** -149 - Fraction(2) ** -102
    assert Fraction(float(lo)) <= exact <= Fraction(float(hi))


# ------------------------------------------------------------------------------------ joins of three paths or more
def test_a_join_of_three_paths_counts_its_partial_sums():
    # docs/theory.md §5: summing k coefficient tensors one after the other, the j-th addition rounds within u|s_j| of
    # its result, and a partial sum can exceed the final one: 1e8 + 1 − 1e8 sums to 0 in float32 (exact: 1), an error
    # the final sum's γ_k ⟨|Λ|, m⟩ (0 here) cannot cover; the partial sum |1e8 + 1| is kept for the join's term
    from art_weightpert.certification.linear import Joins, _accumulate

    pending, joins = {}, Joins()
    for term in (1e8, 1.0, -1e8):
        _accumulate(pending, 3, torch.tensor([[[term]]]), joins)
    assert pending[3].item() == 0.0 and joins.count[3] == 3
    assert joins.partial[3].item() == 1e8  # |s_2| = fl(1e8 + 1)
    m = torch.tensor([[2.0]])
    assert joins.error(3, pending[3], m).item() >= 2.0  # at least the lost 1 times |v| ≤ 2
    assert 3 not in joins.partial  # taken once


def test_three_paths_meeting_at_a_value_lower_the_bound_by_their_partial_sums(monkeypatch):
    import art_weightpert.certification.linear as linear
    from art_weightpert.certification.linear import backward_margin_bounds
    from art_weightpert.network import read_network

    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.neg = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
            self.a, self.b, self.c = (nn.Linear(1, 2, bias=False) for _ in range(3))
            self.head = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            y = self.fc1(x) + self.neg(x)
            return self.head(self.a(y) + self.b(y) + self.c(y))

    model = Three()
    with torch.no_grad():
        model.fc1.weight.fill_(1e4)
        model.neg.weight.fill_(-1e4)
        model.head.weight.copy_(torch.eye(2))
        for layer, value in ((model.a, -1e8), (model.b, 1.0), (model.c, 1e8)):
            layer.weight.copy_(torch.tensor([[value], [0.0]]))
    model = model.eval().requires_grad_(False)
    network = read_network(model, (1,))
    x, labels = torch.tensor([[1.0]]), torch.tensor([1])
    with_partials = backward_margin_bounds(network, {}, x, labels, torch.float32, rounding=True)[0, 0]
    monkeypatch.setattr(linear.Joins, "partial_error", lambda self, value, m: 0.0)
    without = backward_margin_bounds(network, {}, x, labels, torch.float32, rounding=True)[0, 0]
    exact = backward_margin_bounds(network, {}, x.double(), labels, torch.float64)[0, 0]
    assert with_partials <= exact == 0.0
    assert with_partials < without - 0.5  # the partial sums' term ⟨|1e8 + 1|, m⟩ γ, m the box of y (its rounding)


# ------------------------------------------------------------------------- a batch-norm scale below float32's range
def test_a_subnormal_batch_norm_scale_is_covered_in_the_box_and_the_backward_rule():
    # a float64 scale of 1.2e-44 is 9·2⁻¹⁴⁹ in float32 (6e-46 off, relative 5%): at |h| = 3e38 the box moved by 1.8e-7
    # while its rounding term g|s|m underflowed (the review of this stop; older than it); in the backward rule the
    # coefficients λ·s are off by |λ|·6e-46 each, times |h|
    from fractions import Fraction

    from art_weightpert.certification.interval import round_fixed
    from art_weightpert.operators.batch_norm import BatchNorm
    from art_weightpert.rounding import finite_box

    layer = BatchNorm("bn", torch.tensor([1.2e-44], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    h = torch.tensor([[3e38]])
    lo, hi = finite_box(*round_fixed(layer, layer.interval(h, h), [(h, h)]))
    exact = Fraction(1.2e-44) * Fraction(h.item())
    assert Fraction(lo.item()) <= exact <= Fraction(hi.item())
    error, covered = _rule_error(layer, torch.full((1, 1, 1), 1e30), torch.tensor([[3e8]]))
    assert error > 1e-7 and covered >= error
