"""
The searches behind :class:`.BitFlipBackdoor`: the trojan bit search on quantized weights (TBT, Rakin et al., CVPR
2020) and the single exponent-bit flip of a float weight (OneFlip, USENIX Security 2025), each learning its trigger
(:mod:`art_weightpert.attacks.trigger`) together with the flips.

Both run on :class:`VictimModel`, a private copy of the estimator's base module evaluated with
``torch.func.functional_call`` on ``W + Δ``: the user's module is never touched, also when a search is interrupted.
A flip of code ``c`` by bit ``b`` moves the weight by ``s·d_b(c)`` (docs/theory.md §8); an IEEE exponent flip
multiplies it by a power of two (docs/theory.md §8.3).

| Paper link: https://arxiv.org/abs/1909.05193 (TBT)
| Paper link: https://www.usenix.org/conference/usenixsecurity25 (OneFlip)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from art_weightpert.attacks.bit_search import batched_logits
from art_weightpert.attacks.trigger import PatchTrigger, optimise_pattern, select_mask
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.quantization import BitFlip, QuantizedWeights
from art_weightpert.torch_tools import batch_slices, run_with_parameters

logger = logging.getLogger(__name__)

NGR_FRACTION = 0.1  # share of the final layer's feature neurons ranked by NGR
TOP_K = 256  # weights per layer, by gradient magnitude, whose bits are candidates
CANDIDATES_PER_BIT = 2  # best first-order flips of each bit position and layer, evaluated exactly
TRIGGER_STEPS = 100  # Adam steps of a trigger optimised from scratch, and of the final refinement
TRIGGER_STEPS_PER_FLIP = 10  # Adam steps of the trigger after each committed flip
CLEAN_TOLERANCE = 0.015  # largest clean accuracy drop on the attack inputs a committed flip may cause (quantized)


class VictimModel:
    """
    A private eval-mode copy of ``estimator``'s base module with a tap on the input of the final layer (the feature
    neurons). ``logits`` evaluates it on preprocessed inputs with weights ``W + deltas``.

    :param estimator: the attacked estimator.
    :param final: name of the final Linear layer.
    """

    def __init__(self, estimator: PyTorchWeightClassifier, final: str) -> None:
        self.estimator = estimator
        self.model = copy.deepcopy(estimator.base_model).eval()
        self.params = {name: p.detach() for name, p in self.model.named_parameters()}
        self.final_weight = f"{final}.weight" if final else "weight"
        self._capture, self._features = False, None
        self.model.get_submodule(final).register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        if self._capture:
            self._features = args[0]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """The estimator's (torch) preprocessing of raw inputs, differentiable."""
        x_pre, _ = self.estimator._apply_preprocessing(x, None, fit=False, no_grad=False)
        return x_pre

    def logits(self, x_pre: torch.Tensor, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits on preprocessed ``x_pre`` with weights ``W + deltas``."""
        params = {name: self.params[name] + d for name, d in deltas.items()}
        return run_with_parameters(self.model, params, x_pre)

    def features(self, x_pre: torch.Tensor, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, inputs of the final layer)`` on preprocessed ``x_pre``."""
        self._capture = True
        try:
            out = self.logits(x_pre, deltas)
        finally:
            self._capture = False
        return out, self._features.flatten(1)

    def batched_logits(
        self, x_pre: torch.Tensor, deltas: Mapping[str, torch.Tensor], name: str, stacked: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(C, N, K)`` for each value of weight ``name`` in ``stacked`` (the others ``W + deltas``)."""
        params = {n: self.params[n] + d for n, d in deltas.items()}
        return batched_logits(self.model, params, name, stacked, x_pre)


def saliency(
    victim: VictimModel,
    x: torch.Tensor,
    deltas: Mapping[str, torch.Tensor],
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """Mean absolute input gradient of ``score(logits, features)`` (where a trigger moves it most)."""
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(*victim.features(victim.preprocess(x), deltas)), x)
    return grad.abs().mean(dim=0).cpu().numpy()


def input_spread(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> np.ndarray:
    """Per input entry, the clean inputs' standard deviation plus 1% of the input range: where it is small, clean
    inputs vary least and a trigger placed there stands out."""
    return (x.std(dim=0) + 0.01 * (high - low)).cpu().numpy()


def refine_trigger(
    victim: VictimModel,
    trigger: PatchTrigger,
    pattern: torch.Tensor,
    x: torch.Tensor,
    deltas: Mapping[str, torch.Tensor],
    target: int,
    low: torch.Tensor,
    high: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """``steps`` Adam steps on the trigger's values from ``pattern``, towards ``target`` on the model with weights
    ``W + deltas``, within ``[low, high]``."""
    targets = torch.full((len(x),), target, dtype=torch.long, device=x.device)

    def loss(p: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(victim.logits(victim.preprocess(trigger.apply_tensor(x, p)), deltas), targets)

    return optimise_pattern(loss, low, high, steps, start=pattern)


def far_pattern(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The bound farthest from the clean inputs' mean, entry by entry (the most conspicuous trigger values)."""
    mean = x.mean(dim=0)
    return torch.where(mean - low < high - mean, high, low)


# ---------------------------------------------------------------------------------------------------- TBT (quantized)
class TrojanBitSearch:
    """
    Trojan bit search on the quantized weights, for one trigger placement (:meth:`placements`): a progressive search
    of single bit flips minimising ``CE(f(x), y) + CE(f(x ⊕ trigger), target)`` (first-order ranking of every bit of
    the ``TOP_K`` weights of each layer with the largest gradient, then the ``CANDIDATES_PER_BIT`` best of each bit
    position evaluated exactly), under a floor on the clean accuracy, the trigger re-optimised towards the target
    after each flip, and a pruning pass that drops every flip the objective does not need.

    :param victim: the private copy of the model.
    :param quantized: the quantized weights (their layers may flip).
    :param target: the target class.
    :param batch_size: samples per forward pass.
    """

    def __init__(self, victim: VictimModel, quantized: QuantizedWeights, target: int, batch_size: int) -> None:
        self.victim, self.quantized, self.target, self.batch_size = victim, quantized, target, batch_size
        self.floor = 0.0  # clean accuracy a committed flip must keep on the attack inputs (set by run)

    def deltas(self, quantized: QuantizedWeights) -> dict[str, torch.Tensor]:
        """``{weight name: s·c − W}`` of ``quantized`` (the private copy holds the estimator's weights ``W``)."""
        return quantized.deltas(self.victim.estimator)

    def placements(self, x: torch.Tensor, size: int, low: torch.Tensor, high: torch.Tensor, channels_first: bool):
        """
        Where the trigger may go: the patch (or features) of largest input saliency, for the NGR neurons (TBT: the
        feature neurons with the largest ``|∂CE(f(x), t)/∂W[t, j]| = Σ (1 − p_t)·h_j``) and for the target's
        cross-entropy, divided by the clean inputs' spread to the power 0, 1 and 2 (where clean inputs vary least, a
        trigger stands out and the weights from it are silent on clean inputs). Distinct masks only.
        """
        deltas = self.deltas(self.quantized)
        targets = torch.full((len(x),), self.target, dtype=torch.long, device=x.device)
        with torch.no_grad():
            logits, h = self.victim.features(self.victim.preprocess(x), deltas)
            gap = 1.0 - torch.softmax(logits, dim=1)[:, self.target]
            ranking = (gap.unsqueeze(1) * h).sum(dim=0)
        neurons = torch.argsort(ranking, descending=True, stable=True)[: max(1, math.ceil(NGR_FRACTION * h.shape[1]))]
        maps = (
            saliency(self.victim, x, deltas, lambda out, act: act[:, neurons].sum()),
            saliency(self.victim, x, deltas, lambda out, act: F.cross_entropy(out, targets, reduction="sum")),
        )
        spread = input_spread(x, low, high)
        masks: list[np.ndarray] = []
        for sal in maps:
            for power in (0, 1, 2):
                mask = select_mask(sal / spread**power, size, channels_first)
                if not any(np.array_equal(mask, other) for other in masks):
                    masks.append(mask)
        return [PatchTrigger(mask, np.zeros(mask.shape, dtype=np.float32)) for mask in masks]

    def screen(
        self, x: torch.Tensor, labels: torch.Tensor, trigger: PatchTrigger, low: torch.Tensor, high: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """
        The trigger values optimised towards the target on the unflipped quantized model, from :func:`far_pattern`
        (the start of :meth:`run`), and their mean cross-entropy to the target on the attack inputs whose label is
        not the target: placements where the trigger alone pulls hardest towards the target need the fewest flips.
        """
        deltas = self.deltas(self.quantized)
        pattern = self.refine_trigger(x, trigger, far_pattern(x, low, high), deltas, low, high, TRIGGER_STEPS)
        others = x[labels != self.target]
        if len(others) == 0:
            return pattern, 0.0
        targets = torch.full((len(others),), self.target, dtype=torch.long, device=x.device)
        with torch.no_grad():
            out = self.victim.logits(self.victim.preprocess(trigger.apply_tensor(others, pattern)), deltas)
        return pattern, float(F.cross_entropy(out, targets))

    def run(
        self, x: torch.Tensor, labels: torch.Tensor, trigger: PatchTrigger, max_flips: int, low: torch.Tensor,
        high: torch.Tensor, progress: Callable[[float], None], start: torch.Tensor | None = None,
    ) -> tuple[list[BitFlip], torch.Tensor, float]:  # fmt: skip
        """
        The progressive search from the trigger values ``start`` (default :func:`far_pattern`), then pruning and a
        last trigger refinement. A flip is committed only when the clean accuracy on ``(x, labels)`` stays within
        :data:`CLEAN_TOLERANCE` of the unflipped quantized model's.

        :return: ``(flips, trigger values, success rate on the attack inputs whose label is not the target)``.
        """
        quantized, flips = self.quantized, []
        pattern = far_pattern(x, low, high) if start is None else start
        deltas = self.deltas(quantized)
        with torch.no_grad():
            predictions = self.victim.logits(self.victim.preprocess(x), deltas).argmax(dim=1)
        self.floor = float((predictions == labels).double().mean()) - CLEAN_TOLERANCE
        for _ in range(max_flips):
            x_trig = trigger.apply_tensor(x, pattern)
            current, grads = self.objective(x, labels, x_trig, deltas, need_grad=True)
            best = self.best_flip(quantized, grads, deltas, x, labels, x_trig, set(flips))
            if best is None or best[1] >= current - 1e-7:
                logger.info("No bit flip lowers the backdoor objective any more; stopping.")
                break
            flips.append(best[0])
            quantized = quantized.flip([best[0]])
            deltas = self.deltas(quantized)
            pattern = self.refine_trigger(x, trigger, pattern, deltas, low, high, TRIGGER_STEPS_PER_FLIP)
            progress(best[1])
        flips = self.prune(flips, x, labels, trigger.apply_tensor(x, pattern))
        deltas = self.deltas(self.quantized.flip(flips))
        pattern = self.refine_trigger(x, trigger, pattern, deltas, low, high, TRIGGER_STEPS)
        return flips, pattern, self.success(x[labels != self.target], trigger, pattern, deltas)

    def success(self, x: torch.Tensor, trigger: PatchTrigger, pattern: torch.Tensor, deltas: dict) -> float:
        """Share of ``x`` with the trigger that go to the target with weights ``W + deltas``."""
        if len(x) == 0:
            return 0.0
        with torch.no_grad():
            out = self.victim.logits(self.victim.preprocess(trigger.apply_tensor(x, pattern)), deltas)
        return float((out.argmax(dim=1) == self.target).double().mean())

    def objective(
        self, x: torch.Tensor, labels: torch.Tensor, x_trig: torch.Tensor, deltas: dict, need_grad: bool = False
    ) -> tuple[float, dict[str, torch.Tensor] | None]:
        """Mean clean cross-entropy plus mean triggered cross-entropy to the target, and its weight gradients."""
        probes = {n: d.detach().requires_grad_(need_grad) for n, d in deltas.items()}
        total, grads = 0.0, {n: torch.zeros_like(d) for n, d in deltas.items()}
        targets = torch.full_like(labels, self.target)
        for inputs, y in ((x, labels), (x_trig, targets)):
            for s in batch_slices(len(x), self.batch_size):
                with torch.set_grad_enabled(need_grad):
                    out = self.victim.logits(self.victim.preprocess(inputs[s].detach()), probes)
                    loss = F.cross_entropy(out, y[s], reduction="sum") / len(x)
                if need_grad:
                    for n, g in zip(probes, torch.autograd.grad(loss, list(probes.values()))):
                        grads[n] += g
                total += float(loss.detach())
        return total, grads if need_grad else None

    def best_flip(self, quantized, grads, deltas, x, labels, x_trig, taken) -> tuple[BitFlip, float] | None:
        """The flip with the lowest exact objective among each layer's best first-order candidates."""
        best: tuple[BitFlip, float] | None = None
        targets = torch.full_like(labels, self.target)
        xp, xtp = self.victim.preprocess(x).detach(), self.victim.preprocess(x_trig).detach()
        for name, grad in grads.items():
            g = grad.reshape(-1).to(torch.float64)
            index = torch.topk(g.abs(), min(TOP_K, g.numel())).indices
            changes = quantized.bit_changes(name, index)  # (n_bits, k)
            gain = -g[index].unsqueeze(0) * changes
            shape = tuple(grad.shape)
            cands: list[tuple[BitFlip, float]] = []
            for bit in range(gain.shape[0]):
                found = 0
                for col in torch.argsort(gain[bit], descending=True, stable=True).tolist():
                    if gain[bit, col] <= 0 or found == CANDIDATES_PER_BIT:
                        break
                    flip = BitFlip(name, tuple(int(i) for i in np.unravel_index(int(index[col]), shape)), bit)
                    if flip not in taken:
                        cands.append((flip, float(changes[bit, col])))
                        found += 1
            if not cands:
                continue
            base = self.victim.params[name] + deltas[name]
            stacked = base.detach().unsqueeze(0).repeat((len(cands),) + (1,) * base.ndim)
            for j, (flip, change) in enumerate(cands):
                stacked[(j,) + flip.index] += change
            loss = torch.zeros(len(cands), dtype=torch.float64)
            correct = torch.zeros(len(cands), dtype=torch.float64)
            with torch.no_grad():
                for inputs, y in ((xp, labels), (xtp, targets)):
                    for s in batch_slices(len(x), self.batch_size):
                        out = self.victim.batched_logits(inputs[s], deltas, name, stacked)
                        yb = y[s].repeat(len(cands))
                        ce = F.cross_entropy(out.flatten(0, 1), yb, reduction="none").reshape(len(cands), -1)
                        loss += ce.sum(dim=1).double().cpu() / len(x)
                        if y is labels:
                            correct += (out.argmax(2) == y[s]).sum(1).double().cpu() / len(x)
            loss = torch.where(correct >= self.floor, loss, torch.inf)
            j = int(torch.argmin(loss))
            if not torch.isfinite(loss[j]):
                continue
            if best is None or float(loss[j]) < best[1]:
                best = (cands[j][0], float(loss[j]))
        return best

    def prune(self, flips: list[BitFlip], x, labels, x_trig) -> list[BitFlip]:
        """Drop, one at a time, every flip whose removal does not raise the objective."""
        kept = list(flips)
        current, _ = self.objective(x, labels, x_trig, self.deltas(self.quantized.flip(kept)))
        for flip in list(flips):
            trial = [f for f in kept if f != flip]
            value, _ = self.objective(x, labels, x_trig, self.deltas(self.quantized.flip(trial)))
            if value <= current:
                kept, current = trial, value
        if len(kept) < len(flips):
            logger.info("Pruning dropped %d of %d flips.", len(flips) - len(kept), len(flips))
        return kept

    def refine_trigger(self, x, trigger, pattern, deltas, low, high, steps: int) -> torch.Tensor:
        """A few Adam steps on the trigger's values towards the target on the flipped model (:func:`refine_trigger`)."""
        return refine_trigger(self.victim, trigger, pattern, x, deltas, self.target, low, high, steps)
