"""The one plotting module (``art_weightpert.metrics.plots``): curves of several models side by side, certified radius
histograms, bit-flip curves, and how each method is labelled (the report and ``plot_robustness_curve`` share it).

The figures are rendered and measured: the legend lies inside the figure, the ε axis is logarithmic for a geometric
grid, tick labels do not overlap, overlapping lines stay distinguishable and misclassified points get their own bar."""

from __future__ import annotations

import math

import matplotlib.image
import pytest

from art_weightpert.metrics import plot_certified_radius_histogram, plot_robustness_curves
from art_weightpert.metrics.plots import (
    STYLES,
    bit_flip_figure,
    certified_radius_figure,
    is_geometric,
    method_label,
    plot_bit_flip_curves,
    robustness_curves_figure,
)

CURVE = {
    "eps": [0.0, 0.1, 0.2],
    "budgets": [{"relative": True}],
    "norm": "row_l1",
    "accuracies": {"clean": [0.9, 0.9, 0.9], "random": [0.9, 0.85, 0.8], "linear": [0.9, 0.5, None]},
    "random_min": [0.9, 0.8, 0.7],
    "random_max": [0.9, 0.9, 0.85],
    "unavailable": {"paper": "a GELU layer"},
}
GEOMETRIC = [0.0, 9.1e-05, 0.000228, 0.000455, 0.00091, 0.00228, 0.00455]  # a default grid of evaluate
FULL = {
    "eps": GEOMETRIC,
    "budgets": [{"relative": False}],
    "norm": "inf",
    "accuracies": {
        "clean": [0.96] * 7,
        "random": [0.96] * 7,  # lies exactly on the clean line
        "pgd": [0.96, 0.95, 0.9, 0.8, 0.6, 0.3, 0.1],
        "paper": [0.96, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0],
        "interval": [0.96, 0.8, 0.6, 0.3, 0.1, 0.0, 0.0],
        "linear": [0.96, 0.85, 0.7, 0.4, 0.2, 0.0, 0.0],
    },
    "random_min": [0.96] * 7,
    "random_max": [0.96] * 7,
    "unavailable": {},
}
UNAVAILABLE = {
    **FULL,
    "accuracies": {m: FULL["accuracies"][m] for m in ("clean", "random", "pgd")},
    "unavailable": {m: "a residual connection in 'layer1' is not a chain of layers" for m in ("paper", "interval")},
}
FLIPS = {
    "n_bits": 8,
    "flips": [1, 2, 5, 10, 20],
    "quantized_accuracy": 0.96,
    "bfa_accuracy": [0.95, 0.9, 0.7, 0.4, 0.1],
    "random_mean": [0.96, 0.96, 0.96, 0.95, 0.95],
    "random_std": [0.0, 0.0, 0.001, 0.002, 0.004],
}


def legend_inside_figure(fig) -> None:
    """Draw ``fig`` and assert every legend's bounding box lies inside the figure's."""
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "no legend"
    box = fig.bbox
    for legend in legends:
        extent = legend.get_window_extent(renderer)
        assert extent.x0 >= box.x0 - 0.5 and extent.y0 >= box.y0 - 0.5, (extent, box)
        assert extent.x1 <= box.x1 + 0.5 and extent.y1 <= box.y1 + 0.5, (extent, box)


def tick_labels_do_not_overlap(ax, renderer) -> None:
    labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert len(boxes) >= 2
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, [t.get_text() for t in labels]


@pytest.mark.parametrize(
    "results",
    [{"one model (inf ball)": FULL}, {"standard": FULL, "robust": CURVE}, {"resnet": UNAVAILABLE}],
    ids=["single", "two models", "certificates unavailable"],
)
def test_legend_inside_the_figure_and_readable_ticks(results):
    fig = robustness_curves_figure(results)
    legend_inside_figure(fig)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        tick_labels_do_not_overlap(ax, renderer)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    if "resnet" in results:
        assert any("certified (paper), certified (interval)" in t for t in texts), texts


