"""
:class:`RandomBitFlips`: random faults in the bits of quantized weights (memory errors, radiation, undervolting).

Two fault models: exactly ``nb_flips`` distinct bits drawn uniformly, or a bit error rate ``ber`` (each bit flips
independently with that probability), both restricted to the bit positions ``bits`` of the weights of ``layers``.
The gap to :class:`.BitFlipAttack` at the same number of flips shows how much worse an adversary is than chance;
the accuracy per bit position shows which bits matter (THEORY.md §8: a sign-bit flip moves a weight by about
``max|W|``, a low bit by one quantization step).

| Paper link: https://arxiv.org/abs/1903.12269
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.attacks.base import WeightAttack, accuracy_with_deltas, predict_labels
from art_weightpert.quantization import BitFlip, QuantizedWeights, check_quantization_args
from art_weightpert.validation import check_bool, check_int, check_positive_int, check_probability

logger = logging.getLogger(__name__)

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


class RandomBitFlips(WeightAttack):
    """
    Random bit flips in the quantized weights, drawn reproducibly: with a ``seed``, :meth:`generate` always returns
    the first draw and :meth:`evaluate` the first ``nb_samples`` draws of the same stream; with ``seed=None`` the
    stream is seeded from torch's global generator (so ``torch.manual_seed`` makes runs reproducible).
    """

    attack_params = Attack.attack_params + [
        "nb_flips",
        "ber",
        "n_bits",
        "granularity",
        "layers",
        "bits",
        "nb_samples",
        "seed",
        "batch_size",
        "verbose",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        nb_flips: int | None = None,
        ber: float | None = None,
        n_bits: int = 8,
        granularity: str = "tensor",
        layers: list[str] | None = None,
        bits: list[int] | None = None,
        nb_samples: int = 10,
        seed: int | None = None,
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.RandomBitFlips` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param nb_flips: flip exactly this many distinct bits (exclusive with ``ber``).
        :param ber: flip each bit with this probability (exclusive with ``nb_flips``).
        :param n_bits: bits per quantized weight, 2 to 16.
        :param granularity: one quantization scale per ``"tensor"`` or per output ``"channel"``.
        :param layers: names of the Linear/Conv layers whose weights are quantized and may flip (``None``: all).
        :param bits: the bit positions that may flip, 0 (least significant) to ``n_bits - 1`` (sign); ``None``: all.
        :param nb_samples: number of draws in :meth:`evaluate`.
        :param seed: seed of the draws (``None``: drawn from torch's global generator).
        :param batch_size: samples per forward pass in :meth:`evaluate`.
        :param verbose: show a progress bar over the draws.
        """
        super().__init__(estimator, budget=None, verbose=verbose)
        self.nb_flips = nb_flips
        self.ber = ber
        self.n_bits = n_bits
        self.granularity = granularity
        self.layers = layers
        self.bits = bits
        self.nb_samples = nb_samples
        self.seed = seed
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        # The weight ball of WeightAttack does not apply: the fault model is a number or a rate of flipped bits.
        Attack._check_params(self)
        if (self.nb_flips is None) == (self.ber is None):
            raise ValueError("give exactly one of `nb_flips` and `ber`.")
        if self.nb_flips is not None:
            check_int(self.nb_flips, "nb_flips", minimum=0)
        if self.ber is not None:
            check_probability(self.ber, "ber")
        check_quantization_args(self.n_bits, self.granularity, self.layers, self.estimator.base_model)
        if self.bits is not None:
            if isinstance(self.bits, (int, np.integer)) or not len(self.bits):
                raise TypeError("`bits` must be a non-empty list of bit positions or None.")
            for bit in self.bits:
                check_int(bit, "bits", minimum=0, maximum=self.n_bits - 1)
        check_positive_int(self.nb_samples, "nb_samples")
        if self.seed is not None:
            check_int(self.seed, "seed", minimum=0)
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray | None = None, y: np.ndarray | None = None, **kwargs: Any) -> list[BitFlip]:
        """
        One random draw of flipped bits (``x`` and ``y`` are not needed; accepted for ART's signature).

        :return: the flipped bits, each at most once, sorted by weight, entry and bit.
        """
        quantized = self._quantize()
        return self._to_flips(quantized, self._draw(quantized, self._bits(), self._rng()))

    def evaluate(self, x: np.ndarray, y: np.ndarray | None = None, per_bit: bool = True) -> dict[str, Any]:
        """
        Accuracy on ``(x, y)`` of the quantized model under ``nb_samples`` random draws.

        :param x: inputs.
        :param y: integer or one-hot labels (``None``: agreement with the quantized model's predictions).
        :param per_bit: also measure, for each allowed bit position, the accuracy under the same fault model
            restricted to that position (``nb_samples`` more draws each).
        :return: ``{"mean", "std", "min", "max": float, "quantiles": {q: accuracy}, "accuracies": np.ndarray
            (nb_samples,), "clean": float (the float model), "quantized": float (no flip), "nb_flips": np.ndarray
            (flips per draw), "per_bit": {bit: {"mean", "std"}}}`` (``per_bit`` only when asked).
        """
        quantized = self._quantize()
        x_t, labels = self.estimator.prepare_inputs(x, y)
        clean_deltas = quantized.deltas(self.estimator)
        if labels is None:
            labels = predict_labels(self.estimator, x_t, clean_deltas, self.batch_size)
        bits = self._bits()
        runs = [bits] + ([[b] for b in bits] if per_bit else [])
        rng = self._rng()
        results = []
        with tqdm(total=self.nb_samples * len(runs), desc="RandomBitFlips", disable=not self.verbose) as bar:
            for allowed in runs:
                accuracies, counts = np.empty(self.nb_samples), np.empty(self.nb_samples, dtype=np.int64)
                for i in range(self.nb_samples):
                    masks = self._draw(quantized, allowed, rng)
                    counts[i] = sum(int(_popcount(m)) for m in masks.values())
                    deltas = quantized.xor(masks).deltas(self.estimator)
                    accuracies[i] = accuracy_with_deltas(self.estimator, x_t, labels, deltas, self.batch_size)
                    bar.update(1)
                results.append((accuracies, counts))
        accuracies, counts = results[0]
        out = {
            "mean": float(accuracies.mean()),
            "std": float(accuracies.std()),
            "min": float(accuracies.min()),
            "max": float(accuracies.max()),
            "quantiles": {q: float(np.quantile(accuracies, q)) for q in QUANTILES},
            "accuracies": accuracies,
            "clean": accuracy_with_deltas(self.estimator, x_t, labels, None, self.batch_size),
            "quantized": accuracy_with_deltas(self.estimator, x_t, labels, clean_deltas, self.batch_size),
            "nb_flips": counts,
        }
        if per_bit:
            out["per_bit"] = {
                b: {"mean": float(acc.mean()), "std": float(acc.std())} for b, (acc, _) in zip(bits, results[1:])
            }
        return out

    # ------------------------------------------------------------------------------------------------ internals
    def _quantize(self) -> QuantizedWeights:
        return QuantizedWeights.from_estimator(self.estimator, self.n_bits, self.granularity, self.layers)

    def _bits(self) -> list[int]:
        return sorted({int(b) for b in self.bits}) if self.bits is not None else list(range(self.n_bits))

    def _rng(self) -> np.random.Generator:
        seed = int(torch.randint(0, 2**62, (1,))) if self.seed is None else int(self.seed)
        return np.random.default_rng(seed)

    def _draw(self, quantized: QuantizedWeights, bits: list[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One draw as XOR masks ``{weight name: int64 tensor}``: distinct positions among the ``numel × len(bits)``
        flippable bits, ``nb_flips`` of them or each with probability ``ber``."""
        codes = quantized.codes
        sizes = np.array([c.numel() * len(bits) for c in codes.values()], dtype=np.int64)
        total = int(sizes.sum())
        count = self.nb_flips if self.nb_flips is not None else int(rng.binomial(total, self.ber))
        if count > total:
            raise ValueError(f"`nb_flips`={count} exceeds the {total} flippable bits.")
        chosen = np.sort(rng.choice(total, size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        masks = {}
        for k, (name, c) in enumerate(codes.items()):
            local = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - offsets[k]
            if not len(local):
                continue
            entry, bit = np.divmod(local, len(bits))
            mask = np.zeros(c.numel(), dtype=np.int64)
            np.add.at(mask, entry, np.left_shift(1, np.asarray(bits, dtype=np.int64)[bit]))  # distinct bits: sum = OR
            masks[name] = torch.as_tensor(mask.reshape(c.shape), device=c.device)
        return masks

    def _to_flips(self, quantized: QuantizedWeights, masks: dict[str, torch.Tensor]) -> list[BitFlip]:
        flips = []
        for name, mask in masks.items():
            for flat in torch.nonzero(mask.reshape(-1)).reshape(-1).tolist():
                value = int(mask.reshape(-1)[flat])
                index = tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))
                flips += [BitFlip(name, index, b) for b in range(self.n_bits) if value >> b & 1]
        return flips


def _popcount(mask: torch.Tensor) -> torch.Tensor:
    """Number of set bits in an int64 tensor of bit masks below 2^16."""
    return sum(((mask >> b) & 1).sum() for b in range(16))
