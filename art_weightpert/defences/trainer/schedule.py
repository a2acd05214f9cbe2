"""
The schedule of :class:`.WeightRobustTrainer`: warm-up of λ and ε, the learning-rate scheduler, and the detection of
runs that collapse.

Warm-up (the standard remedy of certified training, e.g. IBP / CROWN-IBP): the robust term's weight λ *and* the
radius ε of the ball grow linearly from 0 to their targets over the first ``warmup`` epochs, step by step. With ε = 0
the margin bound is the margin itself, so the network first learns the task and then widens its margins while the ball
grows; at the full ε from the first step the robust term dominates and the trivial minimiser (all activations zero,
every margin exactly 0, loss ``ln K``) is reached instead (docs/theory.md §7, docs/training.md).

Collapse: robust training that ends at a constant prediction. It is recognised from the per-epoch training accuracy:
near the accuracy of always predicting the most frequent label for ``patience`` epochs in a row, after an epoch in
which the model had clearly learned. The trainer reports it; a recipe that must not return such a model raises
:class:`TrainingCollapsedError` (:func:`raise_if_collapsed`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from art_weightpert.budget import ParameterBall, PerturbationBudget


def ramp_factor(step: int, warmup_steps: int) -> float:
    """The warm-up factor in ``[0, 1]`` after ``step`` optimizer steps: ``step / warmup_steps``, 1 once the warm-up is
    over (and always 1 without a warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``None``, or a ``torch.optim.lr_scheduler.LRScheduler`` of ``optimizer`` (the classifier's own)."""
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"`scheduler` must be a torch.optim.lr_scheduler.LRScheduler, got {type(scheduler).__name__}.")
    if scheduler.optimizer is not optimizer:
        raise ValueError("`scheduler` must schedule the classifier's own optimizer.")


def step_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler | None, epoch_loss: float) -> None:
    """One epoch's step of the learning-rate scheduler (``ReduceLROnPlateau`` gets the epoch's mean loss)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(epoch_loss)
    elif scheduler is not None:
        scheduler.step()


def scale_param_balls(param_balls: dict[str, ParameterBall], factor: float) -> dict[str, ParameterBall]:
    """The same balls with every radius (and ε) multiplied by ``factor`` (every bound is monotone in the radii, and a
    ball of radius 0 leaves only the network's own margin)."""
    if factor == 1.0:
        return param_balls
    return {
        name: dataclasses.replace(ball, radius=ball.radius * factor, eps=ball.eps * factor)
        for name, ball in param_balls.items()
    }


@dataclass
class CollapseDetector:
    """
    Watches the per-epoch training accuracy of a robust run and says when it failed. Two failures are told apart:

    * ``"collapsed"``: the last ``patience`` epochs (or, at the end of the run, the last epoch) are near chance after
      an earlier epoch that had clearly learned;
    * ``"stuck"``: every epoch so far is near chance, ``patience`` epochs after the warm-up (or at the end of a run
      of at least ``patience`` epochs): the robust term dominated from the start (the wait lets a slow start learn).

    :param patience: epochs in a row near chance that count as a failure.
    :param warmup: epochs of warm-up (a run is not called stuck before its ball reaches the budget).
    :param tolerance: "near chance" is at most ``chance + tolerance · (1 − chance)``; "had learned" is at least
        ``chance + 2 · tolerance · (1 − chance)``, where chance is the accuracy of always predicting the most frequent
        training label.
    """

    patience: int = 3
    warmup: int = 0
    tolerance: float = 0.1
    accuracies: list[float] = field(default_factory=list)
    chance: float = 0.0

    def update(self, accuracy: float, chance: float, final: bool = False) -> str | None:
        """Record one epoch's training accuracy and chance level; ``"collapsed"``, ``"stuck"`` or None (see the class
        docstring). ``final``: this is the run's last epoch."""
        self.accuracies.append(float(accuracy))
        self.chance = float(chance)
        near_chance = self.chance + self.tolerance * (1.0 - self.chance)
        learned = self.chance + 2.0 * self.tolerance * (1.0 - self.chance)
        recent = self.accuracies[-1:] if final else self.accuracies[-self.patience :]
        earlier = self.accuracies[: -len(recent)]
        if earlier and max(earlier) >= learned and (final or len(recent) == self.patience):
            return "collapsed" if max(recent) <= near_chance else None
        enough = len(self.accuracies) >= self.patience + (0 if final else self.warmup)
        return "stuck" if enough and max(self.accuracies) <= near_chance else None

    def report(
        self,
        verdict: str,
        history: dict[str, Any],
        budget: PerturbationBudget,
        lam: float,
        stopped: bool,
        logger: logging.Logger | None,
    ) -> None:
        """Record a failed run in the trainer's ``history`` (``collapsed``, ``warnings``) and, with a ``logger`` (the
        main process), log it and raise it as a ``UserWarning`` pointing at the caller of ``fit``."""
        message = self.message(verdict, budget, lam, stopped=stopped)
        history["collapsed"] = True
        history["warnings"].append(message)
        if logger is not None:
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=4)

    def message(self, verdict: str, budget: PerturbationBudget, lam: float, stopped: bool = False) -> str:
        """The warning for a failed run at ``budget`` and λ = ``lam``: the numbers and what to change."""
        ball = f"{budget.norm} ε = {budget.eps}{' relative' if budget.relative else ''}"
        epochs = len(self.accuracies)
        best = int(np.argmax(self.accuracies))
        if verdict == "collapsed":
            what = (
                f"robust training collapsed: training accuracy {self.accuracies[-1]:.3f} at epoch {epochs} is at "
                f"chance ({self.chance:.3f}, always the most frequent label) although it reached "
                f"{self.accuracies[best]:.3f} at epoch {best + 1}; the model now predicts (almost) one class."
            )
        else:
            what = (
                f"robust training is stuck at chance: training accuracy at most {self.accuracies[best]:.3f} in all "
                f"{epochs} epochs (chance: {self.chance:.3f}, always the most frequent label); the robust term "
                f"dominated from the start (check that the data are learnable with lam=0)."
            )
        return (
            f"{what} The ball ({ball}) is probably too large for this model to certify. Try a smaller ε "
            f"(a row-ℓ1 ε that suits a 64-input layer is huge for a wide conv or linear layer; relative=True scales "
            f"it to the weights), a smaller λ (now {lam:g}) or a longer warm-up (now {self.warmup} epochs)."
        ) + (" Training stopped at this epoch (stop_on_collapse=True)." if stopped else "")