def test_geometric_grid_gets_a_log_axis_and_linear_grid_a_linear_one():
    assert is_geometric(GEOMETRIC) and not is_geometric([0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
    assert not is_geometric([0.0, 0.1]) and not is_geometric([0.0, 0.1, 0.5, 1.0])
    log_ax = robustness_curves_figure({"m": FULL}).axes[0]
    assert log_ax.get_xscale() == "symlog" and "log scale" in log_ax.get_xlabel()
    assert robustness_curves_figure({"m": CURVE}).axes[0].get_xscale() == "linear"


def test_overlapping_lines_stay_distinguishable():
    markers = [style[3] for style in STYLES.values()]
    assert len(set(markers)) == len(markers) - 1  # "certified" and "interval" are the same curve
    ax = robustness_curves_figure({"m": FULL}).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    clean, random = lines["clean"], lines["random faults (mean)"]
    assert list(clean.get_ydata()) == list(random.get_ydata())  # the case of the issue: same values
    assert clean.get_zorder() > random.get_zorder()  # drawn on top ...
    assert clean.get_markerfacecolor() == "none" and clean.get_markersize() > random.get_markersize()  # ... hollow


def test_curves_of_two_models_in_one_figure(tmp_path):
    path = plot_robustness_curves({"standard": CURVE, "robust": CURVE}, tmp_path / "curves.svg")
    svg = (tmp_path / "curves.svg").read_text()
    assert path == str(tmp_path / "curves.svg")
    for text in ("standard", "robust", "certified (linear)", "random faults (mean)", "ε (relative)", "unavailable"):
        assert text in svg, text
    plot_robustness_curves({"one": CURVE}, tmp_path / "one.png", dpi=50)
    image = matplotlib.image.imread(tmp_path / "one.png")
    assert image.shape[0] == pytest.approx(4.6 * 50, abs=2) and image.shape[1] == pytest.approx(6.0 * 50, abs=2)
    with pytest.raises(ValueError, match="result"):
        plot_robustness_curves({"bad": {"eps": [0.1]}}, tmp_path / "bad.png")


def test_histogram_puts_misclassified_points_in_their_own_bar(tmp_path):
    radii = {"interval": {"standard": [0.0, 0.0, 0.01, 0.02, math.inf], "robust": [0.0, 0.1, 0.2, math.inf, 0.3]}}
    wrong = {"standard": [True, False, False, False, False], "robust": [True, False, False, False, False]}
    fig = certified_radius_figure(radii, misclassified=wrong)
    legend_inside_figure(fig)
    histogram, bars = fig.axes
    assert [int(p.get_height()) for p in bars.patches] == [1, 1]  # one misclassified point per model
    assert "misclassified" in [t.get_text() for t in bars.get_xticklabels()]
    in_histogram = sum(p.get_height() for p in histogram.patches)
    assert in_histogram == 3 + 3  # the correct points with finite radii, the standard's radius 0 included
    assert any("median: standard 0.01, robust 0.2" in t.get_text() for t in histogram.texts)
    plot_certified_radius_histogram(radii, tmp_path / "hist.svg", relative=True, misclassified=wrong)
    svg = (tmp_path / "hist.svg").read_text()
    assert "certified radius (interval)" in svg and "(relative)" in svg
    plot_certified_radius_histogram({}, tmp_path / "none.svg", unavailable=["model has a GELU"])
    assert "model has a GELU" in (tmp_path / "none.svg").read_text()


def test_bit_flip_curves(tmp_path):
    fig = bit_flip_figure({"standard": FLIPS, "robust": {**FLIPS, "bfa_accuracy": [0.96, 0.95, 0.9, 0.85, 0.8]}})
    legend_inside_figure(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog"
    assert [float(t) for t in ax.get_xticks()] == [0, 1, 2, 5, 10, 20]
    tick_labels_do_not_overlap(ax, fig.canvas.get_renderer())
    labels = [line.get_label() for line in ax.get_lines()]
    assert "standard: bit-flip attack" in labels and "robust: random flips (mean)" in labels
    assert plot_bit_flip_curves({"m": FLIPS}, tmp_path / "flips.png", dpi=40).endswith("flips.png")
    with pytest.raises(ValueError, match="bit_flip_curve"):
        bit_flip_figure({"m": {"flips": [1]}})


def test_bit_flip_curves_with_the_certified_curve():
    certified = {**FLIPS, "certify_method": "linear", "certified_points": 200,
                 "certified_accuracy": [0.9, 0.7, 0.2, 0.0, 0.0],
                 "certified_flips_histogram": {"-1": 8, "0": 12, "1": 40, "2": 100, "3": 40}}  # fmt: skip
    fig = bit_flip_figure({"standard": certified, "robust": FLIPS})
    legend_inside_figure(fig)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert "robust: certified (linear, 200 points)" not in lines and "robust: bit-flip attack" in lines
    curve = lines["standard: certified (linear, 200 points)"]
    assert list(curve.get_xdata()) == [0, 1, 2, 5, 10, 20]
    assert list(curve.get_ydata()) == pytest.approx([1 - 8 / 200, 0.9, 0.7, 0.2, 0.0, 0.0])
    assert curve.get_linestyle() == ":" and curve.get_color() == lines["standard: bit-flip attack"].get_color()


def test_labels_name_the_certificate_of_a_curve():
    assert method_label("certified", {"certify_method": "linear"}) == "certified (linear)"
    assert method_label("certified") == "certified"
    assert method_label("some_new_method") == "some_new_method"
