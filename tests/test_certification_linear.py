"""The "linear" certificate (THEORY.md §4b): exact weight absorption, sound relaxations, soundness against random
extreme points and a per-sample weight attack on MLPs and CNNs (all norms, absolute and relative, with and without
biases), never looser than the interval bound and strictly tighter on a trained model."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from conftest import make_classifier
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.balls import abs_chord
from art_weightpert.certification.activations import kinked, s_shaped
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import BACKWARD_RULES, backward_margin_bounds, linear_margin_bounds
from art_weightpert.certification.weight_terms import BackwardContext
from art_weightpert.network import read_network

NORMS = ["inf", "row_l1", "l2"]
TOL = 1e-9


def margins_under(network, params, x, labels, deltas=None):
    """Exact margins ``f_y − f_i`` of the float64 network with ``W + Δ``, ``+inf`` at the label."""
    p = dict(params)
    for name, d in (deltas or {}).items():
        p[name] = p[name] + torch.as_tensor(np.asarray(d), dtype=torch.float64)
    out = network.forward(x, p)
    own = labels.unsqueeze(1)
    return (out.gather(1, own) - out).scatter(1, own, float("inf"))


def brute_force_minimum(model64, budget, x, labels):
    """Minimum of every margin over all vertices of a box budget (tiny models only), the vertices batched by vmap."""
    network = read_network(model64)
    params = network.params(dtype=torch.float64)
    param_balls = budget.parameter_balls(model64, torch.float64)
    sizes = [t.radius.numel() for t in param_balls]
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=sum(sizes))), dtype=torch.float64)
    own = labels.unsqueeze(1)

    def margins(flat):
        p, start = dict(params), 0
        for t, n in zip(param_balls, sizes):
            p[t.param_name] = p[t.param_name] + (flat[start : start + n] * t.radius.reshape(-1)).reshape(t.radius.shape)
            start += n
        out = network.forward(x, p)
        return out.gather(1, own) - out

    low = torch.func.vmap(margins)(signs).amin(dim=0)
    return low.scatter(1, own, float("inf"))


# ------------------------------------------------------------------------------------------ exact absorption
@pytest.mark.parametrize("relative", [False, True])
def test_one_layer_bound_equals_minimum_over_box_vertices(relative):
    torch.manual_seed(3)
    model64 = nn.Linear(3, 3, bias=True).double()
    budget = PerturbationBudget(0.3 if relative else 0.05, "inf", relative=relative, include_bias=True)
    x = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.2, 0.0]], dtype=torch.float64)  # signed inputs: the |x| term
    labels = torch.tensor([0, 2])
    network = read_network(model64)
    param_balls = budget.parameter_balls(model64, torch.float64)
    exact = brute_force_minimum(model64, budget, x, labels)
    bound = backward_margin_bounds(network, param_balls, x, labels)
    torch.testing.assert_close(bound, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(linear_margin_bounds(network, param_balls, x, labels), exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("relative", [False, True])
def test_first_conv_bound_keeps_the_kernel_shared_and_is_exact(relative):
    """A perturbed convolution on the known input, followed by a fixed linear map: the bound equals the minimum over
    the box vertices (the kernel is shared across positions, not relaxed per position)."""
    torch.manual_seed(6)
    model64 = nn.Sequential(nn.Conv2d(1, 2, 2, stride=1, bias=False), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()
    budget = PerturbationBudget(0.3 if relative else 0.05, "inf", layers=["0"], relative=relative)
    x = torch.randn((3, 1, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    param_balls = budget.parameter_balls(model64, torch.float64)
    exact = brute_force_minimum(model64, budget, x, labels)
    bound = backward_margin_bounds(read_network(model64), param_balls, x, labels)
    torch.testing.assert_close(bound, exact, rtol=0, atol=1e-12)


def test_absorption_after_relu_is_exact():
    """Only the last layer is perturbed: its input ĥ ≥ 0 is known exactly, and ``A = CW − |C|δ`` gives the exact
    minimum over the box (THEORY.md §4b)."""
    torch.manual_seed(4)
    model64 = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3)).double()
    budget = PerturbationBudget(0.08, "inf", layers=["2"], include_bias=True)
    x = torch.tensor([[1.0, -0.5], [0.3, 0.8], [-1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 2])
    param_balls = budget.parameter_balls(model64, torch.float64)
    exact = brute_force_minimum(model64, budget, x, labels)
    bound = backward_margin_bounds(read_network(model64), param_balls, x, labels)
    torch.testing.assert_close(bound, exact, rtol=0, atol=1e-12)


def test_absorption_identity_min_over_box_equals_formula():
    """``min_{|Δ| ≤ δ} λ·Δh = −(|λ|δ)·h`` for ``h ≥ 0``: brute force over the vertices of a 2×4 box."""
    gen = torch.Generator().manual_seed(5)
    lam = torch.randn(2, generator=gen, dtype=torch.float64)
    h = torch.rand(4, generator=gen, dtype=torch.float64)
    delta = torch.rand(2, 4, generator=gen, dtype=torch.float64)
    vertices = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=8)), dtype=torch.float64).reshape(-1, 2, 4)
    brute = torch.einsum("r,vrc,c->v", lam, vertices * delta, h).min()
    torch.testing.assert_close(brute, -(lam.abs() @ delta) @ h, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------ relaxations
def grid_in(lo, hi, n=401):
    t = torch.linspace(0, 1, n, dtype=torch.float64).reshape(-1, 1)
    return lo + t * (hi - lo)


def random_boxes(seed=0, n=300):
    gen = torch.Generator().manual_seed(seed)
    a = 4 * torch.randn(n, generator=gen, dtype=torch.float64)
    b = a + 3 * torch.rand(n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen, dtype=torch.float64)
    b[:10] = a[:10]  # degenerate boxes
    return a, b


@pytest.mark.parametrize(
    "name, fn",
    [
        ("relu", lambda z: torch.relu(z)),
        ("leaky_0.1", lambda z: nn.functional.leaky_relu(z, 0.1)),
        ("leaky_2", lambda z: nn.functional.leaky_relu(z, 2.0)),
        ("sigmoid", torch.sigmoid),
        ("tanh", torch.tanh),
    ],
)
def test_activation_relaxation_lines_enclose_the_function(name, fn):
    lo, hi = random_boxes()
    if name == "relu":
        (ls, li), (us, ui) = kinked(lo, hi, 0.0)
    elif name.startswith("leaky"):
        (ls, li), (us, ui) = kinked(lo, hi, float(name.split("_")[1]))
    elif name == "sigmoid":
        (ls, li), (us, ui) = s_shaped(torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), lo, hi)
    else:
        (ls, li), (us, ui) = s_shaped(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lo, hi)
    z = grid_in(lo, hi)
    f = fn(z)
    assert bool((ls * z + li <= f + 1e-12).all())
    assert bool((us * z + ui >= f - 1e-12).all())


def test_abs_chord_bounds_magnitude_and_is_identity_on_nonnegative_boxes():
    lo, hi = random_boxes(seed=1)
    slope, offset = abs_chord((lo + hi) / 2, (hi - lo) / 2)
    z = grid_in(lo, hi)
    assert bool((slope * z + offset >= z.abs() - 1e-12).all())
    wide_nonneg = (lo >= 0) & (hi > lo)
    assert bool((slope[wide_nonneg] == 1).all()) and bool((offset[wide_nonneg] == 0).all())
    point = hi == lo  # a fixed value: exact
    assert bool((slope[point] * lo[point] + offset[point] == lo[point].abs()).all())


FIXED_LAYERS = {
    "maxpool": nn.MaxPool2d(2),
    "maxpool_overlap_padded": nn.MaxPool2d(3, stride=2, padding=1),
    "maxpool_dilated": nn.MaxPool2d(2, stride=1, dilation=2),
    "maxpool_ceil": nn.MaxPool2d(3, stride=2, ceil_mode=True),
    "avgpool": nn.AvgPool2d(3, stride=2, padding=1),
    "avgpool_no_pad_count": nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
    "batchnorm": nn.BatchNorm2d(3),
    "leaky_relu": nn.LeakyReLU(0.3),
    "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(),
}


@pytest.mark.parametrize("name", list(FIXED_LAYERS))
def test_backward_rule_of_a_fixed_layer_is_a_lower_bound_on_its_box(name):
    """For random coefficients λ on the output and random points h of the input box (vertices included):
    ``λ·layer(h) ≥ A·h + c`` with ``(A, c)`` from the layer's backward rule."""
    torch.manual_seed(7)
    module = FIXED_LAYERS[name].double().eval()
    if isinstance(module, nn.BatchNorm2d):
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.2, 2)
        module.weight.data.uniform_(-1.5, 1.5)
    layer = read_network(nn.Sequential(module, nn.Flatten(), nn.Linear(3 * 49, 2)).double(), (3, 7, 7)).layers[0]
    gen = torch.Generator().manual_seed(1)
    centre = torch.randn((4, 3, 7, 7), generator=gen, dtype=torch.float64)
    width = torch.rand((4, 3, 7, 7), generator=gen, dtype=torch.float64) * (torch.rand(4, 1, 1, 1, generator=gen) < 0.7)
    lo, hi = centre - width, centre + width
    with torch.no_grad():
        out_shape = module(lo).shape[1:]
        a = torch.randn((4, 5) + tuple(out_shape), generator=gen, dtype=torch.float64)
        a_in, const = BACKWARD_RULES[type(layer)](layer, a, lo, hi, None)
        for k in range(64):
            t = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
            if k % 2:
                t = t.round()
            h = lo + t * (hi - lo)
            value = torch.einsum("nk...,n...->nk", a, module(h))
            linear = torch.einsum("nk...,n...->nk", a_in, h) + const
            assert bool((linear <= value + 1e-9).all()), (linear - value).max()
        if name in ("avgpool", "avgpool_no_pad_count", "batchnorm"):  # linear maps: the bound is an identity
            torch.testing.assert_close(linear, value)


