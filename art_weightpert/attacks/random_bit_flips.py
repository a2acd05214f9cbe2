"""
:class:`RandomBitFlips`: random faults in the bits of quantized weights (memory errors, radiation, undervolting).

Two fault models: exactly ``nb_flips`` distinct bits drawn uniformly, or a bit error rate ``ber`` (each bit flips
independently with that probability), both restricted to the bit positions ``bits`` of the weights of ``layers``.
The gap to :class:`.BitFlipAttack` at the same number of flips shows how much worse an adversary is than chance;
the accuracy per bit position shows which bits matter (docs/theory.md §8.1: a sign-bit flip moves a weight by about
``max|W|``, a low bit by one quantization step). On a deployed int8 model
(:meth:`.PyTorchWeightClassifier.from_quantized`) the deployed codes flip, and the accuracies are those of the deployed
model's own forward.

| Paper link: https://arxiv.org/abs/1903.12269
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.base import accuracy_with_deltas
from art_weightpert.attacks.bit_draws import RandomFlipsBase
from art_weightpert.quantization import BitFlip, QuantizedWeights, check_quantization_args, effective_quantized_weights
from art_weightpert.validation import check_int

logger = logging.getLogger(__name__)


class RandomBitFlips(RandomFlipsBase):
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
        super().__init__(estimator, verbose=verbose)
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
        # the fault model is a number or a rate of flipped bits.
        self._check_draw_params()
        check_quantization_args(self.n_bits, self.granularity, self.layers, self.estimator.base_model)
        if self.bits is not None:
            if isinstance(self.bits, (int, np.integer)) or not len(self.bits):
                raise TypeError("`bits` must be a non-empty list of bit positions or None.")
            for bit in self.bits:
                check_int(bit, "bits", minimum=0, maximum=self.n_bits - 1)

    # ------------------------------------------------------------------------------------------------ hooks
    def _encode(self) -> QuantizedWeights:
        return effective_quantized_weights(self.estimator, self.n_bits, self.granularity, self.layers, self._target)

    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> BitFlip:
        return BitFlip(name, index, bit)

    def _allowed(self, weights: QuantizedWeights) -> list[int]:
        return sorted({int(b) for b in self.bits}) if self.bits is not None else list(range(self.n_bits))

    def _width(self, weights: QuantizedWeights) -> int:
        return self.n_bits

    def _tensors(self, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        return weights.codes

    def _references(self, weights: QuantizedWeights, x_t: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The float model's accuracy ("clean") and the quantized model's without any flip ("quantized")."""
        deltas = weights.deltas(self._target)
        quantized = accuracy_with_deltas(self._target, x_t, labels, deltas, self.batch_size, sharded=True)
        return {**super()._references(weights, x_t, labels), "quantized": quantized}
