"""
:class:`BitFlipAttack`: the bit-flip attack (BFA) of Rakin et al. (ICCV 2019) on the quantized weights of a
classifier, untargeted or targeted (T-BFA, Rakin et al., TPAMI 2021).

Progressive bit search, one flip per iteration: one forward/backward pass on the attack batch gives the gradient of
the loss with respect to every quantized weight; in each layer the ``top_k`` weights by gradient magnitude are the
candidates, and the first-order change of the loss of flipping each of their bits alone is ``g·s·d_b(c)``
(docs/theory.md §8.1). The ``nb_candidates`` best loss-increasing flips of each layer are then evaluated by their
actual loss (batched with ``torch.func.vmap``), and the best one over all layers is committed (the search is
:class:`.BitSearchAttack`'s). With ``nb_candidates=1`` this is the paper's intra-layer / cross-layer search (with
its ``top_k=10``); the defaults (100 weights, 10 candidates per layer) are stronger on the digits models, where the
first-order ranking is often wrong (docs/bit_flips.md).

The model is evaluated with ``torch.func.functional_call`` on ``W + Δ``: the user's module and the estimator are never
modified, also when the attack is interrupted. On a deployed int8 model
(:meth:`.PyTorchWeightClassifier.from_quantized`) the deployed codes flip and every accuracy is the deployed model's own
forward with the flipped codes.

| Paper link: https://arxiv.org/abs/1903.12269 (BFA), https://arxiv.org/abs/2007.12336 (T-BFA)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.bit_search import BitSearchAttack
from art_weightpert.quantization import BitFlip, QuantizedWeights, check_quantization_args, effective_quantized_weights

logger = logging.getLogger(__name__)


class BitFlipAttack(BitSearchAttack):
    """
    Progressive bit search on the ``n_bits`` quantized weights of the selected layers. ``generate`` returns the
    flipped bits in the order found; :attr:`quantized_` holds the quantized weights attacked and :attr:`history_`
    one ``{"loss", "accuracy"}`` dict per flip, measured on ``(x, y)`` (in targeted mode, "accuracy" is the share of
    inputs classified as their target). Deterministic for the same inputs; every bit flips at most once.
    """

    attack_params = Attack.attack_params + [
        "max_flips",
        "n_bits",
        "granularity",
        "layers",
        "targeted",
        "top_k",
        "nb_candidates",
        "stop_accuracy",
        "batch_size",
        "verbose",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        max_flips: int = 10,
        n_bits: int = 8,
        granularity: str = "tensor",
        layers: list[str] | None = None,
        targeted: bool = False,
        top_k: int = 100,
        nb_candidates: int = 10,
        stop_accuracy: float | None = None,
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.BitFlipAttack` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param max_flips: most bits to flip (0 returns no flip).
        :param n_bits: bits per quantized weight, 2 to 16.
        :param granularity: one quantization scale per ``"tensor"`` or per output ``"channel"``.
        :param layers: names of the Linear/Conv layers whose weights are quantized and may flip (``None``: all).
        :param targeted: drive the inputs to the classes given as ``y`` instead of away from their labels.
        :param top_k: weights per layer ranked by gradient magnitude whose bits are candidates.
        :param nb_candidates: best first-order flips per layer evaluated by their actual loss (1: the paper's BFA).
        :param stop_accuracy: stop after the first flip whose accuracy on ``(x, y)`` is at most this value (targeted:
            whose share of inputs *not* at their target is at most this value); ``None``: flip ``max_flips`` bits.
        :param batch_size: samples per forward pass.
        :param verbose: show a progress bar over the flips.
        """
        super().__init__(estimator, verbose=verbose)
        self.max_flips = max_flips
        self.n_bits = n_bits
        self.granularity = granularity
        self.layers = layers
        self.targeted = targeted
        self.top_k = top_k
        self.nb_candidates = nb_candidates
        self.stop_accuracy = stop_accuracy
        self.batch_size = batch_size
        self._check_params()
        self.quantized_: QuantizedWeights | None = None
        self.history_: list[dict[str, float]] = []

    def _check_params(self) -> None:
        # the threat set is a number of flipped bits.
        self._check_search_params()
        check_quantization_args(self.n_bits, self.granularity, self.layers, self.estimator.base_model)

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any) -> list[BitFlip]:
        """
        Search the bits to flip.

        :param x: the attack batch, shape ``(N,) + input_shape``.
        :param y: untargeted: integer or one-hot labels (``None``: the quantized model's predictions); targeted: the
            target class of every input, or one class (an int) for all.
        :return: the flipped bits in the order found (at most ``max_flips``).
        """
        self.quantized_ = effective_quantized_weights(
            self.estimator, self.n_bits, self.granularity, self.layers, self._target
        )
        return self._search(x, y, self.quantized_)[0]

    def generate_estimator(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any):
        """
        Run the attack and return the quantized estimator with the flips applied (a new
        :class:`.PyTorchWeightClassifier`; the original is unchanged).

        :param x: the attack batch.
        :param y: labels or targets, as in :meth:`generate`.
        :return: the attacked quantized estimator.
        """
        flips = self.generate(x, y)
        return self.quantized_.flip(flips).apply(self._target)

    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> BitFlip:
        return BitFlip(name, index, bit)
