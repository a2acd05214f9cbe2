"""The backward rules of the "linear" certificate (docs/theory.md §4b), each on its own: the activation relaxations and
the chord of ``|·|`` enclose their functions, every fixed layer's rule is a lower bound on its box (exact for the linear
maps), and the affine rule never exceeds the exact worst case over the ball at any point of the box, for every norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.balls import abs_chord
from art_weightpert.certification.linear import BACKWARD_RULES
from art_weightpert.certification.weight_terms import BackwardContext
from art_weightpert.network import read_network
from art_weightpert.operators.relu import kinked
from art_weightpert.operators.s_shaped import s_shaped

NORMS = ["inf", "row_l1", "l2"]


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
    "global_avgpool": nn.AdaptiveAvgPool2d(1),  # the closed-form adjoint λ / (H·W)
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
    features = module(torch.zeros(1, 3, 7, 7, dtype=torch.float64)).numel()
    layer = read_network(nn.Sequential(module, nn.Flatten(), nn.Linear(features, 2)).double(), (3, 7, 7)).layers[0]
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
        if name == "global_avgpool":  # the closed form is the adjoint autograd computes
            probe = torch.zeros((20,) + tuple(lo.shape[1:]), dtype=torch.float64, requires_grad=True)
            with torch.enable_grad():
                (adjoint,) = torch.autograd.grad(module(probe), probe, a.reshape((20,) + tuple(out_shape)))
            torch.testing.assert_close(a_in, adjoint.reshape(a_in.shape), rtol=1e-15, atol=0)
        if name in ("avgpool", "avgpool_no_pad_count", "global_avgpool", "batchnorm"):  # linear maps: an identity
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
    the balls' support functions at the gradients ``G`` of ``λ·(W ⋆ h + b)`` (docs/theory.md §2; the support functions
    are checked against the balls' vertices in test_balls.py)."""
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
