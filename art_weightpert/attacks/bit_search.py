"""
:class:`BitSearchAttack`: the progressive bit search shared by :class:`.BitFlipAttack` (integer codes) and
:class:`.FloatBitFlipAttack` (IEEE float encodings).

One flip per iteration (docs/theory.md §8): one forward/backward pass on the attack batch gives the gradient of the loss
with respect to every weight that may flip; in each layer the ``top_k`` weights by gradient magnitude are the
candidates, and the first-order change of the loss of flipping each of their allowed bits alone is ``g·(w' − w)``. The
``nb_candidates`` best loss-increasing flips of each layer are then evaluated by their actual loss (batched with
``torch.func.vmap``), and the best one over all layers is committed. A flip whose change is not finite (a float weight
flipped to ``±inf`` or NaN) has no meaningful first-order gain: up to ``nb_candidates`` of them per layer (those of the
weights with the largest gradients) are evaluated by their actual loss too, a NaN loss counting as infinite.

The model is evaluated with ``torch.func.functional_call``: the user's module and the estimator are never modified,
also when the attack is interrupted.

| Paper link: https://arxiv.org/abs/1903.12269 (BFA), https://arxiv.org/abs/1906.01017 (Terminal Brain Damage)
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from art.attacks.attack import Attack
from torch.func import vmap
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.attacks.base import BitFlipAttackBase, predict_labels
from art_weightpert.torch_tools import eval_mode, run_with_parameters
from art_weightpert.validation import check_bool, check_non_negative_int, check_positive_int, check_probability

logger = logging.getLogger(__name__)


class Candidate(NamedTuple):
    """A flip under evaluation: weight ``name``, entry ``flat`` of the flattened weight, ``row`` of the weights'
    :meth:`bit_changes` (bit position ``bit``) and the weight's change (``±inf``/NaN for a non-finite float flip)."""

    name: str
    flat: int
    row: int
    bit: int
    change: float


