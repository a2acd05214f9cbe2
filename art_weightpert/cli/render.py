"""
The report as text: the tables printed by the command line and the content of ``report.md`` (numbers from the report
dictionary of :func:`.build_report`; labels from :mod:`art_weightpert.metrics.plots`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from art_weightpert.certification import METHODS as BOUND_METHODS
from art_weightpert.cli.render_sections import (
    bit_flip_comparison,
    bit_flip_lines,
    bound_lines,
    fmt,
    markdown_table,
    measures_lines,
    unavailable_lines,
)
from art_weightpert.metrics.plots import method_label

SETTING_LABELS = {
    "training_eps": "training budget (robust model)",
    "hidden": "hidden layer widths",
    "epochs": "training epochs",
    "batch_size": "training batch size",
    "lam": "λ, weight of the robust loss term",
    "mu": "μ, weight of the operator-norm term",
    "kappa": "κ, safety margin of the robust term",
    "method": "margin bound used in training",
    "warmup": "warm-up epochs (λ ramped from 0)",
    "pgd_steps": "WeightPGD steps",
    "random_samples": "random draws per ε (and per number of bit flips)",
    "test_points": "test points evaluated",
    "eps_multiples_of_training_eps": "ε grid as multiples of the training ε",
    "device": "device",
    "eval_batch_size": "evaluation batch size",
    "eps_grid_source": "ε grid",
    "bit_flips": "bit flips (most flips, bits per weight, scales)",
    "measures": "generalization measures",
    "nproc": "processes (--nproc)",
    "threads": "torch threads in all (--threads)",
    "threads_per_process": "torch threads per process",
}
"""Readable labels of the report's settings (``report.json`` keeps the keys)."""

_fmt = fmt
_markdown_table = markdown_table


def setting_lines(settings: Mapping[str, Any]) -> list[str]:
    """The settings as ``* label: value`` lines (lists joined, ``None`` as "none")."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(fmt(v, "g") for v in value)
        lines.append(
            f"* {SETTING_LABELS.get(key, key.replace('_', ' '))}: {'none' if value is None else fmt(value, 'g')}"
        )
    return lines


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
            if m == "verified" and entry.get("verified_falsified") is not None:
                cell += (
                    f" (falsified {_fmt(entry['verified_falsified'][i])}, unknown {_fmt(entry['verified_unknown'][i])}"
                    f", {_fmt(entry['verified_seconds_per_sample'][i], '.2f')} s/sample)"
                )
            row.append(cell)
        rows.append(row)
    return header, rows


def zero_certificate_lines(report: Mapping[str, Any], name: str) -> list[str]:
    """Why every certified column of a model is 0 at every ε > 0 of the grid, and what to try (empty otherwise, or
    when the model is not even clean-correct)."""
    entry = report["models"][name]
    certified = [m for m in BOUND_METHODS if m in entry["curves"]]
    positive = [i for i, eps in enumerate(report["eps_grid"]) if eps > 0]
    if not certified or not positive or not entry["clean_accuracy"]:
        return []
    if any(entry["curves"][m][i] for m in certified for i in positive):
        return []
    budget = report["budget"]
    layers = entry.get("perturbed_layers") or []
    which = f"{len(layers)} perturbed layer{'' if len(layers) == 1 else 's'}" if layers else "the perturbed layers"
    names = f" ({', '.join(layers)})" if 0 < len(layers) <= 8 else ""
    every = "every Linear/Conv layer of the model" if budget["layers"] is None else "every layer it names"
    tries = []
    if budget["layers"] is None or len(layers) > 1:
        tries.append("perturb fewer layers (the budget's `layers`; `--layers NAME ...`)")
    if not budget["relative"]:
        tries.append("relative balls (`--relative`: radii proportional to each weight)")
    tries += [
        "a smaller ε grid (`--eps`)",
        "a model trained for the ball (`art-weightpert train`, `WeightRobustTrainer`)",
        "the verifier (`--methods ... verified`: branch and bound, a verdict per sample)",
    ]
    return [
        f"Every certified column ({', '.join(method_label(m) for m in certified)}) is 0 at every ε > 0: the budget "
        f"perturbs {every} at once — {which}{names} — and the bounds compound with depth (each perturbed layer "
        "widens the bound of every layer after it), so even the smallest ε of the grid "
        f"({report['eps_grid'][positive[0]]:.4g}) is beyond what they can certify. The attacks' columns still "
        "measure the model. To certify something, try: " + "; ".join(tries) + ".",
    ]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _budget_text(budget: Mapping[str, Any]) -> str:
    layers = "all Linear/Conv layers" if budget["layers"] is None else ", ".join(budget["layers"])
    kind = "relative" if budget["relative"] else "absolute"
    bias = "weights and biases" if budget["include_bias"] else "weights only (biases fixed)"
    return f"`{budget['norm']}` ball, {kind} radii, {bias}, layers: {layers}"


def training_warnings(entry: Mapping[str, Any]) -> list[str]:
    """The trainer's warnings of a model trained for the report (``history["warnings"]``: a collapsed run)."""
    return list((entry.get("history") or {}).get("warnings") or [])


