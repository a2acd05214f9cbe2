"""The "linear" certificate (docs/theory.md §4b): exact weight absorption, soundness against random
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
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import backward_margin_bounds, linear_margin_bounds
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
    minimum over the box (docs/theory.md §4b)."""
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
