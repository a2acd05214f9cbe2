"""
Plots of robustness curves, certified radii and bit-flip curves: the one place that knows how each method is drawn
(:data:`STYLES`). Used by :func:`plot_robustness_curve` (public, ``art_weightpert.metrics``) and by the command line's
report.

Every figure keeps its legend inside the figure (below the panels, with the space reserved by matplotlib's
constrained layout), uses a logarithmic ε axis (symmetric-log, so that ε = 0 stays on it) when the ε grid is
geometric, and draws each method with its own colour, line style and marker, so that lines lying on each other (the
clean line under the random faults' mean) stay visible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from art_weightpert.budget import NORM_LABELS

STYLES: dict[str, tuple[str, str, str, str]] = {
    "clean": ("black", "--", "clean", "o"),
    "random": ("tab:blue", "-", "random faults (mean)", "s"),
    "pgd": ("tab:red", "-", "WeightPGD", "^"),
    "certified": ("tab:green", "-", "certified", "D"),
    "paper": ("tab:olive", "-.", "certified (paper)", "v"),
    "interval": ("tab:green", "-", "certified (interval)", "D"),
    "linear": ("tab:purple", ":", "certified (linear)", "P"),
    "alpha": ("tab:pink", ":", "certified (alpha)", "X"),
    "verified": ("tab:cyan", "-", "certified (verifier)", "*"),
}
"""Per method: colour, line style, label and marker."""

BALL_LABELS = {**NORM_LABELS, "mixed": "several balls"}
"""Per norm of a result, its ball in words (``"mixed"``: a budget with several balls)."""
HOLLOW = ("clean",)
"""Methods drawn with larger hollow markers, on top: their line often lies on another one."""


def method_label(method: str, result: Mapping[str, Any] | None = None) -> str:
    """The label of a method in tables and legends (``"certified"`` names the curve's ``certify_method``)."""
    if method == "certified" and result is not None and result.get("certify_method"):
        return f"certified ({result['certify_method']})"
    return STYLES.get(method, (None, None, method, None))[2]


def is_geometric(values: Sequence[float]) -> bool:
    """True when the positive values of a grid span at least a factor 10 and are more evenly spaced on a log scale
    than on a linear one (the default ε grids of the report), so that a log axis shows them best."""
    positive = np.sort(np.asarray([v for v in values if v is not None and v > 0], dtype=float))
    if len(positive) < 3 or positive[-1] < 10 * positive[0]:
        return False

    def spread(v: np.ndarray) -> float:
        steps = np.diff(v)
        return float(np.std(steps) / np.mean(steps)) if np.mean(steps) > 0 else np.inf

    return spread(np.log(positive)) < spread(positive)


def plot_robustness_curve(result: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """
    Plot a :func:`.weight_robustness_curve` result (accuracy against ε, one line per method; the random faults'
    min-max range shaded) and save it.

    :param result: the dict returned by :func:`.weight_robustness_curve`.
    :param path: output file (the extension picks the format, e.g. ``.png``, ``.pdf``, ``.svg``).
    :param title: figure title (default: names the norm).
    :return: the path written.
    """
    _check_curve(result)
    ball = BALL_LABELS.get(result.get("norm", ""), str(result.get("norm", "")))
    title = title if title is not None else f"Accuracy under weight perturbation ({ball})"
    return plot_robustness_curves({title: result}, path)


def plot_robustness_curves(
    results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, dpi: int | None = None
) -> str:
    """
    Several :func:`.weight_robustness_curve` results side by side, one panel each (titled by its key), one legend
    below the panels. The ε axis is logarithmic (symmetric-log, ε = 0 kept) when the grid is geometric.

    :param results: ``{panel title: curve result}`` (a result may add ``"unavailable": {method: reason}``, named in
        its panel).
    :param path: output file.
    :param dpi: resolution of raster formats (default: matplotlib's).
    :return: the path written.
    """
    return _save(robustness_curves_figure(results), path, dpi)


def robustness_curves_figure(results: Mapping[str, Mapping[str, Any]]) -> Any:
    """The matplotlib ``Figure`` of :func:`plot_robustness_curves` (not saved)."""
    for result in results.values():
        _check_curve(result)
    fig, axes = _figure(len(results), width=6.0 if len(results) == 1 else 5.0, height=4.6)
    legend: dict[str, Any] = {}
    for ax, (title, result) in zip(axes, results.items()):
        legend.update({k: v for k, v in _draw_curve(ax, result).items() if k not in legend})
        ax.set_title(title, fontsize=10)
    _figure_legend(fig, legend)
    return fig


def plot_certified_radius_histogram(
    radii: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    relative: bool = False,
    unavailable: Sequence[str] = (),
    dpi: int | None = None,
    misclassified: Mapping[str, Sequence[bool]] | None = None,
) -> str:
    """
    Histograms of per-sample certified radii: one panel per certification method, one colour per model. Radii that
    are infinite (never broken) are left out; misclassified test points (radius 0 by definition) get their own bar
    left of the histogram, so that the first bin only holds correctly classified points with small radii.

    :param radii: ``{method: {model name: radii}}``.
    :param path: output file.
    :param relative: the radii are relative (ε·|W|): says so on the axis.
    :param unavailable: reasons shown instead of the panels when ``radii`` is empty.
    :param dpi: resolution of raster formats.
    :param misclassified: ``{model name: per test point, True when misclassified}`` (``None``: not separated).
    :return: the path written.
    """
    return _save(certified_radius_figure(radii, relative, unavailable, misclassified), path, dpi)


def certified_radius_figure(
    radii: Mapping[str, Mapping[str, Sequence[float]]],
    relative: bool = False,
    unavailable: Sequence[str] = (),
    misclassified: Mapping[str, Sequence[bool]] | None = None,
) -> Any:
    """The matplotlib ``Figure`` of :func:`plot_certified_radius_histogram` (not saved)."""
    fig, axes = _figure(max(1, len(radii)), width=5.5, height=4.0, bar_panels=bool(radii) and misclassified is not None)
    if not radii:
        reasons = sorted(set(unavailable))
        text = "certification unavailable" + (":\n" + "\n".join(reasons)[:300] if reasons else "")
        axes[0].text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8, transform=axes[0].transAxes)
        axes[0].set_axis_off()
        return fig
    legend: dict[str, Any] = {}
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(n for s in radii.values() for n in s))}
    for i, (method, series) in enumerate(radii.items()):
        ax = axes[i]
        wrong = {n: np.asarray(misclassified[n], dtype=bool) for n in series if n in (misclassified or {})}
        kept = {n: np.asarray(v, dtype=float)[~wrong[n]] if n in wrong else np.asarray(v, dtype=float)
                for n, v in series.items()}  # fmt: skip
        finite = {n: v[np.isfinite(v)] for n, v in kept.items()}
        top = max((float(v.max()) for v in finite.values() if len(v)), default=0.0)
        bins = np.linspace(0.0, top if top > 0 else 1.0, 31)
        medians = []
        for name, values in finite.items():
            medians.append(f"{name} {np.median(values):.3g}" if len(values) else f"{name} n/a")
            _, _, patches = ax.hist(values, bins=bins, alpha=0.55, color=colours[name], label=name)
            legend.setdefault(name, patches[0] if len(patches) else None)
        ax.text(0.98, 0.97, "median: " + ", ".join(medians), transform=ax.transAxes, ha="right", va="top", fontsize=7)
        ax.yaxis.set_major_locator(_integer_locator())
        _readable_ticks(ax, log=False)  # small radii: "0.00025", not "0.00025000" running into its neighbour
        ax.set_title(f"certified radius ({method})", fontsize=10)
        ax.set_xlabel("ε certified" + (" (relative)" if relative else "") + ", correctly classified points")
        ax.set_ylabel("test points")
        ax.grid(alpha=0.3)
        if wrong:
            _misclassified_bars(axes[len(radii) + i], ax, wrong, colours)
        elif misclassified is not None:
            axes[len(radii) + i].set_axis_off()
    _figure_legend(fig, {k: v for k, v in legend.items() if v is not None})
    return fig