def summary_text(report: Mapping[str, Any]) -> str:
    """The readable summary printed by the command line (a table per model)."""
    out = [f"Budget: {_budget_text(report['budget'])}", f"Data: {report['data'].get('description', '')}"]
    for name, entry in report["models"].items():
        out.append("")
        out.append(f"Model {name!r}: clean accuracy {_fmt(entry['clean_accuracy'])}")
        out.append(text_table(*results_table(report, name)))
        flips = entry.get("bit_flips") or {}
        if "bfa_accuracy" in flips:
            out.append(
                f"Bit flips ({flips['n_bits']}-bit, quantized accuracy {fmt(flips['quantized_accuracy'])}): after "
                + ", ".join(
                    f"{k}: BFA {b:.3f} / random {r:.3f}"
                    for k, b, r in zip(flips["flips"], flips["bfa_accuracy"], flips["random_mean"])
                )  # fmt: skip
            )
        out += [f"  {line}" for line in unavailable_lines(entry)]
        out += [f"  {line}" for line in zero_certificate_lines(report, name)]
        out += [f"  warning: {warning}" for warning in training_warnings(entry)]
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
    lines += setting_lines(report["settings"])
    lines += [
        "",
        "Reading the tables: accuracies are shares of the test points (0 to 1); ε is the radius of the weight ball in "
        "the units of the budget above (absolute: the weights' own units; relative: a fraction of each weight, row "
        "or layer norm). *certified* is the share of test points whose prediction is correct and provably unchanged "
        "by **every** weight perturbation in the ball (sound bounds in float64); *WeightPGD* is the accuracy under one "
        "adversarial perturbation found for the whole test set; *random faults* is the mean accuracy over random "
        "perturbations in the ball. Certified ≤ true robust accuracy ≤ WeightPGD ≤ random ≤ clean.",
    ]
    for name in report["models"]:
        lines += _model_section(report, name)
    lines += bit_flip_comparison(report["models"])
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
    for warning in training_warnings(entry):
        lines += [f"**Warning — {warning}**", ""]
    lines += [f"Clean accuracy: **{_fmt(entry['clean_accuracy'])}**", ""]
    lines.append(_markdown_table(*results_table(report, name)))
    zero = zero_certificate_lines(report, name)
    if zero:
        lines += ["", *zero]
    unavailable = unavailable_lines(entry)
    if unavailable:
        lines += ["", "Not computed for this model (each reason once, with what it affects):", ""]
        lines += [f"* {line}" for line in unavailable]
    if entry["certified_radius"]:
        lines += [
            "",
            "Certified radius per test point: the largest ε (in the units of the ε grid) at which the point is "
            "certified; 0 where the prediction is wrong, never broken = certified at every radius tried:",
            "",
        ]
        lines.append(_markdown_table(*_radius_table(entry["certified_radius"])))
    if entry.get("generalization_bound"):
        lines += bound_lines(entry["generalization_bound"])
    if entry.get("measures"):
        lines += measures_lines(entry["measures"])
    if entry.get("bit_flips"):
        lines += bit_flip_lines(entry["bit_flips"])
    training = {k: v for k, v in (entry.get("training") or {}).items() if not isinstance(v, (dict, list))}
    if training:
        lines += ["", "Training: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(v, '.3g')}" for k, v in training.items())]
    return lines


def _radius_table(summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "mean", "median", "median (certified points)", "max (finite)", "share > 0", "never broken"]
    keys = ("mean", "median", "median_certified", "max")
    rows = [
        [m, *(_fmt(s[k], ".3g") for k in keys), _fmt(s["fraction_positive"]), str(s.get("infinite", 0))]
        for m, s in summaries.items()
    ]
    return header, rows
