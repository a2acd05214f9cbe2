"""
:class:`RandomFloatBitFlips`: random faults in the IEEE bits of float weights (memory errors, radiation, undervolting).

Two fault models (:mod:`.bit_draws`): exactly ``nb_flips`` distinct bits, or a bit error rate ``ber``, restricted to the
bit positions ``bits`` of the weights of ``layers``; uniform over the positions, or weighted by a per-position
``distribution`` (measured fault maps are rarely uniform). The accuracy per bit position shows which bits matter
(docs/theory.md §8.2): a flip of the top exponent bit can send a weight to ``10^38`` or NaN, a low mantissa bit moves
it by a relative ``2^-23``. The gap to :class:`.FloatBitFlipAttack` at the same number of flips shows how much worse an
adversary is than chance.

| Paper link: https://arxiv.org/abs/1906.01017
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.bit_draws import RandomFlipsBase, check_distribution
from art_weightpert.float_bits import FloatBitFlip, FloatWeights

logger = logging.getLogger(__name__)


class RandomFloatBitFlips(RandomFlipsBase):
    """
    Random bit flips in the float weights, drawn reproducibly: with a ``seed``, :meth:`generate` always returns the
    first draw and :meth:`evaluate` the first ``nb_samples`` draws of the same stream; with ``seed=None`` the stream
    is seeded from torch's global generator. Bits outside ``bits`` (and positions of weight 0 in ``distribution``)
    never flip.
    """

    attack_params = Attack.attack_params + [
        "nb_flips",
        "ber",
        "bits",
        "layers",
        "nb_samples",
        "seed",
        "distribution",
        "batch_size",
        "verbose",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        nb_flips: int | None = None,
        ber: float | None = None,
        bits: list[int] | None = None,
        layers: list[str] | None = None,
        nb_samples: int = 10,
        seed: int | None = None,
        distribution: Mapping[int, float] | np.ndarray | None = None,
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.RandomFloatBitFlips` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly)
            with float32, float16, bfloat16 or float64 weights.
        :param nb_flips: flip exactly this many distinct bits (exclusive with ``ber``).
        :param ber: bit error rate (exclusive with ``nb_flips``): each allowed bit flips with this probability, or with
            a ``distribution``, each bit of position ``b`` with probability ``ber·L·p_b`` (``L`` allowed positions).
        :param bits: the bit positions that may flip, IEEE numbering of the weights' dtype (float32: 0–22 mantissa,
            23–30 exponent, 31 sign); ``None``: all.
        :param layers: names of the Linear/Conv layers whose weights may flip (``None``: all).
        :param nb_samples: number of draws in :meth:`evaluate`.
        :param seed: seed of the draws (``None``: drawn from torch's global generator).
        :param distribution: relative frequency of faults per bit position: a mapping ``{bit: weight}`` or an array
            with one weight per position of the dtype (normalized over the allowed positions); ``None``: uniform.
        :param batch_size: samples per forward pass in :meth:`evaluate`.
        :param verbose: show a progress bar over the draws.
        """
        super().__init__(estimator, verbose=verbose)
        self.nb_flips = nb_flips
        self.ber = ber
        self.bits = bits
        self.layers = layers
        self.nb_samples = nb_samples
        self.seed = seed
        self.distribution = distribution
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        # the fault model is a number or a rate of flipped bits.
        self._check_draw_params()
        weights = self._encode()  # layers, bits against the weights' dtype, float weights
        if self.distribution is not None:
            probabilities = self._probabilities(weights, self._allowed(weights))
            if self.ber is not None and self.ber * len(probabilities) * probabilities.max() > 1:
                raise ValueError(f"`ber`={self.ber} with this `distribution` gives a position a rate above 1.")

    # ------------------------------------------------------------------------------------------------ hooks
    def _encode(self) -> FloatWeights:
        return FloatWeights.from_estimator(self._target, self.layers, self.bits)

    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> FloatBitFlip:
        return FloatBitFlip(name, index, bit)

    def _allowed(self, weights: FloatWeights) -> list[int]:
        return list(weights.bits)

    def _width(self, weights: FloatWeights) -> int:
        return weights.layout.width

    def _tensors(self, weights: FloatWeights) -> dict[str, torch.Tensor]:
        return weights.values

    def _probabilities(self, weights: FloatWeights, allowed: list[int]) -> np.ndarray | None:
        if self.distribution is None:
            return None
        return check_distribution(self.distribution, allowed, weights.layout.width)
