"""
:class:`BitFlipRobustTrainer`: training that makes the bit-flip attack (BFA) on the deployed quantized weights need
many more flips, after He et al. (CVPR 2020), as an ART defence trainer.

An ``n_bits`` sign-bit flip moves a weight by about ``max|W|`` of its tensor (docs/theory.md §8), and BFA picks the
weights where that hurts most: a small weight that jumps to ``±max|W|``. Every method trains with the weights that
will be deployed in the forward pass (straight-through estimator: the gradient of the deployed weights is applied to
float latent weights) and writes the deployed weights into the classifier when ``fit`` ends:

* ``"binarization"`` (binarization-aware training, the default): each selected layer's weights are ``α·sign(W)``
  with ``α`` the mean ``|W|`` of the tensor (or of each output channel). Every quantized code is then
  ``±(2^(n_bits−1) − 1)``: no flip can make a weight larger, a sign-bit flip only sends one weight to about 0, and
  one weight among many matters little.
* ``"clustering"`` (piece-wise clustering): quantization-aware training at ``n_bits`` plus ``lam`` times
  :func:`clustering_penalty` on the latent weights (the spread of each layer's positive weights around their mean and
  of its negative weights around theirs): ``max|W|`` comes closer to a typical ``|w|``.
* ``"quantization"``: quantization-aware training at ``n_bits`` alone (the deployed codes are the trained ones).

With ``adv_flips > 0`` (default 5) every step also takes the cross-entropy of the deployed weights with the
``adv_flips`` single-bit flips of largest first-order loss increase (BFA's ranking, :func:`adversarial_flip_deltas`)
and averages the two: the network learns not to depend on the few weights BFA would pick.

Clustering bounds no flip (a sign-bit flip still moves a weight by about ``max|W|``); binarization is the one method
under which no flip can enlarge any weight, and with ``adv_flips=5`` it is the one that multiplies the flips BFA needs
on the digits models (measured per method and seed in docs/bit_flips.md, "Measured against the attack").

| Paper link: https://openaccess.thecvf.com/content_CVPR_2020/html/He_Defending_and_Harnessing_the_Bit-Flip_Based_Adversarial_Weight_Attack_CVPR_2020_paper.html
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from art.defences.trainer.trainer import Trainer
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.defences.trainer.batches import Batch, array_batches
from art_weightpert.defences.trainer.monitoring import check_validation_data
from art_weightpert.defences.trainer.schedule import check_scheduler, step_scheduler
from art_weightpert.defences.trainer.settings import ValidatedSettings
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.quantization import QuantizedWeights, check_quantization_args
from art_weightpert.torch_tools import batch_slices, eval_mode, kept_training_flags
from art_weightpert.validation import (
    check_bool,
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
)

logger = logging.getLogger(__name__)

METHODS = ("binarization", "clustering", "quantization")

HISTORY_KEYS = ("epoch", "loss", "ce", "adv", "cluster", "accuracy", "lr", "time")


def binarized_codes(weight: torch.Tensor, n_bits: int, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n_bits`` codes and scales of ``α·sign(W)``, ``α`` the mean ``|W|`` of the tensor (``"tensor"``) or of each
    output channel (``"channel"``): codes ``±(2^(n_bits−1) − 1)`` (0 where ``W = 0``), scale ``α / (2^(n_bits−1) − 1)``
    (float64), as :class:`.QuantizedWeights` holds them."""
    w = weight.detach().to(torch.float64)
    level = (1 << (n_bits - 1)) - 1
    alpha = w.abs().mean() if granularity == "tensor" else w.abs().reshape(len(w), -1).mean(dim=1)
    return torch.sign(w).to(torch.int64) * level, alpha / level


def clustering_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    """Piece-wise clustering term: ``Σ_l mean_i (w_i − μ_l^{sign(w_i)})² / (mean_i |w_i|)²``, the spread of each
    layer's positive weights around their mean plus that of its negative weights around theirs (zeros belong to
    neither), relative to the square of the layer's mean weight magnitude (held constant in the gradient, so the term
    cannot shrink by scaling the weights); 0 for two-valued layers, differentiable."""
    total = weights[0].new_zeros(())
    for w in weights:
        flat = w.reshape(-1)
        spread = flat.new_zeros(())
        for mask in ((flat > 0).to(flat.dtype), (flat < 0).to(flat.dtype)):  # masks: cheaper than boolean indexing
            mean = (flat * mask).sum() / mask.sum().clamp_min(1.0)
            spread = spread + ((flat - mean) ** 2 * mask).sum()
        total = total + spread / (flat.numel() * flat.detach().abs().mean().clamp_min(1e-12) ** 2)
    return total


