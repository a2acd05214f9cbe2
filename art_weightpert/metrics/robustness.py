"""
Robustness curves under weight perturbation: accuracy against the radius ε of a weight ball, for the clean model,
random faults (:class:`.RandomWeightPerturbation`), the universal weight attack (:class:`.WeightPGD`) and the
certificates (:class:`.WeightPerturbationCertifier`, one or several bound methods), in the style of Foolbox's
robustness sweeps. :func:`.plot_robustness_curve` (``metrics/plots.py``) draws them.

For every ε: certified ≤ true robust accuracy ≤ PGD accuracy ≤ mean random accuracy ≤ 1 (up to the attack's
strength), and clean accuracy is the ε = 0 value of all of them.

In a ``torch.distributed`` process group the samples are sharded by whole batches: the predictions here, the random
faults, the attack's gradients and the certificates are computed by batch on the ranks and gathered or summed, so every
rank returns the single-process curve (the PGD points up to the order of floating-point sums).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert import distributed
from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification import METHODS as BOUND_METHODS
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import as_weight_classifier
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)

METHODS = ("clean", "random", "pgd", "certified")
"""The default methods; any bound method name of :data:`art_weightpert.certification.METHODS` is accepted too, and
``"verified"`` (:class:`.WeightPerturbationVerifier`: certified, falsified and unknown shares)."""

VERIFIED = "verified"


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
    method: str = "linear",
    pgd_params: Mapping[str, Any] | None = None,
    random_params: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    verbose: bool = False,
    seed: int | None = None,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
    verify_params: Mapping[str, Any] | None = None,
    **deprecated: Any,
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
        :class:`.WeightPGD`), ``"certified"`` (share of samples certified correct by ``method``) and the
        bound method names of :data:`art_weightpert.certification.METHODS` (certified accuracy by that method; several
        at once), and ``"verified"``: the share certified by :class:`.WeightPerturbationVerifier` (bounds, branch and
        bound, attack; docs/theory.md §11), with its falsified and unknown shares beside it. At a zero radius, random
        faults and WeightPGD are not run: they give the clean accuracy.
    :param layers: perturbed layers for ε values (``None``: all); ``relative``, ``include_bias``: as in the budget.
    :param method: the bound method of ``"certified"`` (default ``"linear"``, the tightest; formerly
        ``certify_method``, still accepted with a ``DeprecationWarning``).
    :param pgd_params: keyword arguments of :class:`.WeightPGD` (default: its own).
    :param random_params: keyword arguments of :class:`.RandomWeightPerturbation` (default ``nb_samples=10`` and
        ``seed``, or 0 when ``seed`` is ``None``).
    :param batch_size: samples per forward pass; ``verbose``: progress bars of the attacks and the certifier.
    :param seed: when given, torch's generator is seeded with it before each WeightPGD run, so the results do not
        depend on the order of the work.
    :param progress: called with a short description after each (budget, method) unit of work.
    :param dtype: the precision of the certificates (``torch.float32`` with the rounding terms of docs/theory.md §5,
        or ``torch.float64``; ``None``: the certifier's default).
    :param verify_params: keyword arguments of :class:`.WeightPerturbationVerifier` for ``"verified"`` (default: its
        own, with the curve's ``batch_size`` and ``verbose``).
    :return: ``{"eps": [float], "budgets": [budget.to_dict()], "methods": [str], "accuracies": {method: [float]},
        "clean_accuracy": float, "random_std", "random_min", "random_max": [float] and "random_quantiles":
        [{q: float}] (with "random"), "norm", "certify_method", "nb_samples": int, "unavailable": {method: reason},
        "seconds": {method: float}, "notes": [str]}`` and with ``"verified"``: "verified_falsified",
        "verified_unknown" (shares per ε; ``1 − falsified`` bounds the robust accuracy from above) and
        "verified_seconds_per_sample". A certificate that cannot handle the model gives NaN, a note and its reason
        under "unavailable".
    """
    method = renamed_keyword(deprecated, "certify_method", "method", method, "linear", "weight_robustness_curve")
    reject_unknown_keywords(deprecated, "weight_robustness_curve")
    classifier = as_weight_classifier(classifier, "classifier")
    methods = _check_methods(methods, method)
    budgets = _budgets(budgets_or_eps_list, norm, layers, relative, include_bias)
    run = _Runner(classifier, x, y, budgets, methods, method, batch_size, verbose, seed, dtype)
    run.set_params(pgd_params, random_params, verify_params)
    for budget in budgets:
        for method in methods:
            run.measure(method, budget)
            if progress is not None:
                progress(f"{method} ε={_axis_value(budget):g}")
        logger.info(
            "weight_robustness_curve: %s -> %s", budget, {m: v[-1] for m, v in run.result["accuracies"].items()}
        )
    return run.result