AFFINE_LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (6,)),
    "conv": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
    "conv_strided": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), (2, 6, 6)),
    "conv_grouped_dilated": (lambda: nn.Conv2d(4, 4, 2, dilation=2, groups=2), (4, 5, 5)),
}


def _affine_layer(module):
    from art_weightpert.network import Affine

    return Affine("", module, "weight", "bias" if module.bias is not None else None)


def worst_case_value(module, a, h, budget):
    """``min over the ball of λ·((W + Δ) ⋆ h + b + Δb)`` for a known ``h``, in closed form: ``λ·(W ⋆ h + b)`` minus
    the balls' support functions at the gradients ``G`` of ``λ·(W ⋆ h + b)`` (THEORY.md §2; the support functions are
    checked against the balls' vertices in test_balls.py)."""
    out = torch.zeros(a.shape[:2], dtype=torch.float64)
    param_balls = {t.kind: t for t in budget.parameter_balls(module, torch.float64)}
    for n in range(a.shape[0]):
        for k in range(a.shape[1]):
            module.zero_grad()
            value = (a[n, k] * module(h[n : n + 1])[0]).sum()
            value.backward()
            total = value.detach()
            for kind, t in param_balls.items():
                grad = getattr(module, kind).grad
                total = total - t.ball.support(grad, t.radius, grad.shape)
            out[n, k] = total
    return out


