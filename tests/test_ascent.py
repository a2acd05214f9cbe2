"""Tests of the one projected-ascent loop of the weight attacks (:func:`.ascend` and its step schedules), on a toy
problem where every evaluated point is visible."""

from __future__ import annotations

import numpy as np
import pytest

from art_weightpert.attacks.ascent import ConstantStep, CosineStep, HalvingOnStall, Score, ascend


def toy_problem(max_iter: int, schedule, restarts: int = 1, starts=(-1.0, 0.9, -0.4)):
    """Maximize ``f(t) = -(t - 0.3)^2`` on ``[-1, 1]`` with sign steps (a 1-D box ball of radius 1); returns the
    loop's answer and every (score, state) evaluated."""
    seen = []

    def evaluate(t, need_grad):
        score = Score(0.0, -((t - 0.3) ** 2))
        seen.append((score, t))
        return score, (-2 * (t - 0.3) if need_grad else None)

    def step(t, grad, fraction):
        return float(np.clip(t + fraction * np.sign(grad), -1.0, 1.0))

    result = ascend(lambda r: starts[r], evaluate, step, schedule, max_iter, restarts)
    return result, seen


@pytest.mark.parametrize(
    "schedule", [HalvingOnStall(), ConstantStep(0.7), CosineStep(1.0, 8)], ids=lambda schedule: type(schedule).__name__
)
def test_ascend_returns_the_best_point_it_evaluated(schedule):
    (score, state), seen = toy_problem(8, schedule, restarts=2)
    assert len(seen) == 2 * 9  # max_iter + 1 points per restart
    best = max(seen, key=lambda pair: pair[0])
    assert score == best[0] and state == best[1]


@pytest.mark.parametrize(
    "schedule", [HalvingOnStall(), ConstantStep(0.7)], ids=lambda schedule: type(schedule).__name__
)
def test_ascend_more_iterations_or_restarts_never_weaker(schedule):
    scores = [toy_problem(k, schedule)[0][0] for k in range(8)]
    assert scores == sorted(scores)
    assert toy_problem(4, schedule, restarts=3)[0][0] >= toy_problem(4, schedule, restarts=1)[0][0]


def test_halving_schedule_halves_on_stall_and_resumes_from_the_best():
    schedule = HalvingOnStall(first=1.0, patience=2)
    steps = [schedule.next(i, objective) for i, objective in enumerate([1.0, 2.0, 1.5, 1.9, 3.0, 2.0, 2.0])]
    assert steps == [(1.0, False), (1.0, False), (1.0, False), (0.5, True), (0.5, False), (0.5, False), (0.25, True)]
    schedule.reset()
    assert schedule.next(0, -5.0) == (1.0, False)
    # on the toy problem the step shrinks until the optimum is found to within the last step
    (score, state), _ = toy_problem(30, HalvingOnStall())
    assert abs(state - 0.3) < 1e-3


def test_cosine_schedule_decays_from_first_to_a_hundredth():
    fractions = [CosineStep(0.5, 10).next(i, 0.0)[0] for i in range(11)]
    assert fractions[0] == pytest.approx(0.5) and fractions[-1] == pytest.approx(0.005)
    assert fractions == sorted(fractions, reverse=True)
