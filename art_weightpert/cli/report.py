"""
The evaluation report of the command line: accuracy of one or more models across a grid of weight-ball radii ε by
every method (clean, random faults, universal weight PGD, certificates), certified radii, the generalization bound,
written as ``report.json`` (every number), ``report.md`` (tables, :mod:`.render`) and PNG plots
(:mod:`art_weightpert.metrics.plots`).

Every number comes from the library's public functions: :func:`.weight_robustness_curve` (the curves, the random
faults' statistics, the timings), :func:`.certified_weight_radius` (summarized by :func:`.radius_summary`) and
:func:`.generalization_bound`; the default ε grid is :func:`.default_eps_grid`.

Reading the numbers: for every ε, certified accuracy ≤ true robust accuracy ≤ weight-PGD accuracy ≤ mean
accuracy under random faults ≤ clean accuracy, up to the attack's strength. The certificate is per sample (every
perturbation in the ball); WeightPGD finds one perturbation for the whole data set.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification import METHODS as BOUND_METHODS
from art_weightpert.cli.parser import REPORT_METHODS, one_line
from art_weightpert.cli.render import markdown_report
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.metrics import certified_weight_radius, generalization_bound, weight_robustness_curve
from art_weightpert.metrics.plots import plot_bit_flip_curves, plot_certified_radius_histogram, plot_robustness_curves
from art_weightpert.metrics.summaries import radius_summary
from art_weightpert.network import UnsupportedModelError, read_network

SCHEMA_VERSION = 1
PLOT_DPI = 110


def versions() -> dict[str, str]:
    """Versions of the software that produced a report."""
    import art
    import sklearn

    from art_weightpert import __version__

    return {
        "art_weightpert": __version__,
        "adversarial_robustness_toolbox": art.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def jsonable(value: Any) -> Any:
    """``value`` with numpy and torch numbers and arrays as plain Python (non-finite floats become ``None``)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_model(
    classifier: PyTorchWeightClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    eps_grid: Sequence[float],
    methods: Sequence[str] = REPORT_METHODS,
    pgd_steps: int = 20,
    random_samples: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    train_data: tuple[np.ndarray, np.ndarray] | None = None,
    radius_methods: Sequence[str] = ("paper", "interval"),
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """
    One model's entry of the report: its :func:`.weight_robustness_curve` across the ε grid by each method, the
    certified radius per test point and the generalization bound.

    :param classifier: the model.
    :param x: test inputs; ``y``: their integer labels.
    :param budget: the ball; its ε is replaced by each grid value (and sets the units of the certified radii).
    :param eps_grid: radii ε to evaluate.
    :param methods: subset of :data:`.REPORT_METHODS`.
    :param pgd_steps: iterations of :class:`.WeightPGD` (one random start; torch is seeded with ``seed`` before each).
    :param random_samples: draws of :class:`.RandomWeightPerturbation` per ε.
    :param seed: seed of the attacks.
    :param batch_size: samples per forward pass.
    :param train_data: ``(x_train, y_train)`` for the generalization bound (docs/theory.md §6), or ``None``.
    :param radius_methods: certification methods whose per-sample certified radius is computed (a bisection over
        the radius for most bounds: costly for ``"linear"``, hence not in the default).
    :param progress: called after each unit of work with its description (for a progress bar).
    :param dtype: the precision of the certificates (``None``: the certifiers' default; docs/theory.md §5).
    :return: ``{"clean_accuracy", "curves": {method: [accuracy per ε]}, "random_std", "random_min", "random_max",
        "certified_radius": {method: summary}, "unavailable": {method: reason}, "generalization_bound", "seconds":
        {method: float}, "correct": [per test point], "perturbed_layers": [the budget's layers on the model]}``.
    """
    curve = weight_robustness_curve(
        classifier,
        x,
        y,
        [budget.with_eps(float(eps)) for eps in eps_grid],
        methods=methods,
        pgd_params={"max_iter": pgd_steps},
        random_params={"nb_samples": random_samples, "seed": seed},
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        dtype=dtype,
    )
    entry = _entry_of_curve(curve, methods)
    entry["perturbed_layers"] = budget.layer_names(classifier.base_model)
    if any(m in entry["curves"] for m in radius_methods):  # to plot misclassified points apart from small radii
        entry["correct"] = (classifier.predict(x, batch_size=batch_size).argmax(axis=1) == y).tolist()
    for method in radius_methods:
        if method in entry["curves"]:
            start = time.perf_counter()
            radii = certified_weight_radius(classifier, x, y, budget, method=method, batch_size=batch_size, dtype=dtype)
            entry["certified_radius"][method] = radius_summary(radii)
            entry["seconds"][method] += time.perf_counter() - start
    if train_data is not None:
        entry["generalization_bound"] = _generalization_bound(classifier, train_data, budget, eps_grid)
    return entry


def _entry_of_curve(curve: Mapping[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """A model's entry from its robustness curve (methods that could not run go to ``unavailable``)."""
    unavailable = {m: one_line(reason) for m, reason in curve["unavailable"].items()}
    available = [m for m in methods if m not in unavailable]
    entry: dict[str, Any] = {
        "clean_accuracy": curve["clean_accuracy"],
        "curves": {m: curve["accuracies"][m] for m in available},
        "unavailable": unavailable,
        "certified_radius": {},
        "generalization_bound": None,
        "seconds": {m: curve["seconds"][m] for m in available if m != "clean"},
    }
    if "random" in methods:
        entry.update({key: curve[key] for key in ("random_std", "random_min", "random_max")})
    if "verified" in available:
        keys = ("verified_falsified", "verified_unknown", "verified_seconds_per_sample")
        entry.update({key: curve[key] for key in keys})
    return entry


def clean_only_entry(clean_accuracy: float, methods: Sequence[str], n_eps: int, reason: str) -> dict[str, Any]:
    """The entry of a model whose weights cannot be perturbed: clean accuracy only, every other method unavailable
    for ``reason``."""
    return {
        "clean_accuracy": clean_accuracy,
        "curves": {"clean": [clean_accuracy] * n_eps} if "clean" in methods else {},
        "unavailable": {m: reason for m in methods if m != "clean"},
        "certified_radius": {},
        "generalization_bound": None,
        "seconds": {},
    }


def _generalization_bound(classifier, train_data, budget, eps_grid) -> dict[str, Any]:
    """The generalization bound of docs/theory.md §6 at the largest ε of the grid (``{"unavailable": reason}`` when it
    cannot be computed)."""
    eps = max(eps_grid)
    try:
        value = generalization_bound(classifier, *train_data, budget.with_eps(eps), method="paper")  # THEORY §6
    except (UnsupportedModelError, NotImplementedError, ValueError) as err:
        return {"unavailable": one_line(err)}
    layers = [layer.name for layer in read_network(classifier.base_model, classifier.input_shape).affine_layers]
    return {"budget_eps": eps, "layers": layers, **jsonable(value if isinstance(value, Mapping) else {"bound": value})}


# ------------------------------------------------------------------------------------------------ writing
def build_report(
    command: str,
    models: Mapping[str, Mapping[str, Any]],
    budget: PerturbationBudget,
    eps_grid: Sequence[float],
    methods: Sequence[str],
    data: Mapping[str, Any],
    settings: Mapping[str, Any],
    seeds: Mapping[str, int],
    seconds: float,
) -> dict[str, Any]:
    """Assemble the report dictionary (the content of ``report.json``)."""
    return jsonable(
        {
            "schema": SCHEMA_VERSION,
            "tool": "art-weightpert",
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "seeds": dict(seeds),
            "settings": dict(settings),
            "data": dict(data),
            "budget": budget.to_dict(),
            "eps_grid": [float(e) for e in eps_grid],
            "methods": list(methods),
            "models": {name: dict(entry) for name, entry in models.items()},
            "plots": {},
            "seconds": seconds,
        }
    )


def curve_of(report: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One model of the report in the form of a :func:`.weight_robustness_curve` result (for the plots)."""
    entry = report["models"][name]
    curve = {
        "eps": report["eps_grid"],
        "budgets": [report["budget"]],
        "norm": report["budget"]["norm"],
        "accuracies": {m: entry["curves"][m] for m in report["methods"] if m in entry["curves"]},
        "unavailable": entry["unavailable"],
    }
    if entry.get("random_min") is not None:
        curve.update(random_min=entry["random_min"], random_max=entry["random_max"])
    return curve


def write_plots(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
    """The report's plots (accuracy against ε per model; certified radius histograms): ``{title: file name}``."""
    norm = report["budget"]["norm"]
    curves = {f"{name} ({norm} ball)": curve_of(report, name) for name in report["models"]}
    plot_robustness_curves(curves, os.path.join(out_dir, "accuracy_vs_eps.png"), dpi=PLOT_DPI)
    entries = report["models"].values()
    radii = {
        method: {
            name: [math.inf if v is None else v for v in e["certified_radius"][method]["values"]]
            for name, e in report["models"].items()
            if method in e["certified_radius"]
        }
        for method in BOUND_METHODS
        if any(method in e["certified_radius"] for e in entries)
    }
    reasons = [r for e in entries for m, r in e["unavailable"].items() if m in BOUND_METHODS]
    wrong = {name: [not c for c in e["correct"]] for name, e in report["models"].items() if e.get("correct")}
    path = os.path.join(out_dir, "certified_radius_hist.png")
    relative = report["budget"]["relative"]
    plot_certified_radius_histogram(radii, path, relative, reasons, dpi=PLOT_DPI, misclassified=wrong or None)
    plots = {"accuracy vs ε": "accuracy_vs_eps.png", "certified radius histogram": "certified_radius_hist.png"}
    flips = {
        name: e["bit_flips"] for name, e in report["models"].items() if "bfa_accuracy" in (e.get("bit_flips") or {})
    }
    if flips:
        plot_bit_flip_curves(flips, os.path.join(out_dir, "bit_flips.png"), dpi=PLOT_DPI)
        plots["accuracy vs flipped bits"] = "bit_flips.png"
    return plots


def write_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """
    Write the plots, ``report.json`` and ``report.md`` into ``out_dir`` (created if needed).

    :param report: the dict of :func:`build_report` (its ``plots`` entry is filled in).
    :param out_dir: output folder.
    :return: ``{kind: path}`` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    report["plots"] = write_plots(report, out_dir)
    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, allow_nan=False)
        handle.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(markdown_report(report))
    paths.update({title: os.path.join(out_dir, f) for title, f in report["plots"].items()})
    return paths
