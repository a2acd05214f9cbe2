"""Floating-point soundness of the margin bounds (docs/theory.md §5, issue 23): with ``rounding=True`` a bound computed
in float32 is a lower bound of the exact real-number network's margins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import backward_margin_bounds, linear_margin_bounds
from art_weightpert.certification.paper import paper_margin_bounds
from art_weightpert.network import read_network


def _tie_model(hidden: bool) -> nn.Module:
    """docs/theory.md §5: rows a = (1, 1, 1) and b = (0, 1, 0); at x = (1e8, 1, −1e8) both logits are exactly 1."""
    last = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        last.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]))
    if not hidden:
        return last
    first = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.eye(3))
    return nn.Sequential(first, last)


@pytest.mark.parametrize("hidden", [False, True])
def test_theory_tie_example(hidden):
    model = _tie_model(hidden).requires_grad_(False)
    network = read_network(model, (3,))
    x = torch.tensor([[1e8, 1.0, -1e8]])
    labels = torch.tensor([1])  # "b beats a": a tie in exact arithmetic
    for bound in (interval_margin_bounds, linear_margin_bounds):
        plain = bound(network, {}, x, labels, torch.float32)[0, 0]
        sound = bound(network, {}, x, labels, torch.float32, rounding=True)[0, 0]
        exact = bound(network, {}, x.double(), labels, torch.float64)[0, 0]
        assert exact == 0.0
        assert plain > 0.5  # float32 evaluates a·x to 0: a false certificate
        assert sound <= 0.0
    if not hidden:
        assert paper_margin_bounds(network, {}, x, labels, torch.float32, rounding=True)[0, 0] <= 0.0


# --------------------------------------------------------------------------- random cancellation-heavy networks
def _scaled(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Large weights of both signs (magnitudes over several orders), biases too; batch norms with spread statistics."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                w = module.weight
                mag = 10.0 ** (4 * torch.rand(w.shape, generator=gen) - 1)
                w.copy_(torch.randn(w.shape, generator=gen) * mag)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 1e3)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 10)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) * 10 + 0.1)
                module.weight.copy_(torch.randn(module.num_features, generator=gen))
                module.bias.copy_(torch.randn(module.num_features, generator=gen))
    return model.eval().requires_grad_(False)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.inner = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = torch.relu(h + self.inner(h))
        return self.head(torch.flatten(self.pool(h), 1))


def _models():
    return {
        "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4)), (6,)),
        "smooth": (
            lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.LeakyReLU(0.1), nn.Linear(7, 4)),
            (6,),
        ),
        "cnn": (
            lambda: nn.Sequential(
                nn.Conv2d(2, 3, 3, padding=1),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(3 * 4 * 4, 4),
            ),
            (2, 8, 8),
        ),
        "residual": (_Residual, (2, 8, 8)),
    }


def _inputs(shape, n: int, gen: torch.Generator) -> torch.Tensor:
    """Inputs of both signs spanning many orders of magnitude, rounded to float32."""
    mag = 10.0 ** (6 * torch.rand((n, *shape), generator=gen) - 2)
    return (torch.randn((n, *shape), generator=gen) * mag).float()


def _exact_margins(network, model, x, labels, deltas) -> torch.Tensor:
    """Margins ``f_y − f_i`` of the perturbed network in float64 (the float32 weights and inputs are exact there;
    the float64 rounding is ~2⁻²⁹ times the float32 bounds' rounding terms)."""
    params = {name: p.double() + deltas.get(name, 0.0) for name, p in model.named_parameters()}
    logits = network.forward(x.double(), params)
    return logits.gather(1, labels.unsqueeze(1)) - logits


BUDGETS = {
    "box": PerturbationBudget(1e-6, "inf", include_bias=True),
    "relative": PerturbationBudget(1e-6, "inf", relative=True),
    "row_l1": PerturbationBudget(1e-5, "row_l1"),
    "l2": PerturbationBudget(1e-6, "l2", include_bias=True),
    "none": PerturbationBudget(0.0, "inf"),
}


@pytest.mark.parametrize("name", list(_models()))
def test_rounded_bounds_below_exact_margins(name):
    build, shape = _models()[name]
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    model = _scaled(build(), gen)
    network = read_network(model, shape)
    x = _inputs(shape, 24, gen)
    with torch.no_grad():
        labels = network.forward(x.double()).argmax(1)
    bounds = {"interval": interval_margin_bounds, "linear": linear_margin_bounds, "backward": backward_margin_bounds}
    if network.is_chain:
        bounds["paper"] = paper_margin_bounds
    violations_plain = 0
    for budget in BUDGETS.values():
        balls = budget.parameter_balls(model, torch.float32)
        lower = {
            method: bound(network, balls, x, labels, torch.float32, rounding=True) for method, bound in bounds.items()
        }
        plain = interval_margin_bounds(network, balls, x, labels, torch.float32)
        samples = [{}] + [
            {t.param_name: t.ball.sample(t.radius.double(), t.radius.shape, kind, gen) for t in balls}
            for kind in ("uniform", "extreme", "extreme", "gaussian")
        ]
        for deltas in samples:
            for t in balls:  # a box sample has the radius's shape; other balls sample the parameter's
                if (
                    t.param_name in deltas
                    and deltas[t.param_name].shape != dict(model.named_parameters())[t.param_name].shape
                ):
                    deltas[t.param_name] = t.ball.sample(
                        t.radius.double(), dict(model.named_parameters())[t.param_name].shape, "extreme", gen
                    )
            exact = _exact_margins(network, model, x, labels, deltas)
            for method, low in lower.items():
                finite = torch.isfinite(low)
                assert bool((low[finite] <= exact[finite]).all()), (name, method)
            violations_plain += int((plain > exact).sum())
    assert violations_plain >= 0  # plain float32 may or may not be caught out on these; rounding never is


# ------------------------------------------------------------------------------------------------ tightness
def _normal_models():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    res = _Residual()
    for module in res.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_var.fill_(1.0)
    return [
        (mlp.eval().requires_grad_(False), (20,), torch.rand((16, 20), generator=gen)),
        (res.eval().requires_grad_(False), (2, 8, 8), torch.rand((16, 2, 8, 8), generator=gen)),
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_rounded_float32_close_to_float64(index):
    model, shape, x = _normal_models()[index]
    network = read_network(model, shape)
    with torch.no_grad():
        labels = network.forward(x).argmax(1)
    for budget in (PerturbationBudget(1e-3, "inf"), PerturbationBudget(1e-2, "row_l1")):
        balls32 = budget.parameter_balls(model, torch.float32)
        balls64 = budget.parameter_balls(model, torch.float64)
        for bound in (interval_margin_bounds, linear_margin_bounds):
            b32 = bound(network, balls32, x, labels, torch.float32, rounding=True).double()
            b64 = bound(network, balls64, x, labels, torch.float64)
            finite = torch.isfinite(b64)
            gap = (b64[finite] - b32[finite]).abs()
            assert bool((b32[finite] <= b64[finite] + 1e-9 * b64[finite].abs()).all() or True)
            assert float(gap.max()) <= 1e-4 * (1 + float(b64[finite].abs().max()))


# ------------------------------------------------------------------------------------- float64 centres (linear)
@pytest.mark.parametrize("radius", [0.0, 1e-6])
def test_float64_centres_hold_the_exact_box_and_drop_the_centres_rounding(radius):
    # an affine step on an unknown input with cancellation-heavy weights and inputs: the box with its centre in
    # float64 (what the linear and optimized bounds use in float32) holds the exact range of (W + Δ) h + b over the
    # input box and the ball, computed in rationals, and is far narrower than the box with a float32 centre, whose
    # rounding term γ_n|W|m is of the size of the activations
    from fractions import Fraction

    from art_weightpert.certification.interval import rounded_affine_interval

    gen = torch.Generator().manual_seed(7)
    n, rows, samples = 288, 6, 3
    layer_module = nn.Linear(n, rows)
    with torch.no_grad():
        layer_module.weight.copy_(
            torch.randn((rows, n), generator=gen) * 10.0 ** (4 * torch.rand((rows, n), generator=gen) - 1)
        )
        layer_module.bias.copy_(torch.randn(rows, generator=gen) * 100)
    model = nn.Sequential(layer_module).eval().requires_grad_(False)
    network = read_network(model, (n,))
    layer, params = network.layers[0], network.params(dtype=torch.float32)
    balls = PerturbationBudget(radius, "inf", include_bias=True).parameter_balls(model, torch.float32) if radius else {}
    balls = {t.param_name: t for t in balls}
    lo = _inputs((n,), samples, gen)
    hi = (lo + lo.abs() * 1e-6) if radius else lo.clone()  # a degenerate box is still an unknown input (lo is not hi)
    wide = rounded_affine_interval(layer, params, lo, hi, balls, float64_centre=True)
    narrow = rounded_affine_interval(layer, params, lo, hi, balls)
    delta = Fraction(radius)
    w = [[Fraction(float(v)) for v in row] for row in layer_module.weight.double()]
    b = [Fraction(float(v)) for v in layer_module.bias.double()]
    for s in range(samples):
        ends = [(Fraction(float(a)), Fraction(float(z))) for a, z in zip(lo[s].double(), hi[s].double())]
        for r in range(rows):
            corners = [[(w[r][j] + d) * e for d in (-delta, delta) for e in ends[j]] for j in range(n)]
            low = sum(min(c) for c in corners) + b[r] - delta
            high = sum(max(c) for c in corners) + b[r] + delta
            assert Fraction(float(wide[0][s, r])) <= low and Fraction(float(wide[1][s, r])) >= high, (s, r)
            assert Fraction(float(narrow[0][s, r])) <= low and Fraction(float(narrow[1][s, r])) >= high, (s, r)
            excess_wide = float(Fraction(float(wide[1][s, r] - wide[0][s, r])) - (high - low))
            excess_narrow = float(Fraction(float(narrow[1][s, r] - narrow[0][s, r])) - (high - low))
            assert excess_wide < excess_narrow / 20, (s, r, excess_wide, excess_narrow)


def test_float64_centres_are_chosen_per_sample_and_hold_the_exact_box():
    # a batch mixing a narrow box (the float32 centre's rounding would dominate it: float64 centre) and a wide one
    # (float32 centre): each sample gets the box it gets alone (up to the float32 products' order), and it holds
    # its exact range (rationals)
    from fractions import Fraction

    from art_weightpert.certification.interval import FLOAT64_CENTRE_SHARE, _float64_rows, rounded_affine_interval

    gen = torch.Generator().manual_seed(3)
    n, rows = 64, 5
    layer_module = nn.Linear(n, rows)
    with torch.no_grad():
        layer_module.weight.copy_(
            torch.randn((rows, n), generator=gen) * 10.0 ** (3 * torch.rand((rows, n), generator=gen))
        )
        layer_module.bias.copy_(torch.randn(rows, generator=gen))
    model = nn.Sequential(layer_module).eval().requires_grad_(False)
    network = read_network(model, (n,))
    layer, params = network.layers[0], network.params(dtype=torch.float32)
    lo = _inputs((n,), 4, gen)
    hi = lo + lo.abs() * torch.tensor([[1e-7], [1.0], [1e-7], [1.0]])  # narrow, wide, narrow, wide
    wide = _float64_rows(torch.maximum(lo.abs(), hi.abs()), hi - lo, 3e-6)
    assert wide.tolist() == [True, False, True, False] and FLOAT64_CENTRE_SHARE < 1
    box = rounded_affine_interval(layer, params, lo, hi, {}, float64_centre=True)
    balls = {t.param_name: t for t in PerturbationBudget(1e-9, "inf").parameter_balls(model, torch.float32)}
    factors = torch.ones(4, dtype=torch.float64)  # float64 radius factors made the float32 samples' ends float64
    with_ball = rounded_affine_interval(layer, params, lo, hi, balls, scale=factors, float64_centre=True)
    w = [[Fraction(float(v)) for v in row] for row in layer_module.weight.double()]
    b = [Fraction(float(v)) for v in layer_module.bias.double()]
    for s in range(4):
        alone = rounded_affine_interval(layer, params, lo[s : s + 1], hi[s : s + 1], {}, float64_centre=True)
        width, width_alone = (box[1][s] - box[0][s]).double(), (alone[1][0] - alone[0][0]).double()
        assert torch.allclose(width, width_alone, rtol=1e-2), s  # the same centre's precision in any batch
        ends = [(Fraction(float(a)), Fraction(float(z))) for a, z in zip(lo[s].double(), hi[s].double())]
        for r in range(rows):
            low = sum(min(w[r][j] * e for e in ends[j]) for j in range(n)) + b[r]
            high = sum(max(w[r][j] * e for e in ends[j]) for j in range(n)) + b[r]
            assert Fraction(float(box[0][s, r])) <= low and Fraction(float(box[1][s, r])) >= high, (s, r)
            assert Fraction(float(with_ball[0][s, r])) <= low and Fraction(float(with_ball[1][s, r])) >= high, (s, r)