class _Runner:
    """One accuracy per (method, budget), by the public attacks and certifier; fills the curve's side results."""

    def __init__(self, classifier, x, y, budgets, methods, certify_method, batch_size, verbose, seed, dtype) -> None:
        self.classifier, self.x, self.batch_size, self.verbose, self.seed = classifier, x, batch_size, verbose, seed
        self.dtype = dtype
        _, labels_t = classifier.prepare_inputs(x, y)  # validates x and y
        distributed.check_same_data(np.asarray(x), None if y is None else np.asarray(y), name="x")
        self.clean_pred = _predicted_labels(classifier, x, batch_size)
        self.labels = self.clean_pred if labels_t is None else labels_t.cpu().numpy()
        self.result: dict[str, Any] = {
            "eps": [_axis_value(b) for b in budgets],
            "budgets": [b.to_dict() for b in budgets],
            "methods": methods,
            "accuracies": {m: [] for m in methods},
            "clean_accuracy": float(np.mean(self.clean_pred == self.labels)) if len(self.labels) else math.nan,
            "norm": budgets[0].norm if len({b.norm for b in budgets}) == 1 else "mixed",
            "certify_method": certify_method,
            "nb_samples": len(self.labels),
            "unavailable": {},
            "seconds": dict.fromkeys(methods, 0.0),
            "notes": [],
        }
        if "random" in methods:
            self.result.update(random_std=[], random_min=[], random_max=[], random_quantiles=[])
        if VERIFIED in methods:
            self.result.update(verified_falsified=[], verified_unknown=[], verified_seconds_per_sample=[])

    def set_params(
        self,
        pgd_params: Mapping[str, Any] | None,
        random_params: Mapping[str, Any] | None,
        verify_params: Mapping[str, Any] | None = None,
    ) -> None:
        """The keyword arguments of the attacks and the verifier: the curve's ``batch_size``, ``verbose`` and
        ``seed``, then the user's."""
        self.verify_kwargs = {"verbose": self.verbose, "dtype": self.dtype, **dict(verify_params or {})}
        self.pgd_kwargs = {"batch_size": self.batch_size, "verbose": self.verbose, **dict(pgd_params or {})}
        seed = 0 if self.seed is None else self.seed
        self.random_kwargs = {"nb_samples": 10, "seed": seed, "batch_size": self.batch_size, "verbose": self.verbose}
        self.random_kwargs.update(dict(random_params or {}))

    def measure(self, method: str, budget: PerturbationBudget) -> None:
        """Append the accuracy of ``method`` at ``budget`` to the curve, and its time."""
        start = time.perf_counter()
        self.result["accuracies"][method].append(float(self(method, budget)))
        self.result["seconds"][method] += time.perf_counter() - start

    def __call__(self, method: str, budget: PerturbationBudget) -> float:
        if method == "clean":
            return self.result["clean_accuracy"]
        if method == "random":
            return self.random(budget)
        if method == "pgd":
            return self.result["clean_accuracy"] if _zero_radius(budget) else self.pgd(budget)
        if method == VERIFIED:
            return self.verified(budget)
        bound = self.result["certify_method"] if method == "certified" else method
        return self.certified(method, bound, budget)

    def random(self, budget: PerturbationBudget) -> float:
        from art_weightpert.attacks import RandomWeightPerturbation
        from art_weightpert.attacks.base import QUANTILES

        clean = self.result["clean_accuracy"]
        if _zero_radius(budget):
            stats = {
                "mean": clean,
                "std": 0.0,
                "min": clean,
                "max": clean,
                "quantiles": dict.fromkeys(QUANTILES, clean),
            }
        else:
            stats = RandomWeightPerturbation(self.classifier, budget, **self.random_kwargs).evaluate(
                self.x, self.labels
            )
        for key in ("std", "min", "max", "quantiles"):
            self.result[f"random_{key}"].append(stats[key])
        return stats["mean"]

    def pgd(self, budget: PerturbationBudget) -> float:
        from art_weightpert.attacks import WeightPGD

        if self.seed is not None:
            torch.manual_seed(self.seed)
        attacked = WeightPGD(self.classifier, budget, **self.pgd_kwargs).generate_estimator(self.x, self.labels)
        predictions = _predicted_labels(attacked, self.x, self.batch_size)  # W + Δ + δ: the carried Δ kept
        return float(np.mean(predictions == self.labels)) if len(self.labels) else math.nan

    def verified(self, budget: PerturbationBudget) -> float:
        from art_weightpert.metrics.verification import weight_verified_accuracy

        if VERIFIED in self.result["unavailable"]:
            shares = {"certified": math.nan, "falsified": math.nan, "unknown": math.nan, "seconds_per_sample": math.nan}
        else:
            try:
                shares = weight_verified_accuracy(self.classifier, self.x, self.labels, budget, **self.verify_kwargs)
            except (UnsupportedModelError, NotImplementedError) as err:
                self.result["unavailable"][VERIFIED] = str(err)
                self.result["notes"].append(f"verified accuracy unavailable: {err}")
                logger.warning("verified accuracy unavailable: %s", err)
                return self.verified(budget)
        self.result["verified_falsified"].append(shares["falsified"])
        self.result["verified_unknown"].append(shares["unknown"])
        self.result["verified_seconds_per_sample"].append(shares["seconds_per_sample"])
        return shares["certified"]

    def certified(self, method: str, bound: str, budget: PerturbationBudget) -> float:
        if method in self.result["unavailable"]:
            return math.nan
        try:
            kwargs = {"method": bound, "batch_size": self.batch_size, "verbose": self.verbose, "dtype": self.dtype}
            certifier = WeightPerturbationCertifier(self.classifier, budget, **kwargs)
            certified = np.asarray(certifier.certify(self.x, self.labels), dtype=bool)
        except (UnsupportedModelError, NotImplementedError) as err:
            self.result["unavailable"][method] = str(err)
            note = f"certified accuracy by {bound!r} unavailable: {err}"
            self.result["notes"].append(note)
            logger.warning(note)
            return math.nan
        # A certificate covers the label's margins; count a sample only if it is also classified correctly.
        return float(np.mean(certified & (self.clean_pred == self.labels))) if len(self.labels) else math.nan


# ---------------------------------------------------------------------------------------------- helpers
def _predicted_labels(classifier: PyTorchWeightClassifier, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The classifier's labels for ``x``; in a process group each rank predicts its batches and all gather them."""
    return distributed.map_batches(
        lambda index: classifier.predict(x[index], batch_size=batch_size).argmax(axis=1), len(x), batch_size
    ).astype(np.int64)


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


def _zero_radius(budget: PerturbationBudget) -> bool:
    """True for a ball of radius 0 (every perturbation in it is zero)."""
    values = budget.eps.values() if isinstance(budget.eps, dict) else [budget.eps]
    return all(v == 0 for v in values)


def _check_methods(methods: Sequence[str] | str, certify_method: str) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    allowed = list(METHODS) + [m for m in BOUND_METHODS if m not in METHODS] + [VERIFIED]
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise ValueError(f"`methods` must be a non-empty subset of {allowed}, got {methods}.")
    if "certified" in methods and certify_method not in BOUND_METHODS:
        raise ValueError(f"`method` must be one of {list(BOUND_METHODS)}, got {certify_method!r}.")
    return methods
