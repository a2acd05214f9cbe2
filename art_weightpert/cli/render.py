"""
The report as text: the tables printed by the command line and the content of ``report.md`` (numbers from the report
dictionary of :func:`.build_report`; labels from :mod:`art_weightpert.metrics.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from art_weightpert.metrics.plots import method_label


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def results_table(report: Mapping[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one model's accuracy table: one row per ε, one column per available method."""
    entry = report["models"][name]
    methods = [m for m in report["methods"] if m in entry["curves"]]
    header = ["ε"] + [method_label(m) for m in methods]
    rows = []
    for i, eps in enumerate(report["eps_grid"]):
        row = [f"{eps:.4g}"]
        for m in methods:
            cell = _fmt(entry["curves"][m][i])
            if m == "random" and entry.get("random_min") is not None:
                cell += f" (min {_fmt(entry['random_min'][i])})"
            row.append(cell)
        rows.append(row)
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _budget_text(budget: Mapping[str, Any]) -> str:
    layers = "all Linear/Conv layers" if budget["layers"] is None else ", ".join(budget["layers"])
    kind = "relative" if budget["relative"] else "absolute"
    bias = "weights and biases" if budget["include_bias"] else "weights only (biases fixed)"
    return f"`{budget['norm']}` ball, {kind} radii, {bias}, layers: {layers}"


def summary_text(report: Mapping[str, Any]) -> str:
    """The readable summary printed by the command line (a table per model)."""
    out = [f"Budget: {_budget_text(report['budget'])}", f"Data: {report['data'].get('description', '')}"]
    for name, entry in report["models"].items():
        out.append("")
        out.append(f"Model {name!r}: clean accuracy {_fmt(entry['clean_accuracy'])}")
        out.append(text_table(*results_table(report, name)))
        for method, reason in entry["unavailable"].items():
            out.append(f"  {method_label(method)} unavailable: {reason}")
    return "\n".join(out)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The content of ``report.md``."""
    v = report["versions"]
    lines = [
        "# art-weightpert report",
        "",
        f"Command: `art-weightpert {report['command']}` · created {report['created']} · art-weightpert "
        f"{v['art_weightpert']}, ART {v['adversarial_robustness_toolbox']}, torch {v['torch']}, numpy {v['numpy']}, "
        f"Python {v['python']}. Seeds: " + ", ".join(f"{k} = {s}" for k, s in report["seeds"].items()) + ".",
        "",
        "## Setting",
        "",
        f"* Data: {report['data'].get('description', '')}",
        f"* Weight budget: {_budget_text(report['budget'])}.",
        "* ε grid: " + ", ".join(f"{e:.4g}" for e in report["eps_grid"]),
        "* Methods: " + ", ".join(method_label(m) for m in report["methods"]),
    ]
    lines += [f"* {key}: {value}" for key, value in report["settings"].items()]
    lines += [
        "",
        "Reading the table: *certified* is the share of test points whose prediction is correct and provably unchanged "
        "by **every** weight perturbation in the ball (sound bounds in float64); *WeightPGD* is the accuracy under one "
        "adversarial perturbation found for the whole test set; *random faults* is the mean accuracy over random "
        "perturbations in the ball. Certified ≤ true robust accuracy ≤ WeightPGD ≤ random ≤ clean.",
    ]
    for name in report["models"]:
        lines += _model_section(report, name)
    if report["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({path})" for title, path in report["plots"].items()]
    lines.append("")
    return "\n".join(lines)


def _model_section(report: Mapping[str, Any], name: str) -> list[str]:
    """The lines of one model in ``report.md``: its table, what was unavailable, radii, bound and training."""
    entry = report["models"][name]
    lines = ["", f"## Model `{name}`", ""]
    if entry.get("description"):
        lines += [entry["description"], ""]
    lines += [f"Clean accuracy: **{_fmt(entry['clean_accuracy'])}**", ""]
    lines.append(_markdown_table(*results_table(report, name)))
    if entry["unavailable"]:
        lines += ["", "Unavailable:", ""]
        lines += [f"* {method_label(m)}: {reason}" for m, reason in entry["unavailable"].items()]
    if entry["certified_radius"]:
        lines += ["", "Certified radius per test point (largest ε certified; 0 where the prediction is wrong):", ""]
        lines.append(_markdown_table(*_radius_table(entry["certified_radius"])))
    bound = entry.get("generalization_bound")
    if bound:
        lines += ["", "Generalization bound under weight perturbation (docs/theory.md; standard constants):", ""]
        lines += [f"* {k}: {_fmt(v, '.4g') if not isinstance(v, (dict, list)) else v}" for k, v in bound.items()]
    training = {k: v for k, v in (entry.get("training") or {}).items() if not isinstance(v, (dict, list))}
    if training:
        lines += ["", "Training: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in training.items())]
    return lines


def _radius_table(summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "mean", "median", "median (certified points)", "max (finite)", "share > 0", "never broken"]
    keys = ("mean", "median", "median_certified", "max")
    rows = [
        [m, *(_fmt(s[k], ".3g") for k in keys), _fmt(s["fraction_positive"]), str(s.get("infinite", 0))]
        for m, s in summaries.items()
    ]
    return header, rows