def plot_bit_flip_curves(
    curves: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, dpi: int | None = None
) -> str:
    """
    Accuracy against the number of flipped bits (log axis) for the bit-flip attack (solid), random flips (dashed,
    ± one standard deviation shaded) and, where the curve has one, the certified accuracy (dotted; at 0 flips the
    quantized accuracy on the certified points), one colour per model; the quantized model's accuracy is the point at
    0 flips.

    :param curves: ``{model name: the dict of bit_flip_curve}``.
    :param path: output file.
    :param dpi: resolution of raster formats.
    :return: the path written.
    """
    return _save(bit_flip_figure(curves), path, dpi)


def bit_flip_figure(curves: Mapping[str, Mapping[str, Any]]) -> Any:
    """The matplotlib ``Figure`` of :func:`plot_bit_flip_curves` (not saved)."""
    fig, axes = _figure(1, width=6.0, height=4.4)
    ax = axes[0]
    legend: dict[str, Any] = {}
    for i, (name, curve) in enumerate(curves.items()):
        if "flips" not in curve or "bfa_accuracy" not in curve:
            raise ValueError("`curves` must map model names to the dicts returned by bit_flip_curve.")
        flips = np.asarray([0, *curve["flips"]], dtype=float)
        start = curve["quantized_accuracy"]
        bfa = np.asarray([start, *curve["bfa_accuracy"]], dtype=float)
        mean = np.asarray([start, *curve["random_mean"]], dtype=float)
        std = np.asarray([0.0, *curve["random_std"]], dtype=float)
        bfa_label, random_label = f"{name}: bit-flip attack", f"{name}: random flips (mean)"
        (legend[bfa_label],) = ax.plot(flips, bfa, "-", color=f"C{i}", marker="o", markersize=4, label=bfa_label)
        (legend[random_label],) = ax.plot(
            flips, mean, "--", color=f"C{i}", marker="s", markersize=6, markerfacecolor="none", label=random_label
        )
        ax.fill_between(flips, mean - std, mean + std, color=f"C{i}", alpha=0.12, lw=0)
        if curve.get("certified_accuracy") is not None:
            label = f"{name}: certified ({curve['certify_method']}, {curve['certified_points']} points)"
            (legend[label],) = ax.plot(
                flips, _certified_points(curve), ":", color=f"C{i}", marker="^", markersize=5, lw=1.8, label=label
            )
    ax.set_xscale("symlog", linthresh=1.0)
    _readable_ticks(ax, log=True)
    counts = sorted({0, *(k for c in curves.values() for k in c["flips"])})
    if len(counts) <= 8:  # label every number of flips measured
        from matplotlib import ticker

        ax.xaxis.set_major_locator(ticker.FixedLocator(counts))
    ax.set_xlabel("flipped bits")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy of the quantized model against flipped bits", fontsize=10)
    certified = any(c.get("certified_accuracy") is not None for c in curves.values())
    _figure_legend(fig, legend, columns=2 if certified else 3)  # the certified labels are long
    return fig


