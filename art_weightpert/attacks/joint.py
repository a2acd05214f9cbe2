"""
:class:`JointWeightInputPGD`: simultaneous projected gradient steps on one universal weight perturbation and on
per-sample input perturbations.

The threat model is an adversary who has tampered with the deployed weights (or exploits their faults) *and* crafts
its inputs. Both perturbations ascend the same objective at the same point; the weight step is the ball's
steepest-ascent rule, the input step a sign step (``input_norm=inf``) or a normalized gradient step (``input_norm=2``)
per sample, projected back onto the input ball and into the estimator's ``clip_values``.

The other way to combine the two, in two stages, uses ART directly: hand :meth:`.WeightPGD.generate_estimator`'s
result to ``art.attacks.evasion.ProjectedGradientDescent``.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.attacks.ascent import Deltas, Score, radius_fraction_schedule, weight_step
from art_weightpert.attacks.base import WeightAttack, check_ascent_params
from art_weightpert.budget import PerturbationBudget, WeightPerturbation
from art_weightpert.validation import check_choice, check_non_negative, check_optional_positive

State = tuple[Deltas, torch.Tensor]  # (weight deltas, adversarial inputs)
INPUT_NORMS = {np.inf: np.inf, "inf": np.inf, 2: 2, "2": 2}


class JointWeightInputPGD(WeightAttack):
    """
    Joint PGD on the weights (one perturbation for the whole data set, in a :class:`.PerturbationBudget`) and on the
    inputs (one perturbation per sample, in an ℓ∞ or ℓ2 ball of radius ``input_eps``).

    Step sizes, with their units spelled out:

    * ``weight_eps_step`` is a *fraction of each parameter's radius* (as ``WeightPGD``'s ``eps_step``); ``None``
      selects :class:`.WeightPGD`'s schedule: full-radius steps, halved whenever the objective stalls for two
      iterations, resuming from the best pair;
    * ``input_eps_step`` is an *absolute* step in the units of the raw inputs (as ART's ``eps_step``); ``None`` makes
      it ``input_eps`` times the current weight fraction, so both steps follow the same schedule.

    The best pair (lowest accuracy, then highest loss) is returned.
    """

    attack_params = WeightAttack.attack_params + [
        "input_eps",
        "input_norm",
        "input_eps_step",
        "max_iter",
        "weight_eps_step",
        "loss",
        "batch_size",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        input_eps: float,
        input_norm: float | int | str = np.inf,
        input_eps_step: float | None = None,
        max_iter: int = 20,
        verbose: bool = True,
        weight_eps_step: float | None = None,
        loss: str = "ce",
        batch_size: int = 128,
    ) -> None:
        """
        Create a :class:`.JointWeightInputPGD` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param budget: the weight ball.
        :param input_eps: radius of the input ball, in the units of the raw (unpreprocessed) inputs.
        :param input_norm: ``np.inf`` or ``2``.
        :param input_eps_step: input step, absolute, in the units of the raw inputs (``None``: ``input_eps`` times the
            current weight step fraction).
        :param max_iter: number of joint steps.
        :param verbose: show a progress bar over the iterations.
        :param weight_eps_step: weight step as a fraction of each parameter's radius (``None``: the adaptive
            schedule).
        :param loss: ``"ce"`` or ``"margin"``.
        :param batch_size: samples per forward/backward pass.
        """
        super().__init__(estimator, budget, verbose=verbose)
        self.input_eps = input_eps
        self.input_norm = input_norm
        self.input_eps_step = input_eps_step
        self.max_iter = max_iter
        self.weight_eps_step = weight_eps_step
        self.loss = loss
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_non_negative(self.input_eps, "input_eps")
        check_choice(self.input_norm, "input_norm", INPUT_NORMS)
        check_optional_positive(self.input_eps_step, "input_eps_step")
        check_ascent_params(self.max_iter, self.loss, self.batch_size)
        check_optional_positive(self.weight_eps_step, "weight_eps_step")
        if not self.estimator.all_framework_preprocessing:
            raise ValueError(
                "`estimator` has preprocessing that is not written in torch; the joint attack needs its gradient."
            )

    def generate(
        self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, WeightPerturbation]:
        """
        Attack the weights and the inputs together.

        :param x: inputs of shape ``(N,) + input_shape`` (raw, before the estimator's preprocessing).
        :param y: integer or one-hot labels (``None``: the model's clean predictions).
        :return: ``(x_adv, delta)``: adversarial inputs (float32, within ``input_eps`` of ``x`` and inside
            ``clip_values``) and the weight perturbation (in the budget).
        """
        est = self._target
        x0 = torch.as_tensor(est.check_inputs(x), device=est.device)
        labels = torch.as_tensor(est.check_labels(y, len(x0)), device=est.device) if y is not None else None
        if labels is None:
            labels = self._predict_labels(self._preprocess(x0).detach(), self.batch_size)
        param_balls = self._param_balls()

        def evaluate(state: State, need_grad: bool) -> tuple[Score, tuple[list[torch.Tensor], torch.Tensor] | None]:
            deltas, x_adv = state
            score, grads, x_grad = self._score_and_grads(
                x_adv,
                labels,
                deltas,
                need_grad,
                loss=self.loss,
                targeted=False,
                batch_size=self.batch_size,
                input_map=self._preprocess,
            )
            return score, None if grads is None else (grads, x_grad)

        def step(state: State, grads: tuple[list[torch.Tensor], torch.Tensor], fraction: float) -> State:
            (deltas, x_adv), (weight_grads, x_grad) = state, grads
            x_step = fraction * float(self.input_eps) if self.input_eps_step is None else self.input_eps_step
            return (
                weight_step(param_balls, deltas, weight_grads, fraction),
                self._input_step(x_adv, x0, x_grad, float(x_step)),
            )

        deltas, x_adv = self._run_ascent(
            start=lambda _: (self._zero_deltas(param_balls), x0.clone()),
            evaluate=evaluate,
            step=step,
            schedule=radius_fraction_schedule(self.weight_eps_step),
            max_iter=self.max_iter,
        )
        return x_adv.cpu().numpy().astype(np.float32), self._perturbation(deltas)

    # ------------------------------------------------------------------------------------------------ internals
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x_pre, _ = self._target._apply_preprocessing(x, None, fit=False, no_grad=False)
        return x_pre

    def _input_step(self, x_adv: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, step: float) -> torch.Tensor:
        """Steepest ascent step of length ``step`` in the input norm, projected onto the input ball and the clip
        values."""
        eps = float(self.input_eps)
        with torch.no_grad():
            if INPUT_NORMS[self.input_norm] == np.inf:
                x_new = x_adv + step * grad.sign()
                x_new = torch.minimum(torch.maximum(x_new, x0 - eps), x0 + eps)
            else:
                dims = tuple(range(1, grad.dim()))
                norm = grad.norm(dim=dims, keepdim=True).clamp_min(1e-12)
                diff = x_adv + step * grad / norm - x0
                scale = (eps / diff.norm(dim=dims, keepdim=True).clamp_min(1e-12)).clamp_max(1.0)
                x_new = x0 + diff * scale
            clip = self._target.clip_values
            if clip is not None:
                low = torch.as_tensor(np.asarray(clip[0]), dtype=x_new.dtype, device=x_new.device)
                high = torch.as_tensor(np.asarray(clip[1]), dtype=x_new.dtype, device=x_new.device)
                x_new = torch.minimum(torch.maximum(x_new, low), high)
        return x_new