@pytest.mark.parametrize("layer_name", list(AFFINE_LAYERS))
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relative", [False, True])
def test_affine_rule_is_below_the_worst_case_at_every_point_of_the_box(layer_name, norm, relative):
    """The affine rule's ``A·ĥ + c`` never exceeds ``min_Δ λ·ẑ`` (computed exactly for each fixed ``ĥ``), for
    non-negative and signed boxes."""
    factory, shape = AFFINE_LAYERS[layer_name]
    torch.manual_seed(8)
    module = factory().double()
    layer = _affine_layer(module)
    budget = PerturbationBudget(0.2 if relative else 0.05, norm, relative=relative, include_bias=True)
    param_balls = {t.param_name: t for t in budget.parameter_balls(module, torch.float64)}
    params = {name: p.detach() for name, p in module.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    centre = torch.randn((3,) + shape, generator=gen, dtype=torch.float64)
    centre[0] = centre[0].abs() + 0.3  # a non-negative box (as after a ReLU)
    lo, hi = centre - 0.25, centre + 0.25
    with torch.no_grad():
        out_shape = module(lo).shape[1:]
    a = torch.randn((3, 4) + tuple(out_shape), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        a_in, const = BACKWARD_RULES[type(layer)](layer, a, lo, hi, BackwardContext(params, param_balls))
    for k in range(6):
        t = torch.rand(lo.shape, generator=gen, dtype=torch.float64)
        h = lo + (t.round() if k % 2 else t) * (hi - lo)
        linear = torch.einsum("nk...,n...->nk", a_in, h) + const
        worst = worst_case_value(module, a, h, budget)
        assert bool((linear <= worst + 1e-9).all()), (linear - worst).max()
    gap = (worst - linear).mean() / (worst - torch.einsum("nk...,n...->nk", a, module(h).detach())).abs().mean()
    assert float(gap) < 0.8  # not vacuous: the relaxation costs well under the perturbation term itself
    if layer_name == "linear" and norm != "l2":  # exact at a vertex: the chord of |ĥ| and max_c m_c are attained
        torch.testing.assert_close(linear, worst, rtol=0, atol=1e-12)


def test_maxpool_rule_is_exact_where_one_input_dominates_each_window():
    module = nn.MaxPool2d(2).double()
    layer = read_network(nn.Sequential(module, nn.Flatten(), nn.Linear(4, 2)).double(), (1, 4, 4)).layers[0]
    lo = torch.zeros((1, 1, 4, 4), dtype=torch.float64)
    lo[0, 0, ::2, ::2] = 5.0  # the top-left input of every window dominates
    hi = lo + 1.0
    a = torch.tensor([[[[1.0, -2.0], [-0.5, 3.0]]]], dtype=torch.float64).unsqueeze(1)
    a_in, const = BACKWARD_RULES[type(layer)](layer, a, lo, hi, None)
    h = lo + torch.rand(lo.shape, dtype=torch.float64)
    torch.testing.assert_close(
        torch.einsum("nk...,n...->nk", a_in, h) + const, torch.einsum("nk...,n...->nk", a, module(h))
    )


# ------------------------------------------------------------------------------------------ soundness
def _mlp(activation, bias):
    return nn.Sequential(
        nn.Linear(6, 8, bias=bias), activation, nn.Linear(8, 7, bias=bias), activation, nn.Linear(7, 4, bias=bias)
    )


def _cnn(pool, activation, groups=1):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        activation,
        pool,
        nn.Conv2d(4, 4, 2, stride=1, groups=groups, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 3 * 3, 4),
    )


MODELS = {
    "mlp_relu_bias": (lambda: _mlp(nn.ReLU(), True), (6,)),
    "mlp_relu_nobias": (lambda: _mlp(nn.ReLU(), False), (6,)),
    "mlp_leaky": (lambda: _mlp(nn.LeakyReLU(0.2), True), (6,)),
    "mlp_tanh": (lambda: _mlp(nn.Tanh(), True), (6,)),
    "mlp_sigmoid": (lambda: _mlp(nn.Sigmoid(), False), (6,)),
    "cnn_maxpool": (lambda: _cnn(nn.MaxPool2d(2), nn.ReLU()), (2, 8, 8)),
    "cnn_maxpool_overlap": (lambda: _cnn(nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(), groups=2), (2, 8, 8)),
    "cnn_maxpool_ceil": (lambda: _cnn(nn.MaxPool2d(3, stride=2, ceil_mode=True), nn.ReLU()), (2, 8, 8)),
    "cnn_avgpool_tanh": (lambda: _cnn(nn.AvgPool2d(3, stride=2, padding=1), nn.Tanh()), (2, 8, 8)),
}
EPS = {
    ("inf", False): 0.03,
    ("row_l1", False): 0.1,
    ("l2", False): 0.1,
    ("inf", True): 0.1,
    ("row_l1", True): 0.1,
    ("l2", True): 0.1,
}


@pytest.fixture(scope="module", params=list(MODELS))
def setting(request):
    factory, shape = MODELS[request.param]
    torch.manual_seed(list(MODELS).index(request.param))
    model = factory().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model64 = copy.deepcopy(model).double()
    network = read_network(model64, shape)
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.rand((6,) + shape, generator=gen, dtype=torch.float64) - 0.5  # some negative inputs
    with torch.no_grad():
        labels = model64(x).argmax(dim=1)
    classifier = make_classifier(model, input_shape=shape, nb_classes=4)
    return model64, network, x, labels, classifier


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("include_bias", [False, True])
def test_no_perturbation_in_the_ball_goes_below_the_linear_bound(setting, norm, relative, include_bias):
    from art_weightpert.attacks.per_sample import PerSampleWeightPGD

    model64, network, x, labels, classifier = setting
    budget = PerturbationBudget(EPS[norm, relative], norm, relative=relative, include_bias=include_bias)
    param_balls = budget.parameter_balls(model64, torch.float64)
    with torch.no_grad():
        backward = backward_margin_bounds(network, param_balls, x, labels)
        linear = linear_margin_bounds(network, param_balls, x, labels)
        interval = interval_margin_bounds(network, param_balls, x, labels)
        params = network.params(dtype=torch.float64)
        observed = margins_under(network, params, x, labels)
        for seed in range(16):
            delta = budget.sample(model64, "extreme" if seed % 2 else "uniform", seed=seed)
            observed = torch.minimum(observed, margins_under(network, params, x, labels, delta))
    attack = PerSampleWeightPGD(classifier, budget, max_iter=8, num_random_init=0, batch_size=16, verbose=False)
    found = attack.generate(x.float().numpy(), labels.numpy())
    observed = torch.minimum(observed, torch.as_tensor(found["margins"], dtype=torch.float64))
    finite = torch.isfinite(observed)
    assert bool((backward[finite] <= observed[finite] + TOL).all()), (backward - observed)[finite].max()
    assert bool((linear >= interval).all())
    assert bool((linear[finite] <= observed[finite] + TOL).all())


# ------------------------------------------------------------------------------------------ tightness
@pytest.fixture(scope="module")
def trained(digits):
    """A digits MLP 64-32-32-10 trained deterministically (Adam, 10 epochs), in float64, with 100 test points."""
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt, gen = torch.as_tensor(x_train), torch.as_tensor(y_train), torch.Generator().manual_seed(0)
    for _ in range(10):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimizer.step()
    model64 = model.double().eval().requires_grad_(False)
    x = torch.as_tensor(x_test[:100], dtype=torch.float64)
    return model64, read_network(model64, (64,)), x, torch.as_tensor(y_test[:100])


def test_linear_is_strictly_tighter_than_interval_on_a_trained_mlp(trained):
    model64, network, x, labels = trained
    budget = PerturbationBudget(0.005, "inf")
    param_balls = budget.parameter_balls(model64, torch.float64)
    with torch.no_grad():
        backward = backward_margin_bounds(network, param_balls, x, labels)
        interval = interval_margin_bounds(network, param_balls, x, labels)
        correct = model64(x).argmax(dim=1) == labels
    finite = torch.isfinite(interval)
    assert bool((backward[finite] > interval[finite]).float().mean() > 0.9)
    certified = [int((correct & (b.amin(dim=1) > TOL)).sum()) for b in (backward, interval)]
    assert certified[0] >= certified[1] + 20  # 63 against 27 when written


def test_scale_multiplies_every_radius_per_sample(trained):
    model64, network, x, labels = trained
    x, labels = x[:5], labels[:5]
    budget = PerturbationBudget(0.2, "row_l1", relative=True, include_bias=True)
    scale = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.1], dtype=torch.float64)
    with torch.no_grad():
        got = linear_margin_bounds(network, budget.parameter_balls(model64, torch.float64), x, labels, scale=scale)
        for i, s in enumerate(scale.tolist()):
            param_balls = budget.with_eps(0.2 * s).parameter_balls(model64, torch.float64)
            want = linear_margin_bounds(network, param_balls, x[i : i + 1], labels[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], want, rtol=1e-12, atol=1e-12)


