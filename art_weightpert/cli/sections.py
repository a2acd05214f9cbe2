"""
The optional sections of a report, each computed by one public function of the library:

* "Bit flips" (``--bit-flips N``): :func:`.bit_flip_curve` — the quantized model's accuracy against the number of
  flipped bits, for the bit-flip attack (BFA), for random flips and certified by :class:`.BitFlipCertifier`
  (``"linear"``, on at most ``CERTIFY_POINTS`` test points), the flips BFA chose, the per-bit sensitivity and the
  distribution of the certified flips; with ``threats``, also the float model's IEEE bits
  (:func:`.float_bit_flip_curve`), a backdoor by flips (:func:`.backdoor_evaluation`) and what the post-hoc defences
  buy: the weight-integrity detector against BFA (:func:`.integrity_evaluation`) and activation clipping against
  random faults (:func:`.clipping_evaluation`);
* "Generalization measures" (``--measures``): :func:`.weight_sharpness` (worst and average case, adaptive),
  :func:`.pac_bayes_bound` (σ by :func:`.pac_bayes_sigma`, isotropic and magnitude-aware) and, when the data has a
  training split, :func:`.generalization_gap` (test minus training error and loss).

The numbers derived from their results (``flips_to_halve``, the numbers of flips) come from
:mod:`art_weightpert.metrics.summaries` too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from art_weightpert.cli.parser import one_line
from art_weightpert.metrics import bit_flip_curve, pac_bayes_bound, weight_sharpness
from art_weightpert.metrics.bit_flip_defences import backdoor_evaluation, clipping_evaluation, integrity_evaluation
from art_weightpert.metrics.bit_flips import float_bit_flip_curve
from art_weightpert.metrics.summaries import flip_counts, flips_to_halve, generalization_gap
from art_weightpert.network import UnsupportedModelError

ATTACK_BATCH = 128
"""Training points (else test points) the bit-flip attack sees."""
CERTIFY_POINTS = 200
"""Test points the bit-flip certificate sees (the first ones; it costs more than a forward pass)."""
QUICK_CERTIFY_POINTS = 50
"""Test points the bit-flip certificate sees in ``demo --quick`` (its cost grows with the points and the flips)."""
FLOAT_FLIPS = (1, 2, 5)
"""Flipped IEEE bits of the float model's curve (one exponent flip usually breaks a float model)."""
BACKDOOR_FLIPS = 20
"""Flip budget of the backdoor row."""
BACKDOOR_POINTS = 512
"""Training points (else test points) the backdoor learns its trigger and flips on."""
INTEGRITY_FLIPS = 10
"""Flips of the BFA run the weight-integrity detector is measured against."""
CLIPPING_FLIPS = (1, 5, 20)
"""Random flips of the activation-clipping comparison."""


@dataclass(frozen=True)
class BitFlipSettings:
    """``--bit-flips``, ``--n-bits``, ``--granularity``, the random draws per number of flips, and the method and
    number of test points of the certified curve (``certify_method=None``: no certificate)."""

    max_flips: int
    n_bits: int = 8
    granularity: str = "tensor"
    nb_samples: int = 10
    certify_method: str | None = "linear"
    certify_points: int = CERTIFY_POINTS
    threats: bool = True
    backdoor_target: int = 0

    def counts(self) -> list[int]:
        """The numbers of flips of the curve (:func:`.flip_counts`): 1, 2, 5, 10, 20, 50, ... up to and including
        ``max_flips``."""
        return flip_counts(self.max_flips)


@dataclass(frozen=True)
class MeasureSettings:
    """The radii of the sharpness measures (adaptive ℓ∞ ball for the worst case, relative Gaussian noise for the
    average case; the values of ``examples/generalization_measures.py``), WeightPGD steps and Monte Carlo draws."""

    rho_worst: float = 0.05
    rho_average: float = 0.2
    pgd_steps: int = 10
    nb_draws: int = 10
    target_deviation: float = 0.1


