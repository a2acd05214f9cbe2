"""
Robustness curves under weight perturbation: accuracy against the radius ε of a weight ball, for the clean model,
random faults (:class:`.RandomWeightPerturbation`), the universal weight attack (:class:`.WeightPGD`) and the
certificate (:class:`.WeightPerturbationCertifier`), in the style of Foolbox's robustness sweeps.

For every ε: certified ≤ true robust accuracy ≤ PGD accuracy ≤ mean random accuracy ≤ 1 (up to the attack's
strength), and clean accuracy is the ε = 0 value of all of them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import PerturbationBudget
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)

METHODS = ("clean", "random", "pgd", "certified")
BALL_LABELS = {"inf": "box ℓ∞ ball", "row_l1": "row ℓ1 ball", "l2": "Frobenius ℓ2 ball", "mixed": "several balls"}


def weight_robustness_curve(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray | None,
    budgets_or_eps_list: Sequence[float | PerturbationBudget] | float | PerturbationBudget,
    norm: str = "inf",
    methods: Sequence[str] = METHODS,
    layers: Sequence[str] | None = None,
    relative: bool = False,
    include_bias: bool = False,
    certify_method: str = "interval",
    pgd_params: Mapping[str, Any] | None = None,
    random_params: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict[str, Any]:
    """
    Accuracy on ``(x, y)`` for each weight budget of a sweep, by each method.

    :param classifier: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
    :param x: inputs.
    :param y: integer or one-hot labels (``None``: the clean predictions, so clean accuracy is 1).
    :param budgets_or_eps_list: radii ε (combined with ``norm``, ``layers``, ``relative``, ``include_bias`` into
        budgets) or :class:`.PerturbationBudget` objects, or a mix.
    :param norm: the ball of the ε values: ``"inf"``, ``"row_l1"`` or ``"l2"``.
    :param methods: any of ``"clean"``, ``"random"`` (mean accuracy over random draws), ``"pgd"`` (universal
        :class:`.WeightPGD`) and ``"certified"`` (share of samples certified correct).
    :param layers: perturbed layers for ε values (``None``: all).
    :param relative: relative radii for ε values.
    :param include_bias: also perturb biases for ε values.
    :param certify_method: the certifier's method: ``"paper"``, ``"interval"`` or ``"linear"``.
    :param pgd_params: keyword arguments of :class:`.WeightPGD` (default: its own, with ``verbose=False``).
    :param random_params: keyword arguments of :class:`.RandomWeightPerturbation` (default ``nb_samples=10,
        seed=0``).
    :param batch_size: samples per forward pass.
    :param verbose: progress bars of the attacks and the certifier.
    :return: ``{"eps": [float], "budgets": [budget.to_dict()], "methods": [str], "accuracies": {method: [float]},
        "random_std", "random_min", "random_max": [float] (with "random"), "norm", "certify_method",
        "nb_samples": int, "notes": [str]}``. A certificate that cannot handle the model gives NaN and a note.
    """
    from art_weightpert.attacks import RandomWeightPerturbation, WeightPGD

    if isinstance(classifier, PyTorchClassifier) and not isinstance(classifier, PyTorchWeightClassifier):
        classifier = PyTorchWeightClassifier.from_classifier(classifier)
    if not isinstance(classifier, PyTorchWeightClassifier):
        raise TypeError(f"`classifier` must be an ART PyTorchClassifier, got {type(classifier).__name__}.")
    if isinstance(methods, str):
        methods = [methods]
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"`methods` must be a non-empty subset of {list(METHODS)}, got {methods}.")
    if "certified" in methods:
        from art_weightpert.certification import METHODS as CERTIFY_METHODS

        if certify_method not in CERTIFY_METHODS:
            raise ValueError(f"`certify_method` must be one of {list(CERTIFY_METHODS)}, got {certify_method!r}.")
    budgets = _budgets(budgets_or_eps_list, norm, layers, relative, include_bias)
    pgd_kwargs = {"batch_size": batch_size, "verbose": verbose, **dict(pgd_params or {})}
    random_kwargs = {"nb_samples": 10, "seed": 0, "batch_size": batch_size, "verbose": verbose}
    random_kwargs.update(dict(random_params or {}))

    x_t, labels_t = classifier.prepare_inputs(x, y)
    clean_pred = classifier.predict(x, batch_size=batch_size).argmax(axis=1)
    labels = clean_pred if labels_t is None else labels_t.cpu().numpy()
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=x_t.device)
    clean_acc = float(np.mean(clean_pred == labels)) if len(labels) else float("nan")

    result: dict[str, Any] = {
        "eps": [_axis_value(b) for b in budgets],
        "budgets": [b.to_dict() for b in budgets],
        "methods": methods,
        "accuracies": {m: [] for m in methods},
        "norm": budgets[0].norm if len({b.norm for b in budgets}) == 1 else "mixed",
        "certify_method": certify_method,
        "nb_samples": len(labels),
        "notes": [],
    }
    if "random" in methods:
        result.update(random_std=[], random_min=[], random_max=[])
    for budget in budgets:
        for method in methods:
            if method == "clean":
                acc = clean_acc
            elif method == "random":
                stats = RandomWeightPerturbation(classifier, budget, **random_kwargs).evaluate(x, labels)
                acc = stats["mean"]
                result["random_std"].append(stats["std"])
                result["random_min"].append(stats["min"])
                result["random_max"].append(stats["max"])
            elif method == "pgd":
                attack = WeightPGD(classifier, budget, **pgd_kwargs)
                deltas = classifier.check_deltas(attack.generate(x, labels))
                acc = attack._accuracy(x_t, labels_t, deltas, batch_size)
            else:
                certifier_kwargs = {"method": certify_method, "batch_size": batch_size, "verbose": verbose}
                acc = _certified_accuracy(classifier, budget, x, labels, clean_pred, certifier_kwargs, result["notes"])
            result["accuracies"][method].append(float(acc))
        logger.info("weight_robustness_curve: %s -> %s", budget, {m: v[-1] for m, v in result["accuracies"].items()})
    return result


def plot_robustness_curve(result: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> str:
    """
    Plot a :func:`weight_robustness_curve` result (accuracy against ε, one line per method; the random faults' min-max
    range shaded) and save it.

    :param result: the dict returned by :func:`weight_robustness_curve`.
    :param path: output file (the extension picks the format, e.g. ``.png``, ``.pdf``, ``.svg``).
    :param title: figure title (default: names the norm).
    :return: the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(result, Mapping) or "eps" not in result or "accuracies" not in result:
        raise ValueError("`result` must be the dict returned by weight_robustness_curve.")
    eps = np.asarray(result["eps"], dtype=float)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {
        "clean": ("k", "--"),
        "random": ("tab:blue", "-"),
        "pgd": ("tab:red", "-"),
        "certified": ("tab:green", "-"),
    }
    for method, values in result["accuracies"].items():
        color, line = styles.get(method, (None, "-"))
        ax.plot(
            eps,
            np.asarray(values, dtype=float),
            line,
            color=color,
            marker="o",
            markersize=3,
            label=method,
            zorder=3 if method == "clean" else 2,  # the clean line often lies on the random one
        )
    if "random_min" in result and len(result["random_min"]) == len(eps):
        ax.fill_between(eps, result["random_min"], result["random_max"], color="tab:blue", alpha=0.15, linewidth=0)
    ax.set_xlabel("ε (relative)" if _all_relative(result) else "ε")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ball = BALL_LABELS.get(result.get("norm", ""), str(result.get("norm", "")))
    ax.set_title(title if title is not None else f"Accuracy under weight perturbation ({ball})")
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------- helpers
def _budgets(values: Any, norm: str, layers, relative: bool, include_bias: bool) -> list[PerturbationBudget]:
    if isinstance(values, (PerturbationBudget, int, float, np.integer, np.floating)):
        values = [values]
    if not isinstance(values, Sequence | np.ndarray) or len(values) == 0:
        raise ValueError("`budgets_or_eps_list` must be a non-empty list of eps values or PerturbationBudgets.")
    budgets = []
    for value in values:
        if isinstance(value, PerturbationBudget):
            budgets.append(value)
        else:
            budgets.append(PerturbationBudget(value, norm, layers=layers, relative=relative, include_bias=include_bias))
    return budgets


