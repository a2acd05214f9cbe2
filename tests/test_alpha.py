"""The ``"alpha"`` bound (optimized linear bounds, docs/theory.md §11): never looser than ``"linear"``, strictly tighter
on an MLP with unstable ReLUs, sound (no per-sample attack and no extreme point of the ball beats a lower bound, also
per branch of a split), registered, and differentiable for training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.certification import METHODS
from art_weightpert.certification.alpha import alpha_margin_bounds, optimized_bounds
from art_weightpert.certification.common import by_param_name
from art_weightpert.certification.linear import linear_margin_bounds, other_classes
from art_weightpert.network import read_network
from tests.conftest import random_cnn, random_mlp
from tests.test_residual import ResidualMLP, SmallResNet, warmed

N_EXTREME = 150


def _model(name: str) -> tuple[nn.Module, tuple[int, ...], int]:
    if name == "mlp":
        return random_mlp((8, 20, 20, 20, 5), False, seed=3).eval(), (8,), 5
    if name == "mlp_bias":
        return random_mlp((8, 16, 16, 5), True, seed=5).eval(), (8,), 5
    if name == "cnn":
        return random_cnn(seed=13), (1, 6, 6), 5
    if name == "residual_mlp":
        return warmed(ResidualMLP(seed=3), (6,)), (6,), 5
    return warmed(SmallResNet("mean", seed=4), (1, 6, 6)), (1, 6, 6), 4


EPS = {"mlp": 0.03, "mlp_bias": 0.02, "cnn": 0.02, "residual_mlp": 0.02, "resnet": 0.02}


def _case(name: str, n: int = 12, seed: int = 0):
    model, shape, classes = _model(name)
    x = torch.as_tensor(np.random.default_rng(seed).uniform(-1, 1, size=(n, *shape)), dtype=torch.float64)
    with torch.no_grad():
        labels = model(x.float()).argmax(dim=1)
    return model, shape, classes, x, labels


def _extreme_margins(model: nn.Module, budget: PerturbationBudget, x: torch.Tensor, labels: torch.Tensor):
    """Lowest margin per class over ``N_EXTREME`` extreme points of the ball, evaluated in float64."""
    model64 = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in model64.named_parameters()}
    with torch.no_grad():
        low = torch.full((len(x), int(model64(x[:1]).shape[1])), np.inf, dtype=torch.float64)
        for seed in range(N_EXTREME):
            delta = budget.sample(model, "extreme", seed=seed)
            p = {k: v + torch.as_tensor(delta[k], dtype=torch.float64) if k in delta else v for k, v in params.items()}
            logits = functional_call(model64, p, (x,))
            margins = (logits.gather(1, labels.unsqueeze(1)) - logits).scatter(1, labels.unsqueeze(1), np.inf)
            low = torch.minimum(low, margins)
    return low


def _violations(observed: torch.Tensor | np.ndarray, bounds: torch.Tensor, rtol: float) -> int:
    observed = torch.as_tensor(observed, dtype=torch.float64)
    finite = torch.isfinite(bounds)
    slack = rtol * (1 + observed[finite].abs())
    return int((observed[finite] < bounds[finite] - slack).sum())


# ------------------------------------------------------------------------------------------------ tightness
@pytest.mark.parametrize("name", ["mlp", "mlp_bias", "cnn", "residual_mlp", "resnet"])
def test_alpha_is_never_looser_than_linear_and_sound(name):
    model, shape, classes, x, labels = _case(name)
    budget = PerturbationBudget(EPS[name], "inf", include_bias=name == "mlp_bias")
    network = read_network(model, shape)
    balls = budget.parameter_balls(model, torch.float64)
    with torch.no_grad():
        linear = linear_margin_bounds(network, balls, x, labels)
        alpha = alpha_margin_bounds(network, balls, x, labels, steps=10)
    assert alpha.shape == (len(x), classes) and alpha.dtype == torch.float64
    assert torch.all(torch.isinf(alpha.gather(1, labels.unsqueeze(1))))
    finite = torch.isfinite(linear)
    assert torch.all(alpha[finite] >= linear[finite])
    assert _violations(_extreme_margins(model, budget, x, labels), alpha, 1e-9) == 0
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), shape, classes)
    attack = PerSampleWeightPGD(clf, budget, max_iter=40, num_random_init=1, verbose=False)
    found = attack.generate(x.float().numpy(), labels.numpy())
    assert _violations(found["margins"], alpha, 1e-5) == 0


def test_alpha_is_strictly_tighter_on_an_mlp_with_unstable_relus():
    model, shape, _, x, labels = _case("mlp", n=16)
    network = read_network(model, shape)
    balls = PerturbationBudget(0.03, "inf").parameter_balls(model, torch.float64)
    with torch.no_grad():
        linear = linear_margin_bounds(network, balls, x, labels)
        crown = alpha_margin_bounds(network, balls, x, labels, steps=0)  # tightened boxes only
        alpha = alpha_margin_bounds(network, balls, x, labels)
    finite = torch.isfinite(linear)
    gain = (alpha - linear)[finite]
    assert gain.min() >= 0 and gain.mean() > 0.05
    assert torch.all(alpha[finite] >= crown[finite]) and (alpha - crown)[finite].mean() > 0.01


def test_per_class_rows_scale_and_batching_agree():
    """``classes=`` bounds the same margins as the full bound; per-sample radius factors equal scaled balls; the
    result does not depend on how the batch is cut."""
    model, shape, classes, x, labels = _case("mlp", n=6)
    network = read_network(model, shape)
    budget = PerturbationBudget(0.03, "inf")
    balls = budget.parameter_balls(model, torch.float64)
    with torch.no_grad():
        full = alpha_margin_bounds(network, balls, x, labels)
        rows = torch.tensor([[(int(y) + 1) % classes, (int(y) + 2) % classes] for y in labels])
        part = alpha_margin_bounds(network, balls, x, labels, classes=rows)
        torch.testing.assert_close(part, full.gather(1, rows), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(alpha_margin_bounds(network, balls, x, labels, samples_per_chunk=2), full)
        scale = torch.tensor([0.0, 0.5, 1.0, 1.5, 1.0, 0.2], dtype=torch.float64)
        scaled = alpha_margin_bounds(network, balls, x, labels, scale=scale)
        for n in (0, 1, 3):
            one = alpha_margin_bounds(
                network, budget.scaled(float(scale[n])).parameter_balls(model, torch.float64), x[n : n + 1],
                labels[n : n + 1],
            )  # fmt: skip
            torch.testing.assert_close(scaled[n : n + 1], one, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        logits = model(x.float()).double()
    logits = logits[:1]
    exact = (logits.gather(1, labels[:1].unsqueeze(1)) - logits)[torch.isfinite(scaled[:1])]
    torch.testing.assert_close(scaled[:1][torch.isfinite(scaled[:1])], exact, rtol=1e-5, atol=1e-5)


def test_a_samples_bound_does_not_depend_on_its_batch():
    """The intermediate boxes tighten each sample's own unstable neurons within its own budget: the same bounds alone
    or in a batch (CROWN's bound is not monotone in the boxes, so extra tightening could change them)."""
    model, shape, _, x, labels = _case("cnn", n=10, seed=3)
    network = read_network(model, shape)
    balls = PerturbationBudget(0.03, "inf").parameter_balls(model, torch.float64)
    with torch.no_grad():
        batch = alpha_margin_bounds(network, balls, x, labels, steps=3, intermediate_budget=3000)
        alone = [alpha_margin_bounds(network, balls, x[n : n + 1], labels[n : n + 1], steps=3, intermediate_budget=3000)
                 for n in range(len(x))]  # fmt: skip
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ branches
def _values_mlp(model: nn.Sequential, x: torch.Tensor, delta: dict) -> list[torch.Tensor]:
    """Every value of a Sequential MLP in float64 with weights ``W + delta``: the input, then each layer's output."""
    values = [x]
    for i, layer in enumerate(model):
        h = values[-1]
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach().double() + torch.as_tensor(delta.get(f"{i}.weight", 0.0), dtype=torch.float64)
            h = h @ w.T
            if layer.bias is not None:
                h = h + layer.bias.detach().double()
        else:
            h = torch.relu(h)
        values.append(h)
    return values


def test_split_branches_are_sound_and_an_empty_branch_is_infinite():
    model = random_mlp((8, 12, 12, 4), False, seed=7).eval()
    network = read_network(model, (8,))
    x = torch.as_tensor(np.random.default_rng(1).uniform(-1, 1, size=(8, 8)), dtype=torch.float64)
    with torch.no_grad():
        labels = model(x.float()).argmax(dim=1)
    budget = PerturbationBudget(0.04, "inf")
    balls = by_param_name(budget.parameter_balls(model, torch.float64))
    value = 3  # the second ReLU's input
    others = other_classes(labels, 4)  # the rows of optimized_bounds
    with torch.no_grad():
        _, boxes = optimized_bounds(network, balls, x, labels, steps=0)
        lo, hi = boxes[value]
        unstable = (lo < 0) & (hi > 0)
        assert unstable.any()
        neuron = int(unstable.sum(dim=0).argmax())
        zero = torch.zeros_like(lo)
        only = torch.zeros_like(lo, dtype=torch.bool)
        only[:, neuron] = True
        big, small = torch.full_like(lo, -np.inf), torch.full_like(lo, np.inf)
        up = {value: (torch.where(only, zero, big), None)}
        down = {value: (None, torch.where(only, zero, small))}
        b_up, boxes_up = optimized_bounds(network, balls, x, labels, up, steps=5)
        b_down, boxes_down = optimized_bounds(network, balls, x, labels, down, steps=5)
        assert torch.all(boxes_up[value][0][:, neuron] >= 0) and torch.all(boxes_down[value][1][:, neuron] <= 0)
        # every extreme point falls in a branch; its margins are above that branch's bounds
        for seed in range(60):
            delta = budget.sample(model, "extreme", seed=seed)
            values = _values_mlp(model, x, delta)
            logits = values[-1]
            margins = (logits.gather(1, labels.unsqueeze(1)) - logits).gather(1, others)
            z = values[value][:, neuron]
            for side, bounds in ((z >= 0, b_up), (z <= 0, b_down)):
                rows = side.unsqueeze(1) & torch.isfinite(bounds)
                assert torch.all(margins[rows] >= bounds[rows] - 1e-9 * (1 + margins[rows].abs()))
        # a floor above the box: no weight of the ball reaches that branch
        empty = {value: (torch.where(only, hi + 1, big), None)}
        b_empty, _ = optimized_bounds(network, balls, x, labels, empty, steps=2)
        assert torch.all(torch.isinf(b_empty) & (b_empty > 0))


# ------------------------------------------------------------------------------------------------ registry, training
def test_alpha_is_registered_and_certifies_at_least_what_linear_certifies(digits):
    _, _, x_test, y_test = digits
    model = random_mlp((64, 32, 32, 10), True, seed=1).eval()
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10, clip_values=(0, 1))
    x, y = x_test[:20], clf.predict(x_test[:20]).argmax(axis=1)
    assert "alpha" in METHODS and METHODS["alpha"].never_above == "linear"
    budget = PerturbationBudget(0.003, "inf")
    linear = WeightPerturbationCertifier(clf, budget, "linear", verbose=False)
    alpha = WeightPerturbationCertifier(clf, budget, "alpha", verbose=False)
    lb_linear, lb_alpha = linear.margin_lower_bounds(x, y), alpha.margin_lower_bounds(x, y)
    finite = np.isfinite(lb_linear)
    assert np.all(lb_alpha[finite] >= lb_linear[finite])
    assert np.all(alpha.certify(x, y) >= linear.certify(x, y))
    assert np.all(alpha.certified_radius(x[:5], y[:5]) >= 0.99 * linear.certified_radius(x[:5], y[:5]))


