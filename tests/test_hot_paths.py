"""Issue 17: the faster backward rules of the linear certificate give the bounds of the previous rules.

The previous rules are kept here as the reference. The max-pool rule is bit-identical (same windows, same tie-break,
the scatter writes exactly the entries the fold summed). The activation rule computes ``λ·where(λ ≥ 0, l, u)``
instead of ``λ·u + λ⁺·(l − u)``: equal in exact arithmetic, so equal up to float64 rounding of the bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from art_weightpert import PerturbationBudget
from art_weightpert.certification import linear, weight_terms
from art_weightpert.certification.activations import relaxation
from art_weightpert.certification.common import CentredBox, batched_dot, sum_features
from art_weightpert.certification.interval import interval_preactivation_bounds
from art_weightpert.network import Activation, MaxPool, read_network
from art_weightpert.zoo import digits_resnet
from tests.conftest import random_cnn, random_mlp
from tests.test_residual import warmed


def _old_activation_backward(layer, a, lo, hi, ctx):
    (l_slope, l_icpt), (u_slope, u_icpt) = relaxation(layer, lo, hi)
    pos = a.clamp_min(0)
    a_in = a * u_slope.unsqueeze(1) + pos * (l_slope - u_slope).unsqueeze(1)
    return a_in, batched_dot(a, u_icpt) + batched_dot(pos, l_icpt - u_icpt)


def _old_maxpool_backward(layer, a, lo, hi, ctx):
    mod = layer.module
    n, k = a.shape[:2]
    if mod.ceil_mode:
        return a.new_zeros(a.shape[:2] + lo.shape[1:]), linear.concretize(a, layer.apply(lo), layer.apply(hi))
    kernel, stride = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size)
    pad, dil = _pair(mod.padding), _pair(mod.dilation)
    channels, height, width = lo.shape[1:]
    border = (pad[1], pad[1], pad[0], pad[0])

    def windows(t):
        t = F.pad(t, border, value=float("-inf"))
        return F.unfold(t, kernel, dil, 0, stride).reshape(n, channels, kernel[0] * kernel[1], -1)

    lw, uw = windows(lo), windows(hi)
    best = lw.argmax(dim=2, keepdim=True)
    l_best = lw.gather(2, best).squeeze(2)
    others = uw.scatter(2, best, float("-inf")).amax(dim=2)
    dominant = (others <= l_best).unsqueeze(1)
    lam = a.reshape(n, k, channels, -1)
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    selected = pos + torch.where(dominant, neg, 0.0)
    const = sum_features(torch.where(dominant, 0.0, neg) * uw.amax(dim=2).unsqueeze(1))
    spread = lam.new_zeros((n, k, channels, kernel[0] * kernel[1], lam.shape[-1]))
    spread = spread.scatter(3, best.unsqueeze(1).expand(n, k, -1, -1, -1), selected.unsqueeze(3))
    size = (height + 2 * pad[0], width + 2 * pad[1])
    folded = F.fold(spread.reshape(n * k, -1, lam.shape[-1]), size, kernel, dil, 0, stride)
    a_in = folded[:, :, pad[0] : pad[0] + height, pad[1] : pad[1] + width]
    return a_in.reshape(a.shape[:2] + lo.shape[1:]), const


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
BUDGETS = {
    "inf": PerturbationBudget(0.02, "inf"),
    "l2_relative_bias": PerturbationBudget(0.05, "l2", relative=True, include_bias=True),
    "row_l1": PerturbationBudget(0.03, "row_l1"),
    "inf_first_layer_bias": PerturbationBudget(0.03, "inf", layers=["0"], include_bias=True),
}


def _problem(model_name: str, budget_name: str, n: int, seed: int):
    """``(model, network, x, balls, labels)``: the model in float64, ``n`` random inputs, the budget's balls (on the
    digits ResNet a first-layer budget names its stem ``conv1``) and labels cycling through the classes."""
    model, shape = (RESIDUAL | MODELS)[model_name]()
    model = model.double().eval().requires_grad_(False)
    x = torch.rand((n,) + shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    network = read_network(model, shape)
    budget = BUDGETS[budget_name]
    if model_name == "digits_resnet" and list(budget.layers or []) == ["0"]:
        budget = PerturbationBudget(budget.eps, budget.norm, layers=["conv1"], include_bias=True)
    labels = torch.arange(n) % network.layers[-1].module.out_features
    return model, network, x, budget.parameter_balls(model, torch.float64), labels


def _bounds(model_name: str, budget_name: str, rules: dict, fuse: bool = True) -> torch.Tensor:
    _, network, x, balls, labels = _problem(model_name, budget_name, 12, 1)
    saved, fused = dict(linear.BACKWARD_RULES), linear._activation_before_pool
    linear.BACKWARD_RULES.update(rules)
    if rules or not fuse:  # each rule on its own (the pooling + activation shortcut bypasses the table)
        linear._activation_before_pool = lambda network, index: None
    try:
        return linear.backward_margin_bounds(network, balls, x, labels, torch.float64)
    finally:
        linear.BACKWARD_RULES.update(saved)
        linear._activation_before_pool = fused


@pytest.mark.parametrize("budget_name", list(BUDGETS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_new_rules_give_the_previous_bounds(model_name, budget_name):
    new = _bounds(model_name, budget_name, {}, fuse=False)
    fused = _bounds(model_name, budget_name, {})
    with_old_pool = _bounds(model_name, budget_name, {MaxPool: _old_maxpool_backward})
    old = _bounds(model_name, budget_name, {MaxPool: _old_maxpool_backward, Activation: _old_activation_backward})
    assert torch.isfinite(new[new != float("inf")]).all()
    # max pooling: bit-identical
    torch.testing.assert_close(new, with_old_pool, rtol=0, atol=0)
    # activations: the same value in exact arithmetic, float64 rounding apart
    scale = old[torch.isfinite(old)].abs().max()
    torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12 * float(scale))
    # a max pooling after an activation, both rules on the windows' maxima: the same sums, in another order
    torch.testing.assert_close(fused, new, rtol=1e-12, atol=1e-12 * float(scale))


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
