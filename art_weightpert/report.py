"""
The evaluation report of the command line: accuracy of one or more models across a grid of weight-ball radii ε by
every method (clean, random faults, universal weight PGD, certificates), certified radii, the generalization bound,
written as ``report.json`` (every number), ``report.md`` (tables) and PNG plots.

Reading the numbers: for every ε, certified accuracy ≤ true robust accuracy ≤ weight-PGD accuracy ≤ mean
accuracy under random faults ≤ clean accuracy, up to the attack's strength. The certificate is per sample (every
perturbation in the ball); WeightPGD finds one perturbation for the whole data set.
"""

from __future__ import annotations

import datetime
import json
import logging
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
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)

ATTACK_METHODS = ("random", "pgd")
CERTIFIED_METHODS = ("paper", "interval", "linear")
METHODS = ("clean",) + ATTACK_METHODS + CERTIFIED_METHODS
SCHEMA_VERSION = 1

METHOD_LABELS = {
    "clean": "clean",
    "random": "random faults (mean)",
    "pgd": "WeightPGD",
    "paper": "certified (paper)",
    "interval": "certified (interval)",
    "linear": "certified (linear)",
}


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


def default_eps_grid(model: torch.nn.Module, budget: PerturbationBudget) -> list[float]:
    """
    The ε grid used when none is given: 0, 0.2 %, 0.5 %, 1 %, 2 %, 5 % and 10 % of the typical size of the perturbed
    weights in the budget's norm (mean |W| entry for ``inf``, mean row ℓ1 norm for ``row_l1``, mean Frobenius norm for
    ``l2``); for a relative budget, those fractions themselves.

    :param model: the unperturbed module.
    :param budget: the ball (its ε is ignored).
    :return: the grid, increasing, starting at 0.
    """
    fractions = [0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    if budget.relative:
        return fractions
    sizes = []
    for target in PerturbationBudget(1.0, budget.norm, budget.layers, relative=True).parameter_balls(
        model, torch.float64
    ):
        if target.kind == "weight":
            sizes.append(float(target.radius.mean()))
    scale = float(np.mean(sizes)) if sizes else 1.0
    return [float(f"{f * scale:.3g}") for f in fractions]


# ------------------------------------------------------------------------------------------------ evaluation
def _accuracy(classifier: PyTorchWeightClassifier, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    if len(y) == 0:
        return math.nan
    return float(np.mean(classifier.predict(x, batch_size=batch_size).argmax(axis=1) == y))


def _radius_summary(values: np.ndarray) -> dict[str, Any]:
    """Summary of per-sample certified radii (``inf``: never broken; stored as ``None`` in the values list)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    positive = values[values > 0]
    return {
        "mean": float(finite.mean()) if len(finite) else math.nan,
        "median": float(np.median(values)) if len(values) else math.nan,
        "median_certified": float(np.median(positive)) if len(positive) else 0.0,
        "max": float(finite.max()) if len(finite) else math.nan,
        "fraction_positive": float(np.mean(values > 0)) if len(values) else math.nan,
        "infinite": int(np.sum(np.isinf(values))),
        "values": [float(v) if math.isfinite(v) else None for v in values],
    }


def evaluate_model(
    classifier: PyTorchWeightClassifier | None,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    eps_grid: Sequence[float],
    methods: Sequence[str] = METHODS,
    pgd_steps: int = 20,
    random_samples: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    unsupported_reason: str | None = None,
    clean_accuracy: float | None = None,
    train_data: tuple[np.ndarray, np.ndarray] | None = None,
    radius_methods: Sequence[str] = ("paper", "interval"),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """
    Evaluate one model across the ε grid by each method.

    :param classifier: the model as a :class:`.PyTorchWeightClassifier` (``None`` when it cannot be perturbed, e.g. a
        TorchScript module that is not a ``Sequential``; then ``clean_accuracy`` is required).
    :param x: test inputs.
    :param y: integer test labels.
    :param budget: the ball; its ε is replaced by each grid value (and ignored for certified radii, which are in the
        budget's units).
    :param eps_grid: radii ε to evaluate.
    :param methods: subset of :data:`METHODS`.
    :param pgd_steps: iterations of :class:`.WeightPGD` (one random start).
    :param random_samples: draws of :class:`.RandomWeightPerturbation` per ε.
    :param seed: seed of the attacks (torch's generator is re-seeded before each one, so results do not depend on
        the order of the work).
    :param batch_size: samples per forward pass.
    :param unsupported_reason: why the weights cannot be perturbed at all (every method but clean is unavailable).
    :param clean_accuracy: clean accuracy computed elsewhere (for ``classifier=None``).
    :param train_data: ``(x_train, y_train)`` for the generalization bound (THEORY.md §6), or ``None``.
    :param radius_methods: certification methods whose per-sample certified radius is computed (a bisection over
        the radius for most bounds: costly for ``"linear"``, hence not in the default).
    :param progress: called with a description after each unit of work (for a progress bar).
    :return: ``{"clean_accuracy", "curves": {method: [accuracy per ε]}, "random_std", "random_min", "random_max",
        "certified_radius": {method: summary}, "unavailable": {method: reason}, "generalization_bound", "seconds":
        {method: float}}``.
    """
    step = progress or (lambda _: None)
    eps_grid = [float(e) for e in eps_grid]
    result: dict[str, Any] = {
        "curves": {},
        "unavailable": {},
        "certified_radius": {},
        "generalization_bound": None,
        "seconds": {},
    }
    if classifier is not None:
        clean_accuracy = _accuracy(classifier, x, y, batch_size)
    result["clean_accuracy"] = clean_accuracy
    if "clean" in methods:
        result["curves"]["clean"] = [clean_accuracy] * len(eps_grid)
    if classifier is None or unsupported_reason is not None:
        for method in methods:
            if method != "clean":
                result["unavailable"][method] = unsupported_reason or "the model cannot be perturbed"
                step(method)
        return result

    if "random" in methods:
        _run_random(result, classifier, x, y, budget, eps_grid, random_samples, seed, batch_size, clean_accuracy, step)
    if "pgd" in methods:
        _run_pgd(result, classifier, x, y, budget, eps_grid, pgd_steps, seed, batch_size, clean_accuracy, step)
    for method in CERTIFIED_METHODS:
        if method in methods:
            radius = method in radius_methods
            _run_certifier(result, method, classifier, x, y, budget, eps_grid, batch_size, radius, step)
    if train_data is not None:
        result["generalization_bound"] = _generalization_bound(classifier, train_data, budget, eps_grid)
    return result


def _run_random(result, classifier, x, y, budget, eps_grid, samples, seed, batch_size, clean, step) -> None:
    from art_weightpert.attacks import RandomWeightPerturbation

    start = time.perf_counter()
    curve, std, low, high = [], [], [], []
    for eps in eps_grid:
        if eps == 0:
            curve.append(clean), std.append(0.0), low.append(clean), high.append(clean)
        else:
            attack = RandomWeightPerturbation(
                classifier, budget.with_eps(eps), nb_samples=samples, seed=seed, batch_size=batch_size, verbose=False
            )
            stats = attack.evaluate(x, y)
            curve.append(stats["mean"]), std.append(stats["std"]), low.append(stats["min"]), high.append(stats["max"])
        step(f"random ε={eps:g}")
    result["curves"]["random"] = curve
    result.update(random_std=std, random_min=low, random_max=high)
    result["seconds"]["random"] = time.perf_counter() - start


def _run_pgd(result, classifier, x, y, budget, eps_grid, steps, seed, batch_size, clean, step) -> None:
    from art_weightpert.attacks import WeightPGD

    start = time.perf_counter()
    curve = []
    for eps in eps_grid:
        if eps == 0:
            curve.append(clean)
        else:
            torch.manual_seed(seed)
            attack = WeightPGD(classifier, budget.with_eps(eps), max_iter=steps, batch_size=batch_size, verbose=False)
            perturbed = classifier.with_weight_perturbation(attack.generate(x, y))
            curve.append(_accuracy(perturbed, x, y, batch_size))
        step(f"pgd ε={eps:g}")
    result["curves"]["pgd"] = curve
    result["seconds"]["pgd"] = time.perf_counter() - start


def _run_certifier(result, method, classifier, x, y, budget, eps_grid, batch_size, with_radius, step) -> None:
    start = time.perf_counter()
    try:
        from art_weightpert.certification import WeightPerturbationCertifier

        predicted = classifier.predict(x, batch_size=batch_size).argmax(axis=1) == y
        curve = []
        for eps in eps_grid:
            certifier = WeightPerturbationCertifier(
                classifier, budget.with_eps(eps), method=method, batch_size=batch_size, verbose=False
            )
            curve.append(float(np.mean(np.asarray(certifier.certify(x, y), dtype=bool) & predicted)))
            step(f"{method} ε={eps:g}")
        radius = None
        if with_radius:
            certifier = WeightPerturbationCertifier(
                classifier, budget, method=method, batch_size=batch_size, verbose=False
            )
            radius = np.asarray(certifier.certified_radius(x, y), dtype=np.float64)
    except (UnsupportedModelError, NotImplementedError, ImportError) as err:
        result["unavailable"][method] = _one_line(err)
        logger.warning("certification by %r unavailable: %s", method, _one_line(err))
        return
    result["curves"][method] = curve
    if radius is not None:
        result["certified_radius"][method] = _radius_summary(radius)
    result["seconds"][method] = time.perf_counter() - start


def _generalization_bound(classifier, train_data, budget, eps_grid) -> dict[str, Any]:
    """The generalization bound of THEORY.md §6 at the largest ε of the grid (``{"unavailable": reason}`` when it
    cannot be computed)."""
    try:
        from art_weightpert.metrics import generalization_bound

        eps = max(eps_grid)
        x_train, y_train = train_data
        value = generalization_bound(classifier, x_train, y_train, budget.with_eps(eps))
    except (UnsupportedModelError, NotImplementedError, ImportError, AttributeError, ValueError) as err:
        return {"unavailable": _one_line(err)}
    return {"budget_eps": eps, **_jsonable(value if isinstance(value, Mapping) else {"bound": value})}


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Layer types and parameter count of a module, for the report."""
    return {
        "class": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "text": " ".join(str(model).split()) if len(str(model)) < 2000 else type(model).__name__,
    }


def forward_check(model: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    """Run ``model`` (eval mode, on its parameters' device) on ``x`` and return the logits."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32, device=device))


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
    return _jsonable(
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


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) if isinstance(value, float) else str(value)


def results_table(report: Mapping[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one model's accuracy table: one row per ε, one column per available method."""
    entry = report["models"][name]
    methods = [m for m in report["methods"] if m in entry["curves"]]
    header = ["ε"] + [METHOD_LABELS.get(m, m) for m in methods]
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
            out.append(f"  {METHOD_LABELS.get(method, method)} unavailable: {reason}")
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
        "* Methods: " + ", ".join(METHOD_LABELS.get(m, m) for m in report["methods"]),
    ]
    for key, value in report["settings"].items():
        lines.append(f"* {key}: {value}")
    lines += [
        "",
        "Reading the table: *certified* is the share of test points whose prediction is correct and provably unchanged "
        "by **every** weight perturbation in the ball (sound bounds in float64); *WeightPGD* is the accuracy under one "
        "adversarial perturbation found for the whole test set; *random faults* is the mean accuracy over random "
        "perturbations in the ball. Certified ≤ true robust accuracy ≤ WeightPGD ≤ random ≤ clean.",
    ]
    for name, entry in report["models"].items():
        lines += ["", f"## Model `{name}`", ""]
        if entry.get("description"):
            lines += [entry["description"], ""]
        lines += [f"Clean accuracy: **{_fmt(entry['clean_accuracy'])}**", ""]
        lines.append(_markdown_table(*results_table(report, name)))
        if entry["unavailable"]:
            lines += ["", "Unavailable:", ""]
            lines += [f"* {METHOD_LABELS.get(m, m)}: {reason}" for m, reason in entry["unavailable"].items()]
        if entry["certified_radius"]:
            lines += ["", "Certified radius per test point (largest ε certified; 0 where the prediction is wrong):", ""]
            header = [
                "method",
                "mean",
                "median",
                "median (certified points)",
                "max (finite)",
                "share > 0",
                "never broken",
            ]
            keys = ("mean", "median", "median_certified", "max")
            rows = [
                [m, *(_fmt(s[k], ".3g") for k in keys), _fmt(s["fraction_positive"]), str(s.get("infinite", 0))]
                for m, s in entry["certified_radius"].items()
            ]
            lines.append(_markdown_table(header, rows))
        bound = entry.get("generalization_bound")
        if bound:
            lines += ["", "Generalization bound under weight perturbation (docs/theory.md; standard constants):", ""]
            lines += [f"* {k}: {_fmt(v, '.4g') if not isinstance(v, (dict, list)) else v}" for k, v in bound.items()]
        if entry.get("training"):
            lines += ["", "Training: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in entry["training"].items()
                                                   if not isinstance(v, (dict, list)))]  # fmt: skip
    if report["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({path})" for title, path in report["plots"].items()]
    lines.append("")
    return "\n".join(lines)


_STYLES = {
    "clean": ("black", "--"),
    "random": ("tab:blue", "-"),
    "pgd": ("tab:red", "-"),
    "paper": ("tab:olive", "-"),
    "interval": ("tab:green", "-"),
    "linear": ("tab:purple", "-"),
}


def _figure(ncols: int, width: float = 5.0, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_accuracy_vs_eps(report: Mapping[str, Any], path: str) -> str:
    """Accuracy against ε, one panel per model, one line per method (random faults' min–max shaded)."""
    names = list(report["models"])
    fig, axes = _figure(len(names), height=4.2)
    eps = np.asarray(report["eps_grid"], dtype=float)
    unit = "ε (relative)" if report["budget"]["relative"] else "ε"
    legend: dict[str, Any] = {}
    for ax, name in zip(axes, names):
        entry = report["models"][name]
        for method in report["methods"]:
            if method not in entry["curves"]:
                continue
            color, line = _STYLES.get(method, (None, "-"))
            values = np.asarray([np.nan if v is None else v for v in entry["curves"][method]], dtype=float)
            label = METHOD_LABELS.get(method, method)
            (handle,) = ax.plot(eps, values, line, color=color, marker="o", markersize=3, label=label)
            legend.setdefault(label, handle)
        if entry.get("random_min") is not None and "random" in entry["curves"]:
            ax.fill_between(eps, entry["random_min"], entry["random_max"], color="tab:blue", alpha=0.15, linewidth=0)
        for i, method in enumerate(entry["unavailable"]):
            ax.text(0.02, 0.03 + 0.06 * i, f"{method}: unavailable", transform=ax.transAxes, fontsize=7, color="gray")
        ax.set_title(f"{name} ({report['budget']['norm']} ball)")
        ax.set_xlabel(unit)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(6, len(legend)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if legend else 0, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def plot_certified_radius_histogram(report: Mapping[str, Any], path: str) -> str:
    """Histogram of the certified radius per test point, one panel per certification method, one colour per model."""
    methods = [m for m in CERTIFIED_METHODS if any(m in e["certified_radius"] for e in report["models"].values())]
    fig, axes = _figure(max(1, len(methods)))
    if not methods:
        reasons = {r for e in report["models"].values() for m, r in e["unavailable"].items() if m in CERTIFIED_METHODS}
        text = "certification unavailable" + (":\n" + "\n".join(sorted(reasons))[:300] if reasons else "")
        axes[0].text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8, transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, method in zip(axes, methods):
        series = {
            name: np.asarray([np.inf if v is None else v for v in e["certified_radius"][method]["values"]], float)
            for name, e in report["models"].items()
            if method in e["certified_radius"]
        }
        series = {name: v[np.isfinite(v)] for name, v in series.items()}
        top = max((float(v.max()) for v in series.values() if len(v)), default=0.0)
        bins = np.linspace(0.0, top if top > 0 else 1.0, 31)
        for name, values in series.items():
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (median {np.median(values):.3g})")
        ax.set_title(f"certified radius ({method})")
        ax.set_xlabel("ε certified" + (" (relative)" if report["budget"]["relative"] else ""))
        ax.set_ylabel("test points")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """
    Write the plots, ``report.json`` and ``report.md`` into ``out_dir`` (created if needed).

    :param report: the dict of :func:`build_report` (its ``plots`` entry is filled in).
    :param out_dir: output folder.
    :return: ``{kind: path}`` of the files written.
    """
    os.makedirs(out_dir, exist_ok=True)
    plots = {
        "accuracy vs ε": ("accuracy_vs_eps.png", plot_accuracy_vs_eps),
        "certified radius histogram": ("certified_radius_hist.png", plot_certified_radius_histogram),
    }
    report["plots"] = {}
    for title, (filename, plot) in plots.items():
        plot(report, os.path.join(out_dir, filename))
        report["plots"][title] = filename
    paths = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1, allow_nan=False)
        handle.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(markdown_report(report))
    paths.update({title: os.path.join(out_dir, f) for title, f in report["plots"].items()})
    return paths