def test_bound_is_differentiable_in_float32(trained):
    model64, network, x, labels = trained
    model32 = copy.deepcopy(model64).float().requires_grad_(True)
    network32 = read_network(model32, (64,))
    budget = PerturbationBudget(0.005, "inf")
    bounds = linear_margin_bounds(
        network32, budget.parameter_balls(model32), x[:8].float(), labels[:8], dtype=torch.float32
    )
    assert bounds.dtype == torch.float32
    grads = torch.autograd.grad(bounds[torch.isfinite(bounds)].sum(), list(model32.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads) and any(bool(g.abs().sum() > 0) for g in grads)


def test_bad_labels_and_scale_are_rejected(trained):
    model64, network, x, labels = trained
    param_balls = PerturbationBudget(0.01).parameter_balls(model64, torch.float64)
    with pytest.raises(ValueError, match="labels"):
        linear_margin_bounds(network, param_balls, x[:4], labels[:3])
    with pytest.raises(ValueError, match="scale"):
        linear_margin_bounds(network, param_balls, x[:4], labels[:4], scale=torch.ones(3))


def test_certifier_linear_method_certifies_at_least_interval(tiny_mlp_classifier, digits):
    from art_weightpert import WeightPerturbationCertifier

    _, _, x_test, y_test = digits
    budget = PerturbationBudget(0.01, "inf")
    lin = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method="linear", verbose=False)
    ivl = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method="interval", verbose=False)
    x, y = x_test[:60], y_test[:60]
    assert np.all(lin.certify(x, y) >= ivl.certify(x, y))
    lin_bounds, ivl_bounds = lin.margin_lower_bounds(x, y), ivl.margin_lower_bounds(x, y)
    assert np.all(lin_bounds >= ivl_bounds)
    finite = np.isfinite(ivl_bounds)
    assert np.mean(lin_bounds[finite] > ivl_bounds[finite]) > 0.5