# ---------------------------------------------------------------------------------------------- helpers
def _certified_points(curve: Mapping[str, Any]) -> np.ndarray:
    """The certified curve from 0 flips: the quantized accuracy on the certified points, then per number of flips."""
    histogram = {int(k): v for k, v in curve["certified_flips_histogram"].items()}
    start = 1.0 - histogram.get(-1, 0) / max(curve["certified_points"], 1)
    return np.asarray([start, *curve["certified_accuracy"]], dtype=float)


def _check_curve(result: Any) -> None:
    if not isinstance(result, Mapping) or "eps" not in result or "accuracies" not in result:
        raise ValueError("`result` must be the dict returned by weight_robustness_curve.")


def _draw_curve(ax: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one curve result on ``ax``; return ``{label: line}`` for the legend: only the methods that produced a
    number (the unavailable ones, and any without a finite value, are named in a note on the panel instead)."""
    eps = np.asarray(result["eps"], dtype=float)
    handles = {}
    missing = list(result.get("unavailable") or {})
    for method, values in result["accuracies"].items():
        color, line, _, marker = STYLES.get(method, (None, "-", method, "x"))
        label = method_label(method, result)
        values = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        if not np.isfinite(values).any():
            missing.append(method)
            continue
        hollow = method in HOLLOW  # drawn on top with large hollow markers: the line below stays visible
        (handles[label],) = ax.plot(
            eps, values, line, color=color, marker=marker, markersize=8 if hollow else 4, label=label,
            markerfacecolor="none" if hollow else color, zorder=3 if hollow else 2,
        )  # fmt: skip
    if "random" in result["accuracies"] and len(result.get("random_min") or ()) == len(eps):
        ax.fill_between(eps, result["random_min"], result["random_max"], color=STYLES["random"][0], alpha=0.15, lw=0)
    if len(result.get("verified_falsified") or ()) == len(eps):
        handles.update(_undecided_band(ax, eps, result))
    if missing:
        text = "unavailable: " + ", ".join(method_label(m) for m in dict.fromkeys(missing))
        ax.text(0.02, 0.03, text, transform=ax.transAxes, fontsize=7, color="gray", wrap=True)
    log = is_geometric(eps)
    if log:
        ax.set_xscale("symlog", linthresh=float(min(e for e in eps if e > 0)))
    _readable_ticks(ax, log, eps)
    budgets = result.get("budgets") or []
    relative = budgets and all(b.get("relative") for b in budgets)
    ax.set_xlabel(("ε (relative)" if relative else "ε") + (", log scale" if log else ""))
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    return handles


def _undecided_band(ax: Any, eps: np.ndarray, result: Mapping[str, Any]) -> dict[str, Any]:
    """The verifier's undecided samples as a band between its certified share (below) and the share it could not
    falsify (above, ``1 − falsified``: an upper bound of the robust accuracy, like the attacks' curves)."""
    certified = np.asarray([np.nan if v is None else v for v in result["accuracies"]["verified"]], dtype=float)
    falsified = np.asarray([np.nan if v is None else v for v in result["verified_falsified"]], dtype=float)
    if not np.isfinite(falsified).any():
        return {}
    color = STYLES["verified"][0]
    (upper,) = ax.plot(eps, 1 - falsified, "--", color=color, lw=1, label="not falsified (verifier)")
    band = ax.fill_between(eps, certified, 1 - falsified, color=color, alpha=0.15, lw=0, label="undecided (verifier)")
    return {"not falsified (verifier)": upper, "undecided (verifier)": band}


def _readable_ticks(ax: Any, log: bool, values: Sequence[float] = ()) -> None:
    """At most 5 x ticks, printed as short numbers (``.3g``), so that the labels never run together: on a
    symmetric-log axis 0 and the powers of 10 from the linear threshold on (or the smallest and largest value when
    fewer than two powers of 10 fall in the range)."""
    from matplotlib import ticker

    if log:
        linthresh = ax.xaxis.get_transform().linthresh
        top = max(values) if len(values) else linthresh
        decades = [10.0**k for k in range(math.ceil(math.log10(linthresh)), math.floor(math.log10(top)) + 1)]
        if len(decades) < 2:
            decades = sorted({linthresh, top})
        ax.xaxis.set_major_locator(ticker.FixedLocator([0.0, *decades[-4:]]))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
    else:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.tick_params(labelsize=8)


def _integer_locator() -> Any:
    from matplotlib import ticker

    return ticker.MaxNLocator(integer=True)


def _misclassified_bars(
    ax: Any, histogram_ax: Any, wrong: Mapping[str, np.ndarray], colours: Mapping[str, str]
) -> None:
    """One bar per model: the number of misclassified test points (their certified radius is 0)."""
    names = list(wrong)
    counts = [int(wrong[n].sum()) for n in names]
    ax.bar(range(len(names)), counts, color=[colours[n] for n in names], alpha=0.55)
    for i, count in enumerate(counts):
        ax.text(i, count, str(count), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([(len(names) - 1) / 2], ["misclassified"], fontsize=8)
    ax.set_xlim(-0.8, len(names) - 0.2)
    ax.sharey(histogram_ax)
    ax.set_ylabel("test points")
    ax.grid(alpha=0.3, axis="y")


def _figure(ncols: int, width: float = 5.0, height: float = 3.8, bar_panels: bool = False) -> tuple[Any, list[Any]]:
    """A figure with constrained layout and ``ncols`` panels (with ``bar_panels``, a narrow panel left of each,
    returned after the main panels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols + (0.9 * ncols if bar_panels else 0), height), layout="constrained")
    FigureCanvasAgg(fig)
    if not bar_panels:
        return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    grid = fig.add_gridspec(1, 2 * ncols, width_ratios=[1, 5] * ncols)
    return fig, [fig.add_subplot(grid[0, 2 * i + 1]) for i in range(ncols)] + [
        fig.add_subplot(grid[0, 2 * i]) for i in range(ncols)
    ]


def _figure_legend(fig: Any, handles: Mapping[str, Any], columns: int = 3) -> None:
    """One legend below the panels, inside the figure (constrained layout reserves its room), at most ``columns``
    entries per row."""
    if handles:
        ncol = min(columns, len(handles))
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=ncol, fontsize=8)


def _save(fig: Any, path: str | os.PathLike, dpi: int | None) -> str:
    path = os.fspath(path)
    fig.savefig(path, **({} if dpi is None else {"dpi": dpi}))
    return path
