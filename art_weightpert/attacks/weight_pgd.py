"""
:class:`WeightPGD`: projected gradient ascent on the weights, for one *universal* perturbation of a whole data set
(the threat model of hardware faults and of tampering with a deployed model).

Each step moves every perturbed parameter along its ball's steepest-ascent direction (sign steps for the box,
steepest ℓ1 steps per row for ``row_l1``, normalized steps for ``l2``; :mod:`art_weightpert.balls`) and projects it
back exactly. Gradients are accumulated over batches, so one step sees the whole of ``(x, y)``. The iterate with the
lowest measured accuracy (then the highest loss) is kept, so more iterations or restarts never give a weaker result.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert import distributed
from art_weightpert.attacks.ascent import Deltas, Score, radius_fraction_schedule, weight_step
from art_weightpert.attacks.base import WeightAttack, check_ascent_params
from art_weightpert.budget import ParameterBall, PerturbationBudget, WeightPerturbation
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.validation import check_bool, check_non_negative_int, check_optional_positive


class WeightPGD(WeightAttack):
    """
    Universal projected gradient attack on the weights selected by a :class:`.PerturbationBudget`.

    Step sizes are fractions of each parameter's radius. With ``eps_step=None`` the attack starts with full-radius
    steps and halves the step whenever the objective has not improved for two iterations, restarting from the best
    iterate (the step-size control of APGD, Croce and Hein 2020); this schedule depends only on the past, so a longer
    run repeats a shorter one before going further.
    """

    attack_params = WeightAttack.attack_params + [
        "max_iter",
        "eps_step",
        "num_random_init",
        "targeted",
        "loss",
        "batch_size",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        max_iter: int = 20,
        eps_step: float | None = None,
        num_random_init: int = 1,
        targeted: bool = False,
        loss: str = "ce",
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.WeightPGD` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param budget: the weight ball; its layers are checked against the model.
        :param max_iter: gradient steps per start (0: evaluate the starting point only).
        :param eps_step: step size as a fraction of each parameter's radius; ``None`` for the adaptive schedule.
        :param num_random_init: random starts (uniform in the ball) in addition to the one from the centre, the
            estimator's effective weights (0: the centre only). The centre is always evaluated, so the result is
            never more accurate on ``(x, y)`` than the estimator itself.
        :param targeted: drive the inputs to the labels ``y`` given to :meth:`generate` (then required).
        :param loss: ``"ce"`` (mean cross-entropy) or ``"margin"`` (mean Carlini-Wagner logit margin).
        :param batch_size: samples per forward/backward pass; gradients are accumulated over the batches.
        :param verbose: show a progress bar over the iterations.
        """
        super().__init__(estimator, budget, verbose=verbose)
        self.max_iter = max_iter
        self.eps_step = eps_step
        self.num_random_init = num_random_init
        self.targeted = targeted
        self.loss = loss
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_ascent_params(self.max_iter, self.loss, self.batch_size)
        check_optional_positive(self.eps_step, "eps_step")
        check_non_negative_int(self.num_random_init, "num_random_init")
        check_bool(self.targeted, "targeted")

    # ------------------------------------------------------------------------------------------------ public API
    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> WeightPerturbation:
        """
        Find one weight perturbation in the budget that lowers the accuracy on all of ``(x, y)``.

        :param x: inputs of shape ``(N,) + input_shape``.
        :param y: labels (integer ``(N,)`` or one-hot ``(N, nb_classes)``); targets in targeted mode. ``None``: the
            model's clean predictions (untargeted only).
        :return: the perturbation of the estimator's effective weights ``W + Δ`` (``budget.contains(delta, model)``
            holds for the model with those weights), carrying the budget.
        """
        x_t, labels = self._target.prepare_inputs(x, y, require_labels=self.targeted)
        if labels is None:
            labels = self._predict_labels(x_t, self.batch_size)
        param_balls = self._param_balls()
        seed = distributed.broadcast_object(int(torch.randint(0, 2**62, (1,))))  # rank 0's: the same starts everywhere
        gen = torch.Generator().manual_seed(seed)  # reproducible via torch.manual_seed

        def evaluate(deltas: Deltas, need_grad: bool) -> tuple[Score, list[torch.Tensor] | None]:
            score, grads, _ = self._score_and_grads(
                x_t, labels, deltas, need_grad, loss=self.loss, targeted=self.targeted, batch_size=self.batch_size
            )
            return score, grads

        best = self._run_ascent(
            start=lambda restart: self._start(param_balls, restart, gen),
            evaluate=evaluate,
            step=lambda deltas, grads, fraction: weight_step(param_balls, deltas, grads, fraction),
            schedule=radius_fraction_schedule(self.eps_step),
            max_iter=self.max_iter,
            restarts=1 + self.num_random_init,
        )
        return self._perturbation(best)

    def generate_estimator(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> PyTorchWeightClassifier:
        """
        Run :meth:`generate` and return a new estimator that predicts with ``W + Δ + δ`` (the attacked estimator and
        the user's module are unchanged). It can be handed to any ART attack, e.g. ``ProjectedGradientDescent``.

        :param x: inputs.
        :param y: labels or targets, as for :meth:`generate`.
        :return: the perturbed :class:`.PyTorchWeightClassifier`.
        """
        return self._target.with_weight_perturbation(self.generate(x, y, **kwargs))

    # ------------------------------------------------------------------------------------------------ internals
    def _start(self, param_balls: list[ParameterBall], restart: int, gen: torch.Generator) -> Deltas:
        """Restart 0 starts at the centre (the estimator's effective weights), the others uniformly in the ball."""
        if restart == 0:
            return self._zero_deltas(param_balls)
        model = self._target.base_model
        return {
            t.param_name: t.ball.sample(t.radius, model.get_parameter(t.param_name).shape, "uniform", gen)
            for t in param_balls
        }
