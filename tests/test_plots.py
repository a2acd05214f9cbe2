"""The one plotting module (``art_weightpert.metrics.plots``): curves of several models side by side, certified radius
histograms, and how each method is labelled (the report and ``plot_robustness_curve`` share it)."""

from __future__ import annotations

import math

import matplotlib.image
import pytest

from art_weightpert.metrics import plot_certified_radius_histogram, plot_robustness_curves
from art_weightpert.metrics.plots import method_label

CURVE = {
    "eps": [0.0, 0.1, 0.2],
    "budgets": [{"relative": True}],
    "norm": "row_l1",
    "accuracies": {"clean": [0.9, 0.9, 0.9], "random": [0.9, 0.85, 0.8], "linear": [0.9, 0.5, None]},
    "random_min": [0.9, 0.8, 0.7],
    "random_max": [0.9, 0.9, 0.85],
    "unavailable": {"paper": "a GELU layer"},
}


def test_curves_of_two_models_in_one_figure(tmp_path):
    path = plot_robustness_curves({"standard": CURVE, "robust": CURVE}, tmp_path / "curves.svg")
    svg = (tmp_path / "curves.svg").read_text()
    assert path == str(tmp_path / "curves.svg")
    for text in (
        "standard",
        "robust",
        "certified (linear)",
        "random faults (mean)",
        "ε (relative)",
        "paper: unavailable",
    ):
        assert text in svg, text
    plot_robustness_curves({"one": CURVE}, tmp_path / "one.png", dpi=50)
    image = matplotlib.image.imread(tmp_path / "one.png")
    assert image.shape[0] == pytest.approx(4.2 * 50, abs=2) and image.shape[1] == pytest.approx(6.0 * 50, abs=2)
    with pytest.raises(ValueError, match="result"):
        plot_robustness_curves({"bad": {"eps": [0.1]}}, tmp_path / "bad.png")


def test_certified_radius_histogram_skips_infinite_radii_and_explains_missing_ones(tmp_path):
    radii = {"interval": {"standard": [0.0, 0.01, 0.02, math.inf], "robust": [0.05, 0.1, math.inf, math.inf]}}
    plot_certified_radius_histogram(radii, tmp_path / "hist.svg", relative=False)
    svg = (tmp_path / "hist.svg").read_text()
    assert "certified radius (interval)" in svg
    assert "standard (median 0.01)" in svg and "robust (median 0.075)" in svg  # medians of the finite radii
    plot_certified_radius_histogram({}, tmp_path / "none.svg", unavailable=["model has a GELU"])
    assert "model has a GELU" in (tmp_path / "none.svg").read_text()


def test_labels_name_the_certificate_of_a_curve():
    assert method_label("certified", {"certify_method": "linear"}) == "certified (linear)"
    assert method_label("certified") == "certified"
    assert method_label("some_new_method") == "some_new_method"
