"""PerturbationBudget (docs/theory.md §2): layer selection, radii, exact projection, membership, sampling, inclusions
and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_cnn, make_mlp
from test_balls import reference_projection, rows_of
from torch import nn

from art_weightpert import PerturbationBudget, WeightPerturbation
from art_weightpert.balls import BoxBall, L2Ball, RowL1Ball
from art_weightpert.budget import delta_tensors

NORMS = ["inf", "row_l1", "l2"]


@pytest.fixture(scope="module")
def mlp():
    return make_mlp(seed=1)


@pytest.fixture(scope="module")
def cnn():
    return make_cnn(seed=1)


def params_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.named_parameters()}


def random_delta(model, scale: float, seed: int = 0, names=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: scale * rng.normal(size=v.shape) for k, v in model.named_parameters() if names is None or k in names}


# ------------------------------------------------------------------------------------------------ description
def test_default_budget_perturbs_every_linear_and_conv_weight(mlp, cnn):
    budget = PerturbationBudget(0.1)
    assert [t.param_name for t in budget.parameter_balls(mlp)] == ["0.weight", "2.weight"]
    assert [t.param_name for t in budget.parameter_balls(cnn)] == ["0.weight", "4.weight"]
    with_bias = PerturbationBudget(0.1, include_bias=True).parameter_balls(mlp)
    assert [(t.param_name, t.layer_name, t.kind) for t in with_bias] == [
        ("0.weight", "0", "weight"),
        ("0.bias", "0", "bias"),
        ("2.weight", "2", "weight"),
        ("2.bias", "2", "bias"),
    ]


def test_layers_and_per_layer_eps(mlp):
    budget = PerturbationBudget({"2": 0.3}, norm="row_l1")
    assert budget.layers == ("2",)
    (target,) = budget.parameter_balls(mlp)
    assert target.param_name == "2.weight" and target.eps == 0.3
    np.testing.assert_allclose(target.radius.numpy(), np.full(10, 0.3), rtol=1e-7)
    budget = PerturbationBudget({"0": 0.1, "2": 0.2}, layers=["0"])
    assert [t.param_name for t in budget.parameter_balls(mlp)] == ["0.weight"]
    assert PerturbationBudget(0.1, layers="2").layers == ("2",)
    eps = {t.param_name: t.eps for t in PerturbationBudget({"0": 0.1, "2": 0.2}).parameter_balls(mlp)}
    assert eps == {"0.weight": 0.1, "2.weight": 0.2}


def test_nested_layer_names():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    model.add_module("head", nn.Linear(3, 2))
    budget = PerturbationBudget({"features.0": 0.1, "head": 0.2}, include_bias=True)
    names = [t.param_name for t in budget.parameter_balls(model)]
    assert names == ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
    assert set(names) <= set(dict(model.named_parameters()))


@pytest.mark.parametrize("norm", NORMS)
def test_radii_absolute_and_relative(mlp, cnn, norm):
    for model in (mlp, cnn):
        w = {k: v for k, v in params_of(model).items() if k.endswith("weight")}
        absolute = PerturbationBudget(0.05, norm=norm).radii(model)
        relative = PerturbationBudget(0.05, norm=norm, relative=True).radii(model)
        for name, weight in w.items():
            if norm == "inf":
                expected_abs, expected_rel = np.full(weight.shape, 0.05), 0.05 * np.abs(weight)
            elif norm == "row_l1":  # a conv row is one output channel's kernel
                expected_abs, expected_rel = np.full(weight.shape[0], 0.05), 0.05 * np.abs(rows_of(weight)).sum(1)
            else:
                expected_abs, expected_rel = np.array(0.05), np.array(0.05 * np.linalg.norm(weight))
            np.testing.assert_allclose(absolute[name], expected_abs, rtol=1e-6)
            np.testing.assert_allclose(relative[name], expected_rel, rtol=1e-5)


def test_relative_budgets_scale_with_the_weights(mlp):
    doubled = make_mlp(seed=1)
    with torch.no_grad():
        for p in doubled.parameters():
            p.mul_(2)
    for norm in NORMS:
        budget = PerturbationBudget(0.1, norm=norm, relative=True, include_bias=True)
        base, big = budget.radii(mlp), budget.radii(doubled)
        for name in base:
            np.testing.assert_allclose(big[name], 2 * base[name], rtol=1e-6)
        # a perturbation at the boundary for W is inside for 2W and outside when W is halved
        delta = budget.sample(mlp, "extreme", seed=0)
        assert budget.contains(delta, doubled)
        assert not budget.contains({k: 3 * v for k, v in delta.items()}, doubled)


def test_bias_balls(mlp):
    b = {k: v for k, v in params_of(mlp).items() if k.endswith("bias")}
    inf = PerturbationBudget(0.1, norm="row_l1", include_bias=True, relative=True).radii(mlp)
    np.testing.assert_allclose(inf["0.bias"], 0.1 * np.abs(b["0.bias"]), rtol=1e-6)  # a box, entry-wise
    l2 = PerturbationBudget(0.1, norm="l2", include_bias=True, relative=True).radii(mlp)
    np.testing.assert_allclose(l2["2.bias"], 0.1 * np.linalg.norm(b["2.bias"]), rtol=1e-6)
    assert PerturbationBudget(0.1, norm="row_l1").bias_ball.name == "inf"
    assert PerturbationBudget(0.1, norm="l2").bias_ball.name == "l2"


def test_row_l1_radii_are_the_inclusions(cnn):
    # box δ ⊆ row_l1(n·δ); l2 ε ⊆ row_l1(√n·ε); row_l1 ε itself (n = fan-in: 1·3·3 for the conv, 64 for the Linear)
    fan_in = {"0.weight": 9, "4.weight": 64}
    for norm, expected in (
        ("inf", lambda n: n * 0.01),
        ("l2", lambda n: math.sqrt(n) * 0.01),
        ("row_l1", lambda n: 0.01),
    ):
        radii = PerturbationBudget(0.01, norm=norm, include_bias=True).row_l1_radii(cnn, torch.float64)
        assert set(radii) == {"0.weight", "4.weight"}
        for name, r in radii.items():
            np.testing.assert_allclose(r.numpy(), expected(fan_in[name]), rtol=1e-12)


def test_scaled_with_eps_and_serialization():
    budget = PerturbationBudget({"0": 0.1, "2": 0.2}, norm="l2", relative=True, include_bias=True)
    assert budget.scaled(2.0).eps == {"0": 0.2, "2": 0.4}
    assert budget.scaled(2.0).norm == "l2" and budget.scaled(2.0).relative and budget.scaled(2.0).include_bias
    assert PerturbationBudget(0.1).scaled(0.5).eps == 0.05
    assert budget.with_eps(0.3).eps == 0.3 and budget.with_eps(0.3).layers == ("0", "2")
    assert PerturbationBudget.from_dict(budget.to_dict()) == budget
    assert PerturbationBudget.from_dict(json.loads(budget.to_json())) == budget
    assert budget != PerturbationBudget({"0": 0.1, "2": 0.2}, norm="l2")
    assert "l2" in repr(budget)
    with pytest.raises(ValueError, match="factor"):
        budget.scaled(-1.0)


# ------------------------------------------------------------------------------------------------- projection
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("include_bias", [False, True])
def test_projection_is_in_the_ball_idempotent_and_exact(cnn, norm, relative, include_bias):
    budget = PerturbationBudget(0.05, norm=norm, relative=relative, include_bias=include_bias)
    delta = random_delta(cnn, 0.2, seed=3)
    projected = budget.project(delta, cnn)
    assert isinstance(projected, WeightPerturbation) and projected.budget == budget
    assert budget.contains(projected, cnn, atol=1e-9)
    assert not budget.contains(delta, cnn)
    again = budget.project(projected, cnn)
    for name in projected:
        np.testing.assert_allclose(again[name], projected[name], atol=1e-12)
    radii = {t.param_name: t.radius.numpy() for t in budget.parameter_balls(cnn, torch.float64)}
    assert set(projected) == set(radii)  # parameters outside the budget are dropped
    for name, radius in radii.items():
        np.testing.assert_allclose(
            projected[name], reference_projection_for(budget, name, delta[name], radius), atol=1e-9
        )


def reference_projection_for(budget, name, delta, radius):
    norm = budget.norm if name.endswith("weight") else budget.bias_ball.name
    return reference_projection(norm, delta, radius)


def test_projection_fills_missing_parameters_with_zero(mlp):
    budget = PerturbationBudget(0.1, norm="row_l1")
    projected = budget.project({"0.weight": np.ones((16, 64))}, mlp)
    np.testing.assert_array_equal(projected["2.weight"], np.zeros((10, 16)))
    np.testing.assert_allclose(np.abs(projected["0.weight"]).sum(1), 0.1)
    np.testing.assert_allclose(projected["0.weight"], 0.1 / 64)


# ------------------------------------------------------------------------------------------------- membership
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relative", [False, True])
def test_contains_agrees_with_the_norm_definitions(mlp, norm, relative):
    budget = PerturbationBudget(0.1, norm=norm, relative=relative, include_bias=True)
    boundary = budget.sample(mlp, "extreme", seed=1)
    assert budget.contains(boundary, mlp)
    assert budget.contains({k: 0.999 * v for k, v in boundary.items()}, mlp, atol=0)
    assert not budget.contains({k: 1.01 * v for k, v in boundary.items()}, mlp, atol=0)
    for name in boundary:  # pushing one parameter out is enough
        outside = dict(boundary)
        outside[name] = 1.01 * boundary[name]
        assert not budget.contains(outside, mlp, atol=0), name
    assert budget.contains({}, mlp)


def test_contains_by_hand(mlp):
    w = np.zeros((10, 16))
    w[3, :4] = 0.025  # row ℓ1 0.1, max entry 0.025, Frobenius 0.05
    assert PerturbationBudget(0.1, norm="row_l1", layers=["2"]).contains({"2.weight": w}, mlp, atol=0)
    assert not PerturbationBudget(0.099, norm="row_l1", layers=["2"]).contains({"2.weight": w}, mlp, atol=0)
    assert PerturbationBudget(0.025, norm="inf", layers=["2"]).contains({"2.weight": w}, mlp, atol=0)
    assert not PerturbationBudget(0.0249, norm="inf", layers=["2"]).contains({"2.weight": w}, mlp, atol=0)
    assert PerturbationBudget(0.05, norm="l2", layers=["2"]).contains({"2.weight": w}, mlp, atol=1e-12)
    assert not PerturbationBudget(0.0499, norm="l2", layers=["2"]).contains({"2.weight": w}, mlp, atol=0)
    # tolerance: atol absorbs a tiny excess
    assert PerturbationBudget(0.0999, norm="row_l1", layers=["2"]).contains({"2.weight": w}, mlp, atol=1e-3)


def test_contains_rejects_parameters_outside_the_budget(mlp):
    budget = PerturbationBudget(0.1, layers=["2"])
    assert not budget.contains({"0.weight": np.full((16, 64), 0.01)}, mlp)
    assert not budget.contains({"2.bias": np.full(10, 0.01)}, mlp)  # biases only with include_bias
    assert budget.contains({"0.weight": np.zeros((16, 64))}, mlp)


# --------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("relative", [False, True])
def test_samples_are_in_the_ball_for_every_distribution(cnn, norm, relative):
    budget = PerturbationBudget(0.05, norm=norm, relative=relative, include_bias=True)
    names = {t.param_name for t in budget.parameter_balls(cnn)}
    for distribution in ("uniform", "extreme", "gaussian"):
        s = budget.sample(cnn, distribution, seed=2)
        assert isinstance(s, WeightPerturbation) and s.budget == budget and set(s) == names
        assert budget.contains(s, cnn, atol=1e-7)
        assert all(np.abs(v).max() > 0 for v in s.values())


def test_extreme_samples_reach_the_boundary(cnn):
    box = PerturbationBudget(0.05, relative=True)
    s = box.sample(cnn, "extreme", seed=0)
    for name, r in box.radii(cnn).items():
        np.testing.assert_allclose(np.abs(s[name]), r, rtol=1e-6)
    row = PerturbationBudget(0.05, norm="row_l1")
    s = row.sample(cnn, "extreme", seed=0)
    for name in s:
        np.testing.assert_allclose(np.abs(rows_of(s[name])).sum(1), 0.05, rtol=1e-6)
    l2 = PerturbationBudget(0.05, norm="l2")
    s = l2.sample(cnn, "extreme", seed=0)
    for name in s:
        assert np.linalg.norm(s[name]) == pytest.approx(0.05, rel=1e-6)


def test_sampling_is_reproducible(mlp):
    budget = PerturbationBudget(0.05, norm="row_l1")
    a, b, c = (budget.sample(mlp, seed=s) for s in (7, 7, 8))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
    assert budget.sample(mlp).keys() == a.keys()


# ------------------------------------------------------------------------------------------------- inclusions
@pytest.mark.parametrize("norm", NORMS)
def test_samples_lie_in_the_including_balls(cnn, norm):
    budget = PerturbationBudget(0.05, norm=norm, relative=True)
    row_radii = budget.row_l1_radii(cnn, torch.float64)
    param_balls = {t.param_name: t for t in budget.parameter_balls(cnn, torch.float64)}
    for seed in range(5):
        s = budget.sample(cnn, "uniform" if seed % 2 else "extreme", seed=seed)
        for name, d in s.items():
            d = torch.as_tensor(d, dtype=torch.float64)
            t = param_balls[name]
            # samples are drawn in the parameters' float32: allow its rounding
            assert float(RowL1Ball().excess(d, row_radii[name])) <= 1e-7 * float(row_radii[name].max())
            assert float(BoxBall().excess(d, t.ball.entry_bound(t.radius, d.shape))) <= 1e-7 * float(t.radius.max())
    assert isinstance(param_balls["0.weight"].ball, {"inf": BoxBall, "row_l1": RowL1Ball, "l2": L2Ball}[norm])


# -------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf"), -float("inf")])
def test_bad_eps_values(eps):
    with pytest.raises(ValueError, match="eps"):
        PerturbationBudget(eps)


@pytest.mark.parametrize("eps", ["0.1", None, True, [0.1], torch.tensor(0.1)])
def test_bad_eps_types(eps):
    with pytest.raises(TypeError, match="eps"):
        PerturbationBudget(eps)


def test_bad_eps_dicts(mlp):
    with pytest.raises(ValueError, match=r"eps\['2'\]"):
        PerturbationBudget({"0": 0.1, "2": -1.0})
    with pytest.raises(ValueError, match=r"eps\['0'\]"):
        PerturbationBudget({"0": float("nan")})
    with pytest.raises(TypeError, match=r"eps\['0'\]"):
        PerturbationBudget({"0": "big"})
    with pytest.raises(ValueError, match="at least one layer"):
        PerturbationBudget({})
    with pytest.raises(ValueError, match=r"no radius for layers \['2'\]"):
        PerturbationBudget({"0": 0.1}, layers=["0", "2"])


def test_bad_norm_and_flags():
    with pytest.raises(ValueError, match=r"`norm` must be one of \['inf', 'row_l1', 'l2'\]"):
        PerturbationBudget(0.1, norm="l1")
    with pytest.raises(TypeError, match="relative"):
        PerturbationBudget(0.1, relative=1)
    with pytest.raises(TypeError, match="include_bias"):
        PerturbationBudget(0.1, include_bias="yes")
    with pytest.raises(ValueError, match="layers"):
        PerturbationBudget(0.1, layers=[])
    with pytest.raises(ValueError, match="distribution"):
        PerturbationBudget(0.1).sample(make_mlp(), "laplace")


def test_unknown_layer_names_list_the_valid_ones(mlp):
    for budget in (PerturbationBudget(0.1, layers=["fc1"]), PerturbationBudget({"1": 0.1})):
        with pytest.raises(ValueError, match=r"valid layers are \['0', '2'\]"):
            budget.parameter_balls(mlp)
        with pytest.raises(ValueError, match="unknown layer"):
            budget.sample(mlp)
    with pytest.raises(ValueError, match="no Linear or Conv"):
        PerturbationBudget(0.1).parameter_balls(nn.Sequential(nn.ReLU()))


def test_bad_deltas(mlp):
    budget = PerturbationBudget(0.1)
    with pytest.raises(ValueError, match=r"unknown parameter 'fc.weight'.*'0.weight'"):
        budget.project({"fc.weight": np.zeros((16, 64))}, mlp)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(64, 16\).*\(16, 64\)"):
        budget.contains({"0.weight": np.zeros((64, 16))}, mlp)
    bad = np.zeros((16, 64))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        budget.project({"0.weight": bad}, mlp)
    with pytest.raises(TypeError, match="delta"):
        delta_tensors([np.zeros((16, 64))], mlp)
    out = delta_tensors({"0.weight": np.zeros((16, 64))}, mlp)
    assert out["0.weight"].dtype == torch.float32 and out["0.weight"].device == mlp[0].weight.device