class TrainingCollapsedError(RuntimeError):
    """A robust training run ended at (or near) chance: the model predicts (almost) one class. The message gives the
    numbers and what to change; the model is left as trained."""


def raise_if_collapsed(
    history: dict[str, Any], labels: np.ndarray, predictions: np.ndarray | None = None, tolerance: float = 0.1
) -> None:
    """
    Raise :class:`TrainingCollapsedError` when the history of :meth:`.WeightRobustTrainer.fit` reports a collapse
    (``history["collapsed"]``) or the trained model's training accuracy is near chance: the last epoch's (train mode),
    or with ``predictions`` theirs. Pass the eval-mode predictions of a model with batch norm trained on batch
    statistics (``batch_norm="train"``): its train-mode accuracy can be high while its eval-mode network, on the
    running statistics, is at chance.

    :param history: the trainer's history.
    :param labels: the training labels (class indices or one-hot): chance is the share of the most frequent one.
    :param predictions: optional predicted class indices of the trained model on the training inputs (eval mode).
    :param tolerance: "near chance" is at most ``chance + tolerance · (1 − chance)`` (as :class:`CollapseDetector`).
    """
    labels = np.asarray(labels)
    labels = (labels.argmax(axis=1) if labels.ndim == 2 else labels).astype(np.int64)
    chance = float(np.bincount(labels).max() / max(len(labels), 1))
    if history.get("collapsed"):
        messages = history.get("warnings") or ["robust training collapsed."]
        raise TrainingCollapsedError(messages[0])
    if predictions is not None:
        accuracy, which = float(np.mean(np.asarray(predictions) == labels)), "of the trained model (eval mode)"
    else:
        accuracy, which = (history["accuracy"] or [float("nan")])[-1], "in the last epoch"
    if not accuracy > chance + tolerance * (1.0 - chance):
        raise TrainingCollapsedError(
            f"robust training ended at chance: training accuracy {accuracy:.3f} {which} (chance: {chance:.3f}, "
            f"always the most frequent label). Try a smaller ε, a smaller λ or a longer warm-up; with batch norm, "
            f'batch_norm="frozen".'
        )


__all__ = [
    "CollapseDetector",
    "TrainingCollapsedError",
    "check_scheduler",
    "raise_if_collapsed",
    "ramp_factor",
    "scale_param_balls",
    "step_scheduler",
]
