"""
Accuracy of a quantized classifier against the number of flipped bits: the bit-flip attack next to random flips and,
optionally, the certified accuracy of :class:`.BitFlipCertifier` (the data of the report's "Bit flips" section); and
the same for the IEEE bits of a float model's weights (:func:`float_bit_flip_curve`, docs/theory.md §8.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.base import accuracy_with_deltas
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.float_bit_flip import FloatBitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.attacks.random_float_bit_flips import RandomFloatBitFlips
from art_weightpert.certification.bit_flip import BIT_FLIP_METHODS, BitFlipCertifier
from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.estimators.wrapping import as_weight_classifier, effective_estimator
from art_weightpert.float_bits import FloatWeights, mantissa_bits, sign_bit
from art_weightpert.quantization import QuantizedWeights
from art_weightpert.validation import check_choice, check_int, check_positive_int


def bit_flip_curve(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    flips: Iterable[int] = (1, 2, 5, 10, 20),
    x_attack: np.ndarray | None = None,
    y_attack: np.ndarray | None = None,
    n_bits: int = 8,
    granularity: str = "tensor",
    layers: list[str] | None = None,
    nb_samples: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    verbose: bool = False,
    method: str | None = None,
    certify_points: int = 200,
    dtype: torch.dtype | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """
    Accuracy on ``(x, y)`` of the ``n_bits`` quantized classifier after ``k`` flipped bits, for each ``k`` in
    ``flips``: the :class:`.BitFlipAttack` (run once on the attack batch for ``max(flips)`` flips; its first ``k``
    flips) and :class:`.RandomBitFlips` (``nb_samples`` draws of ``k`` distinct bits). With a bound ``method``, also
    the share of the first ``certify_points`` points whose quantized prediction is correct and provably survives every
    set of at most ``k`` flipped bits (:meth:`.BitFlipCertifier.certified_flips`, computed once for ``max(flips)``).

    :param classifier: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
    :param x: evaluation inputs; ``y``: their integer or one-hot labels.
    :param flips: the numbers of flipped bits (positive).
    :param x_attack: the attack batch and ``y_attack`` its labels (``None``: the first 128 of ``x`` and ``y``).
    :param n_bits: bits per quantized weight; ``granularity``: ``"tensor"`` or ``"channel"``; ``layers``: the
        quantized layers (``None``: every Linear/Conv layer).
    :param nb_samples: random draws per number of flips; ``seed``: their seed; ``batch_size``: samples per forward
        pass; ``verbose``: progress bars.
    :param method: the bound method of the certified curve, ``"linear"`` or ``"interval"`` (``None``: no certified
        curve; formerly ``certify_method``, still accepted with a ``DeprecationWarning``).
    :param certify_points: the certified points, the first of ``(x, y)`` (the certificate costs more than a forward).
    :param dtype: the precision of the certificate, ``torch.float32`` (with the rounding-error terms of
        docs/theory.md §5) or ``torch.float64`` (``None``: :class:`.BitFlipCertifier`'s default).
    :raises UnsupportedModelError: with a ``method``, when the certificate does not support the model (raised
        before the attack runs).
    :return: a JSON-able dict: ``n_bits``, ``granularity``, ``layers``, ``clean_accuracy``, ``quantized_accuracy``,
        ``flips`` and per entry ``bfa_accuracy`` / ``random_mean`` / ``random_std``; ``bfa_flips`` (``layer``,
        ``param``, ``index``, ``bit``, ``old_code``, ``new_code``, ``old_value``, ``new_value``),
        ``bfa_attack_accuracy`` and ``bit_sensitivity`` (``{bit: accuracy}``, max(flips) flips at that bit); with
        a ``method`` also ``certify_method`` (its name), ``certified_points``, ``certified_accuracy`` (per entry of
        ``flips``) and ``certified_flips_histogram`` (``{k: number of points}`` for k = −1 (misclassified by the
        quantized model), 0, 1, ..., max(flips); it sums to ``certified_points``).
    """
    method = renamed_keyword(deprecated, "certify_method", "method", method, None, "bit_flip_curve")
    reject_unknown_keywords(deprecated, "bit_flip_curve")
    classifier = as_weight_classifier(classifier, "classifier")
    counts = sorted({check_int(k, "flips", minimum=1) for k in flips})
    if not counts:
        raise ValueError("`flips` must hold at least one number of flips.")
    quantization = (n_bits, granularity, layers)
    certifier = _certifier(classifier, max(counts), quantization, method, certify_points, batch_size, verbose, dtype)
    if x_attack is None:
        x_attack, y_attack = x[:128], y[:128]
    attack = BitFlipAttack(classifier, max(counts), n_bits, granularity, layers, batch_size=batch_size, verbose=verbose)
    found = attack.generate(x_attack, y_attack)
    quantized: QuantizedWeights = attack.quantized_
    target = effective_estimator(classifier)  # the weights the classifier predicts with, W + Δ (docs/certification.md)
    x_t, labels = target.prepare_inputs(x, y, require_labels=True)
    curve = accuracy_after_each_flip(target, quantized, found, x_t, labels, batch_size)
    options = {"n_bits": n_bits, "granularity": granularity, "layers": layers, "batch_size": batch_size}
    options.update(nb_samples=nb_samples, seed=seed, verbose=verbose)
    random_stats = [RandomBitFlips(classifier, k, **options).evaluate(x, y, per_bit=k == counts[-1]) for k in counts]
    result = {
        "n_bits": int(n_bits),
        "granularity": granularity,
        "layers": None if layers is None else list(layers),
        "clean_accuracy": accuracy_with_deltas(target, x_t, labels, None, batch_size),
        "quantized_accuracy": curve[0],
        "flips": counts,
        "bfa_accuracy": [curve[min(k, len(found))] for k in counts],
        "random_mean": [r["mean"] for r in random_stats],
        "random_std": [r["std"] for r in random_stats],
        "bfa_flips": _describe(quantized, found),
        "bfa_attack_accuracy": [h["accuracy"] for h in attack.history_],
        "bit_sensitivity": {int(b): v["mean"] for b, v in random_stats[-1]["per_bit"].items()},
    }
    if certifier is not None:
        result.update(_certified_curve(certifier, x[:certify_points], y[:certify_points], counts))
    return result


def _certifier(
    classifier,
    max_flips: int,
    quantization: tuple,
    method: str | None,
    points: int,
    batch_size: int,
    verbose: bool,
    dtype: torch.dtype | None = None,
) -> BitFlipCertifier | None:
    """The certifier of the certified curve (``None`` without ``method``); it checks the model before the attack."""
    if method is None:
        return None
    check_choice(method, "method", BIT_FLIP_METHODS)
    check_positive_int(points, "certify_points")
    precision = {} if dtype is None else {"dtype": dtype}
    return BitFlipCertifier(classifier, max_flips, *quantization, method, batch_size, verbose, **precision)


def _certified_curve(certifier: BitFlipCertifier, x: np.ndarray, y: np.ndarray, counts: list[int]) -> dict[str, Any]:
    """Certified accuracy at each ``k`` of ``counts`` and the histogram of the certified flips, from one
    :meth:`.BitFlipCertifier.certified_flips` call (a point certified for ``k`` flips is certified for fewer)."""
    flips = certifier.certified_flips(x, y)
    return {
        "certify_method": certifier.method,
        "certified_points": len(flips),
        "certified_accuracy": [float(np.mean(flips >= k)) if len(flips) else 0.0 for k in counts],
        "certified_flips_histogram": {k: int(np.sum(flips == k)) for k in range(-1, certifier.max_flips + 1)},
    }


def accuracy_after_each_flip(
    classifier, quantized: QuantizedWeights, found: list, x_t, labels, batch_size: int
) -> list[float]:
    """Accuracy on preprocessed ``(x_t, labels)`` after the first k flips of ``found``, k = 0 .. len(found)."""
    curve = [accuracy_with_deltas(classifier, x_t, labels, quantized.deltas(classifier), batch_size)]
    for flip in found:
        quantized = quantized.flip([flip])
        curve.append(accuracy_with_deltas(classifier, x_t, labels, quantized.deltas(classifier), batch_size))
    return curve


def _describe(quantized: QuantizedWeights, found: list) -> list[dict[str, Any]]:
    """Each flip with its layer, old and new code and weight value (flips applied in order)."""
    out = []
    state = quantized
    for flip in found:
        after = state.flip([flip])
        old, new = int(state.codes[flip.param_name][flip.index]), int(after.codes[flip.param_name][flip.index])
        layer = flip.param_name.rsplit(".", 1)[0] if "." in flip.param_name else ""
        out.append(
            {
                "layer": layer,
                "param": flip.param_name,
                "index": list(flip.index),
                "bit": flip.bit,
                "old_code": old,
                "new_code": new,
                "old_value": float(state.value(flip.param_name)[flip.index]),
                "new_value": float(after.value(flip.param_name)[flip.index]),
            }
        )
        state = after
    return out


def float_bit_flip_curve(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    flips: Iterable[int] = (1, 2, 5, 10),
    x_attack: np.ndarray | None = None,
    y_attack: np.ndarray | None = None,
    layers: list[str] | None = None,
    nb_samples: int = 20,
    seed: int = 0,
    batch_size: int = 128,
    verbose: bool = False,
) -> dict[str, Any]:
    """
    Accuracy on ``(x, y)`` of the float model after ``k`` flipped IEEE bits of its weights, for each ``k`` in
    ``flips``: :class:`.FloatBitFlipAttack` over every bit, the same attack with the exponent protected (sign and
    mantissa bits only: what is left when ECC or a range check guards the exponent), and :class:`.RandomFloatBitFlips`
    (``nb_samples`` draws of ``k`` distinct bits anywhere). Each attack runs once on the attack batch for
    ``max(flips)`` flips; the curve takes its first ``k``.

    :param classifier: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` with float weights.
    :param x: evaluation inputs; ``y``: their integer or one-hot labels.
    :param flips: the numbers of flipped bits (positive).
    :param x_attack: the attack batch and ``y_attack`` its labels (``None``: the first 128 of ``x`` and ``y``).
    :param layers: the Linear/Conv layers whose weights may flip (``None``: all).
    :param nb_samples: random draws per number of flips; ``seed``: their seed; ``batch_size``: samples per forward
        pass; ``verbose``: progress bars.
    :return: a JSON-able dict: ``dtype``, ``clean_accuracy``, ``flips`` and per entry ``attack_accuracy``,
        ``protected_attack_accuracy``, ``random_mean``, ``random_std``; ``attack_flips`` (``param``, ``index``,
        ``bit``, ``old_value``, ``new_value`` of the unrestricted attack's flips, in order).
    """
    classifier = effective_estimator(classifier, "classifier")  # W + Δ (docs/certification.md)
    counts = sorted({check_int(k, "flips", minimum=1) for k in flips})
    if not counts:
        raise ValueError("`flips` must hold at least one number of flips.")
    if x_attack is None:
        x_attack, y_attack = x[:128], y[:128]
    weights = FloatWeights.from_estimator(classifier, layers)
    protected = [sign_bit(weights.dtype), *mantissa_bits(weights.dtype)]
    curves, chosen = {}, {}
    for key, bits in (("attack_accuracy", None), ("protected_attack_accuracy", protected)):
        attack = FloatBitFlipAttack(classifier, max(counts), bits, layers, batch_size=batch_size, verbose=verbose)
        chosen[key] = attack.generate(x_attack, y_attack)
        curves[key] = [_float_accuracy(classifier, attack.weights_, chosen[key][:k], x, y, batch_size) for k in counts]
    options = {"layers": layers, "nb_samples": nb_samples, "seed": seed, "batch_size": batch_size, "verbose": verbose}
    random_stats = [RandomFloatBitFlips(classifier, k, **options).evaluate(x, y, per_bit=False) for k in counts]
    return {
        "dtype": str(weights.dtype).replace("torch.", ""),
        "clean_accuracy": _float_accuracy(classifier, weights, [], x, y, batch_size),
        "flips": counts,
        **curves,
        "random_mean": [r["mean"] for r in random_stats],
        "random_std": [r["std"] for r in random_stats],
        "attack_flips": _describe_float(weights, chosen["attack_accuracy"]),
    }


def _float_accuracy(classifier, weights: FloatWeights, chosen: list, x: np.ndarray, y: np.ndarray, batch_size: int):
    """Accuracy on ``(x, y)`` with ``chosen`` flipped (the values exactly, through :meth:`.FloatWeights.apply`)."""
    flipped = weights.flip(chosen).apply(classifier) if chosen else classifier
    return estimator_accuracy(flipped, x, y, batch_size)


def estimator_accuracy(estimator, x: np.ndarray, y: np.ndarray, batch_size: int = 128) -> float:
    """Accuracy on ``(x, y)`` of ``estimator`` as it predicts (with any perturbation it carries); nan for no input."""
    if len(x) == 0:
        return float("nan")
    labels = estimator.check_labels(y, len(x), required=True)
    return float(np.mean(estimator.predict(x, batch_size=batch_size).argmax(axis=1) == labels))


def _describe_float(weights: FloatWeights, found: list) -> list[dict[str, Any]]:
    """Each flip with its old and new weight value (flips applied in order; a non-finite value as a string)."""
    out, state = [], weights
    for flip in found:
        after = state.flip([flip])
        old, new = (float(w.values[flip.param_name][flip.index]) for w in (state, after))
        out.append({"param": flip.param_name, "index": list(flip.index), "bit": flip.bit,
                    "old_value": old if np.isfinite(old) else str(old),
                    "new_value": new if np.isfinite(new) else str(new)})  # fmt: skip
        state = after
    return out
