"""
The one projected-ascent loop of the weight attacks: step-size control, best-iterate tracking and restarts.

:func:`ascend` knows nothing about norms, weights or inputs. The caller gives it

* ``start(restart) -> state``: the starting point of each restart (a state is whatever the attack moves: a dict of
  weight deltas, or deltas and adversarial inputs);
* ``evaluate(state, need_grad) -> (Score, grads)``: the score of a state and, when ``need_grad``, the gradients that
  ``step`` consumes (``None`` otherwise);
* ``step(state, grads, fraction) -> state``: one projected steepest-ascent step of ``fraction`` times the radius (the
  balls own the norm-specific rule, see :func:`projected_step`);
* a :class:`StepSchedule` that picks the fraction of each iteration.

Each restart evaluates ``max_iter + 1`` points (the start and one point after each step); the highest :class:`Score`
over every point of every restart is returned with its state, so more iterations or restarts never give a lower
score (the schedules depend only on the past).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypeVar

import torch

from art_weightpert.balls import Ball
from art_weightpert.budget import ParameterBall

State = TypeVar("State")
Deltas = dict[str, torch.Tensor]  # parameter name -> perturbation (a weight attack's state)


class Score(NamedTuple):
    """What an attack maximizes, compared lexicographically: the success rate first, then the mean objective."""

    success: float
    objective: float


class StepSchedule:
    """Step sizes of one run, as fractions of the ball's radius. :func:`ascend` calls :meth:`reset` before each
    restart, then :meth:`next` before each step."""

    def reset(self) -> None:
        """Forget the previous run."""

    def next(self, iteration: int, objective: float) -> tuple[float, bool]:
        """
        The step of iteration ``iteration`` (0-based), given the objective measured there.

        :return: ``(fraction, resume)``: the step as a fraction of the radius, and whether the step starts from the best
            point of the run instead of the current one.
        """
        raise NotImplementedError


class ConstantStep(StepSchedule):
    """The same fraction at every iteration."""

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)

    def next(self, iteration: int, objective: float) -> tuple[float, bool]:
        return self.fraction, False


class HalvingOnStall(StepSchedule):
    """APGD's step-size control (Croce and Hein 2020): start with ``first`` and halve the step whenever the objective
    has not improved for ``patience`` iterations, resuming from the best point."""

    def __init__(self, first: float = 1.0, patience: int = 2) -> None:
        self.first = float(first)
        self.patience = int(patience)
        self.reset()

    def reset(self) -> None:
        self.fraction, self._best, self._stalled = self.first, float("-inf"), 0

    def next(self, iteration: int, objective: float) -> tuple[float, bool]:
        if objective > self._best:
            self._best, self._stalled = objective, 0
        else:
            self._stalled += 1
        if self._stalled < self.patience:
            return self.fraction, False
        self.fraction, self._stalled = self.fraction / 2, 0
        return self.fraction, True


class CosineStep(StepSchedule):
    """Cosine decay from ``first`` at iteration 0 towards ``first / 100`` at iteration ``max_iter``."""

    def __init__(self, first: float, max_iter: int) -> None:
        self.first = float(first)
        self.max_iter = int(max_iter)

    def next(self, iteration: int, objective: float) -> tuple[float, bool]:
        return self.first * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * iteration / self.max_iter))), False


def radius_fraction_schedule(fraction: float | None) -> StepSchedule:
    """The universal attacks' schedule: constant steps of ``fraction`` times the radius, or (``None``) APGD's halving
    on stagnation from full-radius steps."""
    return HalvingOnStall(first=1.0, patience=2) if fraction is None else ConstantStep(fraction)


class _Best:
    """The best point seen so far (its score, state and gradients)."""

    def __init__(self) -> None:
        self.score: Score | None = None
        self.state: Any = None
        self.grads: Any = None

    def offer(self, score: Score, state: Any, grads: Any = None) -> None:
        if self.score is None or score > self.score:
            self.score, self.state, self.grads = score, state, grads


def ascend(
    start: Callable[[int], State],
    evaluate: Callable[[State, bool], tuple[Score, Any]],
    step: Callable[[State, Any, float], State],
    schedule: StepSchedule,
    max_iter: int,
    restarts: int = 1,
    on_step: Callable[[Score], None] | None = None,
) -> tuple[Score, State]:
    """
    Projected steepest ascent from ``restarts`` starting points.

    :param start: ``start(restart)`` returns the starting state of restart ``0, 1, ...`` (called lazily, in order).
    :param evaluate: ``evaluate(state, need_grad)`` returns the state's :class:`Score` and, when ``need_grad``, its
        gradients.
    :param step: ``step(state, grads, fraction)`` returns the next state (projected back into the ball).
    :param schedule: the step sizes (reset before each restart).
    :param max_iter: steps per restart (0: evaluate the starting points only).
    :param restarts: number of starting points (≥ 1).
    :param on_step: called after every step with the best score of the current restart (e.g. a progress bar).
    :return: the best score over every point evaluated, and its state.
    """
    overall = _Best()
    for restart in range(restarts):
        state = start(restart)
        best = _Best()
        schedule.reset()
        for iteration in range(max_iter + 1):
            score, grads = evaluate(state, iteration < max_iter)
            best.offer(score, state, grads)
            if grads is None:
                break
            fraction, resume = schedule.next(iteration, score.objective)
            if resume:
                state, grads = best.state, best.grads
            state = step(state, grads, fraction)
            if on_step is not None:
                on_step(best.score)
        overall.offer(best.score, best.state)
    return overall.score, overall.state


def projected_step(ball: Ball, delta: torch.Tensor, grad: torch.Tensor, radius: torch.Tensor, fraction: float):
    """``delta`` moved along the ball's steepest-ascent direction by ``fraction`` times the radius, then projected
    back exactly (the ball owns both rules)."""
    moved = ball.steepest_step(grad, radius, fraction)  # a new tensor: add delta in place (one matrix less)
    moved = moved.add_(delta) if moved.dtype == torch.result_type(moved, delta) else delta + moved
    return ball.project(moved, radius)


def weight_step(
    param_balls: list[ParameterBall], deltas: Mapping[str, torch.Tensor], grads: list[torch.Tensor], fraction: float
) -> dict[str, torch.Tensor]:
    """:func:`projected_step` for every perturbed parameter (``grads`` in the order of ``param_balls``)."""
    with torch.no_grad():
        return {
            b.param_name: projected_step(b.ball, deltas[b.param_name], g, b.radius, fraction)
            for b, g in zip(param_balls, grads)
        }
