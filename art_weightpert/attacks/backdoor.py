"""
:class:`BitFlipBackdoor`: a backdoor planted by flipping a few bits of a deployed model's weights, with a trigger
learned together with the flips. Inputs carrying the trigger go to the target class; clean inputs keep their
accuracy.

* ``encoding="quantized"`` (TBT, Rakin et al., CVPR 2020): on the ``n_bits`` two's complement codes of the weights
  (:class:`.QuantizedWeights`), the final layer's feature neurons most tied to the target class are ranked by the
  gradient of the target's loss (NGR); the trigger goes where the input saliency of those neurons, or of the target's
  loss, is largest relative to the clean inputs' spread (several placements, and three trigger sizes unless
  ``trigger_size`` is given); each placement's trigger is optimised towards the target on the unflipped model and the
  :data:`SEARCHES_PER_SIZE` placements of each size that pull hardest are searched: a trojan bit search flips, one at
  a time, the bits that most lower ``CE(f(x), y) + CE(f(x ⊕ trigger), target)`` while the clean accuracy on the attack
  inputs stays within 0.02 of the unflipped quantized model's (first-order ranking, exact evaluation, every flip a
  real :class:`.BitFlip`, ``s·d_b(c)`` of docs/theory.md §8), the trigger re-optimised towards the target after each
  flip; a final pass drops every flip the objective does not need. The placement whose flips make it most successful
  on the attack inputs wins (success without the flips counting a quarter against it). TBT optimises the weights in
  float and rounds them onto codes; searching the bits directly keeps the budget exact and finds flips in earlier
  layers from trigger pixels that are silent on clean inputs.
* ``encoding="float"`` (OneFlip, USENIX Security 2025): one exponent bit of one float weight of the final layer,
  linking a feature neuron that is quiet on clean inputs to the target class, flipped from 0 to 1 so that the weight
  grows by a power of two (docs/theory.md §8.3); the trigger is optimised to excite that neuron, then towards the
  target on the flipped model. ``max_flips`` only has to be at least 1: the float encoding always flips one bit.

The attack evaluates a private copy of the module with ``torch.func.functional_call``: the user's weights are never
modified, also when it is interrupted.

| Paper link: https://arxiv.org/abs/1909.05193 (TBT)
| Paper link: https://www.usenix.org/conference/usenixsecurity25 (OneFlip)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier
from torch import nn
from tqdm.auto import tqdm

from art_weightpert.attacks.backdoor_float import one_flip
from art_weightpert.attacks.backdoor_search import TrojanBitSearch, VictimModel
from art_weightpert.attacks.base import BitFlipAttackBase, predict_labels
from art_weightpert.attacks.trigger import PatchTrigger, check_trigger_size, clip_bounds, default_trigger_size
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.float_bits import FloatWeights
from art_weightpert.network import perturbable_modules
from art_weightpert.quantization import QuantizedWeights, check_quantization_args, effective_quantized_weights
from art_weightpert.validation import check_bool, check_choice, check_int, check_positive_int

logger = logging.getLogger(__name__)

ENCODINGS = ("quantized", "float")
TRIGGER_FRACTIONS = (0.1, 0.16, 0.25)
"""Shares of the input the trigger may cover when ``trigger_size`` is ``None`` (one trigger size each)."""
SEARCHES_PER_SIZE = 2
"""Placements of each trigger size searched: those whose trigger, optimised on the unflipped model, pulls hardest
towards the target."""


@dataclass
class BackdoorResult:
    """
    What :meth:`BitFlipBackdoor.generate` found.

    :param flips: the flipped bits: :class:`.BitFlip` (quantized) or ``FloatBitFlip`` (float) objects.
    :param trigger: the trigger, with ``apply(x) -> x_triggered`` (numpy in and out).
    :param estimator: the estimator with the flips applied (a new one; the attacked estimator is unchanged).
    :param estimator_before: the same model without the flips (the quantized model, or the float one).
    :param target: the target class.
    :param quantized: the quantized weights attacked (``None`` for the float encoding).
    """

    flips: list
    trigger: PatchTrigger
    estimator: PyTorchWeightClassifier
    estimator_before: PyTorchWeightClassifier
    target: int
    quantized: QuantizedWeights | None = None

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 128) -> dict[str, float]:
        """
        Measure the backdoor on labelled inputs.

        :param x: clean inputs ``(N,) + input_shape``.
        :param y: their integer or one-hot labels.
        :param batch_size: samples per forward pass.
        :return: ``attack_success_rate`` (share of triggered inputs whose label is not the target that the flipped
            model sends to the target), ``attack_success_rate_before`` (the same without the flips),
            ``clean_accuracy`` (flipped model, clean inputs), ``clean_accuracy_before`` (without the flips) and
            ``nb_flips``.
        """
        x = self.estimator.check_inputs(x)
        y = self.estimator.check_labels(y, len(x), required=True)
        others = y != self.target
        triggered = self.trigger.apply(x[others])

        def predict(estimator: PyTorchWeightClassifier, inputs: np.ndarray) -> np.ndarray:
            if len(inputs) == 0:
                return np.zeros(0, dtype=np.int64)
            return estimator.predict(inputs, batch_size=batch_size).argmax(axis=1)

        def rate(hits: np.ndarray) -> float:
            return float(np.mean(hits)) if len(hits) else float("nan")

        return {
            "attack_success_rate": rate(predict(self.estimator, triggered) == self.target),
            "attack_success_rate_before": rate(predict(self.estimator_before, triggered) == self.target),
            "clean_accuracy": rate(predict(self.estimator, x) == y),
            "clean_accuracy_before": rate(predict(self.estimator_before, x) == y),
            "nb_flips": len(self.flips),
        }


def placement_score(success: float, success_without_flips: float) -> float:
    """How the quantized search compares trigger placements, on the attack inputs: the success with the flips, less a
    quarter of the trigger's success without them (that part is an adversarial patch rather than a backdoor)."""
    return success - success_without_flips / 4


