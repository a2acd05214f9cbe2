"""The hot paths of the linear certificate (docs/theory.md §4b; issue 17's faster max-pool and activation rules, the
chunked passes) against independent references, not against copies of the rules they replaced:

* soundness: on random MLPs, CNNs (overlapping, padded and disjoint max pooling) and the digits ResNet, every
  budget, the linear and backward lower bounds of each margin are at most the margin of the perturbed network at
  random points, extreme points (vertices, spheres) and points found by projected descent on the margin;
* exactness: with only the last layer perturbed its input is known and every ball's term is exact (§4b), so the
  bound is the closed-form minimum over the ball (box: ``−Σ δ|h|`` per row; row_l1: ``−ε‖h‖_∞`` per row; l2:
  ``−ε√2 ‖h‖₂`` for the rows ``e_y − e_i``), and with a zero radius it is the nominal margin;
* the rules themselves: ReLU/LeakyReLU lines (and the other activations') below and above the function on dense
  grids of random boxes; the activation's backward rule below ``Σ λ σ(z)`` on the box and touching it (CROWN's
  lines touch the function); the max-pool rule below ``Σ λ·maxpool(h)`` at random and extreme points, equal to it at
  ``h = lo`` for ``λ ≥ 0`` and ``h = hi`` for ``λ ≤ 0``, and everywhere when every window has a dominant input;
* paths that must agree: chunked vs one pass (``CHUNK_BYTES``, ``KERNEL_CHUNK_BYTES``), the fused max-pool +
  activation rule vs the two rules apart, the label row dropped vs the full specification, a centred box vs plain
  boxes, a kernel term joined to the convolution's adjoint vs apart (float64 rounding tolerances)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.certification import linear, weight_terms
from art_weightpert.certification.common import CentredBox
from art_weightpert.certification.interval import interval_margin_bounds, interval_preactivation_bounds
from art_weightpert.network import MaxPool, read_network
from art_weightpert.zoo import digits_resnet
from tests.conftest import random_cnn, random_mlp
from tests.test_residual import warmed


def _cnn_pool(seed: int, pool: nn.Module) -> nn.Sequential:
    """Conv 1×7×7 → 3×7×7, ReLU, ``pool`` (to 3×4×4), two Linear layers."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.Linear(48, 4), nn.ReLU(), nn.Linear(4, 5)
    )


MODELS = {
    "mlp": lambda: (random_mlp([10, 12, 9, 5], bias=True, seed=0), (10,)),
    "mlp_leaky": lambda: (random_mlp([10, 12, 9, 5], bias=True, seed=1, act=nn.LeakyReLU), (10,)),
    "mlp_tanh": lambda: (random_mlp([10, 12, 9, 5], bias=True, seed=2, act=nn.Tanh), (10,)),
    "cnn_bn_maxpool": lambda: (random_cnn(3), (1, 6, 6)),
    "cnn_overlapping_pool": lambda: (_cnn_pool(4, nn.MaxPool2d(3, stride=2, padding=1)), (1, 7, 7)),
    "cnn_padded_pool": lambda: (_cnn_pool(5, nn.MaxPool2d(2, padding=1)), (1, 7, 7)),
}
RESIDUAL = {"digits_resnet": lambda: (warmed(digits_resnet(seed=3), (1, 8, 8)), (1, 8, 8))}
LAST_LAYER = {"mlp": "4", "mlp_leaky": "4", "mlp_tanh": "4", "cnn_bn_maxpool": "8", "digits_resnet": "fc"}
BUDGETS = {
    "inf": PerturbationBudget(0.02, "inf"),
    "l2_relative_bias": PerturbationBudget(0.05, "l2", relative=True, include_bias=True),
    "row_l1": PerturbationBudget(0.03, "row_l1"),
    "inf_first_layer_bias": PerturbationBudget(0.03, "inf", layers=["0"], include_bias=True),
}


