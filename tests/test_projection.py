"""The sort-free row-ℓ1 projection (:meth:`.RowL1Ball.project`, THEORY.md §2) equals the previous sort-based one and
is the Euclidean projection: ties, zero radii, rows inside the ball, all-zero rows, float32 and float64, conv shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from art_weightpert import balls
from art_weightpert.balls import RowL1Ball

BALL = RowL1Ball()
SHAPES = [(40, 30), (12, 3, 3, 3), (9,)]  # a Linear weight, a Conv2d weight, a bias
# Largest error allowed, relative to the row's largest |v|, against the previous implementation (same rounding class).
RTOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def previous_projection(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The sort-based implementation replaced in issue 17 (Duchi et al. 2008), verbatim: the reference."""
    v = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(-1, 1)
    a = v.abs()
    inside = a.sum(dim=1) <= radius
    mu, _ = torch.sort(a, dim=1, descending=True)
    cums = mu.cumsum(dim=1) - radius.unsqueeze(1)
    idx = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = mu - cums / idx > 0
    rho = cond.to(v.dtype).mul(idx).argmax(dim=1, keepdim=True)  # last index where cond holds
    theta = (cums.gather(1, rho) / (rho + 1).to(v.dtype)).clamp_min(0)
    out = v.sign() * (a - theta).clamp_min(0)
    out = torch.where(inside.unsqueeze(1), v, out)
    return out.reshape(delta.shape)