def _axis_value(budget: PerturbationBudget) -> float:
    """ε of a budget on the curve's x axis (the largest per-layer ε of a dict)."""
    return float(max(budget.eps.values())) if isinstance(budget.eps, dict) else float(budget.eps)


def _all_relative(result: Mapping[str, Any]) -> bool:
    budgets = result.get("budgets") or []
    return bool(budgets) and all(b.get("relative") for b in budgets)


def _certified_accuracy(
    classifier: PyTorchWeightClassifier,
    budget: PerturbationBudget,
    x: np.ndarray,
    labels: np.ndarray,
    clean_pred: np.ndarray,
    certifier_kwargs: dict[str, Any],
    notes: list[str],
) -> float:
    from art_weightpert.certification import WeightPerturbationCertifier

    try:
        certifier = WeightPerturbationCertifier(classifier, budget, **certifier_kwargs)
        certified = np.asarray(certifier.certify(x, labels), dtype=bool)
    except UnsupportedModelError as err:
        note = f"certified accuracy unavailable: {err}"
        if note not in notes:
            notes.append(note)
            logger.warning(note)
        return math.nan
    # A certificate covers the label's margins; count a sample only if it is also classified correctly.
    return float(np.mean(certified & (clean_pred == labels))) if len(labels) else math.nan