def _problem(model_name: str, budget, n: int, seed: int):
    """``(model, network, x, balls, labels)``: the model in float64, ``n`` random inputs, the budget's balls (on the
    digits ResNet a first-layer budget names its stem ``conv1``) and labels cycling through the classes."""
    model, shape = (RESIDUAL | MODELS)[model_name]()
    model = model.double().eval().requires_grad_(False)
    x = torch.rand((n,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    network = read_network(model, shape)
    budget = BUDGETS[budget] if isinstance(budget, str) else budget
    if model_name == "digits_resnet" and list(budget.layers or []) == ["0"]:
        budget = PerturbationBudget(budget.eps, budget.norm, layers=["conv1"], include_bias=True)
    labels = torch.arange(n) % network.layers[-1].module.out_features
    return model, network, x, budget.parameter_balls(model, torch.float64), labels


def _margins(model: nn.Module, balls, deltas, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` margins ``f_y − f_i`` of the network with the weights moved by ``deltas`` (one per ball)."""
    params = dict(model.named_parameters())
    for b, d in zip(balls, deltas):
        params[b.param_name] = params[b.param_name] + d
    logits = torch.func.functional_call(model, {**params, **dict(model.named_buffers())}, (x,))
    return logits.gather(1, labels.unsqueeze(1)) - logits


def _smallest_margins(model, balls, x, labels, nb_points: int, seed: int) -> torch.Tensor:
    """The smallest margin ``(N, K)`` seen over random points of the ball (uniform, extreme, Gaussian on the
    boundary) and over a few steps of projected descent on the sum of each column's margins."""
    gen = torch.Generator().manual_seed(seed)
    zeros = [torch.zeros(model.get_parameter(b.param_name).shape, dtype=torch.float64) for b in balls]
    smallest = _margins(model, balls, zeros, x, labels)
    kinds = ["uniform", "extreme", "gaussian"]
    for i in range(nb_points):
        deltas = [b.ball.sample(b.radius, model.get_parameter(b.param_name).shape, kinds[i % 3], gen) for b in balls]
        smallest = torch.minimum(smallest, _margins(model, balls, deltas, x, labels))
    nb_classes = smallest.shape[1]
    for offset in range(1, nb_classes):
        column = (labels + offset) % nb_classes
        deltas = zeros
        for _ in range(6):
            deltas = [d.requires_grad_(True) for d in deltas]
            margin = _margins(model, balls, deltas, x, labels)
            smallest = torch.minimum(smallest, margin.detach())
            grads = torch.autograd.grad(-margin.gather(1, column.unsqueeze(1)).sum(), deltas)
            with torch.no_grad():
                deltas = [
                    b.ball.project(d + b.ball.steepest_step(g, b.radius, 0.5), b.radius)
                    for b, d, g in zip(balls, deltas, grads)
                ]
        smallest = torch.minimum(smallest, _margins(model, balls, deltas, x, labels).detach())
    return smallest


def _without_fusion(monkeypatch) -> None:
    monkeypatch.setattr(linear, "_activation_before_pool", lambda network, index: None)


@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize("model_name", list(MODELS | RESIDUAL))
def test_bounds_are_below_the_margins_in_the_ball(model_name, budget_name, monkeypatch):
    model, network, x, balls, labels = _problem(model_name, budget_name, 8, 1)
    backward = linear.backward_margin_bounds(network, balls, x, labels, torch.float64)
    lin = linear.linear_margin_bounds(network, balls, x, labels, torch.float64)
    interval = interval_margin_bounds(network, balls, x, labels, torch.float64)
    others = torch.isfinite(backward)
    assert int(others.sum()) == len(x) * (backward.shape[1] - 1)  # +inf at the label's column only
    # docs/theory.md §4b: the linear method returns the element-wise maximum with the interval bound
    torch.testing.assert_close(lin, torch.maximum(backward, interval), rtol=0, atol=0)
    smallest = _smallest_margins(model, balls, x, labels, 24 if model_name == "digits_resnet" else 60, seed=2)
    scale = float(smallest[others].abs().max())
    assert bool((lin[others] <= smallest[others] + 1e-12 * scale).all()), float((lin - smallest)[others].max())
    # the rules apart (the pooling + activation shortcut off) give the same bound, float64 rounding apart
    _without_fusion(monkeypatch)
    apart = linear.backward_margin_bounds(network, balls, x, labels, torch.float64)
    torch.testing.assert_close(apart, backward, rtol=1e-12, atol=1e-12 * scale)


def _last_layer_minimum(model, model_name, budget, x, labels) -> torch.Tensor:
    """The closed-form minimum of the margins over the ball when only the last Linear layer (input ``h``, known)
    is perturbed: ``m − min over the ball of (Δ_y − Δ_i)·h + Δb_y − Δb_i``."""
    last = model.get_submodule(LAST_LAYER[model_name])
    features = []
    hook = last.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].flatten(1)))
    logits = model(x)
    hook.remove()
    h, w, b = features[0], last.weight, last.bias
    margin = logits.gather(1, labels.unsqueeze(1)) - logits
    eps, y = budget.eps, labels.unsqueeze(1)
    if budget.norm == "inf":  # min of Δ_r·h over |Δ_rc| ≤ δ_rc is −Σ_c δ_rc |h_c|, rows y and i apart
        delta = eps * w.abs() if budget.relative else torch.full_like(w, eps)
        per_row = h.abs() @ delta.T  # (N, K)
        cost = per_row.gather(1, y) + per_row
        if budget.include_bias:
            bias = eps * b.abs() if budget.relative else torch.full_like(b, eps)
            cost = cost + bias[y.squeeze(1)].unsqueeze(1) + bias
    elif budget.norm == "row_l1":  # −ε_r ‖h‖_∞ per row (Hölder, attained on a vertex ±ε_r e_c)
        radius = eps * w.abs().sum(dim=1) if budget.relative else torch.full((w.shape[0],), eps, dtype=w.dtype)
        per_row = h.abs().amax(dim=1, keepdim=True) * radius
        cost = per_row.gather(1, y) + per_row
        assert not budget.include_bias
    else:  # one Frobenius ball over the layer: −ε ‖(e_y − e_i) hᵀ‖_F = −ε √2 ‖h‖₂; the bias ball likewise
        radius = eps * w.norm() if budget.relative else eps
        cost = radius * math.sqrt(2) * h.norm(dim=1, keepdim=True).expand_as(margin)
        if budget.include_bias:
            cost = cost + (eps * b.norm() if budget.relative else eps) * math.sqrt(2)
    return margin - cost


EXACT_BUDGETS = [
    ("inf", False, False),
    ("inf", True, True),
    ("row_l1", False, False),
    ("row_l1", True, False),
    ("l2", False, False),
    ("l2", True, True),
]


@pytest.mark.parametrize("norm, relative, bias", EXACT_BUDGETS)
@pytest.mark.parametrize("model_name", list(LAST_LAYER))
def test_only_the_last_layer_perturbed_gives_the_exact_minimum(model_name, norm, relative, bias):
    model, shape = (RESIDUAL | MODELS)[model_name]()
    budget = PerturbationBudget(0.05, norm, layers=[LAST_LAYER[model_name]], relative=relative, include_bias=bias)
    model, network, x, balls, labels = _problem(model_name, budget, 6, 5)
    expected = _last_layer_minimum(model, model_name, budget, x, labels)
    others = labels.unsqueeze(1) != torch.arange(expected.shape[1])
    scale = float(expected.abs().max())
    for bound in (
        linear.backward_margin_bounds(network, balls, x, labels, torch.float64),
        linear.linear_margin_bounds(network, balls, x, labels, torch.float64),
    ):
        torch.testing.assert_close(bound[others], expected[others], rtol=1e-12, atol=1e-12 * scale)
    # the closed form is a minimum: no point found by descent goes below it
    smallest = _smallest_margins(model, balls, x, labels, 0, seed=0)
    assert bool((smallest[others] >= expected[others] - 1e-12 * scale).all())


@pytest.mark.parametrize("model_name", list(MODELS | RESIDUAL))
def test_a_zero_radius_gives_the_nominal_margins(model_name):
    model, network, x, balls, labels = _problem(model_name, PerturbationBudget(0.0, "inf", include_bias=True), 6, 6)
    margin = model(x).gather(1, labels.unsqueeze(1)) - model(x)
    bound = linear.backward_margin_bounds(network, balls, x, labels, torch.float64)
    others = torch.isfinite(bound)
    torch.testing.assert_close(bound[others], margin[others], rtol=1e-12, atol=1e-12 * float(margin.abs().max()))


# ------------------------------------------------------------------------------------------------------ the rules
ACTIVATIONS = {
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(0.1),
    "leaky_relu_concave": nn.LeakyReLU(2.0),
    "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(),
    "elu": nn.ELU(),
    "softplus": nn.Softplus(),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
}
KINKED = {"relu", "leaky_relu", "leaky_relu_concave"}


def _activation(name: str):
    model = nn.Sequential(nn.Linear(2, 2), ACTIVATIONS[name], nn.Linear(2, 2)).double()
    return read_network(model, (2,)).layers[1]


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` boxes across 0, on either side of it, wide and narrow, and points."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    width = torch.rand(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-3, 2, (n,), generator=gen)
    width[::7] = 0.0
    return centre - width, centre + width


def _grid(lo: torch.Tensor, hi: torch.Tensor, nb: int = 401) -> torch.Tensor:
    """``(n, nb + 1)`` points of each box: a uniform grid with both ends, and 0 where the box holds it."""
    t = torch.linspace(0, 1, nb, dtype=torch.float64)
    z = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * t
    zero = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo), lo)
    return torch.cat([z, zero.unsqueeze(1)], dim=1).clamp(lo.unsqueeze(1), hi.unsqueeze(1))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_lines_enclose_the_function_on_dense_grids(name):
    layer = _activation(name)
    lo, hi = _boxes(300, seed=1)
    (l_slope, l_icpt), (u_slope, u_icpt) = layer.relaxation(lo, hi)
    z = _grid(lo, hi)
    f = ACTIVATIONS[name].double()(z)
    below = l_slope.unsqueeze(1) * z + l_icpt.unsqueeze(1)
    above = u_slope.unsqueeze(1) * z + u_icpt.unsqueeze(1)
    tol = 1e-12 * (1 + z.abs())
    assert bool((below <= f + tol).all()), float((below - f).max())
    assert bool((above >= f - tol).all()), float((f - above).max())
    if name in KINKED:  # CROWN: both lines touch the function on the box (chord at the ends, a line through 0)
        assert bool(((f - below).amin(dim=1) <= 1e-12 * (1 + hi.abs())).all())
        assert bool(((above - f).amin(dim=1) <= 1e-12 * (1 + hi.abs())).all())
        slope = ACTIVATIONS[name].negative_slope if name != "relu" else 0.0
        crossing = (lo < 0) & (hi > 0)
        through_zero = l_slope if slope <= 1 else u_slope  # slope 1 when hi > −lo, else the leak (as CROWN)
        expected = torch.where(hi > -lo, torch.ones_like(lo), torch.full_like(lo, slope))
        torch.testing.assert_close(through_zero[crossing], expected[crossing], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_backward_rule_is_below_and_touches(name):
    """``Σ_j λ_j σ(z_j) ≥ a_in·z + c`` on the whole box (separable: the minimum is the sum of per-coordinate minima,
    taken on a dense grid); for the kinked activations the bound touches: the minimum of the gap is 0."""
    layer = _activation(name)
    lo, hi = (t.reshape(30, 10) for t in _boxes(300, seed=2))
    a = torch.randn(30, 3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a[:, 0] = a[:, 0].abs()  # all non-negative
    a[:, 1] = -a[:, 1].abs()  # all non-positive
    a_in, c = layer.backward(a, lo, hi)
    assert a_in.shape == a.shape and c.shape == a.shape[:2]
    z = _grid(lo.reshape(-1), hi.reshape(-1)).reshape(30, 1, 10, -1)
    f = ACTIVATIONS[name].double()(z)
    gap = (a.unsqueeze(-1) * f - a_in.unsqueeze(-1) * z).amin(dim=-1).sum(dim=-1) - c  # (N, K)
    tol = 1e-11 * (1 + (a.abs().unsqueeze(-1) * (1 + z.abs())).amax(dim=-1).sum(dim=-1))
    assert bool((gap >= -tol).all()), float(gap.min())
    if name in KINKED:
        assert bool((gap <= tol).all()), float(gap.max())


POOLS = {
    "disjoint": nn.MaxPool2d(2),
    "disjoint_padded": nn.MaxPool2d(2, padding=1),
    "overlapping": nn.MaxPool2d(3, stride=2, padding=1),
    "overlapping_stride_1": nn.MaxPool2d(2, stride=1),
    "dilated": nn.MaxPool2d(2, dilation=2),
    "ceil_mode": nn.MaxPool2d(2, ceil_mode=True),
}


def _pool_problem(name: str, dominant: bool, seed: int):
    """A pooling layer, a box ``(3, 2, 5, 5)`` and coefficients ``(3, 4) + output shape``: column 0 non-negative,
    column 1 non-positive. ``dominant``: distinct lower ends 1 apart and widths below 1, so in every window the input
    with the largest lower bound is above every other one on the whole box."""
    layer = MaxPool.from_module("pool", POOLS[name])
    gen = torch.Generator().manual_seed(seed)
    if dominant:
        lo = torch.randperm(3 * 2 * 25, generator=gen).to(torch.float64).reshape(3, 2, 5, 5) - 40
        hi = lo + 0.9 * torch.rand(lo.shape, generator=gen, dtype=torch.float64)
    else:
        lo = torch.randn(3, 2, 5, 5, generator=gen, dtype=torch.float64)
        hi = lo + torch.rand(lo.shape, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(
            -2, 1, lo.shape, generator=gen
        )
        hi.view(-1)[::5] = lo.view(-1)[::5]  # some exact entries
    a = torch.randn((3, 4) + layer.apply(lo).shape[1:], generator=gen, dtype=torch.float64)
    a[:, 0] = a[:, 0].abs()
    a[:, 1] = -a[:, 1].abs()
    return layer, lo, hi, a


def _points(lo: torch.Tensor, hi: torch.Tensor, nb: int, seed: int) -> torch.Tensor:
    """``(nb, *lo.shape)`` points of the box: uniform, random vertices, and vertices with one entry per window moved."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand((nb,) + lo.shape, generator=gen, dtype=torch.float64)
    u[nb // 3 :] = u[nb // 3 :].round()  # vertices
    return lo + (hi - lo) * u


def _pool_gap(layer, a, a_in, c, h):
    """``Σ λ·maxpool(h) − (a_in·h + c)`` for every point ``h`` ``(S, N, ...)``: ``(S, N, K)``."""
    s, n = h.shape[:2]
    y = layer.apply(h.reshape((s * n,) + h.shape[2:])).reshape((s, n) + a.shape[2:])
    value = (a.unsqueeze(0) * y.unsqueeze(2)).flatten(3).sum(dim=3)
    line = (a_in.unsqueeze(0) * h.unsqueeze(2)).flatten(3).sum(dim=3) + c
    return value - line


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pool_rule_is_below_and_exact_at_the_box_ends(name):
    layer, lo, hi, a = _pool_problem(name, dominant=False, seed=0)
    a_in, c = layer.backward(a, lo, hi)
    assert a_in.shape == a.shape[:2] + lo.shape[1:]
    tol = 1e-12 * (1 + a.abs().flatten(2).sum(dim=2) * max(float(lo.abs().max()), float(hi.abs().max())))
    gap = _pool_gap(layer, a, a_in, c, _points(lo, hi, 300, seed=1))
    assert bool((gap >= -tol).all()), float(gap.min())
    at_lo = _pool_gap(layer, a, a_in, c, lo.unsqueeze(0))[0]
    at_hi = _pool_gap(layer, a, a_in, c, hi.unsqueeze(0))[0]
    # λ ≥ 0: the lower bound is λ·h_{j*} with j* the largest lower bound, so it is exact at h = lo; λ ≤ 0: exact at hi
    torch.testing.assert_close(at_lo[:, 0], torch.zeros_like(at_lo[:, 0]), rtol=0, atol=float(tol.max()))
    torch.testing.assert_close(at_hi[:, 1], torch.zeros_like(at_hi[:, 1]), rtol=0, atol=float(tol.max()))


@pytest.mark.parametrize("name", [n for n in POOLS if n != "ceil_mode"])
def test_max_pool_rule_is_exact_on_dominated_windows(name):
    """When one input of every window is above the others on the whole box, ``y = h_{j*}`` there: the rule's linear
    function equals ``Σ λ·maxpool(h)`` at every point of the box, for coefficients of either sign."""
    layer, lo, hi, a = _pool_problem(name, dominant=True, seed=2)
    a_in, c = layer.backward(a, lo, hi)
    gap = _pool_gap(layer, a, a_in, c, _points(lo, hi, 100, seed=3))
    torch.testing.assert_close(gap, torch.zeros_like(gap), rtol=0, atol=1e-10 * float(a.abs().sum()))


SLICED_POOLS = {
    **POOLS,
    "kernel_3": nn.MaxPool2d(3),
    "rectangular_gapped": nn.MaxPool2d((2, 3), stride=(3, 4)),
    "dilated_gapped": nn.MaxPool2d(2, stride=3, dilation=2),
    "kernel_1": nn.MaxPool2d(1),
}


@pytest.mark.parametrize("name", list(SLICED_POOLS))
def test_window_maxima_from_strided_slices_equal_max_pool2d(name):
    """The pooling's map (:func:`.max_pool.window_max`) and, on disjoint windows, its selection of ``j*`` (the first
    largest lower bound), of ``max_j u_j`` and of the dominated windows equal ``max_pool2d``'s, bit for bit, on boxes
    with many ties, infinities and odd map sizes; with a gradient the module itself runs."""
    from art_weightpert.operators import max_pool

    module = SLICED_POOLS[name]
    kernel, stride, pad, dil = max_pool._geometry(module)
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 2, 7, 9), (2, 3, 8, 8), (1, 1, 5, 5)]:
        for dtype in (torch.float32, torch.float64):
            lo = torch.randint(-3, 3, shape, generator=gen).to(dtype)
            hi = lo + torch.randint(0, 2, shape, generator=gen).to(dtype)
            lo.view(-1)[::11], hi.view(-1)[::13] = -math.inf, math.inf
            assert torch.equal(max_pool.window_max(lo, module), module(lo))
            if not MaxPool.from_module("pool", module).disjoint_windows:
                continue
            l_best, index = nn.functional.max_pool2d(lo, kernel, stride, pad, dil, return_indices=True)
            others = hi.flatten(2).scatter(2, index.flatten(2), -math.inf).reshape(hi.shape)
            _, flat_best, u_max, dominant = max_pool._window_selection(lo, hi, module)
            assert torch.equal(flat_best, index.flatten(2))
            assert torch.equal(u_max, module(hi))
            assert torch.equal(dominant, nn.functional.max_pool2d(others, kernel, stride, pad, dil) <= l_best)
    h = torch.randn(2, 2, 6, 6, requires_grad=True)
    max_pool.window_max(h, module).sum().backward()  # max_pool2d's gradient: one 1 per window (its first maximum)
    expected = torch.autograd.grad(module(h).sum(), h)[0]
    assert torch.equal(h.grad, expected)
    batch = torch.randn(3, 2, 2, 6, 6)  # torch.func.vmap over a batch of inputs, as over the module
    torch.testing.assert_close(
        torch.func.vmap(lambda t: max_pool.window_max(t, module))(batch),
        torch.stack([module(t) for t in batch]),
        rtol=0,
        atol=0,
    )


def test_window_maxima_refuse_what_max_pool2d_refuses():
    """Where ``max_pool2d`` raises (a padding above half the kernel, no window in the map, a 2-D input),
    :func:`.max_pool.window_max` raises too instead of returning a map."""
    from art_weightpert.operators import max_pool

    for module, h in [
        (nn.MaxPool2d(1, padding=1), torch.zeros(1, 1, 5, 5)),
        (nn.MaxPool2d(4), torch.zeros(1, 1, 3, 3)),
        (nn.MaxPool2d(2), torch.zeros(4, 4)),
    ]:
        with pytest.raises(RuntimeError):
            module(h)
        with pytest.raises(RuntimeError):
            max_pool.window_max(h, module)


def test_a_window_whose_largest_lower_bound_is_nan_is_not_dominated():
    """A NaN lower end (possible in boxes a caller passes) has no largest lower bound: the window is not dominated, so
    the rule never claims ``y = h_{j*}`` there (which would give a finite bound above the true minimum)."""
    from art_weightpert.operators import max_pool

    lo = torch.tensor([[[[3.0, math.nan]]]])
    hi = torch.tensor([[[[4.0, 5.0]]]])
    _, _, u_max, dominant = max_pool._window_selection(lo, hi, nn.MaxPool2d((1, 2)))
    assert not bool(dominant.any()) and float(u_max) == 5.0


def test_batched_dots_are_independent_of_the_other_rows():
    """:func:`.vector_times_rows` (the bounds' dot products) equals the float64 sum and gives each row the same value
    whatever rows and samples come with it."""
    from art_weightpert.torch_tools import vector_times_rows

    gen = torch.Generator().manual_seed(0)
    rows, v = torch.randn(7, 5, 300, generator=gen), torch.rand(7, 300, generator=gen)
    out = vector_times_rows(v, rows)
    exact = (rows.double() * v.double().unsqueeze(1)).sum(dim=2)
    torch.testing.assert_close(
        out.double(), exact, rtol=0, atol=300 * 2**-24 * float((rows.abs() * v.unsqueeze(1)).sum(2).max())
    )
    for k in range(1, 5):
        assert torch.equal(vector_times_rows(v, rows[:, :k].contiguous()), out[:, :k])
    assert torch.equal(vector_times_rows(v[2:4], rows[2:4]), out[2:4])
    for wrong in (v[:1], v[:, :299]):  # no broadcasting over samples or entries
        with pytest.raises(ValueError):
            vector_times_rows(wrong, rows)


# ------------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize("model_name", ["mlp", "cnn_bn_maxpool"])
def test_label_row_dropped_gives_the_full_specification_bounds(model_name, budget_name):
    """The backward pass without the label's own (zero) specification row gives, in every other column, the bounds
    of the full ``(N, K, K)`` specification, bit for bit (the rows are independent)."""
    _, network, x, balls, labels = _problem(model_name, budget_name, 12, 2)
    dropped = linear.backward_margin_bounds(network, balls, x, labels, torch.float64)
    every = torch.arange(5).expand(12, -1)
    full = linear.backward_margin_bounds(network, balls, x, labels, torch.float64, classes=every)
    others = labels.unsqueeze(1) != every
    assert torch.isinf(dropped[~others]).all()
    torch.testing.assert_close(dropped[others], full[others], rtol=0, atol=0)


@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize("model_name", ["mlp", "cnn_bn_maxpool", "cnn_overlapping_pool", "digits_resnet"])
def test_chunks_of_samples_give_the_bounds_of_one_pass(model_name, budget_name, monkeypatch):
    """The linear bound a sample at a time (``CHUNK_BYTES`` and ``KERNEL_CHUNK_BYTES`` of 1 byte) equals the bound of
    the whole batch at once, with per-sample radius factors and a subset of classes too."""
    _, network, x, balls, labels = _problem(model_name, budget_name, 7, 3)
    nb_classes = network.layers[-1].module.out_features
    scale = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    classes = (labels.unsqueeze(1) + torch.tensor([1, 2])) % nb_classes

    def bounds():
        return (
            linear.linear_margin_bounds(network, balls, x, labels, torch.float64),
            linear.linear_margin_bounds(network, balls, x, labels, torch.float64, scale, classes=classes),
            linear.backward_margin_bounds(network, balls, x, labels, torch.float64, scale),
        )

    monkeypatch.setattr(linear, "CHUNK_BYTES", 2**40)
    monkeypatch.setattr(weight_terms, "KERNEL_CHUNK_BYTES", 2**40)
    whole = bounds()
    monkeypatch.setattr(linear, "CHUNK_BYTES", 1)
    monkeypatch.setattr(weight_terms, "KERNEL_CHUNK_BYTES", 1)
    assert linear.chunk_size(network, x, nb_classes - 1, torch.float64) == 1
    for one_pass, chunked in zip(whole, bounds()):
        assert torch.isfinite(one_pass[one_pass != float("inf")]).all()
        scale_of = one_pass[torch.isfinite(one_pass)].abs().max()
        torch.testing.assert_close(chunked, one_pass, rtol=1e-12, atol=1e-12 * float(scale_of))


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 2)])
def test_a_kernel_term_joins_the_adjoint_of_the_convolution(stride, groups):
    """``add_to_kernel(coef, factor)`` then ``input_coefficients(W)`` maps the coefficients through ``W + coef·factor``:
    the layer's adjoint plus the term ``⟨coef·factor, G(ĥ)⟩`` computed on its own (with per-sample factors)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups).double()
    layer = read_network(
        nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * (5 // stride + stride - 1) ** 2, 3)).double(), (4, 5, 5)
    ).layers[0]
    lo = torch.rand(3, 4, 5, 5, dtype=torch.float64)
    hi = lo + torch.rand(3, 4, 5, 5, dtype=torch.float64)
    out_shape = conv(lo).shape[1:]
    a = torch.randn((3, 2) + out_shape, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    coef = torch.randn(3, 2, groups, 6 // groups, 4 // groups * 9, dtype=torch.float64)
    factor = torch.rand(groups, 6 // groups, 4 // groups * 9, dtype=torch.float64)
    joined = weight_terms.AffineBackward(layer, a, lo, hi, scale)
    joined.add_to_kernel(coef, factor)
    apart = weight_terms.AffineBackward(layer, a, lo, hi)
    expected = apart.transposed(a, conv.weight.detach()) + apart.kernel_to_input(
        coef * factor * scale.reshape(-1, 1, 1, 1, 1)
    )
    torch.testing.assert_close(joined.input_coefficients(conv.weight.detach()), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "cnn_padded_pool", "digits_resnet"])
def test_the_first_layers_value_comes_from_its_centred_box(model_name):
    """An affine layer on the known input gets a :class:`.CentredBox` whose centre is ``W x + b``; the linear bound
    takes it from there instead of recomputing it: the same bounds, bit for bit, as from plain boxes."""
    model, network, x, balls, labels = _problem(model_name, "l2_relative_bias", 5, 4)
    boxes = interval_preactivation_bounds(network, balls, x, network.params(dtype=torch.float64))
    centred = [box for box in boxes if isinstance(box, CentredBox)]
    assert centred
    first = network.layers[[isinstance(box, CentredBox) for box in boxes].index(True) - 1]
    weight, bias = network.params(dtype=torch.float64)[first.weight_name], model.get_submodule(first.name).bias
    torch.testing.assert_close(centred[0].centre, first.apply(x, weight, bias), rtol=0, atol=0)
    plain = [(lo, hi) for lo, hi in boxes]
    with_centre = linear.backward_margin_bounds(network, balls, x, labels, torch.float64, boxes=boxes)
    without = linear.backward_margin_bounds(network, balls, x, labels, torch.float64, boxes=plain)
    torch.testing.assert_close(with_centre, without, rtol=0, atol=0)