def bisection_projection(v: np.ndarray, r: float) -> np.ndarray:
    """Projection of one row onto ``{‖x‖₁ ≤ r}`` in float64: soft thresholding at the root θ of
    ``Σ max(|v| − θ, 0) = r``, found by bisection (no sorting, no Newton step)."""
    a = np.abs(v)
    if a.sum() <= r:
        return v.copy()
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(a - mid, 0).sum() > r else (lo, mid)
    return np.sign(v) * np.maximum(a - 0.5 * (lo + hi), 0)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def hard_case(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that mix every case: heavy ties (entries from a few values), zero radii, rows inside, on the boundary and
    far outside their ball, all-zero rows, and wide dynamic ranges."""
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randint(-3, 4, shape, generator=gen).to(dtype) * 0.25  # ties everywhere
    v = rows_of(delta)
    rows = v.shape[0]
    v[1::5] = torch.randn(v[1::5].shape, generator=gen, dtype=dtype) * 10.0 ** torch.randint(
        -3, 3, (v[1::5].shape[0], 1), generator=gen
    ).to(dtype)
    v[2::7] = 0.0  # all-zero rows
    norms = v.abs().sum(dim=1)
    factor = torch.rand(rows, generator=gen, dtype=dtype) * 1.5  # inside (> 1) or outside (< 1)
    radius = norms * factor
    radius[::4] = 0.0  # zero radii
    radius[3::6] = norms[3::6]  # exactly on the boundary
    return delta, radius


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_new_projection_equals_the_previous_sort_based_one(shape, dtype):
    for seed in range(4):
        delta, radius = hard_case(shape, dtype, seed)
        got, expected = BALL.project(delta, radius), previous_projection(delta, radius)
        assert got.shape == delta.shape and got.dtype == dtype
        scale = rows_of(delta).abs().amax(dim=1, keepdim=True).clamp_min(1.0)
        err = (rows_of(got) - rows_of(expected)).abs() / scale
        assert float(err.max()) <= RTOL[dtype], (seed, float(err.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_stays_in_the_ball_keeps_inside_rows_and_zeroes_zero_radii(dtype):
    delta, radius = hard_case((60, 2, 5, 5), dtype, seed=7)
    p = BALL.project(delta, radius)
    v, pr = rows_of(delta), rows_of(p)
    # In the ball up to the rounding of a row sum (what `excess` and the budget's `contains` tolerate).
    tol = 4 * torch.finfo(dtype).eps * v.abs().sum(dim=1)
    assert bool((pr.abs().sum(dim=1) - radius <= tol).all())
    inside = v.abs().sum(dim=1) <= radius
    assert torch.equal(pr[inside], v[inside])  # rows inside, including all-zero rows, are returned as they are
    assert bool((pr[radius == 0] == 0).all())
    assert bool((pr * v >= 0).all()) and bool((pr.abs() <= v.abs()).all())  # shrinks towards 0, never flips a sign


def test_float32_projection_of_a_large_weight_matches_float64():
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(512, 784, generator=gen, dtype=torch.float64) * 0.02
    radius = torch.full((512,), 0.5, dtype=torch.float64)
    exact = BALL.project(delta, radius)
    fast = BALL.project(delta.float(), radius.float())
    assert fast.dtype == torch.float32
    assert float((fast.double() - exact).abs().max()) <= 1e-6
    np.testing.assert_allclose(exact.numpy(), previous_projection(delta, radius).numpy(), rtol=0, atol=1e-14)


def test_rows_still_moving_after_the_step_limit_take_the_sorted_threshold(monkeypatch):
    fallback_rows = []
    sorted_threshold = balls._l1_threshold_sorted
    monkeypatch.setattr(
        balls, "_l1_threshold_sorted", lambda a, r: fallback_rows.append(len(a)) or sorted_threshold(a, r)
    )
    monkeypatch.setattr(balls, "_MAX_NEWTON_STEPS", 1)  # one step: rows not at their root yet take the fallback
    delta, radius = hard_case((30, 20), torch.float64, seed=3)
    got = BALL.project(delta, radius)
    assert fallback_rows and fallback_rows[0] > 0
    np.testing.assert_allclose(got.numpy(), previous_projection(delta, radius).numpy(), rtol=0, atol=1e-13)


def test_ascent_iterates_with_an_entry_at_the_threshold_settle_without_the_fallback(monkeypatch):
    # Steepest row-l1 steps put r·step/k on k entries, so an entry often equals the next θ* exactly; rounding then
    # made the active set alternate between two sizes and every such row ran into the step limit.
    fallback_calls = []
    sorted_threshold = balls._l1_threshold_sorted
    monkeypatch.setattr(
        balls, "_l1_threshold_sorted", lambda *args: fallback_calls.append(1) or sorted_threshold(*args)
    )
    gen = torch.Generator().manual_seed(5)
    radius = torch.full((256,), 0.5)
    direction = torch.randn(256, 256, generator=gen)  # a gradient that drifts slowly, as in an attack
    delta = torch.zeros(256, 256)
    for _ in range(8):
        grad = direction + 0.5 * torch.randn(256, 256, generator=gen)
        moved = delta + BALL.steepest_step(grad, radius, 0.5)
        delta = BALL.project(moved, radius)
        assert float((delta - previous_projection(moved, radius)).abs().max()) <= 1e-7
    assert not fallback_calls


def test_empty_parameter_is_returned_unchanged():
    for delta, radius in [(torch.zeros(0, 5), torch.zeros(0)), (torch.zeros(3, 0, 2), torch.ones(3))]:
        assert BALL.project(delta, radius).shape == delta.shape


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    rows=arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 9)),
        elements=st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-1e3, 1e3)),
    ),
    fractions=st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.999, 1.0, 2.0]), min_size=4, max_size=4),
)
def test_projection_is_the_euclidean_projection(rows, fractions):
    radius = np.abs(rows).sum(axis=1) * np.array(fractions[: len(rows)])
    p = BALL.project(torch.from_numpy(rows), torch.from_numpy(radius)).numpy()
    scale = max(1.0, float(np.abs(rows).max()))
    for v, r, got in zip(rows, radius, p):
        np.testing.assert_allclose(got, bisection_projection(v, float(r)), rtol=0, atol=1e-9 * scale)
        # Variational inequality of the projection: <v − P, z − P> ≤ 0 at every vertex z = ±r·e_c of the ball.
        vertices = np.concatenate([np.eye(len(v)), -np.eye(len(v))]) * r
        assert float(((vertices - got) @ (v - got)).max()) <= 1e-9 * scale**2
