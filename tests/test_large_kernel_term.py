"""The box ball's term of the backward linear bound on a convolution whose kernel is large against its output
(docs/theory.md §4b, :data:`.affine_view.CHORD_MAX_RATIO`): the constant ``−Σ δ|G(c)| − ⟨|λ|, P(ρ)⟩`` instead of the
chord of ``|G|``. It must lower-bound the exact term at every input of the box, and the certificates built on it must
survive attacks and extreme points, in float64 and in float32 with the rounding terms of §5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.balls import BoxBall
from art_weightpert.network import read_network
from art_weightpert.operators import affine_view
from art_weightpert.operators.affine import Affine
from art_weightpert.operators.affine_view import AffineBackward
from tests.conftest import random_cnn
from tests.test_certification_soundness import _violations, certify_and_attack


def _view(conv: nn.Conv2d, n: int = 3, k: int = 4, hw: int = 5, seed: int = 0) -> AffineBackward:
    """The layer at a backward step: random coefficients on its output and a signed input box."""
    layer = Affine.from_module("conv", conv)
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn((n, conv.in_channels, hw, hw), generator=gen, dtype=torch.float64)
    radius = torch.rand((n, conv.in_channels, hw, hw), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out_hw = conv(centre).shape[2:]
    a = torch.randn((n, k, conv.out_channels, *out_hw), generator=gen, dtype=torch.float64)
    return AffineBackward(layer, a, centre - radius, centre + radius)


def _exact_term(view: AffineBackward, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``min_{|Δ| ≤ δ} λ·(Δ ⋆ h) = −Σ δ |G(h)|`` at an input ``h`` of the box, ``(N, K)``."""
    point = AffineBackward(view.layer, view.coefficients, h, h)
    g = point.centre_gradient()
    return -(g.abs() * delta.reshape(g.shape[2:])).flatten(2).sum(dim=2)


@pytest.mark.parametrize("per_entry", [False, True])
def test_large_kernel_term_below_the_exact_term_everywhere_in_the_box(monkeypatch, per_entry):
    monkeypatch.setattr(affine_view, "CHORD_MAX_RATIO", 0)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    view = _view(conv)
    assert view.large_kernel
    delta = conv.weight.detach().abs() * 0.1 if per_entry else torch.tensor(0.05, dtype=torch.float64)
    term = BoxBall().linear_term(view, delta)
    assert term.input_change is None and term.kernel is None  # a constant: the layer's adjoint stays shared
    full = delta.expand(conv.weight.shape)
    gen = torch.Generator().manual_seed(1)
    lo, hi = view.lo, view.hi
    for kind in ("centre", "vertex", "vertex", "uniform", "uniform"):
        u = {"centre": torch.full_like(lo, 0.5), "uniform": torch.rand(lo.shape, generator=gen, dtype=lo.dtype)}.get(
            kind, torch.randint(0, 2, lo.shape, generator=gen).to(lo.dtype)
        )
        exact = _exact_term(view, full, lo + u * (hi - lo))
        assert bool((term.constant <= exact + 1e-12 * (1 + exact.abs())).all()), kind
    # at the centre the gap is the interval term of the radius alone: −Σδ|G(c)| is exact there
    centre_exact = _exact_term(view, full, (lo + hi) / 2)
    assert bool((term.constant < centre_exact).all())


def test_the_chord_below_the_ratio_and_the_constant_above():
    torch.manual_seed(0)
    small = _view(nn.Conv2d(3, 4, 3, padding=1).double())  # kernel 108, output 100 per row: the chord
    assert not small.large_kernel
    assert BoxBall().linear_term(small, torch.tensor(0.01, dtype=torch.float64)).kernel is not None
    wide = _view(nn.Conv2d(64, 64, 3).double(), n=1, k=2, hw=4)  # kernel 36,864, output 256: the constant
    assert wide.large_kernel and 36864 > affine_view.CHORD_MAX_RATIO * 256
    assert BoxBall().linear_term(wide, torch.tensor(0.01, dtype=torch.float64)).kernel is None


def test_the_constant_and_the_chord_agree_to_second_order(monkeypatch):
    """Both bound ``−Σ δ|G|`` on the box; they differ by terms of the order of δ times the box's radius: on a thin box
    the linear bounds of a CNN are nearly the same (and both below the attack, tested below)."""
    from art_weightpert.certification.linear import backward_margin_bounds

    model = random_cnn(seed=3).double().requires_grad_(False)
    network = read_network(model, (1, 6, 6))
    x = torch.rand((8, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = network.forward(x).argmax(1)
    balls = PerturbationBudget(1e-4, "inf").parameter_balls(model, torch.float64)
    chord = backward_margin_bounds(network, balls, x, labels)
    monkeypatch.setattr(affine_view, "CHORD_MAX_RATIO", 0)
    constant = backward_margin_bounds(network, balls, x, labels)
    finite = torch.isfinite(chord)
    assert float((chord[finite] - constant[finite]).abs().max()) <= 1e-3 * float(chord[finite].abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_certificates_with_the_constant_survive_attacks_and_extreme_points(monkeypatch, dtype):
    monkeypatch.setattr(affine_view, "CHORD_MAX_RATIO", 0)
    model = random_cnn(seed=13)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1, 6, 6), 5)
    x = np.random.default_rng(5).normal(size=(16, 1, 6, 6)).astype(np.float32)
    y = clf.predict(x).argmax(axis=1)
    for relative in (False, True):
        budget = PerturbationBudget(1.0, "inf", relative=relative)
        out = certify_and_attack(clf, budget, x, y, methods=("linear",), dtype=dtype)["linear"]
        certified = out["certified"]
        assert certified.mean() >= 0.5
        assert np.all(out["bounds"][certified].min(axis=1) > 0)
        assert not np.any((out["attack_flipped"] | out["extreme_flipped"]) & certified)
        assert _violations(out["attack_margins"], out["bounds"], out["tol"]) == 0
        assert _violations(out["extreme_margins"], out["bounds"], out["tol"]) == 0


@pytest.mark.parametrize("name", ["cnn", "residual"])
def test_rounded_constant_below_exact_margins_on_cancellation_heavy_networks(monkeypatch, name):
    """The float32 soundness test of docs/theory.md §5 (weights over 1e-1–1e3, inputs over 1e-2–1e4, every ball) with
    the constant on every convolution."""
    import tests.test_float32_soundness as float32_soundness

    monkeypatch.setattr(affine_view, "CHORD_MAX_RATIO", 0)
    float32_soundness.test_rounded_bounds_below_exact_margins(name)
