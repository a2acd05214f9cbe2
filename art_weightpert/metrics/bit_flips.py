"""
Accuracy of a quantized classifier against the number of flipped bits: the bit-flip attack next to random flips
(the data of the report's "Bit flips" section).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.bit_flip import BitFlipAttack, accuracy_with_deltas
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.quantization import QuantizedWeights, as_weight_classifier
from art_weightpert.validation import check_int


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
) -> dict[str, Any]:
    """
    Accuracy on ``(x, y)`` of the ``n_bits`` quantized classifier after ``k`` flipped bits, for each ``k`` in
    ``flips``: the :class:`.BitFlipAttack` (run once on the attack batch for ``max(flips)`` flips; its first ``k``
    flips) and :class:`.RandomBitFlips` (``nb_samples`` draws of ``k`` distinct bits).

    :param classifier: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
    :param x: evaluation inputs.
    :param y: their integer or one-hot labels.
    :param flips: the numbers of flipped bits (positive, increasing order not required).
    :param x_attack: the attack batch (``None``: the first 128 evaluation inputs, which flatters the attack).
    :param y_attack: its labels (``None`` with ``x_attack=None``: the first 128 of ``y``).
    :param n_bits: bits per quantized weight.
    :param granularity: ``"tensor"`` or ``"channel"``.
    :param layers: the quantized layers (``None``: every Linear/Conv layer).
    :param nb_samples: random draws per number of flips.
    :param seed: seed of the random flips.
    :param batch_size: samples per forward pass.
    :param verbose: progress bars.
    :return: a JSON-able dict: ``n_bits``, ``granularity``, ``layers``, ``clean_accuracy`` (float model),
        ``quantized_accuracy``, ``flips`` (sorted), ``bfa_accuracy``, ``random_mean``, ``random_std`` (one per entry
        of ``flips``; BFA entries beyond the flips it found repeat its last accuracy), ``bfa_flips`` (each ``layer``,
        ``param``, ``index``, ``bit``, ``old_code``, ``new_code``, ``old_value``, ``new_value``),
        ``bfa_attack_accuracy`` (its history on the attack batch) and ``bit_sensitivity`` (``{bit: mean accuracy}``
        under ``max(flips)`` random flips at that bit position only).
    """
    classifier = as_weight_classifier(classifier)
    counts = sorted({check_int(k, "flips", minimum=1) for k in flips})
    if not counts:
        raise ValueError("`flips` must hold at least one number of flips.")
    if x_attack is None:
        x_attack, y_attack = x[:128], y[:128]
    attack = BitFlipAttack(classifier, max(counts), n_bits, granularity, layers, batch_size=batch_size, verbose=verbose)
    found = attack.generate(x_attack, y_attack)
    quantized: QuantizedWeights = attack.quantized_
    x_t, labels = classifier.prepare_inputs(x, y, require_labels=True)
    curve = [accuracy_with_deltas(classifier, x_t, labels, quantized.deltas(classifier), batch_size)]
    state = quantized
    for flip in found:
        state = state.flip([flip])
        curve.append(accuracy_with_deltas(classifier, x_t, labels, state.deltas(classifier), batch_size))
    random_mean, random_std, sensitivity = [], [], {}
    for k in counts:
        faults = RandomBitFlips(
            classifier,
            nb_flips=k,
            n_bits=n_bits,
            granularity=granularity,
            layers=layers,
            nb_samples=nb_samples,
            seed=seed,
            batch_size=batch_size,
            verbose=verbose,
        )
        stats = faults.evaluate(x, y, per_bit=k == counts[-1])
        random_mean.append(stats["mean"])
        random_std.append(stats["std"])
        if "per_bit" in stats:
            sensitivity = {int(b): v["mean"] for b, v in stats["per_bit"].items()}
    return {
        "n_bits": int(n_bits),
        "granularity": granularity,
        "layers": None if layers is None else list(layers),
        "clean_accuracy": accuracy_with_deltas(classifier, x_t, labels, None, batch_size),
        "quantized_accuracy": curve[0],
        "flips": counts,
        "bfa_accuracy": [curve[min(k, len(found))] for k in counts],
        "random_mean": random_mean,
        "random_std": random_std,
        "bfa_flips": _describe(quantized, found),
        "bfa_attack_accuracy": [h["accuracy"] for h in attack.history_],
        "bit_sensitivity": sensitivity,
    }


def _describe(quantized: QuantizedWeights, found: list) -> list[dict[str, Any]]:
    """Each flip with its layer, old and new code and weight value (flips applied in order)."""
    out = []
    state = quantized
    for flip in found:
        after = state.flip([flip])
        old, new = int(state.codes[flip.param_name][flip.index]), int(after.codes[flip.param_name][flip.index])
        scale = float(state.scale_like(flip.param_name).expand(state.codes[flip.param_name].shape)[flip.index])
        layer = flip.param_name.rsplit(".", 1)[0] if "." in flip.param_name else ""
        out.append(
            {
                "layer": layer,
                "param": flip.param_name,
                "index": list(flip.index),
                "bit": flip.bit,
                "old_code": old,
                "new_code": new,
                "old_value": old * scale,
                "new_value": new * scale,
            }
        )
        state = after
    return out
