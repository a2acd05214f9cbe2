"""
The float search behind ``BitFlipBackdoor(encoding="float")``: OneFlip (USENIX Security 2025), one exponent bit of one
float weight of the final layer flipped from 0 to 1, so that the weight linking a feature neuron to the target class
grows by a power of two (docs/theory.md §8.3), and a trigger that excites that neuron.

The neurons tried are those with a positive weight to the target that fire least on clean inputs; each gets its own
trigger (placed where it is most sensitive, optimised to excite it, all at once in one batch), and every exponent bit
of its weight is scored exactly on the attack inputs: the flip moves only the target logit, by ``(w' − w)·h``, so the
clean and triggered predictions with the flip follow from one forward pass each. The best flip sends the most
triggered inputs to the target among those that keep the clean accuracy within :data:`FLOAT_CLEAN_TOLERANCE`.

| Paper link: https://www.usenix.org/conference/usenixsecurity25 (OneFlip)
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from art_weightpert.attacks.backdoor_search import TRIGGER_STEPS, VictimModel, input_spread, refine_trigger, saliency
from art_weightpert.attacks.trigger import PatchTrigger, optimise_pattern, select_mask
from art_weightpert.float_bits import FloatBitFlip, flip_float_bits, float_layout
from art_weightpert.torch_tools import batch_slices

logger = logging.getLogger(__name__)

MAX_NEURONS = 32  # feature neurons tried
TRIGGER_SAMPLES = 256  # attack inputs used to place and optimise the triggers
FLOAT_CLEAN_TOLERANCE = 0.01  # largest clean accuracy drop on the attack inputs
SHORTLIST = 8  # best candidate flips whose trigger is then refined on the flipped model


def one_flip(
    victim: VictimModel,
    target: int,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    size: int,
    low: torch.Tensor,
    high: torch.Tensor,
    channels_first: bool,
    batch_size: int,
) -> tuple[FloatBitFlip, PatchTrigger, dict[str, float]]:
    """
    Search the flip and its trigger.

    :param victim: the private copy of the model.
    :param target: the target class.
    :param x: raw attack inputs.
    :param labels: their labels (``None``: the model's predictions).
    :param size: trigger size (see :class:`.BitFlipBackdoor`).
    :param low: lower bounds of the inputs.
    :param high: upper bounds.
    :param channels_first: the estimator's layout.
    :param batch_size: samples per forward pass.
    :return: ``(flip, trigger, scores on the attack inputs)``.
    """
    name = victim.final_weight
    weight = victim.params[name]
    with torch.no_grad():
        logits, h = _batched(victim, x, batch_size)
    labels = logits.argmax(dim=1) if labels is None else labels
    accuracy = float((logits.argmax(dim=1) == labels).double().mean())
    row = weight[target]
    positive = torch.nonzero(row > 0).flatten()
    if len(positive) == 0:
        raise ValueError(f"the final layer has no positive weight to class {target}: no exponent flip can raise it.")
    firing = (h[:, positive] > 0).double().mean(dim=0) + 1e-6 * h[:, positive].mean(dim=0).double()
    neurons = positive[torch.argsort(firing, stable=True)[:MAX_NEURONS]]
    triggers, patterns = _neuron_triggers(victim, x[:TRIGGER_SAMPLES], neurons, size, low, high, channels_first)
    others = labels != target
    scored = []  # every (trigger, exponent flip) with its clean effect and first success
    for m, (j, trigger) in enumerate(triggers):
        effects = _clean_effects(row[j], h[:, j], logits, labels, accuracy, target)
        if not effects:
            continue
        with torch.no_grad():
            logits_trig, h_trig = _batched(victim, trigger.apply_tensor(x[others], patterns[m]), batch_size)
        for bit, change, drop in effects:
            success = _success(logits_trig, h_trig[:, j], target, change)
            scored.append(((drop <= FLOAT_CLEAN_TOLERANCE, success, -drop), m, j, bit, change))
    if not scored:
        raise ValueError("no exponent flip of the final layer's weights to the target stays finite.")
    scored.sort(key=lambda item: item[0], reverse=True)
    best, best_key = None, None
    for (feasible, _, neg_drop), m, j, bit, change in scored[:SHORTLIST]:
        deltas = {name: torch.zeros_like(weight)}
        deltas[name][target, j] = change
        trigger = triggers[m][1]
        x_refine = x[others][:TRIGGER_SAMPLES]
        pattern = refine_trigger(victim, trigger, patterns[m], x_refine, deltas, target, low, high, TRIGGER_STEPS)
        with torch.no_grad():
            logits_trig, h_trig = _batched(victim, trigger.apply_tensor(x[others], pattern), batch_size)
        key = (feasible, _success(logits_trig, h_trig[:, j], target, change), neg_drop)
        if best_key is None or key > best_key:
            best_key = key
            best = (FloatBitFlip(name, (target, j), bit), PatchTrigger(trigger.mask, pattern.cpu().numpy()))
    logger.info("OneFlip: %s, success %.3f, clean drop %.3f on the attack inputs.", best[0], *best_key[1:])
    return best[0], best[1], {"success": best_key[1], "clean_drop": -best_key[2]}


def _batched(victim: VictimModel, x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and feature neurons of the unflipped model, batch by batch."""
    outs = [victim.features(victim.preprocess(x[s]), {}) for s in batch_slices(len(x), batch_size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _clean_effects(w, h, logits, labels, accuracy, target):
    """``(bit, weight change, clean accuracy drop)`` of every exponent flip that raises the positive weight ``w`` to a
    finite value whose products with the clean activations ``h`` stay far from overflow."""
    out = []
    for bit in float_layout(w.dtype).exponent_bits:
        value = flip_float_bits(w, bit)
        change = float(value.double() - w.double())
        limit = 1e-4 * torch.finfo(w.dtype).max
        if np.isfinite(change) and change > 0 and abs(float(value)) * max(float(h.max()), 1.0) < limit:
            drop = accuracy - float((_predict(logits, h, target, change) == labels).double().mean())
            out.append((bit, change, drop))
    return out


def _success(logits: torch.Tensor, h: torch.Tensor, target: int, change: float) -> float:
    """Share of triggered inputs sent to the target once the target logit moves by ``change·h``."""
    return float((_predict(logits, h, target, change) == target).double().mean()) if len(h) else 0.0


def _predict(logits: torch.Tensor, h: torch.Tensor, target: int, change: float) -> torch.Tensor:
    """Predictions once the target logit moves by ``change·h`` (the flipped weight's only effect), in float64."""
    moved = logits.double().clone()
    moved[:, target] += change * h.double()
    return moved.argmax(dim=1)


def _neuron_triggers(
    victim: VictimModel, x: torch.Tensor, neurons: torch.Tensor, size: int, low, high, channels_first: bool
) -> tuple[list[tuple[int, PatchTrigger]], torch.Tensor]:
    """Triggers for each neuron: placed where the neuron is most sensitive (also relative to the inputs' spread, where
    clean inputs vary least), their values optimised (all in one batch) to excite it. Returns ``(neuron, trigger)``
    pairs and the values."""
    spread = input_spread(x, low, high)
    triggers: list[tuple[int, PatchTrigger]] = []
    for j in neurons.tolist():
        sal = saliency(victim, x, {}, lambda out, act, j=j: act[:, j].sum())
        masks = [select_mask(sal / spread**power, size, channels_first) for power in (0, 1)]
        for mask in masks[:1] if np.array_equal(*masks) else masks:
            triggers.append((j, PatchTrigger(mask, np.zeros(mask.shape, dtype=np.float32))))
    masks = torch.as_tensor(np.stack([t.mask for _, t in triggers]), device=x.device)  # (T,) + shape
    owners = torch.tensor([j for j, _ in triggers], device=x.device)
    index = torch.arange(len(triggers), device=x.device)

    def excite(patterns: torch.Tensor) -> torch.Tensor:
        stamped = torch.where(masks.unsqueeze(1), patterns.unsqueeze(1), x.unsqueeze(0))  # (T, B) + shape
        _, h = victim.features(victim.preprocess(stamped.flatten(0, 1)), {})
        return -h.reshape(len(triggers), len(x), -1)[index, :, owners].mean()

    return triggers, optimise_pattern(excite, low, high, TRIGGER_STEPS, batch_shape=(len(triggers),))
