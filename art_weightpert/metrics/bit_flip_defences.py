"""
Bit-flip attacks and defences measured against each other on one model (docs/bit_flips.md, docs/theory.md §8): how
many flips the bit-flip attack needs, how many of them :class:`.WeightIntegrityDetector` sees and what recovery gives
back, how a backdoor by flips fares with and without the detector, and what activation clipping buys against random
faults. The data of the report's "Bit-flip defences" lines and of ``benchmarks/bench_bit_flip_defences.py``.

Every function takes the classifier first and numpy data (ART's metric style) and leaves the classifier unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.backdoor import BitFlipBackdoor
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_float_bit_flips import RandomFloatBitFlips
from art_weightpert.defences.detector import WeightIntegrityDetector
from art_weightpert.defences.transformer import clip_activations
from art_weightpert.estimators.wrapping import effective_estimator
from art_weightpert.metrics.bit_flips import accuracy_after_each_flip, estimator_accuracy
from art_weightpert.validation import check_int, check_positive_int, check_probability


def flips_to_accuracy(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    x_attack: np.ndarray,
    y_attack: np.ndarray,
    level: float = 0.2,
    max_flips: int = 100,
    n_bits: int = 8,
    granularity: str = "tensor",
    layers: list[str] | None = None,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict[str, Any]:
    """
    The number of flips :class:`.BitFlipAttack` (run on ``(x_attack, y_attack)``) needs to bring the quantized
    model's accuracy on ``(x, y)`` to at most ``level``. The attack stops once its own batch is at ``level / 2``.

    :param classifier: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
    :param x: evaluation inputs; ``y``: their labels.
    :param x_attack: the attacker's batch; ``y_attack``: its labels.
    :param level: the accuracy to reach, in [0, 1].
    :param max_flips: most flips tried.
    :param n_bits: bits per weight code; ``granularity``, ``layers``: as :class:`.BitFlipAttack`.
    :return: ``{"flips": int or None (not reached), "max_flips", "level", "quantized_accuracy", "curve"}`` (the
        accuracy on ``(x, y)`` after 0, 1, ... flips).
    """
    classifier = effective_estimator(classifier, "classifier")  # W + Δ (docs/certification.md)
    check_probability(level, "level")
    check_positive_int(max_flips, "max_flips")
    attack = BitFlipAttack(
        classifier, max_flips, n_bits, granularity, layers, stop_accuracy=level / 2, batch_size=batch_size,
        verbose=verbose,
    )  # fmt: skip
    found = attack.generate(x_attack, y_attack)
    x_t, labels = classifier.prepare_inputs(x, y, require_labels=True)
    curve = accuracy_after_each_flip(classifier, attack.quantized_, found, x_t, labels, batch_size)
    reached = next((k for k, a in enumerate(curve) if a <= level), None)
    return {"flips": reached, "max_flips": int(max_flips), "level": float(level), "quantized_accuracy": curve[0],
            "curve": curve}  # fmt: skip


def integrity_evaluation(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    x_attack: np.ndarray,
    y_attack: np.ndarray,
    max_flips: int = 10,
    n_bits: int = 8,
    group_size: int = 64,
    seed: int = 0,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict[str, Any]:
    """
    :class:`.WeightIntegrityDetector` against :class:`.BitFlipAttack`: the detector records the clean quantized
    model, the attack flips ``max_flips`` bits (on ``(x_attack, y_attack)``), the detector checks the attacked model
    and :meth:`.WeightIntegrityDetector.recover` zeroes the flagged groups.

    :param classifier: the trusted model.
    :param x: evaluation inputs; ``y``: their labels.
    :param x_attack: the attacker's batch; ``y_attack``: its labels.
    :param max_flips: flips of the attack; ``n_bits``: bits per weight code.
    :param group_size: weights per checksum group; ``seed``: the detector's secret.
    :return: ``{"false_alarm": bool (groups flagged on the clean quantized model), "nb_flips", "detected_flips"
        (flips whose group is flagged), "detection_rate", "flagged_groups", "nb_groups", "quantized_accuracy",
        "attacked_accuracy", "recovered_accuracy"}`` (accuracies on ``(x, y)``).
    """
    classifier = effective_estimator(classifier, "classifier")  # W + Δ (docs/certification.md)
    detector = WeightIntegrityDetector(classifier, n_bits=n_bits, group_size=group_size, seed=seed)
    attack = BitFlipAttack(classifier, max_flips, n_bits, batch_size=batch_size, verbose=verbose)
    flips = attack.generate(x_attack, y_attack)
    attacked = attack.quantized_.flip(flips).apply(classifier)
    report = detector.detect(attacked)
    detected = _detected(detector, report["groups"], flips)
    return {
        "false_alarm": detector.detect(attack.quantized_)["tampered"],
        "nb_flips": len(flips),
        "detected_flips": detected,
        "detection_rate": detected / len(flips) if flips else float("nan"),
        "flagged_groups": len(report["groups"]),
        "nb_groups": int(report["nb_groups"]),
        "quantized_accuracy": estimator_accuracy(attack.quantized_.apply(classifier), x, y, batch_size),
        "attacked_accuracy": estimator_accuracy(attacked, x, y, batch_size),
        "recovered_accuracy": estimator_accuracy(detector.recover(attacked), x, y, batch_size),
    }


def backdoor_evaluation(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    x_attack: np.ndarray,
    y_attack: np.ndarray | None = None,
    target: int = 0,
    max_flips: int = 20,
    n_bits: int = 8,
    group_size: int = 64,
    seed: int = 0,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict[str, Any]:
    """
    :class:`.BitFlipBackdoor` (TBT) on the ``n_bits`` quantized model, learned on ``x_attack``, measured on
    ``(x, y)``, then checked by a :class:`.WeightIntegrityDetector` (recorded on the clean model) and recovered.

    :param classifier: the model.
    :param x: evaluation inputs; ``y``: their labels.
    :param x_attack: the attacker's inputs; ``y_attack``: their labels (``None``: the model's predictions).
    :param target: the backdoor's target class; ``max_flips``: its flip budget; ``n_bits``: bits per weight code.
    :param group_size: weights per checksum group; ``seed``: the detector's secret.
    :return: the keys of :meth:`.BackdoorResult.evaluate` (``attack_success_rate``, ``attack_success_rate_before``,
        ``clean_accuracy``, ``clean_accuracy_before``, ``nb_flips``) plus ``target``, ``detected_flips`` and, after
        :meth:`.WeightIntegrityDetector.recover`, ``recovered_attack_success_rate`` and ``recovered_clean_accuracy``.
    """
    classifier = effective_estimator(classifier, "classifier")  # W + Δ (docs/certification.md)
    check_int(target, "target", minimum=0, maximum=classifier.nb_classes - 1)
    detector = WeightIntegrityDetector(classifier, n_bits=n_bits, group_size=group_size, seed=seed)
    attack = BitFlipBackdoor(classifier, target, max_flips, n_bits, batch_size=batch_size, verbose=verbose)
    result = attack.generate(x_attack, y_attack)
    out: dict[str, Any] = {"target": int(target), **result.evaluate(x, y, batch_size=batch_size)}
    out["detected_flips"] = _detected(detector, detector.detect(result.estimator)["groups"], result.flips)
    recovered = detector.recover(result.estimator)
    x, labels = classifier.check_inputs(x), classifier.check_labels(y, len(x), required=True)
    others = labels != target
    triggered = result.trigger.apply(x[others])
    out["recovered_attack_success_rate"] = estimator_accuracy(
        recovered, triggered, np.full(len(triggered), target), batch_size
    )
    out["recovered_clean_accuracy"] = estimator_accuracy(recovered, x, labels, batch_size)
    return out


def clipping_evaluation(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    x_calibration: np.ndarray,
    nb_flips: Iterable[int] = (1, 5, 20),
    n_bits: int = 8,
    nb_samples: int = 20,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """
    Random bit faults with and without Ranger-style activation clipping (:func:`.clip_activations`, bounds profiled
    on ``x_calibration``), in both encodings: :class:`.RandomFloatBitFlips` on the float weights (any IEEE bit: an
    exponent flip can blow a weight up, and clipping bounds what it does to the next layer) and
    :class:`.RandomBitFlips` on the ``n_bits`` quantized codes (a flipped code stays inside the quantization range).

    :param classifier: the model (its ReLUs are clipped in a copy).
    :param x: evaluation inputs; ``y``: their labels.
    :param x_calibration: the clean inputs that set the clipping bounds (e.g. training data).
    :param nb_flips: the numbers of random flips; ``n_bits``: bits per weight code.
    :param nb_samples: random draws per number of flips; ``seed``: their seed (the same draws for both models).
    :return: ``{"nb_flips": [...], "n_bits", "float": {...}, "quantized": {...}}``, each encoding with ``plain_mean``,
        ``plain_std``, ``clipped_mean``, ``clipped_std`` (per number of flips) and ``plain_clean``,
        ``clipped_clean`` (accuracy without a flip).
    """
    classifier = effective_estimator(classifier, "classifier")  # W + Δ (docs/certification.md)
    counts = sorted({check_int(k, "nb_flips", minimum=1) for k in nb_flips})
    clipped = clip_activations(classifier, x_calibration, batch_size=batch_size)
    options = {"nb_samples": nb_samples, "seed": seed, "batch_size": batch_size, "verbose": False}
    encodings = {
        "float": lambda model, k: RandomFloatBitFlips(model, nb_flips=k, **options),
        "quantized": lambda model, k: RandomBitFlips(model, nb_flips=k, n_bits=n_bits, **options),
    }
    out: dict[str, Any] = {"nb_flips": counts, "n_bits": int(n_bits)}
    for encoding, attack in encodings.items():
        rows: dict[str, Any] = {}
        for name, model in (("plain", classifier), ("clipped", clipped)):
            stats = [attack(model, k).evaluate(x, y, per_bit=False) for k in counts]
            rows[f"{name}_clean"] = stats[0]["quantized" if encoding == "quantized" else "clean"]
            rows[f"{name}_mean"] = [s["mean"] for s in stats]
            rows[f"{name}_std"] = [s["std"] for s in stats]
        out[encoding] = rows
    return out


def _detected(detector: WeightIntegrityDetector, groups: list, flips: list) -> int:
    """How many of ``flips`` lie in one of the flagged ``groups``."""
    flagged = set(groups)
    return int(sum((f.param_name, detector.group_of(f.param_name, f.index)) in flagged for f in flips))
