"""The row-ℓ1 projection (:meth:`.RowL1Ball.project`, docs/theory.md §2) is the Euclidean projection onto
``{‖x_r‖₁ ≤ r_r}``, checked against its optimality conditions and an independent float64 bisection for ``θ``, not
against another implementation of the same algorithm.

KKT: a row inside its ball is returned as it is; a row outside is the soft thresholding ``sign(v)·max(|v| − θ, 0)``
at one ``θ ≥ 0`` per row with ``‖x‖₁ = r``. The tests recover ``θ`` from the result (``|v| − |x|`` on its support),
check that it is one number per row, that the entries off the support are at most ``θ``, that the ℓ1 norm is the
radius, and that ``θ`` is the root of ``Σ max(|v| − θ, 0) = r`` found by bisection in float64. Tolerances are the
rounding of a row sum (a few ``n·eps·Σ|v|``): a ``θ`` off by one breakpoint, a wrong sign or a wrong support is
orders of magnitude larger on these cases."""

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


def rows_of(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def bisection_theta(v: np.ndarray, r: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Per-row ``θ`` in float64: 0 for rows inside their ball, else the root of ``Σ_c max(|v_c| − θ, 0) = r`` (a
    continuous, decreasing function of ``θ`` on ``[0, max|v|]``), by bisection, vectorized over rows."""
    a = np.abs(np.asarray(v, dtype=np.float64))
    r = np.asarray(r, dtype=np.float64)
    lo, hi = np.zeros(len(a)), a.max(axis=1, initial=0.0)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = np.maximum(a - mid[:, None], 0).sum(axis=1) > r
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(a.sum(axis=1) <= r, 0.0, 0.5 * (lo + hi))


def soft_threshold(v: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.maximum(np.abs(v) - theta[:, None], 0)


def check_projection(delta: torch.Tensor, radius: torch.Tensor, got: torch.Tensor, slack: float = 4.0) -> None:
    """Assert that ``got`` is the Euclidean projection of ``delta`` onto the row-ℓ1 ball of ``radius``: the KKT
    conditions row by row, and the soft thresholding at the bisection ``θ``. Tolerance per row:
    ``slack·n·eps·(Σ|v| + r)`` in the dtype of ``delta`` (the rounding of a sum of ``n`` entries), at least the
    smallest normal number (the bisection's midpoints underflow among subnormals)."""
    assert got.shape == delta.shape and got.dtype == delta.dtype
    eps = torch.finfo(delta.dtype).eps
    v = rows_of(delta).double().numpy()
    p = rows_of(got).double().numpy()
    r = radius.double().numpy()
    n = v.shape[1]
    a, pa = np.abs(v), np.abs(p)
    tol = slack * max(n, 4) * eps * (a.sum(axis=1) + r) + torch.finfo(delta.dtype).tiny  # subnormals: absolute floor
    # (d) rows inside, all-zero rows included: returned as they are, bit for bit (rows within rounding of the
    # boundary may be read as outside: they are checked below, with θ ≈ 0)
    inside = a.sum(axis=1) <= r - tol
    np.testing.assert_array_equal(p[inside], v[inside])
    # (a) in the ball, up to the rounding of a row sum
    assert (pa.sum(axis=1) - r <= tol).all(), float((pa.sum(axis=1) - r - tol).max())
    # shrinks towards 0 and never flips a sign
    assert (p * v >= 0).all() and (pa <= a).all()
    theta_ref = bisection_theta(v, r)
    for row in np.flatnonzero(~inside):
        support = pa[row] > 0
        if r[row] > 0:
            # (c) on the sphere of the ball
            assert abs(pa[row].sum() - r[row]) <= tol[row], (row, pa[row].sum(), r[row])
            assert support.any()
        else:
            assert not support.any()  # zero radius: the row is zeroed
            continue
        # (b) one θ ≥ 0 per row: |v| − |x| is the same on the support, and entries off it are at most θ
        thetas = a[row, support] - pa[row, support]
        theta = float(thetas.mean())
        assert theta >= -tol[row]
        assert float(thetas.max() - thetas.min()) <= tol[row], (row, thetas.min(), thetas.max())
        assert (a[row, ~support] <= theta + tol[row]).all()
        # independent θ: the root found by bisection in float64
        assert abs(theta - theta_ref[row]) <= tol[row], (row, theta, theta_ref[row])
    reference = soft_threshold(v, theta_ref)
    assert (np.abs(p - reference) <= tol[:, None]).all(), float((np.abs(p - reference) - tol[:, None]).max())


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


def test_the_checker_rejects_a_wrong_threshold():
    """The reference can fail: soft thresholding at θ·(1 + 1e-4), or at the θ of the next breakpoint, is refused."""
    delta, radius = hard_case((40, 30), torch.float64, seed=0)
    good = BALL.project(delta, radius)
    check_projection(delta, radius, good)
    v = rows_of(delta).numpy()
    theta = bisection_theta(v, radius.numpy())
    for wrong in (theta * (1 + 1e-4), theta + 0.25 * (theta > 0)):
        bad = torch.from_numpy(
            np.where((np.abs(v).sum(axis=1) <= radius.numpy())[:, None], v, soft_threshold(v, wrong))
        )
        with pytest.raises(AssertionError):
            check_projection(delta, radius, bad.reshape(delta.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_satisfies_the_kkt_conditions(shape, dtype):
    for seed in range(4):
        delta, radius = hard_case(shape, dtype, seed)
        check_projection(delta, radius, BALL.project(delta, radius))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_of_a_conv_weight_zeroes_zero_radii(dtype):
    delta, radius = hard_case((60, 2, 5, 5), dtype, seed=7)
    p = BALL.project(delta, radius)
    check_projection(delta, radius, p)
    assert bool((rows_of(p)[radius == 0] == 0).all())


def test_float32_projection_of_a_large_weight_matches_float64():
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(512, 784, generator=gen, dtype=torch.float64) * 0.02
    radius = torch.full((512,), 0.5, dtype=torch.float64)
    exact = BALL.project(delta, radius)
    check_projection(delta, radius, exact)
    fast = BALL.project(delta.float(), radius.float())
    assert fast.dtype == torch.float32
    assert float((fast.double() - exact).abs().max()) <= 1e-6
    check_projection(delta.float(), radius.float(), fast)


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
    check_projection(delta, radius, got)


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
        check_projection(moved, radius, delta)
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
    delta = torch.from_numpy(rows)
    p = BALL.project(delta, torch.from_numpy(radius))
    check_projection(delta, torch.from_numpy(radius), p)
    scale = max(1.0, float(np.abs(rows).max()))
    for v, r, got in zip(rows, radius, p.numpy()):
        # Variational inequality of the projection: <v − P, z − P> ≤ 0 at every vertex z = ±r·e_c of the ball.
        vertices = np.concatenate([np.eye(len(v)), -np.eye(len(v))]) * r
        assert float(((vertices - got) @ (v - got)).max()) <= 1e-9 * scale**2
        # and no point of the ball sampled at random is closer to v
        z = np.random.default_rng(0).laplace(size=(64, len(v)))
        z *= r / np.maximum(np.abs(z).sum(axis=1, keepdims=True), 1e-300)
        assert float(np.linalg.norm(v - got)) <= float(np.linalg.norm(v - z, axis=1).min()) + 1e-9 * scale
