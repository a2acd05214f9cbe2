"""The row-ℓ1 attack step after issue 17's trimming (fewer passes and matrices, ``topk(sorted=False)``, soft
thresholding as ``v − clamp(v, −θ, θ)``) gives bit-for-bit the values of the previous code, and PGD's iterates stay
in the ball."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPGD, balls
from art_weightpert.attacks import ascent, weight_pgd

BALL = balls.RowL1Ball()


def previous_steepest_step(grad: torch.Tensor, radius: torch.Tensor, step: float) -> torch.Tensor:
    """``RowL1Ball.steepest_step`` before issue 17's trimming, verbatim: the reference."""
    g = grad.reshape(grad.shape[0], -1) if grad.dim() > 1 else grad.reshape(-1, 1)
    k = max(1, int(math.ceil(0.05 * g.shape[1])))
    top = g.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(g).scatter_(1, top, 1.0)
    d = mask * g.sign() / k
    return (step * radius.unsqueeze(1) * d).reshape(grad.shape)


def previous_soft_threshold(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """``RowL1Ball.project`` before the trimming: ``copysign(max(|v| − θ, 0), v)`` at the same ``θ``."""
    v = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(-1, 1)
    a = v.abs()
    return torch.copysign((a - balls._l1_threshold(a, radius)).clamp_min_(0), v).reshape(delta.shape)


def gradient_cases(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Continuous gradients, gradients from a few values (ties at the k-th largest |g| in most rows), and continuous
    ones with all-zero rows, rows with fewer than k non-zero entries and a block of equal largest entries."""
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.randn(shape, generator=gen, dtype=dtype)
    tied = torch.randint(-3, 4, shape, generator=gen).to(dtype) * 0.5
    mixed = torch.randn(shape, generator=gen, dtype=dtype)
    rows = mixed.reshape(shape[0], -1) if mixed.dim() > 1 else mixed.reshape(-1, 1)
    rows[::3] = 0.0
    rows[1::4, 1:] = 0.0  # one non-zero entry
    rows[2::5, : rows.shape[1] // 2] = 2.5  # half the row tied at the largest value
    return [smooth, tied, mixed]


def radius_for(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    radius = torch.rand(shape[0], generator=gen, dtype=dtype) + 0.1
    radius[::4] = 0.0  # zero radii
    return radius


SHAPES = [(64, 300), (40, 7), (12, 3, 5, 5), (9,), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_steepest_step_equals_the_previous_implementation(shape, dtype):
    radius = radius_for(shape, dtype, seed=1)
    for i, grad in enumerate(gradient_cases(shape, dtype, seed=2)):
        for step in (1.0, 0.37):
            new = BALL.steepest_step(grad, radius, step)
            old = previous_steepest_step(grad, radius, step)
            assert new.dtype == old.dtype and new.shape == old.shape
            assert torch.equal(new, old), (shape, dtype, i, step)


def test_steepest_step_keeps_the_promoted_dtype_of_a_wider_radius():
    grad = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    radius = torch.rand(20, dtype=torch.float64)
    new = BALL.steepest_step(grad, radius, 0.5)
    assert new.dtype == torch.float64
    assert torch.equal(new, previous_steepest_step(grad, radius, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_equals_the_previous_soft_threshold(shape, dtype):
    radius = radius_for(shape, dtype, seed=4)
    for i, delta in enumerate(gradient_cases(shape, dtype, seed=5)):
        for scale in (0.01, 1.0, 100.0):  # rows inside, near and far outside their ball
            got = BALL.project(scale * delta, radius)
            assert torch.equal(got, previous_soft_threshold(scale * delta, radius)), (shape, dtype, i, scale)


def test_projected_steps_stay_in_the_ball_and_keep_zero_radius_rows_at_zero():
    gen = torch.Generator().manual_seed(6)
    radius = radius_for((48, 120), torch.float32, seed=7)
    delta = BALL.sample(radius, torch.Size((48, 120)), "uniform", gen)
    direction = torch.randn(48, 120, generator=gen)
    for iteration in range(12):
        grad = direction + torch.randint(-2, 3, (48, 120), generator=gen).float()  # drifting, with ties
        delta = ascent.projected_step(BALL, delta, grad, radius, 1.0 / (1 + iteration % 3))
        assert float(BALL.excess(delta, radius)) <= 1e-6 * float(radius.max())
        assert not delta[radius == 0].any()


def test_weight_pgd_iterates_stay_in_the_row_l1_ball(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (20,), 4, clip_values=(0.0, 1.0))
    x = np.random.default_rng(0).random((64, 20), dtype=np.float32)
    y = np.random.default_rng(1).integers(0, 4, 64)
    budget = PerturbationBudget(0.3, "row_l1", relative=True, include_bias=True)
    iterates = []

    def recording_step(*args, **kwargs):
        iterates.append(ascent.weight_step(*args, **kwargs))
        return iterates[-1]

    monkeypatch.setattr(weight_pgd, "weight_step", recording_step)
    WeightPGD(clf, budget, max_iter=6, eps_step=0.5, verbose=False).generate(x, y)
    assert len(iterates) == 6
    for deltas in iterates:
        assert budget.contains({k: v.detach().numpy() for k, v in deltas.items()}, model)
