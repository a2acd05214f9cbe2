"""
:class:`BitFlipAttack`: the bit-flip attack (BFA) of Rakin et al. (ICCV 2019) on the quantized weights of a
classifier, untargeted or targeted (T-BFA, Rakin et al., TPAMI 2021).

Progressive bit search, one flip per iteration: one forward/backward pass on the attack batch gives the gradient of
the loss with respect to every quantized weight; in each layer the ``top_k`` weights by gradient magnitude are the
candidates, and the first-order change of the loss of flipping each of their bits alone is ``g·s·d_b(c)``
(THEORY.md §8). The ``nb_candidates`` best loss-increasing flips of each layer are then evaluated by their actual loss
(batched with ``torch.func.vmap``), and the best one over all layers is committed. With ``nb_candidates=1`` this is the
paper's intra-layer / cross-layer search (with its ``top_k=10``); the defaults (100 weights, 10 candidates per layer)
are stronger on the digits models, where the first-order ranking is often wrong (docs/bit_flips.md).

The model is evaluated with ``torch.func.functional_call`` on ``W + Δ``: the user's module and the estimator are never
modified, also when the attack is interrupted.

| Paper link: https://arxiv.org/abs/1903.12269 (BFA), https://arxiv.org/abs/2007.12336 (T-BFA)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.attacks.base import WeightAttack, predict_labels
from art_weightpert.estimators.weight_classifier import eval_mode
from art_weightpert.quantization import BitFlip, QuantizedWeights, check_quantization_args
from art_weightpert.validation import check_bool, check_non_negative_int, check_positive_int, check_probability

logger = logging.getLogger(__name__)


class BitFlipAttack(WeightAttack):
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
        super().__init__(estimator, budget=None, verbose=verbose)
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
        # The weight ball of WeightAttack does not apply: the threat set is a number of flipped bits.
        Attack._check_params(self)
        check_non_negative_int(self.max_flips, "max_flips")
        check_quantization_args(self.n_bits, self.granularity, self.layers, self.estimator.base_model)
        check_bool(self.targeted, "targeted")
        check_positive_int(self.top_k, "top_k")
        check_positive_int(self.nb_candidates, "nb_candidates")
        if self.stop_accuracy is not None:
            check_probability(self.stop_accuracy, "stop_accuracy")
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any) -> list[BitFlip]:
        """
        Search the bits to flip.

        :param x: the attack batch, shape ``(N,) + input_shape``.
        :param y: untargeted: integer or one-hot labels (``None``: the quantized model's predictions); targeted: the
            target class of every input, or one class (an int) for all.
        :return: the flipped bits in the order found (at most ``max_flips``).
        """
        quantized = QuantizedWeights.from_estimator(self.estimator, self.n_bits, self.granularity, self.layers)
        self.quantized_, self.history_ = quantized, []
        deltas = quantized.deltas(self.estimator)
        x_t, labels = self._labels(x, y, deltas)
        flipped = {name: torch.zeros((self.n_bits, c.numel()), dtype=torch.bool) for name, c in quantized.codes.items()}
        flips: list[BitFlip] = []
        model = self.estimator.base_model
        with eval_mode(model), tqdm(total=self.max_flips, desc="BitFlipAttack", disable=not self.verbose) as bar:
            for _ in range(self.max_flips):
                candidates = self._candidates(quantized, self._gradients(x_t, labels, deltas), flipped)
                if not candidates:
                    logger.info("No bit flip increases the loss to first order any more; stopping.")
                    break
                loss, accuracy = self._evaluate(candidates, x_t, labels, deltas)
                sign = -1.0 if self.targeted else 1.0
                best = int(torch.argmax(sign * loss))
                name, flat, bit, _ = candidates[best]
                flip = BitFlip(name, tuple(int(i) for i in np.unravel_index(flat, deltas[name].shape)), bit)
                flips.append(flip)
                flipped[name][bit, flat] = True
                quantized = quantized.flip([flip])
                deltas[name] = self._delta(quantized, name)
                self.history_.append({"loss": float(loss[best]), "accuracy": float(accuracy[best])})
                bar.update(1)
                bar.set_postfix(accuracy=f"{float(accuracy[best]):.3f}")
                if self._should_stop(float(accuracy[best])):
                    break
        return flips

    def generate_estimator(self, x: np.ndarray, y: np.ndarray | int | None = None, **kwargs: Any):
        """
        Run the attack and return the quantized estimator with the flips applied (a new
        :class:`.PyTorchWeightClassifier`; the original is unchanged).

        :param x: the attack batch.
        :param y: labels or targets, as in :meth:`generate`.
        :return: the attacked quantized estimator.
        """
        flips = self.generate(x, y)
        return self.quantized_.flip(flips).apply(self.estimator)

    # ------------------------------------------------------------------------------------------------ internals
    def _labels(self, x: np.ndarray, y: Any, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.targeted:
            if y is None:
                raise ValueError("`y` (the target classes) is required in targeted mode.")
            if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
                y = np.full(len(x), int(y), dtype=np.int64)
        x_t, labels = self.estimator.prepare_inputs(x, y)
        if labels is None:
            labels = predict_labels(self.estimator, x_t, deltas, self.batch_size)
        return x_t, labels

    def _should_stop(self, accuracy: float) -> bool:
        if self.stop_accuracy is None:
            return False
        return (1.0 - accuracy if self.targeted else accuracy) <= self.stop_accuracy

    def _delta(self, quantized: QuantizedWeights, name: str) -> torch.Tensor:
        w = self.estimator.base_model.get_parameter(name).detach()
        value = quantized.codes[name].to(torch.float64) * quantized.scale_like(name)
        return (value.to(w.device) - w.to(torch.float64)).to(w.dtype)

    def _gradients(
        self, x_t: torch.Tensor, labels: torch.Tensor, deltas: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Gradient of the attack objective (mean cross-entropy, negated when targeted) with respect to the quantized
        weights: one forward/backward pass over the attack batch."""
        probes = {name: d.clone().requires_grad_(True) for name, d in deltas.items()}
        grads = {name: torch.zeros_like(d) for name, d in deltas.items()}
        sign = -1.0 if self.targeted else 1.0
        for s in distributed.my_batches(len(x_t), self.batch_size):  # in a process group: this rank's batches
            loss = sign * F.cross_entropy(self.estimator.logits(x_t[s], probes), labels[s], reduction="sum") / len(x_t)
            for name, g in zip(probes, torch.autograd.grad(loss, list(probes.values()))):
                grads[name] += g
        return distributed.all_reduce_sum_dict(grads)  # the same gradients on every rank

    def _candidates(
        self, quantized: QuantizedWeights, grads: Mapping[str, torch.Tensor], flipped: Mapping[str, torch.Tensor]
    ) -> list[tuple[str, int, int, float]]:
        """The ``nb_candidates`` flips of each layer with the largest positive first-order gain ``g·s·d_b(c)`` among
        the bits of its ``top_k`` weights by ``|g|``, as ``(weight name, flat index, bit, value change)``."""
        out = []
        for name, grad in grads.items():
            g = grad.reshape(-1).to(torch.float64)
            index = torch.topk(g.abs(), min(self.top_k, g.numel())).indices
            changes = quantized.bit_changes(name, index)  # (n_bits, k)
            gain = g[index].unsqueeze(0) * changes
            gain[flipped[name][:, index.cpu()].to(gain.device)] = 0.0  # every bit flips at most once
            order = torch.argsort(gain.reshape(-1), descending=True, stable=True)[: self.nb_candidates]
            for pos in order.tolist():
                bit, col = divmod(pos, len(index))
                if gain[bit, col] > 0:
                    out.append((name, int(index[col]), bit, float(changes[bit, col])))
        return out

    def _evaluate(
        self,
        candidates: list[tuple[str, int, int, float]],
        x_t: torch.Tensor,
        labels: torch.Tensor,
        deltas: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy on ``(x_t, labels)`` of every candidate flipped alone (on top of the
        committed flips), one vmapped forward per layer and sample batch."""
        model = self.estimator.base_model
        params = {name: model.get_parameter(name).detach() + d for name, d in deltas.items()}
        loss = torch.zeros(len(candidates), dtype=torch.float64, device=x_t.device)
        correct = torch.zeros(len(candidates), dtype=torch.float64, device=x_t.device)
        by_param: dict[str, list[int]] = {}
        for i, (name, *_) in enumerate(candidates):
            by_param.setdefault(name, []).append(i)
        with torch.no_grad():
            for name, rows in by_param.items():
                stacked = params[name].unsqueeze(0).repeat((len(rows),) + (1,) * params[name].ndim)
                flat = stacked.view(len(rows), -1)
                for j, i in enumerate(rows):
                    flat[j, candidates[i][1]] += candidates[i][3]
                for s in distributed.my_batches(len(x_t), self.batch_size):
                    xb, yb = x_t[s], labels[s]
                    logits = _batched_logits(model, params, name, stacked, xb)  # (C, B, K)
                    ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(rows)), reduction="none")
                    loss[rows] += ce.reshape(len(rows), -1).sum(dim=1).to(torch.float64)
                    correct[rows] += (logits.argmax(dim=2) == yb).sum(dim=1).to(torch.float64)
        loss, correct = distributed.all_reduce_sum_list([loss, correct])  # every rank ranks the same candidates
        return loss / len(x_t), correct / len(x_t)


def _batched_logits(
    model: torch.nn.Module, params: Mapping[str, torch.Tensor], name: str, stacked: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` for each value of parameter ``name`` in ``stacked`` (the others from
    ``params``): ``torch.func.vmap`` where the model allows it, a loop otherwise."""

    def run(value: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**params, name: value}, (x,), strict=False)

    try:
        return vmap(run)(stacked)
    except (RuntimeError, NotImplementedError) as error:
        if "vmap" not in str(error) and "atching rule" not in str(error):
            raise  # not vmap's: an error of the model itself propagates
        logger.debug("vmap failed (%s); evaluating the candidates one by one.", error)
        return torch.stack([run(value) for value in stacked])