def test_certified_radius_of_linear_is_at_least_interval_and_certifies(tiny_mlp_classifier, digits):
    from art_weightpert import WeightPerturbationCertifier

    _, _, x_test, y_test = digits
    x, y = x_test[:20], y_test[:20]
    budget = PerturbationBudget(0.01, "inf", relative=True)
    lin = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method="linear", verbose=False)
    ivl = WeightPerturbationCertifier(tiny_mlp_classifier, budget, method="interval", verbose=False)
    radius = lin.certified_radius(x, y)
    assert np.all(radius >= ivl.certified_radius(x, y) * (1 - 1e-9))
    inside = radius > 0
    assert inside.any()
    for i in np.flatnonzero(inside)[:5]:
        at = WeightPerturbationCertifier(
            tiny_mlp_classifier, budget.with_eps(0.99 * radius[i]), "linear", verbose=False
        )
        beyond = WeightPerturbationCertifier(
            tiny_mlp_classifier, budget.with_eps(1.01 * radius[i]), "linear", verbose=False
        )
        assert at.certify(x[i : i + 1], y[i : i + 1])[0] and not beyond.certify(x[i : i + 1], y[i : i + 1])[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bounds_on_cuda_match_cpu(trained):
    model64, network, x, labels = trained
    budget = PerturbationBudget(0.01, "inf", relative=True)
    cpu = linear_margin_bounds(network, budget.parameter_balls(model64, torch.float64), x, labels)
    model_gpu = copy.deepcopy(model64).cuda()
    gpu = linear_margin_bounds(
        read_network(model_gpu, (64,)), budget.parameter_balls(model_gpu, torch.float64), x.cuda(), labels.cuda()
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-9)
