"""The three weight balls of docs/theory.md §2: exact projections (against brute-force solvers), norms, sampling,
steepest steps and the inclusions between balls."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from art_weightpert.balls import BALLS, BoxBall, L2Ball, RowL1Ball

SHAPES = [(5, 7), (3, 2, 3, 3), (6,)]  # a Linear weight, a Conv2d weight, a bias


# ------------------------------------------------------------------------------------------- brute-force references
def rows_of(a: np.ndarray) -> np.ndarray:
    return a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)


def l1_projection_bisection(v: np.ndarray, r: float) -> np.ndarray:
    """Projection of one row onto {‖x‖₁ ≤ r}: soft-thresholding at the θ ≥ 0 with Σ max(|v|-θ, 0) = r, θ found by
    bisection (independent of the sorting algorithm under test)."""
    if np.abs(v).sum() <= r:
        return v.copy()
    lo, hi = 0.0, float(np.abs(v).max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(np.abs(v) - mid, 0).sum() > r:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def l1_projection_slsqp(v: np.ndarray, r: float) -> np.ndarray:
    """The same projection by a generic constrained solver: x = p - q, p, q ≥ 0, Σ(p + q) ≤ r."""
    n = len(v)

    def objective(z):
        x = z[:n] - z[n:]
        return 0.5 * np.sum((x - v) ** 2)

    def gradient(z):
        g = (z[:n] - z[n:]) - v
        return np.concatenate([g, -g])

    z0 = np.zeros(2 * n)
    cons = [{"type": "ineq", "fun": lambda z: r - z.sum(), "jac": lambda z: -np.ones(2 * n)}]
    res = scipy.optimize.minimize(
        objective, z0, jac=gradient, bounds=[(0, None)] * (2 * n), constraints=cons, method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )  # fmt: skip
    assert res.success, res.message
    return res.x[:n] - res.x[n:]


def reference_projection(norm: str, delta: np.ndarray, radius: np.ndarray) -> np.ndarray:
    if norm == "inf":
        return np.clip(delta, -radius, radius)
    if norm == "row_l1":
        rows = rows_of(delta)
        return np.stack([l1_projection_bisection(row, float(r)) for row, r in zip(rows, radius)]).reshape(delta.shape)
    n = np.linalg.norm(delta)
    return delta if n <= radius else delta * (float(radius) / n)


def random_radius(norm: str, shape, gen: torch.Generator, low: float = 0.05, high: float = 1.0) -> torch.Tensor:
    radius_shape = {"inf": shape, "row_l1": (shape[0],), "l2": ()}[norm]
    return low + (high - low) * torch.rand(radius_shape, generator=gen, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------ projection
@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_lands_in_ball_is_idempotent_and_exact(norm, shape):
    ball = BALLS[norm]
    gen = torch.Generator().manual_seed(1)
    for scale in (0.01, 0.3, 3.0):  # points inside, around and far outside the ball
        delta = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        radius = random_radius(norm, shape, gen)
        p = ball.project(delta, radius)
        assert p.shape == delta.shape and p.dtype == delta.dtype
        assert float(ball.excess(p, radius)) <= 1e-12
        np.testing.assert_allclose(ball.project(p, radius).numpy(), p.numpy(), rtol=0, atol=1e-12)
        expected = reference_projection(norm, delta.numpy(), radius.numpy())
        np.testing.assert_allclose(p.numpy(), expected, rtol=0, atol=1e-9)


def test_row_l1_projection_matches_a_generic_constrained_solver():
    ball = RowL1Ball()
    rng = np.random.default_rng(3)
    for _ in range(8):
        v = rng.normal(size=(2, 4)) * rng.uniform(0.2, 3.0)
        r = rng.uniform(0.1, 2.0, size=2)
        p = ball.project(torch.from_numpy(v), torch.from_numpy(r)).numpy()
        for row, radius, got in zip(v, r, p):
            np.testing.assert_allclose(got, l1_projection_slsqp(row, radius), atol=1e-5)


def test_row_l1_projection_satisfies_the_optimality_condition_at_every_vertex():
    # P is the projection onto the convex hull of the vertices ±r·e_c iff <v - P, z - P> ≤ 0 at every vertex z.
    ball = RowL1Ball()
    gen = torch.Generator().manual_seed(4)
    v = 2 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    r = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    p = ball.project(v, r)
    for row in range(6):
        vertices = torch.cat([torch.eye(9, dtype=torch.float64), -torch.eye(9, dtype=torch.float64)]) * r[row]
        inner = (vertices - p[row]) @ (v[row] - p[row])
        assert float(inner.max()) <= 1e-12


def test_row_l1_projection_edge_cases():
    ball = RowL1Ball()
    ties = torch.tensor([[1.0, -1.0, 1.0], [3.0, 0.0, 0.0], [0.2, 0.1, 0.0]], dtype=torch.float64)
    radius = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64)
    p = ball.project(ties, radius)
    np.testing.assert_allclose(p[0].numpy(), [1 / 3, -1 / 3, 1 / 3], atol=1e-12)  # equal magnitudes share r
    np.testing.assert_array_equal(p[1].numpy(), [0.0, 0.0, 0.0])  # zero radius projects onto 0
    np.testing.assert_array_equal(p[2].numpy(), ties[2].numpy())  # inside: unchanged


def test_projection_handles_zero_radius_and_keeps_float32():
    for norm, ball in BALLS.items():
        delta = torch.randn(4, 5)
        radius = {"inf": torch.zeros(4, 5), "row_l1": torch.zeros(4), "l2": torch.zeros(())}[norm]
        p = ball.project(delta, radius)
        assert p.dtype == torch.float32
        assert torch.equal(p.abs(), torch.zeros(4, 5)), norm


@settings(max_examples=60, deadline=None)
@given(
    delta=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=st.floats(-10, 10)),
    norm=st.sampled_from(["inf", "row_l1", "l2"]),
    radius=st.floats(0.0, 5.0),
)
def test_projection_is_exact_on_arbitrary_points(delta, norm, radius):
    ball = BALLS[norm]
    d = torch.from_numpy(delta)
    r = {"inf": torch.full(d.shape, radius), "row_l1": torch.full((d.shape[0],), radius), "l2": torch.tensor(radius)}
    r = r[norm].to(torch.float64)
    p = ball.project(d, r)
    assert float(ball.excess(p, r)) <= 1e-9 * (1 + radius)
    np.testing.assert_allclose(p.numpy(), reference_projection(norm, delta, r.numpy()), atol=1e-8)
    np.testing.assert_allclose(ball.project(p, r).numpy(), p.numpy(), atol=1e-9)


# ---------------------------------------------------------------------------------------------- norms and radii
def test_norms_follow_their_definitions():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=torch.float64)
    assert float(BoxBall().norm(w)) == 3.0
    assert float(RowL1Ball().norm(w)) == 4.0  # max(3.5, 4.0)
    assert float(L2Ball().norm(w)) == pytest.approx(math.sqrt(1 + 4 + 0.25 + 9 + 1))
    conv = torch.ones(2, 3, 2, 2, dtype=torch.float64)
    conv[1] *= 2
    assert float(RowL1Ball().norm(conv)) == 24.0  # a row is one output channel's whole kernel


@pytest.mark.parametrize("shape", SHAPES)
def test_relative_radii_scale_with_the_weights(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 0.1
    np.testing.assert_allclose(BoxBall().radius(w, eps, True).numpy(), eps * w.abs().numpy())
    np.testing.assert_allclose(RowL1Ball().radius(w, eps, True).numpy(), eps * rows_of(w.abs().numpy()).sum(1))
    np.testing.assert_allclose(float(L2Ball().radius(w, eps, True)), eps * np.linalg.norm(w.numpy()))
    for ball in BALLS.values():  # doubling the weights doubles relative radii; absolute radii ignore them
        np.testing.assert_allclose(ball.radius(2 * w, eps, True).numpy(), 2 * ball.radius(w, eps, True).numpy())
        np.testing.assert_array_equal(ball.radius(2 * w, eps, False).numpy(), ball.radius(w, eps, False).numpy())
    assert BoxBall().radius(w, eps, False).shape == w.shape
    assert RowL1Ball().radius(w, eps, False).shape == (shape[0],)
    assert L2Ball().radius(w, eps, False).shape == ()


# ----------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("distribution", ["uniform", "extreme", "gaussian"])
def test_samples_stay_in_the_ball(norm, shape, distribution):
    ball = BALLS[norm]
    gen = torch.Generator().manual_seed(5)
    radius = random_radius(norm, shape, gen)
    for _ in range(5):
        s = ball.sample(radius, torch.Size(shape), distribution, gen)
        assert s.shape == shape and torch.isfinite(s).all()
        assert float(ball.excess(s, radius)) <= 1e-12
        assert float(s.abs().max()) > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_extreme_samples_are_extreme(shape):
    gen = torch.Generator().manual_seed(6)
    box_r = random_radius("inf", shape, gen)
    s = BoxBall().sample(box_r, torch.Size(shape), "extreme", gen)
    np.testing.assert_allclose(s.abs().numpy(), box_r.numpy(), rtol=1e-15)  # a vertex: |δ| = r everywhere
    row_r = random_radius("row_l1", shape, gen)
    for distribution in ("extreme", "gaussian"):
        s = RowL1Ball().sample(row_r, torch.Size(shape), distribution, gen)
        np.testing.assert_allclose(rows_of(s.abs().numpy()).sum(1), row_r.numpy(), rtol=1e-12)  # on every row
    s = RowL1Ball().sample(row_r, torch.Size(shape), "extreme", gen)
    assert np.all((rows_of(s.numpy()) != 0).sum(1) == 1)  # vertices ±r·e_c of each row
    l2_r = random_radius("l2", shape, gen)
    for distribution in ("extreme", "gaussian"):
        s = L2Ball().sample(l2_r, torch.Size(shape), distribution, gen)
        assert float(s.norm()) == pytest.approx(float(l2_r), rel=1e-12)
    s = BoxBall().sample(box_r, torch.Size(shape), "gaussian", gen)  # rescaled onto the box's boundary
    assert float(BoxBall().excess(s, box_r)) == pytest.approx(0.0, abs=1e-12)


def test_uniform_samples_fill_the_ball():
    # For x uniform in an n-dimensional ball, ‖x‖/r has mean n/(n+1) in its own norm (and |x_i|/r mean 1/2 in a box).
    gen = torch.Generator().manual_seed(7)
    s = BoxBall().sample(torch.ones(2000, 3, dtype=torch.float64), torch.Size((2000, 3)), "uniform", gen)
    assert float(s.abs().mean()) == pytest.approx(0.5, abs=0.02)
    assert float(s.mean()) == pytest.approx(0.0, abs=0.02)
    s = RowL1Ball().sample(torch.ones(4000, dtype=torch.float64), torch.Size((4000, 2)), "uniform", gen)
    assert float(s.abs().sum(1).mean()) == pytest.approx(2 / 3, abs=0.02)
    assert float((s > 0).double().mean()) == pytest.approx(0.5, abs=0.02)
    one = torch.tensor(1.0, dtype=torch.float64)
    norms = [float(L2Ball().sample(one, torch.Size((2,)), "uniform", gen).norm()) for _ in range(2000)]
    assert np.mean(norms) == pytest.approx(2 / 3, abs=0.02)


def test_samples_respect_zero_radii():
    # Relative budgets give zero radii where weights are zero; samples must stay 0 there and be non-zero elsewhere.
    gen = torch.Generator().manual_seed(8)
    radius = torch.tensor([[0.0, 0.5, 0.2], [0.3, 0.0, 0.4]])
    for distribution in ("uniform", "extreme", "gaussian"):
        s = BoxBall().sample(radius, torch.Size((2, 3)), distribution, gen)
        assert torch.isfinite(s).all()
        assert float(s[0, 0]) == 0.0 and float(s[1, 1]) == 0.0
        assert float(BoxBall().excess(s, radius)) <= 1e-7
        assert float(s.abs().max()) > 0.01, distribution
    s = RowL1Ball().sample(torch.tensor([0.0, 1.0]), torch.Size((2, 3)), "gaussian", gen)
    assert float(s[0].abs().sum()) == 0.0 and float(s[1].abs().sum()) == pytest.approx(1.0, rel=1e-6)


def test_float32_samples_are_finite_on_large_layers():
    gen = torch.Generator().manual_seed(9)
    for norm in ("inf", "row_l1", "l2"):
        shape = (64, 4096)
        radius = {"inf": torch.full(shape, 0.1), "row_l1": torch.full((64,), 0.1), "l2": torch.tensor(0.1)}[norm]
        for distribution in ("uniform", "extreme", "gaussian"):
            s = BALLS[norm].sample(radius, torch.Size(shape), distribution, gen)
            assert s.dtype == torch.float32 and torch.isfinite(s).all(), (norm, distribution)
            assert float(BALLS[norm].excess(s, radius)) <= 1e-6


# ------------------------------------------------------------------------------------------------ steepest steps
@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
def test_steepest_step_has_the_requested_length_and_ascends(norm):
    ball = BALLS[norm]
    gen = torch.Generator().manual_seed(10)
    g = torch.randn(4, 40, generator=gen, dtype=torch.float64)
    radius = random_radius(norm, (4, 40), gen)
    step = ball.steepest_step(g, radius, 0.25)
    assert step.shape == g.shape
    assert float((g * step).sum()) > 0
    if norm == "inf":
        length = (step.abs() / radius).max()
    elif norm == "row_l1":
        length = (step.abs().sum(1) / radius).max()
    else:
        length = step.norm() / radius
    assert float(length) == pytest.approx(0.25, rel=1e-12)
    if norm == "inf":  # the maximiser of <g, d> over the box of radius 0.25·r
        np.testing.assert_allclose(step.numpy(), 0.25 * radius.numpy() * np.sign(g.numpy()))


# ---------------------------------------------------------------------------------------------------- inclusions
@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_inclusions_contain_every_point_and_are_tight(norm, shape):
    ball = BALLS[norm]
    gen = torch.Generator().manual_seed(11)
    radius = random_radius(norm, shape, gen)
    row_r = ball.row_l1_radius(radius, torch.Size(shape))
    box_r = ball.entry_bound(radius, torch.Size(shape))
    assert row_r.shape == (shape[0],) and box_r.shape == shape
    for distribution in ("uniform", "extreme", "gaussian"):
        for _ in range(10):
            s = ball.sample(radius, torch.Size(shape), distribution, gen)
            assert float(RowL1Ball().excess(s, row_r)) <= 1e-12
            assert float(BoxBall().excess(s, box_r)) <= 1e-12
    # Tightness: for every row (entry) some point of the ball reaches the bound.
    n = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    for r in range(shape[0]):
        if norm == "inf":
            point = radius.clone()  # the all-positive vertex reaches every row's bound at once
        elif norm == "row_l1":
            point = torch.zeros(shape, dtype=torch.float64)
            rows_of(point)[r, 0] = radius[r]
        else:
            point = torch.zeros(shape, dtype=torch.float64)
            rows_of(point)[r] = radius / math.sqrt(n)
        assert float(ball.excess(point, radius)) <= 1e-12
        assert float(rows_of(point)[r].abs().sum()) == pytest.approx(float(row_r[r]), rel=1e-12)
    flat = box_r.reshape(-1)
    for index in (0, flat.numel() - 1):  # one entry pushed to its bound is still in the ball
        point = torch.zeros(flat.numel(), dtype=torch.float64)
        point[index] = flat[index]
        assert float(ball.excess(point.reshape(shape), radius)) <= 1e-12


def test_inclusion_table_of_the_docs():
    # box δ ⊆ row_l1(n·δ); l2 ε ⊆ row_l1(√n·ε); row_l1 ε ⊆ box ε (docs/theory.md §2), n = fan-in.
    shape = torch.Size((3, 2, 3, 3))  # conv: fan-in 2·3·3 = 18
    f64 = torch.float64
    np.testing.assert_allclose(BoxBall().row_l1_radius(torch.full(shape, 0.01, dtype=f64), shape).numpy(), [0.18] * 3)
    np.testing.assert_allclose(
        L2Ball().row_l1_radius(torch.tensor(0.5, dtype=f64), shape).numpy(), [0.5 * math.sqrt(18)] * 3
    )
    np.testing.assert_allclose(
        RowL1Ball().entry_bound(torch.full((3,), 0.2, dtype=f64), shape).numpy(), np.full(shape, 0.2)
    )


# ------------------------------------------------------------------------------------------------ bound terms
def vertices(norm: str, radius: torch.Tensor, shape) -> torch.Tensor:
    """Every vertex of a box or row_l1 ball on a tiny parameter, ``(V, *shape)``."""
    n = int(np.prod(shape))
    if norm == "inf":
        signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=torch.float64)
        return signs.reshape((-1, *shape)) * radius
    rows, fan_in = shape[0], n // shape[0]
    per_row = [[(s * float(radius[r]), c) for s in (-1.0, 1.0) for c in range(fan_in)] for r in range(rows)]
    out = []
    for choice in itertools.product(*per_row):
        v = torch.zeros((rows, fan_in), dtype=torch.float64)
        for r, (value, c) in enumerate(choice):
            v[r, c] = value
        out.append(v.reshape(shape))
    return torch.stack(out)


@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("shape", [(2, 3), (3,), (2, 1, 2, 1)])
def test_support_function_is_the_maximum_over_the_ball(norm, shape):
    """``support(g) = max_Δ ⟨Δ, g⟩``: attained at a vertex for the polytopes, at ``r g / ‖g‖`` for l2, never exceeded
    by sampled points; batched over leading dimensions."""
    ball = BALLS[norm]
    gen = torch.Generator().manual_seed(12)
    radius = random_radius(norm, shape, gen)
    g = torch.randn((4, *shape), generator=gen, dtype=torch.float64)
    got = ball.support(g, radius, torch.Size(shape))
    assert got.shape == (4,)
    if norm == "l2":
        best = torch.stack([(radius * gi / gi.norm() * gi).sum() for gi in g])
    else:
        points = vertices(norm, radius, shape)
        best = torch.einsum("v...,n...->nv", points, g).amax(dim=1)
    torch.testing.assert_close(got, best, rtol=1e-12, atol=1e-12)
    samples = torch.stack([ball.sample(radius, torch.Size(shape), "uniform", gen) for _ in range(50)])
    assert bool((torch.einsum("v...,n...->nv", samples, g) <= got.unsqueeze(1) + 1e-12).all())


@pytest.mark.parametrize("norm", ["inf", "row_l1", "l2"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("conv", [0, 1, 2], ids=["linear", "conv", "grouped-conv"])
def test_interval_term_bounds_every_perturbation_and_is_attained_by_the_box(norm, relative, conv):
    """``|Δ ĥ| ≤ interval_term(m)`` for every ``Δ`` in the ball and ``|ĥ| ≤ m`` (sampled extreme points); for the box
    on a Linear layer the bound is attained; the compact radius (one value for equal radii) gives the same bound."""
    from art_weightpert.network import Affine

    torch.manual_seed(13)
    module = (torch.nn.Conv2d(2, 4, 2, groups=conv) if conv else torch.nn.Linear(5, 3)).double()
    layer = Affine("", module, "weight", "bias")
    gen = torch.Generator().manual_seed(14)
    ball = BALLS[norm]
    radius = ball.radius(module.weight.detach(), 0.1, relative)
    m = torch.rand((2, 2, 4, 4) if conv else (2, 5), generator=gen, dtype=torch.float64)
    bound = ball.interval_term(layer, m, radius)
    compact = ball.interval_term(layer, m, ball.compact_radius(radius))
    torch.testing.assert_close(compact.expand_as(bound), bound, rtol=1e-12, atol=0)
    for _ in range(40):
        delta = ball.sample(radius, module.weight.shape, "extreme", gen)
        h = m * (2 * torch.randint(0, 2, m.shape, generator=gen) - 1)
        assert bool((layer.apply(h, delta).abs() <= bound + 1e-12).all())
    if norm == "inf" and not conv:  # Δ = +radius (a vertex) and ĥ = m ≥ 0 reach it: Δ m = layer(m; radius)
        torch.testing.assert_close(bound, layer.apply(m, radius), rtol=1e-12, atol=0)


def test_only_a_relative_box_folds_into_the_weight_product():
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    assert BoxBall().abs_weight_factor(BoxBall().radius(w, 0.2, True), w, 0.2) == 0.2
    assert BoxBall().abs_weight_factor(BoxBall().radius(w, 0.2, False), w, 0.2) is None
    for ball in (RowL1Ball(), L2Ball()):
        assert ball.abs_weight_factor(ball.radius(w, 0.2, True), w, 0.2) is None
