"""
:class:`FloatBitFlipAttack`: a bit-flip attack on the IEEE float weights of a classifier (Terminal Brain Damage, Hong
et al., USENIX Security 2019), untargeted or targeted.

The progressive bit search of :class:`.BitSearchAttack` on the float encodings (docs/theory.md §8.2): the gradient of
the loss with respect to the float weights ranks the allowed bits of the ``top_k`` weights of each layer by the
first-order gain ``g·(w' − w)``, the ``nb_candidates`` best of each layer are evaluated by their actual loss, and the
best is committed. An exponent flip can send a weight to ``10^38``, ``±inf`` or NaN: such a flip is legitimate (and
catastrophic), but its first-order gain says nothing, so the flips to non-finite values among the ``top_k`` weights are
evaluated by their actual loss too (a NaN loss counts as infinite), and the candidates are ranked by their accuracy
first, the loss breaking ties. Flipped values are exact: the candidates are evaluated with the flipped bit patterns
themselves, not ``W + Δ``.

| Paper link: https://arxiv.org/abs/1906.01017
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.bit_search import BitSearchAttack, Candidate
from art_weightpert.float_bits import FloatBitFlip, FloatWeights, flip_float_bits

logger = logging.getLogger(__name__)


class FloatBitFlipAttack(BitSearchAttack):
    """
    Progressive bit search on the float weights of the selected layers. ``generate`` returns the flipped bits in the
    order found; :attr:`weights_` holds the :class:`.FloatWeights` attacked and :attr:`history_` one ``{"loss",
    "accuracy"}`` dict per flip, measured on ``(x, y)`` (targeted: "accuracy" is the share of inputs classified as
    their target). Deterministic for the same inputs; every bit flips at most once; bits outside ``bits`` never flip.
    Candidates are ranked by their accuracy first (many losses are infinite), the loss breaking ties; the search stops
    early once the model outputs ``inf`` or NaN on the attack batch (no further flip is measurable).
    """

    rank_by_accuracy = True  # a flip to 10^38 or NaN makes many losses infinite: the accuracy ranks them

    attack_params = Attack.attack_params + [
        "max_flips",
        "bits",
        "layers",
        "targeted",
        "stop_accuracy",
        "top_k",
        "nb_candidates",
        "batch_size",
        "verbose",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        max_flips: int = 10,
        bits: list[int] | None = None,
        layers: list[str] | None = None,
        targeted: bool = False,
        stop_accuracy: float | None = None,
        top_k: int = 100,
        nb_candidates: int = 10,
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.FloatBitFlipAttack` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly)
            with float32, float16, bfloat16 or float64 weights.
        :param max_flips: most bits to flip (0 returns no flip).
        :param bits: the bit positions that may flip, IEEE numbering of the weights' dtype (float32: 0–22 mantissa,
            23–30 exponent, 31 sign); ``None``: all of them.
        :param layers: names of the Linear/Conv layers whose weights may flip (``None``: all).
        :param targeted: drive the inputs to the classes given as ``y`` instead of away from their labels.
        :param stop_accuracy: stop after the first flip whose accuracy on ``(x, y)`` is at most this value (targeted:
            whose share of inputs *not* at their target is at most this value); ``None``: flip ``max_flips`` bits.
        :param top_k: weights per layer ranked by gradient magnitude whose bits are candidates.
        :param nb_candidates: best first-order flips (and flips to non-finite values) per layer evaluated by their
            actual loss.
        :param batch_size: samples per forward pass.
        :param verbose: show a progress bar over the flips.
        """
        super().__init__(estimator, verbose=verbose)
        self.max_flips = max_flips
        self.bits = bits
        self.layers = layers
        self.targeted = targeted
        self.stop_accuracy = stop_accuracy
        self.top_k = top_k
        self.nb_candidates = nb_candidates
        self.batch_size = batch_size
        self._check_params()
        self.weights_: FloatWeights | None = None
        self.history_: list[dict[str, float]] = []

    def _check_params(self) -> None:
        # the threat set is a number of flipped bits.
        self._check_search_params()
        self._encode()  # layers, bits against the weights' dtype, float weights

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any) -> list[FloatBitFlip]:
        """
        Search the bits to flip.

        :param x: the attack batch, shape ``(N,) + input_shape``.
        :param y: untargeted: integer or one-hot labels (``None``: the model's predictions); targeted: the target class
            of every input, or one class (an int) for all.
        :return: the flipped bits in the order found (at most ``max_flips``).
        """
        self.weights_ = self._encode()
        return self._search(x, y, self.weights_)[0]

    def generate_estimator(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any):
        """
        Run the attack and return the estimator with the flipped weights (a new :class:`.PyTorchWeightClassifier`
        holding the flipped values exactly, NaN and ``±inf`` included; the original is unchanged).

        :param x: the attack batch.
        :param y: labels or targets, as in :meth:`generate`.
        :return: the attacked estimator.
        """
        flips = self.generate(x, y)
        return self.weights_.flip(flips).apply(self._target)

    # ------------------------------------------------------------------------------------------------ hooks
    def _encode(self) -> FloatWeights:
        return FloatWeights.from_estimator(self._target, self.layers, self.bits)

    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> FloatBitFlip:
        return FloatBitFlip(name, index, bit)

    def _positions(self, weights: FloatWeights) -> tuple[int, ...]:
        return weights.bits

    def _params(self, weights: FloatWeights, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The flipped values themselves (``W + Δ`` may round after an exponent flip)."""
        return {name: value.to(deltas[name].device) for name, value in weights.values.items()}

    def _set_entry(self, flat: torch.Tensor, candidate: Candidate) -> None:
        flat[candidate.flat] = flip_float_bits(flat[candidate.flat], candidate.bit)