def adversarial_flip_deltas(
    quantized: QuantizedWeights, grads: dict[str, torch.Tensor], nb_flips: int
) -> dict[str, torch.Tensor]:
    """The weight changes of the ``nb_flips`` single-bit flips (at most one per weight) with the largest first-order
    loss increase ``g·s·d_b(c)`` (docs/theory.md §8) over all quantized weights: BFA's ranking without its search.

    :param quantized: the deployed codes.
    :param grads: ``{weight name: loss gradient}``, the weights' shapes.
    :param nb_flips: flips to choose (fewer where fewer increase the loss).
    :return: ``{weight name: change}`` in each gradient's dtype, detached.
    """
    names = list(grads)
    if nb_flips <= 0:
        return {name: torch.zeros_like(g) for name, g in grads.items()}
    flat = {name: grads[name].detach().reshape(-1).to(torch.float64) for name in names}
    offsets = np.cumsum([0] + [flat[name].numel() for name in names]).tolist()
    # no flip moves a weight by more than s·2^(n_bits−1) (its sign bit): a bound of each weight's gain, so only the
    # weights with the largest bounds need their bits' exact gains (more of them until the bound proves the choice)
    top_change = float(1 << (quantized.n_bits - 1))
    bound = torch.cat(
        [flat[n].abs() * quantized.scale_like(n).expand(grads[n].shape).reshape(-1).to(flat[n]) for n in names]
    )
    k = min(nb_flips, bound.numel())
    size = 4 * k
    while True:
        size = min(size, bound.numel())
        order = torch.topk(bound, min(size + 1, bound.numel())).indices
        candidates = torch.sort(order[:size]).values
        gains, changes = [], []
        for name, start, stop in zip(names, offsets[:-1], offsets[1:]):
            index = candidates[(candidates >= start) & (candidates < stop)] - start
            per_bit = quantized.bit_changes(name, index).to(flat[name])  # (n_bits, len(index))
            gain, bit = (flat[name][index].unsqueeze(0) * per_bit).max(dim=0)
            gains.append(gain)
            changes.append(per_bit.gather(0, bit.unsqueeze(0)).squeeze(0))  # each weight's most harmful flip
        gain, change = torch.cat(gains), torch.cat(changes)
        top = torch.topk(gain, k)
        if size == bound.numel() or top.values[-1] >= bound[order[size]] * top_change:
            break
        size *= 4
    chosen = top.indices[top.values > 0]
    delta = torch.zeros_like(bound)
    delta[candidates[chosen]] = change[chosen]
    return {
        name: delta[start:stop].reshape(grads[name].shape).to(grads[name].dtype)
        for name, start, stop in zip(names, offsets[:-1], offsets[1:])
    }


