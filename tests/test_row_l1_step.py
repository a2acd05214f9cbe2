"""The row-ℓ1 attack step (:meth:`.RowL1Ball.steepest_step`, docs/theory.md §2) against its definition, written here
independently: steepest ℓ1 ascent puts the step on the largest ``|g|`` of each row, spread over the ``k = max(1,
⌈0.05 n⌉)`` largest (``n`` the row's fan-in): ``step·r·sign(g)/k`` on a set of ``k`` entries with the largest
``|g|``, 0 elsewhere. So ``⟨g, d⟩ = step·r·(mean of the k largest |g|)``, the maximum of ``⟨g, d⟩`` over the steps
that spread ``step·r`` equally over ``k`` entries (brute force over every ``k``-subset on small rows), and the
support function ``step·r·‖g‖_∞`` of the ℓ1 ball when ``k = 1``. PGD's iterates stay in the ball."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPGD, balls
from art_weightpert.attacks import ascent, weight_pgd
from tests.test_projection import check_projection

BALL = balls.RowL1Ball()


def rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def check_step(grad: torch.Tensor, radius: torch.Tensor, step: float, d: torch.Tensor, brute_force: bool) -> None:
    """Assert that ``d`` is a steepest row-ℓ1 step of ``grad`` by the definition above, row by row, in float64."""
    assert d.shape == grad.shape and d.dtype == torch.result_type(grad, radius)
    g = rows_of(grad).double().numpy()
    dd = rows_of(d).double().numpy()
    r = radius.double().numpy()
    n = g.shape[1]
    k = max(1, math.ceil(0.05 * n))
    ag = np.abs(g)
    top_mean = -np.sort(-ag, axis=1)[:, :k].sum(axis=1) / k  # mean of the k largest |g| (numpy's sort)
    eps = np.finfo(np.float32 if d.dtype == torch.float32 else np.float64).eps
    for row in range(g.shape[0]):
        size = step * r[row] / k  # the magnitude on each entry of the support
        tol = 4 * eps * abs(size)
        nonzero = dd[row] != 0
        if size == 0:
            assert not nonzero.any()
            continue
        # at most k entries, each of magnitude step·r/k with the sign of g (g = 0 entries get 0)
        assert nonzero.sum() <= k
        assert (np.abs(np.abs(dd[row, nonzero]) - size) <= tol).all()
        assert (np.sign(dd[row, nonzero]) == np.sign(g[row, nonzero])).all()
        # the support holds entries with the largest |g|: k of them once the zero-g entries are counted
        assert nonzero.sum() == min(k, int((ag[row] > 0).sum()))
        if nonzero.any() and (~nonzero).any():
            assert ag[row, nonzero].min() >= ag[row, ~nonzero].max()
        # ℓ1 norm at most step·r, equal when the row has k non-zero gradients
        assert np.abs(dd[row]).sum() <= step * r[row] * (1 + 4 * k * eps)
        # the value of the step: step·r times the mean of the k largest |g| ...
        value = float(g[row] @ dd[row])
        assert abs(value - step * r[row] * top_mean[row]) <= 8 * k * eps * step * r[row] * top_mean[row] + 1e-300
        if k == 1:  # ... which is the support function of the ℓ1 ball of radius step·r
            assert abs(value - step * r[row] * ag[row].max()) <= 8 * eps * step * r[row] * ag[row].max()
        if brute_force and math.comb(n, k) <= 2000:  # ... and the best spread of step·r over any k entries
            best = max(ag[row, list(s)].sum() for s in itertools.combinations(range(n), k)) * size
            assert abs(value - best) <= 8 * k * eps * best + 1e-300


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


SHAPES = [(64, 300), (40, 7), (12, 3, 5, 5), (9,), (1, 1), (10, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_steepest_step_is_the_spread_steepest_ascent(shape, dtype):
    radius = radius_for(shape, dtype, seed=1)
    for grad in gradient_cases(shape, dtype, seed=2):
        for step in (1.0, 0.37):
            check_step(grad, radius, step, BALL.steepest_step(grad, radius, step), brute_force=shape[0] <= 40)


def test_the_checker_rejects_a_wrong_step():
    """The reference can fail: a step on the wrong entries, of the wrong size, or with a flipped sign is refused."""
    grad = torch.randn(10, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radius = torch.ones(10, dtype=torch.float64)
    good = BALL.steepest_step(grad, radius, 0.5)
    check_step(grad, radius, 0.5, good, brute_force=True)
    smallest = grad.abs().topk(2, dim=1, largest=False).indices
    wrong_entries = torch.zeros_like(grad).scatter_(1, smallest, 0.25 * grad.gather(1, smallest).sign())
    for bad in (wrong_entries, 1.01 * good, -good, good.roll(1, dims=1)):
        with pytest.raises(AssertionError):
            check_step(grad, radius, 0.5, bad, brute_force=True)


def test_steepest_step_keeps_the_promoted_dtype_of_a_wider_radius():
    grad = torch.randn(20, 30, generator=torch.Generator().manual_seed(3))
    radius = torch.rand(20, dtype=torch.float64)
    new = BALL.steepest_step(grad, radius, 0.5)
    assert new.dtype == torch.float64
    check_step(grad, radius, 0.5, new, brute_force=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_of_the_step_cases_is_the_euclidean_projection(shape, dtype):
    """The projection on the gradient cases (ties at the top, one non-zero entry, zero rows), rows inside, near and far
    outside their ball: the KKT conditions and bisection θ of tests/test_projection.py."""
    radius = radius_for(shape, dtype, seed=4)
    for delta in gradient_cases(shape, dtype, seed=5):
        for scale in (0.01, 1.0, 100.0):
            check_projection(scale * delta, radius, BALL.project(scale * delta, radius))


def test_projected_steps_stay_in_the_ball_and_keep_zero_radius_rows_at_zero():
    gen = torch.Generator().manual_seed(6)
    radius = radius_for((48, 120), torch.float32, seed=7)
    delta = BALL.sample(radius, torch.Size((48, 120)), "uniform", gen)
    direction = torch.randn(48, 120, generator=gen)
    for iteration in range(12):
        grad = direction + torch.randint(-2, 3, (48, 120), generator=gen).float()  # drifting, with ties
        moved = delta + BALL.steepest_step(grad, radius, 1.0 / (1 + iteration % 3))
        delta = ascent.projected_step(BALL, delta, grad, radius, 1.0 / (1 + iteration % 3))
        check_projection(moved, radius, delta)
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
    attack = WeightPGD(clf, budget, max_iter=6, eps_step=0.5, verbose=False)
    attack.generate(x, y)
    assert len(iterates) == 6 * (1 + attack.num_random_init)  # every step of every start
    for deltas in iterates:
        assert budget.contains({k: v.detach().numpy() for k, v in deltas.items()}, model)
        weight = deltas["0.weight"].detach().double()
        radius = 0.3 * model[0].weight.detach().double().abs().sum(dim=1)
        assert bool((weight.abs().sum(dim=1) <= radius * (1 + 1e-5)).all())
