"""WeightPerturbation: a mapping of parameter names to arrays with the budget it was made for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_mlp

from art_weightpert import PerturbationBudget, WeightPerturbation


@pytest.fixture(scope="module")
def deltas():
    w = np.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], dtype=np.float32)
    b = np.array([0.25, -0.5], dtype=np.float32)
    return {"fc.weight": w, "fc.bias": b}


def test_mapping_behaviour(deltas):
    wp = WeightPerturbation(deltas)
    assert len(wp) == 2 and list(wp) == ["fc.weight", "fc.bias"] and "fc.bias" in wp and "x" not in wp
    assert set(wp.keys()) == set(deltas) and dict(wp).keys() == deltas.keys()
    np.testing.assert_array_equal(wp["fc.weight"], deltas["fc.weight"])
    with pytest.raises(KeyError):
        wp["fc2.weight"]
    assert wp.get("missing") is None and wp.budget is None
    assert "fc.weight" in repr(wp) and "(2, 3)" in repr(wp)
    deltas_copy = {k: v.copy() for k, v in deltas.items()}
    wp = WeightPerturbation(deltas_copy)
    deltas_copy["fc.weight"][0, 0] = 100.0  # the perturbation owns its arrays
    assert wp["fc.weight"][0, 0] == 1.0


def test_dtypes_and_tensor_input():
    wp = WeightPerturbation({"a": np.ones(3, dtype=np.float64), "b": np.ones(3, dtype=np.float16), "c": torch.ones(2)})
    assert wp["a"].dtype == np.float64 and wp["b"].dtype == np.float32 and wp["c"].dtype == np.float32
    tensors = wp.to_tensors(dtype=torch.float64)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors.values())
    assert wp.to_tensors()["a"].dtype == torch.float64


def test_norms(deltas):
    assert WeightPerturbation(deltas).norms() == {"fc.weight": 3.0, "fc.bias": 0.5}  # no budget: max |δ|
    row = WeightPerturbation(deltas, PerturbationBudget(1.0, norm="row_l1", include_bias=True)).norms()
    assert row == {"fc.weight": 4.0, "fc.bias": 0.5}  # the bias of a row_l1 budget lives in a box
    l2 = WeightPerturbation(deltas, PerturbationBudget(1.0, norm="l2", include_bias=True)).norms()
    assert l2["fc.weight"] == pytest.approx(math.sqrt(15.25)) and l2["fc.bias"] == pytest.approx(math.sqrt(0.3125))


def test_scaled(deltas):
    budget = PerturbationBudget(0.1, norm="row_l1")
    wp = WeightPerturbation(deltas, budget)
    half = wp.scaled(0.5)
    np.testing.assert_allclose(half["fc.weight"], 0.5 * deltas["fc.weight"])
    assert half.budget.eps == pytest.approx(0.05) and half.budget.norm == "row_l1"
    assert wp.budget.eps == 0.1  # the original is unchanged
    flipped = wp.scaled(-1.0)
    np.testing.assert_array_equal(flipped["fc.bias"], -deltas["fc.bias"])
    assert flipped.budget.eps == 0.1
    assert WeightPerturbation(deltas).scaled(2.0).budget is None


def test_save_load_round_trip(tmp_path, deltas):
    budget = PerturbationBudget({"fc": 0.1}, norm="l2", relative=True, include_bias=True)
    wp = WeightPerturbation(deltas, budget)
    wp.save(tmp_path / "delta.npz")
    loaded = WeightPerturbation.load(tmp_path / "delta.npz")
    assert loaded.budget == budget and list(loaded) == list(wp)
    for name in wp:
        np.testing.assert_array_equal(loaded[name], wp[name])
        assert loaded[name].dtype == wp[name].dtype
    wp.save(tmp_path / "no_suffix")  # np.savez writes no_suffix.npz; load finds it under the same name
    assert WeightPerturbation.load(tmp_path / "no_suffix").budget == budget
    with pytest.raises(FileNotFoundError):
        WeightPerturbation.load(tmp_path / "missing.npz")
    WeightPerturbation(deltas).save(str(tmp_path / "plain.npz"))
    plain = WeightPerturbation.load(str(tmp_path / "plain.npz"))
    assert plain.budget is None and set(plain) == set(deltas)


def test_round_trip_of_a_sampled_perturbation(tmp_path):
    model = make_mlp(seed=2)
    budget = PerturbationBudget(0.05, norm="row_l1", include_bias=True)
    wp = budget.sample(model, "gaussian", seed=0)
    wp.save(tmp_path / "s.npz")
    loaded = WeightPerturbation.load(tmp_path / "s.npz")
    assert budget.contains(loaded, model) and loaded.norms() == wp.norms()


def test_bad_input():
    with pytest.raises(TypeError, match="deltas"):
        WeightPerturbation([np.zeros(3)])
    with pytest.raises(TypeError, match="budget"):
        WeightPerturbation({"a": np.zeros(3)}, budget={"eps": 0.1})
    with pytest.raises(ValueError, match="'a' contains NaN or inf"):
        WeightPerturbation({"a": np.array([0.0, np.nan])})
    with pytest.raises(ValueError, match="NaN or inf"):
        WeightPerturbation({"a": np.array([np.inf])})