class BitFlipRobustTrainer(ValidatedSettings, Trainer):
    """
    Trains a PyTorch classifier **in place** so that its ``n_bits`` quantized weights resist the bit-flip attack
    (see the module docstring for the methods). When :meth:`fit` returns, the classifier's float weights are the
    deployed ones: the binarized weights ``α·sign(W)`` or the dequantized ``n_bits`` weights ``s·c`` of the selected
    layers (the latent float weights of training are discarded; a later ``fit`` starts from the deployed weights), so
    ``QuantizedWeights.from_estimator(classifier, n_bits, granularity, layers)`` (also :meth:`quantized_weights`) gives
    exactly the codes that were trained; deploy with the same ``granularity``. For binarization these codes are all
    ``±(2^(n_bits−1) − 1)`` (with ``granularity="tensor"``; per channel, with a per-channel scale): the deployed
    quantized model is the binarized network. Biases and other parameters are trained plainly and stay float.

    | Paper link: https://openaccess.thecvf.com/content_CVPR_2020/html/He_Defending_and_Harnessing_the_Bit-Flip_Based_Adversarial_Weight_Attack_CVPR_2020_paper.html
    """

    trainer_params = ["n_bits", "method", "lam", "adv_flips", "granularity", "layers", "verbose"]

    def __init__(
        self,
        classifier: PyTorchClassifier,
        n_bits: int = 8,
        method: str = "binarization",
        lam: float = 1.0,
        adv_flips: int = 5,
        granularity: str = "tensor",
        layers: list[str] | None = None,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.BitFlipRobustTrainer` instance.

        :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`) with an optimizer; it
            is trained in place.
        :param n_bits: bits per deployed weight code, 2 to 16.
        :param method: ``"binarization"`` (default), ``"clustering"`` or ``"quantization"`` (module docstring).
        :param lam: weight λ ≥ 0 of the piece-wise clustering term (``"clustering"`` only; ignored otherwise).
        :param adv_flips: adversarial bit flips per step (0: none, He et al.'s methods alone): the loss averages the
            cross-entropy of the deployed weights and that with the ``adv_flips`` flips of largest first-order loss
            increase (:func:`adversarial_flip_deltas`); one more forward and backward pass per step.
        :param granularity: one quantization scale (and binarization ``α``) per ``"tensor"`` or per output
            ``"channel"``: the granularity the model will be deployed with.
        :param layers: names of the Linear/Conv layers whose weights are deployed quantized (``None``: all); the
            others train plainly.
        :param verbose: show a progress bar over the epochs.
        """
        estimator = self._trainable(classifier)
        params = {key: value for key, value in locals().items() if key in self.trainer_params}
        params = self._validated(params, estimator)
        super().__init__(classifier)
        self._estimator = estimator
        for key, value in params.items():
            setattr(self, key, value)
        self.history: dict[str, list] = {}

    # ------------------------------------------------------------------------------------------------ parameters
    @staticmethod
    def _validated(params: dict[str, Any], estimator: PyTorchWeightClassifier) -> dict[str, Any]:
        """The validated parameters (``layers`` resolved to the list of layer names)."""
        params = dict(params)
        params["layers"] = check_quantization_args(
            params["n_bits"], params["granularity"], params["layers"], estimator.base_model
        )
        params["n_bits"] = int(params["n_bits"])
        check_choice(params["method"], "method", METHODS)
        params["lam"] = check_non_negative(params["lam"], "lam")
        params["adv_flips"] = check_non_negative_int(params["adv_flips"], "adv_flips")
        params["verbose"] = check_bool(params["verbose"], "verbose")
        return params

    @property
    def weight_names(self) -> list[str]:
        """The names of the deployed quantized weights (``"<layer>.weight"``)."""
        return [f"{layer}.weight" if layer else "weight" for layer in self.layers]

    # ------------------------------------------------------------------------------------------------ deployment
    def quantized_weights(self) -> QuantizedWeights:
        """The deployed codes and scales of the selected weights, from the classifier's current (latent) weights: the
        binarized codes ``±(2^(n_bits−1) − 1)`` and scales ``α / (2^(n_bits−1) − 1)``, or
        ``QuantizedWeights.from_estimator(classifier, n_bits, granularity, layers)``. After :meth:`fit` both equal
        the latter."""
        if self.method != "binarization":
            return QuantizedWeights.from_estimator(self._estimator, self.n_bits, self.granularity, self.layers)
        model = self._estimator.base_model
        pairs = {
            name: binarized_codes(model.get_parameter(name), self.n_bits, self.granularity)
            for name in self.weight_names
        }
        codes = {name: pair[0] for name, pair in pairs.items()}
        return QuantizedWeights(codes, {name: pair[1] for name, pair in pairs.items()}, self.n_bits, self.granularity)

    def _write_deployed(self) -> None:
        """Replace the selected latent weights by the deployed ones ``s·c``, in place."""
        model = self._estimator.base_model
        with torch.no_grad():
            for name, value in self.quantized_weights().dequantize().items():
                weight = model.get_parameter(name)
                weight.copy_(value.to(device=weight.device, dtype=weight.dtype))

    # ------------------------------------------------------------------------------------------------ training
    def fit(  # pylint: disable=arguments-differ
        self,
        x: np.ndarray,
        y: np.ndarray,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        batch_size: int = 128,
        nb_epochs: int = 20,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        **kwargs: Any,
    ) -> dict[str, list]:
        """
        Train the classifier in place on ``(x, y)`` (batches drawn as ``PyTorchClassifier.fit`` draws them), then write
        the deployed weights into it (class docstring), also when training is interrupted.

        :param x: training inputs ``(N,) + input_shape``.
        :param y: integer labels ``(N,)`` or one-hot ``(N, nb_classes)``.
        :param validation_data: optional ``(x_val, y_val)``: the accuracy with the deployed weights after every epoch.
        :param batch_size: samples per step.
        :param nb_epochs: number of epochs.
        :param scheduler: optional ``torch.optim.lr_scheduler.LRScheduler`` of the classifier's optimizer, stepped once
            per epoch (``ReduceLROnPlateau`` gets the epoch's mean loss).
        :param kwargs: ignored (ART trainer signature).
        :return: the history: per-epoch lists ``epoch``, ``loss``, ``ce``, ``cluster`` (mean clustering term, NaN
            unless ``method="clustering"``), ``accuracy`` (training accuracy of the epoch's steps, deployed weights,
            train mode), ``lr``, ``time`` (seconds), with validation data ``val_accuracy``.
        """
        est = self._estimator
        x = est.check_inputs(x)
        labels = est.check_labels(y, len(x), required=True)
        batch_size = check_positive_int(batch_size, "batch_size")
        nb_epochs = check_positive_int(nb_epochs, "nb_epochs")
        if len(x) == 0:
            raise ValueError("`x` holds no samples.")
        check_scheduler(scheduler, self._classifier._optimizer)  # pylint: disable=protected-access
        validation = check_validation_data(est, validation_data)
        batches, _ = array_batches(est, x, labels, batch_size, keep_raw=False)
        return self._train(batches, nb_epochs, scheduler, validation)

    def loss_terms(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        The terms of the loss on a preprocessed batch with the deployed weights in the forward pass (straight-through
        gradient to the latent weights); the model's mode is the caller's.

        :param x: preprocessed inputs on the estimator's device.
        :param labels: int64 class indices.
        :return: ``{"loss", "ce", "adv", "cluster", "accuracy"}`` scalars: ``adv`` is the cross-entropy with
            ``adv_flips`` adversarial flips (NaN when ``adv_flips=0``; otherwise the loss averages ``ce`` and ``adv``),
            ``cluster`` the clustering term (NaN unless ``method="clustering"``).
        """
        est = self._estimator
        model = est.base_model
        quantized = self.quantized_weights()
        deltas = quantized.deltas(est)
        logits = est.logits(x, deltas)
        ce = est._loss(logits, labels)  # pylint: disable=protected-access
        loss = ce
        nan = torch.full((), float("nan"), device=logits.device)
        adv = nan
        if self.adv_flips > 0:
            weights = [model.get_parameter(name) for name in self.weight_names]
            grads = dict(zip(self.weight_names, torch.autograd.grad(ce, weights, retain_graph=True)))
            flips = adversarial_flip_deltas(quantized, grads, self.adv_flips)
            adv = est._loss(est.logits(x, {n: d + flips[n] for n, d in deltas.items()}), labels)  # pylint: disable=W0212
            loss = 0.5 * (ce + adv)
        cluster = nan
        if self.method == "clustering":
            cluster = clustering_penalty([model.get_parameter(name) for name in self.weight_names])
            loss = loss + self.lam * cluster
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "ce": ce, "adv": adv, "cluster": cluster, "accuracy": accuracy}

    def _train(
        self,
        batches: Callable[[], Iterator[Batch]],
        nb_epochs: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        validation: tuple[np.ndarray, np.ndarray] | None,
    ) -> dict[str, list]:
        model = self._estimator.base_model
        optimizer = self._classifier._optimizer  # pylint: disable=protected-access
        history: dict[str, list] = {key: [] for key in HISTORY_KEYS}
        if validation is not None:
            history["val_accuracy"] = []
        self.history = history
        try:
            with kept_training_flags(model):
                for epoch in tqdm(range(nb_epochs), desc="BitFlipRobustTrainer", disable=not self.verbose):
                    start = time.perf_counter()
                    model.train()
                    sums = dict.fromkeys(("loss", "ce", "adv", "cluster", "accuracy"), 0.0)
                    seen = 0
                    for x_pre, y_pre, *_ in batches():
                        optimizer.zero_grad()
                        terms = self.loss_terms(x_pre, y_pre)
                        terms["loss"].backward()
                        optimizer.step()
                        for key in sums:
                            sums[key] += float(terms[key].detach()) * len(y_pre)
                        seen += len(y_pre)
                    record = {key: value / max(seen, 1) for key, value in sums.items()}
                    step_scheduler(scheduler, record["loss"])
                    record["lr"] = float(optimizer.param_groups[0]["lr"])
                    record = {"epoch": epoch + 1, **record, "time": time.perf_counter() - start}
                    if validation is not None:
                        record["val_accuracy"] = self._deployed_accuracy(*validation)
                    for key, value in record.items():
                        history[key].append(value)
                    logger.info("epoch %d: " + ", ".join(f"{k}=%.4g" for k in record if k != "epoch"), *record.values())
        finally:
            self._write_deployed()
        return history

    def _deployed_accuracy(self, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
        """Accuracy on ``(x, y)`` with the deployed weights, in eval mode."""
        est = self._estimator
        x_t, labels = est.prepare_inputs(x, y)
        deltas = self.quantized_weights().deltas(est)
        correct = 0
        with eval_mode(est.base_model), torch.no_grad():
            for b in batch_slices(len(x_t), batch_size):
                logits = est.logits(x_t[b], deltas)
                correct += int((logits.argmax(dim=1) == labels[b]).sum())
        return correct / max(len(x_t), 1)


__all__ = ["METHODS", "BitFlipRobustTrainer", "adversarial_flip_deltas", "binarized_codes", "clustering_penalty"]