def bit_flip_section(
    classifier: Any,
    x: np.ndarray,
    y: np.ndarray,
    attack_data: tuple[np.ndarray, np.ndarray],
    settings: BitFlipSettings,
    seed: int = 0,
    batch_size: int = 128,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """
    The "Bit flips" entry of a model: :func:`.bit_flip_curve` on the test data ``(x, y)`` with the attack batch
    ``attack_data``, plus ``flips_to_halve`` (BFA flips until the attack batch's accuracy is at most half the
    quantized model's test accuracy; ``None``: not within ``max_flips``) and ``attack_points`` (the attack batch's
    size). When the certificate does not support the model, the entry has the attack and random curves and
    ``certified_unavailable`` (the reason). ``dtype``: the certificate's precision (``None``: its default).

    :return: the JSON-able dict, or ``{"unavailable": reason}`` when the model has no quantizable weights.
    """
    x_attack, y_attack = (a[:ATTACK_BATCH] for a in attack_data)
    options = {
        "flips": settings.counts(), "x_attack": x_attack, "y_attack": y_attack, "n_bits": settings.n_bits,
        "granularity": settings.granularity, "nb_samples": settings.nb_samples, "seed": seed, "batch_size": batch_size,
    }  # fmt: skip
    certify = {"method": settings.certify_method, "certify_points": settings.certify_points, "dtype": dtype}
    uncertified = None
    try:
        try:
            curve = bit_flip_curve(classifier, x, y, **options, **certify)
        except UnsupportedModelError as err:  # raised before the attack runs: retry without the certificate
            if settings.certify_method is None:
                raise
            uncertified = one_line(err)
            curve = bit_flip_curve(classifier, x, y, **options)
    except (UnsupportedModelError, NotImplementedError, TypeError, ValueError) as err:
        return {"unavailable": one_line(err)}
    if uncertified is not None:
        curve["certified_unavailable"] = uncertified
    curve["flips_to_halve"] = flips_to_halve(curve["bfa_attack_accuracy"], curve["quantized_accuracy"])
    curve["attack_points"] = len(x_attack)
    if settings.threats:
        curve.update(bit_flip_threats(classifier, x, y, attack_data, settings, seed, batch_size))
    return curve


def bit_flip_threats(
    classifier: Any,
    x: np.ndarray,
    y: np.ndarray,
    attack_data: tuple[np.ndarray, np.ndarray],
    settings: BitFlipSettings,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """
    The threat and defence rows of the "Bit flips" entry, each ``{"unavailable": reason}`` when the library refuses
    the model: ``float`` (:func:`.float_bit_flip_curve`), ``backdoor`` (:func:`.backdoor_evaluation`, target
    ``settings.backdoor_target``, trigger and flips learned on up to ``BACKDOOR_POINTS`` points of ``attack_data``),
    ``integrity`` (:func:`.integrity_evaluation`) and ``clipping`` (:func:`.clipping_evaluation`, bounds profiled on
    ``attack_data``).
    """
    x_attack, y_attack = (a[:ATTACK_BATCH] for a in attack_data)
    x_backdoor, y_backdoor = (a[:BACKDOOR_POINTS] for a in attack_data)
    quantized = {"n_bits": settings.n_bits, "batch_size": batch_size}
    rows = {
        "float": lambda: float_bit_flip_curve(
            classifier, x, y, FLOAT_FLIPS, x_attack, y_attack, nb_samples=settings.nb_samples, seed=seed,
            batch_size=batch_size,
        ),
        "backdoor": lambda: backdoor_evaluation(
            classifier, x, y, x_backdoor, y_backdoor, settings.backdoor_target, BACKDOOR_FLIPS, seed=seed, **quantized
        ),
        "integrity": lambda: integrity_evaluation(
            classifier, x, y, x_attack, y_attack, INTEGRITY_FLIPS, seed=seed, **quantized
        ),
        "clipping": lambda: clipping_evaluation(
            classifier, x, y, attack_data[0], CLIPPING_FLIPS, nb_samples=settings.nb_samples, seed=seed, **quantized
        ),
    }  # fmt: skip
    out = {}
    for key, compute in rows.items():
        try:
            out[key] = compute()
        except (UnsupportedModelError, NotImplementedError, TypeError, ValueError) as err:
            out[key] = {"unavailable": one_line(err)}
    return out


def measures_section(
    classifier: Any,
    data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray],
    on_training_data: bool,
    settings: MeasureSettings = MeasureSettings(),
    seed: int = 0,
    batch_size: int = 128,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """
    The "Generalization measures" entry of a model, computed on ``data`` (the training set when
    ``on_training_data``, as the measures are defined; else the test data): worst- and average-case adaptive
    sharpness, PAC-Bayes σ and bound (isotropic and magnitude-aware, prior centred at 0), and the generalization gap
    (test − training error and cross-entropy) when ``on_training_data``.

    :return: ``{"on": "training"|"test", "n_samples", "sharpness_worst", "sharpness_average", "pac_bayes",
        "pac_bayes_magnitude_aware", "gap"}`` (the dicts of the library), or ``{"unavailable": reason}``.
    """
    x, y = data
    s = settings
    common = {"batch_size": batch_size, "seed": seed}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("sharpness_worst", lambda: weight_sharpness(classifier, x, y, s.rho_worst, kind="worst", max_iter=s.pgd_steps,
                                                     **common)),
        ("sharpness_average", lambda: weight_sharpness(classifier, x, y, s.rho_average, kind="average",
                                                       nb_samples=s.nb_draws, **common)),
        ("pac_bayes", lambda: pac_bayes_bound(classifier, x, y, target_deviation=s.target_deviation,
                                              nb_samples=s.nb_draws, **common)),
        ("pac_bayes_magnitude_aware", lambda: pac_bayes_bound(classifier, x, y, magnitude_aware=True,
                                                              target_deviation=s.target_deviation,
                                                              nb_samples=s.nb_draws, **common)),
    ]  # fmt: skip
    entry: dict[str, Any] = {"on": "training" if on_training_data else "test", "n_samples": int(len(x))}
    entry["settings"] = {"rho_worst": s.rho_worst, "rho_average": s.rho_average, "pgd_steps": s.pgd_steps,
                         "nb_draws": s.nb_draws, "target_deviation": s.target_deviation}  # fmt: skip
    for key, compute in steps:
        try:
            entry[key] = compute()
        except (UnsupportedModelError, NotImplementedError, ValueError) as err:
            entry[key] = {"unavailable": one_line(err)}
        if progress is not None:
            progress(key)
    entry["gap"] = generalization_gap(classifier, data, test_data, batch_size) if on_training_data else None
    return entry
