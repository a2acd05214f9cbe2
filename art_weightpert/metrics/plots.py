"""
Plots of robustness curves and certified radii: the one place that knows how each method is drawn (:data:`STYLES`).
Used by :func:`plot_robustness_curve` (public, ``art_weightpert.metrics``) and by the command line's report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STYLES: dict[str, tuple[str, str, str]] = {
    "clean": ("black", "--", "clean"),
    "random": ("tab:blue", "-", "random faults (mean)"),
    "pgd": ("tab:red", "-", "WeightPGD"),
    "certified": ("tab:green", "-", "certified"),
    "paper": ("tab:olive", "-", "certified (paper)"),
    "interval": ("tab:green", "-", "certified (interval)"),
    "linear": ("tab:purple", "-", "certified (linear)"),
}
"""Per method: colour, line style and label."""

BALL_LABELS = {"inf": "box ℓ∞ ball", "row_l1": "row ℓ1 ball", "l2": "Frobenius ℓ2 ball", "mixed": "several balls"}


def method_label(method: str, result: Mapping[str, Any] | None = None) -> str:
    """The label of a method in tables and legends (``"certified"`` names the curve's ``certify_method``)."""
    if method == "certified" and result is not None and result.get("certify_method"):
        return f"certified ({result['certify_method']})"
    return STYLES.get(method, (None, None, method))[2]


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
    Several :func:`.weight_robustness_curve` results side by side, one panel each (titled by its key), one legend.

    :param results: ``{panel title: curve result}`` (a result may add ``"unavailable": {method: reason}``, shown as a
        note in its panel).
    :param path: output file.
    :param dpi: resolution of raster formats (default: matplotlib's).
    :return: the path written.
    """
    for result in results.values():
        _check_curve(result)
    fig, axes = _figure(len(results), width=6.0 if len(results) == 1 else 5.0, height=4.2)
    legend: dict[str, Any] = {}
    for ax, (title, result) in zip(axes, results.items()):
        legend.update({k: v for k, v in _draw_curve(ax, result).items() if k not in legend})
        ax.set_title(title)
    if len(results) == 1:
        axes[0].legend(list(legend.values()), list(legend), loc="best", fontsize=8)
        fig.tight_layout()
    else:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(6, len(legend)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _save(fig, path, dpi)


def plot_certified_radius_histogram(
    radii: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    relative: bool = False,
    unavailable: Sequence[str] = (),
    dpi: int | None = None,
) -> str:
    """
    Histograms of per-sample certified radii: one panel per certification method, one colour per model (radii that
    are infinite, i.e. never broken, are left out).

    :param radii: ``{method: {model name: radii}}``.
    :param path: output file.
    :param relative: the radii are relative (ε·|W|): says so on the axis.
    :param unavailable: reasons shown instead of the panels when ``radii`` is empty.
    :param dpi: resolution of raster formats.
    :return: the path written.
    """
    fig, axes = _figure(max(1, len(radii)))
    if not radii:
        reasons = sorted(set(unavailable))
        text = "certification unavailable" + (":\n" + "\n".join(reasons)[:300] if reasons else "")
        axes[0].text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8, transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (method, series) in zip(axes, radii.items()):
        finite = {name: np.asarray(v, dtype=float) for name, v in series.items()}
        finite = {name: v[np.isfinite(v)] for name, v in finite.items()}
        top = max((float(v.max()) for v in finite.values() if len(v)), default=0.0)
        bins = np.linspace(0.0, top if top > 0 else 1.0, 31)
        for name, values in finite.items():
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (median {np.median(values):.3g})")
        ax.set_title(f"certified radius ({method})")
        ax.set_xlabel("ε certified" + (" (relative)" if relative else ""))
        ax.set_ylabel("test points")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------------------------------- helpers
def _check_curve(result: Any) -> None:
    if not isinstance(result, Mapping) or "eps" not in result or "accuracies" not in result:
        raise ValueError("`result` must be the dict returned by weight_robustness_curve.")


def _draw_curve(ax: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """Draw one curve result on ``ax``; return ``{label: line}`` for the legend."""
    eps = np.asarray(result["eps"], dtype=float)
    handles = {}
    for method, values in result["accuracies"].items():
        color, line, _ = STYLES.get(method, (None, "-", method))
        label = method_label(method, result)
        values = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        zorder = 3 if method == "clean" else 2  # the clean line often lies on the random one
        (handles[label],) = ax.plot(
            eps, values, line, color=color, marker="o", markersize=3, label=label, zorder=zorder
        )
    if "random" in result["accuracies"] and len(result.get("random_min") or ()) == len(eps):
        ax.fill_between(eps, result["random_min"], result["random_max"], color=STYLES["random"][0], alpha=0.15, lw=0)
    for i, method in enumerate(result.get("unavailable") or {}):
        ax.text(0.02, 0.03 + 0.06 * i, f"{method}: unavailable", transform=ax.transAxes, fontsize=7, color="gray")
    budgets = result.get("budgets") or []
    ax.set_xlabel("ε (relative)" if budgets and all(b.get("relative") for b in budgets) else "ε")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    return handles


def _figure(ncols: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _save(fig: Any, path: str | os.PathLike, dpi: int | None) -> str:
    path = os.fspath(path)
    fig.savefig(path, **({} if dpi is None else {"dpi": dpi}))
    return path
