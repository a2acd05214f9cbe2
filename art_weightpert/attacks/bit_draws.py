"""
:class:`RandomFlipsBase`: random faults in the bits of weights, shared by :class:`.RandomBitFlips` (integer codes) and
:class:`.RandomFloatBitFlips` (IEEE float encodings).

Two fault models over the ``numel × len(bits)`` flippable bits of the selected weights: exactly ``nb_flips`` distinct
bits, or a bit error rate ``ber``. Uniform over the bit positions by default; with per-position probabilities ``p_b``
(a sum of 1 over the allowed positions), the ``nb_flips`` distinct bits are drawn with weights ``p_b``, and under a
bit error rate each bit of position ``b`` flips independently with probability ``ber·L·p_b`` (``L`` positions: the
mean rate over the positions is ``ber``).

| Paper link: https://arxiv.org/abs/1903.12269
"""

from __future__ import annotations

import abc
import logging
from typing import Any

import numpy as np
import torch
from art.attacks.attack import Attack
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.attacks.base import BitFlipAttackBase, accuracy_summary, accuracy_with_deltas, predict_labels
from art_weightpert.flips import popcount
from art_weightpert.validation import check_bool, check_int, check_positive_int, check_probability

logger = logging.getLogger(__name__)


class RandomFlipsBase(BitFlipAttackBase):
    """
    Random bit flips drawn reproducibly: with a ``seed``, :meth:`generate` always returns the first draw and
    :meth:`evaluate` the first ``nb_samples`` draws of the same stream; with ``seed=None`` the stream is seeded from
    torch's global generator (so ``torch.manual_seed`` makes runs reproducible). Subclasses say how the weights are
    read (:meth:`_encode`), which positions may flip (:meth:`_allowed`) and how a flip is named (:meth:`_make_flip`).
    """

    def _check_draw_params(self) -> None:
        """The parameters of the fault model (no weight ball: a number or a rate of flipped bits)."""
        Attack._check_params(self)
        if (self.nb_flips is None) == (self.ber is None):
            raise ValueError("give exactly one of `nb_flips` and `ber`.")
        if self.nb_flips is not None:
            check_int(self.nb_flips, "nb_flips", minimum=0)
        if self.ber is not None:
            check_probability(self.ber, "ber")
        check_positive_int(self.nb_samples, "nb_samples")
        if self.seed is not None:
            check_int(self.seed, "seed", minimum=0)
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")

    # ------------------------------------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _encode(self) -> Any:
        """The weights object (``xor``, ``deltas`` and ``param_names``) the flips apply to."""
        raise NotImplementedError

    @abc.abstractmethod
    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> Any:
        """The flip object of bit ``bit`` of entry ``index`` of weight ``name``."""
        raise NotImplementedError

    @abc.abstractmethod
    def _allowed(self, weights: Any) -> list[int]:
        """The bit positions that may flip, sorted."""
        raise NotImplementedError

    @abc.abstractmethod
    def _width(self, weights: Any) -> int:
        """Bits per weight."""
        raise NotImplementedError

    @abc.abstractmethod
    def _tensors(self, weights: Any) -> dict[str, torch.Tensor]:
        """``{weight name: tensor}`` giving the shape and device of each weight that may flip."""
        raise NotImplementedError

    def _probabilities(self, weights: Any, allowed: list[int]) -> np.ndarray | None:
        """Per-position probabilities over ``allowed`` (summing to 1), or ``None`` for uniform draws."""
        return None

    def _references(self, weights: Any, x_t: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Accuracies without any flip: ``{"clean": the estimator's}`` (subclasses add their encoding's)."""
        return {"clean": accuracy_with_deltas(self._target, x_t, labels, None, self.batch_size, sharded=True)}

    # ------------------------------------------------------------------------------------------------ public
    def generate(self, x: np.ndarray | None = None, y: np.ndarray | None = None, **kwargs: Any) -> list[Any]:
        """
        One random draw of flipped bits (``x`` and ``y`` are not needed; accepted for ART's signature).

        :return: the flipped bits, each at most once, sorted by weight, entry and bit.
        """
        weights = self._encode()
        allowed = self._allowed(weights)
        masks = self._draw(self._tensors(weights), allowed, self._rng(), self._probabilities(weights, allowed))
        return self._to_flips(masks, self._width(weights))

    def evaluate(self, x: np.ndarray, y: np.ndarray | None = None, per_bit: bool = True) -> dict[str, Any]:
        """
        Accuracy on ``(x, y)`` under ``nb_samples`` random draws. In a process group every rank draws the same flips
        (rank 0's seed), classifies its batches of ``x`` and the counts are summed: the single-process result exactly,
        on every rank (each rank must pass the same ``x`` and ``y``).

        :param x: inputs.
        :param y: integer or one-hot labels (``None``: agreement with the unflipped encoding's predictions).
        :param per_bit: also measure, for each allowed bit position, the accuracy under the same fault model
            restricted to that position (``nb_samples`` more draws each).
        :return: ``{"mean", "std", "min", "max": float, "quantiles": {q: accuracy}, "accuracies": np.ndarray
            (nb_samples,), "clean": float (the estimator), "nb_flips": np.ndarray (flips per draw), "per_bit": {bit:
            {"mean", "std"}}}`` (``per_bit`` only when asked), and the subclass's reference accuracies.
        """
        weights = self._encode()
        x_t, labels = self._target.prepare_inputs(x, y)
        if distributed.is_distributed():  # (the inputs' host copy only where there are ranks to compare)
            distributed.check_same_data(x_t.cpu().numpy(), None if y is None else np.asarray(y), name="x")
        if labels is None:
            labels = predict_labels(self._target, x_t, weights.deltas(self._target), self.batch_size)
        allowed = self._allowed(weights)
        tensors = self._tensors(weights)
        runs = [(allowed, self._probabilities(weights, allowed))] + ([([b], None) for b in allowed] if per_bit else [])
        rng = self._rng()
        results = []
        desc = type(self).__name__
        verbose = self.verbose and distributed.is_main_process()
        with tqdm(total=self.nb_samples * len(runs), desc=desc, disable=not verbose) as bar:
            for positions, probabilities in runs:
                accuracies, counts = np.empty(self.nb_samples), np.empty(self.nb_samples, dtype=np.int64)
                for i in range(self.nb_samples):
                    masks = self._draw(tensors, positions, rng, probabilities)
                    counts[i] = sum(popcount(m, 64) for m in masks.values())
                    deltas = weights.xor(masks).deltas(self._target)
                    accuracies[i] = accuracy_with_deltas(
                        self._target, x_t, labels, deltas, self.batch_size, sharded=True
                    )
                    bar.update(1)
                results.append((accuracies, counts))
        accuracies, counts = results[0]
        out = {
            **accuracy_summary(accuracies),
            **self._references(weights, x_t, labels),
            "nb_flips": counts,
        }
        if per_bit:
            out["per_bit"] = {
                b: {"mean": float(acc.mean()), "std": float(acc.std())} for b, (acc, _) in zip(allowed, results[1:])
            }
        return out

    # ------------------------------------------------------------------------------------------------ internals
    def _rng(self) -> np.random.Generator:
        """The stream of draws; in a process group rank 0's (``seed=None``: drawn there), so that every rank draws the
        same flips and returns the single-process result."""
        seed = distributed.broadcast_object(int(torch.randint(0, 2**62, (1,)))) if self.seed is None else self.seed
        return np.random.default_rng(int(seed))

    def _draw(
        self,
        tensors: dict[str, torch.Tensor],
        bits: list[int],
        rng: np.random.Generator,
        probabilities: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """One draw as XOR masks ``{weight name: int64 tensor}``: distinct pairs ``e·L + j`` (entry ``e`` of the
        concatenated weights, ``j``-th allowed position) among the ``numel × L`` flippable bits."""
        sizes = np.array([t.numel() for t in tensors.values()], dtype=np.int64)
        total = int(sizes.sum()) * len(bits)
        if probabilities is None:
            count = self.nb_flips if self.nb_flips is not None else int(rng.binomial(total, self.ber))
            if count > total:
                raise ValueError(f"`nb_flips`={count} exceeds the {total} flippable bits.")
            chosen = np.sort(rng.choice(total, size=count, replace=False)) if count else np.zeros(0, dtype=np.int64)
        else:
            chosen = _weighted_pairs(int(sizes.sum()), probabilities, rng, self.nb_flips, self.ber)
        offsets = np.concatenate([[0], np.cumsum(sizes * len(bits))])
        masks = {}
        for k, (name, t) in enumerate(tensors.items()):
            local = chosen[(chosen >= offsets[k]) & (chosen < offsets[k + 1])] - offsets[k]
            if not len(local):
                continue
            entry, bit = np.divmod(local, len(bits))
            mask = np.zeros(t.numel(), dtype=np.int64)
            np.add.at(mask, entry, np.left_shift(1, np.asarray(bits, dtype=np.int64)[bit]))  # distinct bits: sum = OR
            masks[name] = torch.as_tensor(mask.reshape(t.shape), device=t.device)
        return masks

    def _to_flips(self, masks: dict[str, torch.Tensor], width: int) -> list[Any]:
        flips = []
        for name, mask in masks.items():
            for flat in torch.nonzero(mask.reshape(-1)).reshape(-1).tolist():
                value = int(mask.reshape(-1)[flat])
                index = tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))
                flips += [self._make_flip(name, index, b) for b in range(width) if value >> b & 1]
        return flips


def check_distribution(distribution: Any, allowed: list[int], width: int) -> np.ndarray:
    """
    Per-position probabilities over ``allowed`` from a mapping ``{bit: weight}`` or an array of ``width`` weights
    indexed by bit position (positions not named weigh 0), normalized to sum to 1.

    :raises TypeError: neither a mapping nor a 1-D array.
    :raises ValueError: a weight that is negative or not finite, a position outside ``[0, width)``, a wrong length, or
        no weight on the allowed positions (names ``distribution``).
    """
    full = np.zeros(width, dtype=np.float64)
    if isinstance(distribution, dict):
        for bit, value in distribution.items():
            full[check_int(bit, "distribution", minimum=0, maximum=width - 1)] = _weight(value)
    else:
        try:
            array = np.asarray(distribution, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError("`distribution` must be a mapping {bit: weight} or an array of weights.") from error
        if array.ndim != 1 or len(array) != width:
            raise ValueError(f"`distribution` must hold {width} weights (one per bit position), got {array.shape}.")
        full = np.array([_weight(v) for v in array])
    weights = full[np.asarray(allowed, dtype=np.int64)]
    if weights.sum() <= 0:
        raise ValueError(f"`distribution` puts no weight on the allowed bit positions {allowed}.")
    return weights / weights.sum()


def _weight(value: Any) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`distribution` weights must be finite and non-negative, got {value}.")
    return value


def _weighted_pairs(
    entries: int, probabilities: np.ndarray, rng: np.random.Generator, nb_flips: int | None, ber: float | None
) -> np.ndarray:
    """Distinct sorted pairs ``e·L + j`` drawn with per-position probabilities (see the module docstring)."""
    positions = len(probabilities)
    if nb_flips is not None:
        p = np.tile(probabilities / entries, entries)
        if nb_flips > int(np.count_nonzero(p)):
            raise ValueError(f"`nb_flips`={nb_flips} exceeds the {int(np.count_nonzero(p))} bits of non-zero weight.")
        if not nb_flips:
            return np.zeros(0, dtype=np.int64)
        return np.sort(rng.choice(len(p), size=nb_flips, replace=False, p=p / p.sum()))
    rates = np.minimum(ber * positions * probabilities, 1.0)  # at most 1: checked with the parameters
    pairs = [
        rng.choice(entries, size=rng.binomial(entries, r), replace=False) * positions + j for j, r in enumerate(rates)
    ]
    return np.sort(np.concatenate(pairs)).astype(np.int64)