def test_alpha_is_differentiable_and_leaves_no_gradient_behind():
    model, shape, _, x, labels = _case("mlp", n=4)
    network = read_network(model, shape)
    balls = PerturbationBudget(0.03, "inf").parameter_balls(model, torch.float32)
    with torch.no_grad():
        alpha_margin_bounds(network, balls, x.float(), labels, torch.float32, steps=3)
    assert all(p.grad is None for p in model.parameters())
    bounds = alpha_margin_bounds(network, balls, x.float(), labels, torch.float32, steps=3)
    assert bounds.requires_grad
    bounds[torch.isfinite(bounds)].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_keywords_are_refused():
    model, shape, _, x, labels = _case("mlp", n=2)
    network = read_network(model, shape)
    balls = PerturbationBudget(0.03, "inf").parameter_balls(model, torch.float64)
    with pytest.raises(TypeError, match="step"):
        alpha_margin_bounds(network, balls, x, labels, step=3)


def test_alpha_on_a_network_without_an_optimizable_slope():
    """A concave LeakyReLU (``negative_slope > 1``) has the chord as its lower line: no slope to optimize. Found by
    review: ``"alpha"`` raised "element 0 of tensors does not require grad" there; it now gives the linear bound."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(3.0), nn.Linear(8, 3))
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (4,), 3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    for dtype in (torch.float64, torch.float32):
        bounds = {
            method: WeightPerturbationCertifier(
                clf, PerturbationBudget(1e-2), method, verbose=False, dtype=dtype
            ).margin_lower_bounds(x)
            for method in ("linear", "alpha")
        }
        finite = np.isfinite(bounds["linear"])
        assert np.all(bounds["alpha"][finite] >= bounds["linear"][finite])