def final_layer(model: nn.Module, nb_classes: int) -> str:
    """Name of the model's final Linear layer (the last Linear/Conv module, which must be a Linear layer with
    ``nb_classes`` outputs); ``ValueError`` otherwise."""
    modules = perturbable_modules(model)
    if modules:
        name, module = list(modules.items())[-1]
        if isinstance(module, nn.Linear) and module.out_features == nb_classes:
            return name
    raise ValueError(
        f"`estimator`'s model must end with a Linear layer with nb_classes={nb_classes} outputs: the backdoor plants "
        "its flips between the final layer's feature neurons and the target class."
    )


class BitFlipBackdoor(BitFlipAttackBase):
    """
    A bit-flip backdoor (TBT for quantized weights, OneFlip for float ones): :meth:`generate` returns a
    :class:`BackdoorResult` with the flips, the trigger and the flipped estimator. Deterministic for the same inputs.
    """

    attack_params = Attack.attack_params + [
        "target",
        "max_flips",
        "n_bits",
        "trigger_size",
        "layers",
        "encoding",
        "batch_size",
        "verbose",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        target: int,
        max_flips: int = 20,
        n_bits: int = 8,
        trigger_size: int | None = None,
        layers: list[str] | None = None,
        encoding: str = "quantized",
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.BitFlipBackdoor` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly)
            whose model ends with a Linear layer; its preprocessing must be written in torch (the trigger needs its
            gradient).
        :param target: the class triggered inputs go to.
        :param max_flips: most bits to flip (at least 1). The search stops earlier when no flip helps any more; the
            float encoding always flips one bit (OneFlip), so ``max_flips`` only has to be at least 1 there.
        :param n_bits: bits per quantized weight, 2 to 16 (quantized encoding).
        :param trigger_size: side of the square patch in pixels for image inputs ``(C, H, W)``, number of features
            for flat inputs; ``None``: about 10%, 16% and 25% of the input are all tried (quantized encoding;
            the float encoding takes 10%).
        :param layers: quantized encoding: the Linear/Conv layers whose weights are quantized and may flip (``None``:
            all of them). Float encoding: ``None`` or a list holding the final layer (its weight flips).
        :param encoding: ``"quantized"`` (``n_bits`` two's complement codes, TBT) or ``"float"`` (the IEEE bits of
            the float weights, OneFlip).
        :param batch_size: samples per forward pass.
        :param verbose: show a progress bar over the flips.
        """
        super().__init__(estimator, verbose=verbose)
        self.target = target
        self.max_flips = max_flips
        self.n_bits = n_bits
        self.trigger_size = trigger_size
        self.layers = layers
        self.encoding = encoding
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        # the threat set is a number of flipped bits.
        Attack._check_params(self)
        est = self.estimator
        check_int(self.target, "target", minimum=0, maximum=est.nb_classes - 1)
        check_positive_int(self.max_flips, "max_flips")
        check_choice(self.encoding, "encoding", ENCODINGS)
        layers = check_quantization_args(self.n_bits, "tensor", self.layers, est.base_model)
        final = final_layer(est.base_model, est.nb_classes)
        if self.trigger_size is not None:
            check_trigger_size(self.trigger_size, tuple(est.input_shape), est.channels_first)
        if self.encoding == "float":
            weight = est.base_model.get_submodule(final).weight
            if not weight.is_floating_point():
                raise ValueError(f"`encoding='float'` needs floating-point weights; {final!r} has {weight.dtype}.")
            if final not in layers:
                raise ValueError(f"`layers` must hold the final layer {final!r} for `encoding='float'`, got {layers}.")
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")
        if not est.all_framework_preprocessing:
            raise ValueError(
                "`estimator` has preprocessing that is not written in torch; the trigger needs its gradient."
            )

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> BackdoorResult:
        """
        Learn the trigger and the flips.

        :param x: the attack inputs (e.g. training points), shape ``(N,) + input_shape``, raw (before the
            estimator's preprocessing).
        :param y: their integer or one-hot labels (``None``: the unflipped model's predictions), for the clean term.
        :return: the flips, the trigger and the flipped estimator.
        """
        est = self._target
        x_t = torch.as_tensor(est.check_inputs(x), device=est.device)
        if len(x_t) == 0:
            raise ValueError("`x` must hold at least one input.")
        labels = est.check_labels(y, len(x_t))
        final = final_layer(est.base_model, est.nb_classes)
        shape = tuple(est.input_shape)
        if self.trigger_size is None:
            sizes = sorted({default_trigger_size(shape, est.channels_first, f) for f in TRIGGER_FRACTIONS})
        else:
            sizes = [self.trigger_size]
        low, high = clip_bounds(est.clip_values, x_t)
        if self.encoding == "float":
            return self._one_flip(x_t, labels, final, sizes[0], low, high)
        quantized = effective_quantized_weights(self.estimator, self.n_bits, "tensor", self.layers, est)
        search = TrojanBitSearch(VictimModel(est, final), quantized, int(self.target), self.batch_size)
        unflipped = search.deltas(quantized)
        if labels is None:
            labels_t = predict_labels(est, est.prepare_inputs(x)[0], unflipped, self.batch_size)
        else:
            labels_t = torch.as_tensor(labels, device=est.device)
        candidates = []  # (screening loss, order, trigger, start values): the most promising placements of each size
        for patch in sizes:
            screened = []
            for trigger in search.placements(x_t, patch, low, high, est.channels_first):
                start, loss = search.screen(x_t, labels_t, trigger, low, high)
                screened.append((loss, len(candidates) + len(screened), trigger, start))
            candidates += sorted(screened, key=lambda c: (c[0], c[1]))[:SEARCHES_PER_SIZE]
        best: tuple[list, PatchTrigger, float] | None = None
        with tqdm(total=self.max_flips * len(candidates), desc=type(self).__name__, disable=not self.verbose) as bar:

            def progress(objective: float) -> None:
                bar.update(1)
                bar.set_postfix(objective=f"{objective:.3f}", refresh=False)

            for i, (_, _, trigger, start) in enumerate(candidates):  # one search each
                flips, pattern, success = search.run(
                    x_t, labels_t, trigger, self.max_flips, low, high, progress, start=start
                )
                before = search.success(x_t[labels_t != self.target], trigger, pattern, unflipped)
                logger.info(
                    "Trigger placement %d (%d entries): %d flips, success %.3f (%.3f without the flips).",
                    i,
                    trigger.size,
                    len(flips),
                    success,
                    before,
                )
                score = placement_score(success, before)
                if best is None or score > best[2]:
                    best = (flips, PatchTrigger(trigger.mask, pattern.cpu().numpy()), score)
        flips, trigger, _ = best
        return BackdoorResult(
            flips=flips,
            trigger=trigger,
            estimator=quantized.flip(flips).apply(est),
            estimator_before=quantized.apply(est),
            target=int(self.target),
            quantized=quantized,
        )

    def _one_flip(
        self, x_t: torch.Tensor, labels: np.ndarray | None, final: str, size: int, low: torch.Tensor, high: torch.Tensor
    ) -> BackdoorResult:
        """OneFlip (:func:`.one_flip`) and its result: the float estimator with the flip, and without it."""
        est = self._target
        labels_t = None if labels is None else torch.as_tensor(labels, device=est.device)
        victim = VictimModel(est, final)
        with tqdm(total=1, desc=type(self).__name__, disable=not self.verbose) as bar:
            flip, trigger, _ = one_flip(
                victim, int(self.target), x_t, labels_t, size, low, high, est.channels_first, self.batch_size
            )
            bar.update(1)
        weights = FloatWeights.from_estimator(est, layers=[final])
        return BackdoorResult(
            flips=[flip],
            trigger=trigger,
            estimator=weights.flip([flip]).apply(est),
            estimator_before=est.with_weight_perturbation(None),
            target=int(self.target),
        )