class BitSearchAttack(BitFlipAttackBase):
    """
    Abstract progressive bit search over a weights object with ``bit_changes``, ``flip``, ``deltas`` and
    ``param_names`` (:class:`.QuantizedWeights` or :class:`.FloatWeights`). Subclasses say how the weights are read
    (:meth:`_encode`), which bit each row is (:meth:`_positions`) and how a flip is named (:meth:`_make_flip`).
    :attr:`history_` holds one ``{"loss", "accuracy"}`` dict per flip, measured on ``(x, y)``.
    """

    rank_by_accuracy = False
    """Commit the candidate with the lowest accuracy (highest target rate) first, the loss breaking ties; ``False``:
    the largest loss first (BFA), the accuracy breaking ties."""

    def _check_search_params(self) -> None:
        """The parameters of the search (no weight ball: the threat model is a number of flips)."""
        Attack._check_params(self)
        check_non_negative_int(self.max_flips, "max_flips")
        check_bool(self.targeted, "targeted")
        check_positive_int(self.top_k, "top_k")
        check_positive_int(self.nb_candidates, "nb_candidates")
        if self.stop_accuracy is not None:
            check_probability(self.stop_accuracy, "stop_accuracy")
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")

    # ------------------------------------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _make_flip(self, name: str, index: tuple[int, ...], bit: int) -> Any:
        """The flip object of bit ``bit`` of entry ``index`` of weight ``name``."""
        raise NotImplementedError

    def _positions(self, weights: Any) -> tuple[int, ...]:
        """The bit position of each row of ``weights.bit_changes``."""
        return tuple(range(weights.n_bits))

    def _params(self, weights: Any, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values of the weights that may flip, as the candidates' evaluation sees them: ``W + Δ``."""
        model = self._target.base_model
        return {name: model.get_parameter(name).detach() + d for name, d in deltas.items()}

    def _set_entry(self, flat: torch.Tensor, candidate: Candidate) -> None:
        """Write ``candidate``'s flip into ``flat`` (the flattened values of its weight)."""
        flat[candidate.flat] += candidate.change

    # ------------------------------------------------------------------------------------------------ search
    def _search(self, x: np.ndarray, y: Any, weights: Any) -> tuple[list[Any], Any]:
        """The progressive search on ``weights``: ``(flips in the order found, the flipped weights)``."""
        self.history_ = []
        deltas = weights.deltas(self._target)
        x_t, labels = self._labels(x, y, deltas)
        positions = self._positions(weights)
        flipped = {name: torch.zeros((len(positions), d.numel()), dtype=torch.bool) for name, d in deltas.items()}
        flips: list[Any] = []
        model = self._target.base_model
        desc = type(self).__name__
        with eval_mode(model), tqdm(total=self.max_flips, desc=desc, disable=not self.verbose) as bar:
            for _ in range(self.max_flips):
                params = self._params(weights, deltas)
                candidates = self._candidates(weights, self._gradients(x_t, labels, deltas), flipped, positions)
                if not candidates:
                    logger.info("No bit flip increases the loss to first order any more; stopping.")
                    break
                loss, accuracy = self._evaluate(candidates, x_t, labels, params)
                best = self._best(loss, accuracy)
                name, flat, row, bit, _ = candidates[best]
                flip = self._make_flip(name, tuple(int(i) for i in np.unravel_index(flat, deltas[name].shape)), bit)
                flips.append(flip)
                flipped[name][row, flat] = True
                weights = weights.flip([flip])
                deltas[name] = weights.deltas(self._target, [name])[name]
                self.history_.append({"loss": float(loss[best]), "accuracy": float(accuracy[best])})
                bar.update(1)
                bar.set_postfix(accuracy=f"{float(accuracy[best]):.3f}")
                if self._should_stop(float(accuracy[best])):
                    break
                if not torch.isfinite(loss[best]):
                    logger.info("The model outputs inf or NaN on the attack batch; no further flip is measurable.")
                    break
        return flips, weights

    def _labels(self, x: np.ndarray, y: Any, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.targeted:
            if y is None:
                raise ValueError("`y` (the target classes) is required in targeted mode.")
            if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
                y = np.full(len(x), int(y), dtype=np.int64)
        x_t, labels = self._target.prepare_inputs(x, y)
        if labels is None:
            labels = predict_labels(self._target, x_t, deltas, self.batch_size)
        return x_t, labels

    def _should_stop(self, accuracy: float) -> bool:
        if self.stop_accuracy is None:
            return False
        return (1.0 - accuracy if self.targeted else accuracy) <= self.stop_accuracy

    def _best(self, loss: torch.Tensor, accuracy: torch.Tensor) -> int:
        """The candidate with the largest loss (smallest when targeted), a NaN loss counting as ``+inf``; among equal
        losses (several infinite ones), the lowest accuracy (highest target rate when targeted), then the first. With
        :attr:`rank_by_accuracy`, the accuracy decides first and the loss breaks its ties."""
        sign = -1.0 if self.targeted else 1.0
        keys = [sign * torch.nan_to_num(loss, nan=float("inf")), -sign * accuracy]
        candidates = torch.arange(len(loss), device=loss.device)
        for key in keys[::-1] if self.rank_by_accuracy else keys:
            values = key[candidates]
            candidates = candidates[values == values.max()]
        return int(candidates[0])

    def _gradients(
        self, x_t: torch.Tensor, labels: torch.Tensor, deltas: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Gradient of the attack objective (mean cross-entropy, negated when targeted) with respect to the weights
        that may flip: one forward/backward pass over the attack batch."""
        probes = {name: d.clone().requires_grad_(True) for name, d in deltas.items()}
        grads = {name: torch.zeros_like(d) for name, d in deltas.items()}
        sign = -1.0 if self.targeted else 1.0
        for s in distributed.my_batches(len(x_t), self.batch_size):  # in a process group: this rank's batches
            loss = sign * F.cross_entropy(self._target.logits(x_t[s], probes), labels[s], reduction="sum") / len(x_t)
            for name, g in zip(probes, torch.autograd.grad(loss, list(probes.values()))):
                grads[name] += g
        return distributed.all_reduce_sum_dict(grads)  # the same gradients on every rank

    def _candidates(
        self,
        weights: Any,
        grads: Mapping[str, torch.Tensor],
        flipped: Mapping[str, torch.Tensor],
        positions: tuple[int, ...],
    ) -> list[Candidate]:
        """The ``nb_candidates`` flips of each layer with the largest positive first-order gain ``g·(w' − w)`` among
        the allowed bits of its ``top_k`` weights by ``|g|``, and up to ``nb_candidates`` flips of those weights whose
        change is not finite (no first-order gain: their actual loss decides)."""
        out = []
        for name, grad in grads.items():
            g = torch.nan_to_num(grad.reshape(-1).to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
            index = torch.topk(g.abs(), min(self.top_k, g.numel())).indices
            changes = weights.bit_changes(name, index)  # (rows, k)
            done = flipped[name][:, index.cpu()].to(changes.device)  # every bit flips at most once
            finite = torch.isfinite(changes)
            gain = torch.where(finite & ~done, g[index].unsqueeze(0) * changes, 0.0)
            order = torch.argsort(gain.reshape(-1), descending=True, stable=True)[: self.nb_candidates]
            picks = [pos for pos in order.tolist() if gain.reshape(-1)[pos] > 0]
            wild = (~finite & ~done).T.nonzero()  # by weight (largest |g| first), then row
            picks += [int(row) * len(index) + int(col) for col, row in wild[: self.nb_candidates].tolist()]
            for pos in picks:
                row, col = divmod(pos, len(index))
                out.append(Candidate(name, int(index[col]), row, positions[row], float(changes[row, col])))
        return out

    def _evaluate(
        self, candidates: list[Candidate], x_t: torch.Tensor, labels: torch.Tensor, params: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy and accuracy on ``(x_t, labels)`` of every candidate flipped alone (on top of the
        committed flips in ``params``), one vmapped forward per layer and sample batch."""
        model = self._target.base_model
        loss = torch.zeros(len(candidates), dtype=torch.float64, device=x_t.device)
        correct = torch.zeros(len(candidates), dtype=torch.float64, device=x_t.device)
        by_param: dict[str, list[int]] = {}
        for i, candidate in enumerate(candidates):
            by_param.setdefault(candidate.name, []).append(i)
        with torch.no_grad():
            for name, rows in by_param.items():
                stacked = params[name].unsqueeze(0).repeat((len(rows),) + (1,) * params[name].ndim)
                flat = stacked.view(len(rows), -1)
                for j, i in enumerate(rows):
                    self._set_entry(flat[j], candidates[i])
                for s in distributed.my_batches(len(x_t), self.batch_size):
                    xb, yb = x_t[s], labels[s]
                    logits = batched_logits(model, params, name, stacked, xb)  # (C, B, K)
                    ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(rows)), reduction="none")
                    loss[rows] += ce.reshape(len(rows), -1).sum(dim=1).to(torch.float64)
                    correct[rows] += (logits.argmax(dim=2) == yb).sum(dim=1).to(torch.float64)
        loss, correct = distributed.all_reduce_sum_list([loss, correct])  # every rank ranks the same candidates
        return loss / len(x_t), correct / len(x_t)


def batched_logits(
    model: torch.nn.Module, params: Mapping[str, torch.Tensor], name: str, stacked: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """Logits of ``model`` on ``x`` for each value of parameter ``name`` in ``stacked`` (the others from
    ``params``): ``torch.func.vmap`` where the model allows it, a loop otherwise."""

    def run(value: torch.Tensor) -> torch.Tensor:
        return run_with_parameters(model, {**params, name: value}, x)

    try:
        return vmap(run)(stacked)
    except (RuntimeError, NotImplementedError) as error:
        if "vmap" not in str(error) and "atching rule" not in str(error):
            raise  # not vmap's: an error of the model itself propagates
        logger.debug("vmap failed (%s); evaluating the candidates one by one.", error)
        return torch.stack([run(value) for value in stacked])
