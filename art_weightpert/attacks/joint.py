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

import logging
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.attacks.base import (
    LOSSES,
    WeightAttack,
    check_positive_int,
    check_step,
    objective,
    success,
)
from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.estimators.weight_classifier import eval_mode
from art_weightpert.perturbation import WeightPerturbation

logger = logging.getLogger(__name__)

Deltas = dict[str, torch.Tensor]
INPUT_NORMS = {np.inf: np.inf, "inf": np.inf, 2: 2, "2": 2}


class JointWeightInputPGD(WeightAttack):
    """
    Joint PGD on the weights (one perturbation for the whole data set, in a :class:`.PerturbationBudget`) and on the
    inputs (one perturbation per sample, in an ℓ∞ or ℓ2 ball of radius ``input_eps``).

    With ``eps_step=None`` both steps follow :class:`.WeightPGD`'s schedule: full-radius steps, halved whenever the
    objective stalls for two iterations, resuming from the best pair. The best pair (lowest accuracy, then highest
    loss) is returned.
    """

    attack_params = WeightAttack.attack_params + [
        "input_eps",
        "input_norm",
        "input_eps_step",
        "max_iter",
        "eps_step",
        "loss",
        "batch_size",
    ]

    _patience = 2

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        input_eps: float,
        input_norm: float | int | str = np.inf,
        input_eps_step: float | None = None,
        max_iter: int = 20,
        verbose: bool = True,
        eps_step: float | None = None,
        loss: str = "ce",
        batch_size: int = 128,
    ) -> None:
        """
        Create a :class:`.JointWeightInputPGD` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param budget: the weight ball.
        :param input_eps: radius of the input ball, in the units of the raw (unpreprocessed) inputs.
        :param input_norm: ``np.inf`` or ``2``.
        :param input_eps_step: absolute input step size (``None``: ``input_eps`` times the weight step fraction).
        :param max_iter: number of joint steps.
        :param verbose: show a progress bar over the iterations.
        :param eps_step: weight step as a fraction of each radius (``None``: the adaptive schedule).
        :param loss: ``"ce"`` or ``"margin"``.
        :param batch_size: samples per forward/backward pass.
        """
        super().__init__(estimator, budget, verbose=verbose)
        self.input_eps = input_eps
        self.input_norm = input_norm
        self.input_eps_step = input_eps_step
        self.max_iter = max_iter
        self.eps_step = eps_step
        self.loss = loss
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        if isinstance(self.input_eps, bool) or not isinstance(self.input_eps, (int, float, np.integer, np.floating)):
            raise TypeError(f"`input_eps` must be a number, got {type(self.input_eps).__name__}.")
        if not np.isfinite(self.input_eps) or self.input_eps < 0:
            raise ValueError(f"`input_eps` must be finite and non-negative, got {self.input_eps}.")
        if not isinstance(self.input_norm, (int, float, str, np.integer, np.floating)) or (
            self.input_norm not in INPUT_NORMS
        ):
            raise ValueError(f"`input_norm` must be np.inf or 2, got {self.input_norm!r}.")
        check_step(self.input_eps_step, "input_eps_step")
        check_positive_int(self.max_iter, "max_iter", minimum=0)
        check_step(self.eps_step, "eps_step")
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {self.loss!r}.")
        check_positive_int(self.batch_size, "batch_size")
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
        est = self.estimator
        x0 = torch.as_tensor(est.check_inputs(x), device=est.device)
        labels = torch.as_tensor(est.check_labels(y, len(x0)), device=est.device) if y is not None else None
        if labels is None:
            labels = self._predict_labels(self._preprocess(x0).detach(), self.batch_size)
        param_balls = self._param_balls()
        with (
            eval_mode(est.base_model),
            tqdm(total=self.max_iter, desc="JointWeightInputPGD", disable=not self.verbose) as bar,
        ):
            deltas, x_adv = self._ascend(x0, labels, param_balls, bar)
        return x_adv.cpu().numpy().astype(np.float32), self._perturbation(deltas)

    # ------------------------------------------------------------------------------------------------ internals
    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x_pre, _ = self.estimator._apply_preprocessing(x, None, fit=False, no_grad=False)
        return x_pre

    def _value_and_grads(
        self, x_adv: torch.Tensor, labels: torch.Tensor, deltas: Deltas, need_grad: bool
    ) -> tuple[tuple[float, float], list[torch.Tensor] | None, torch.Tensor | None]:
        """Success rate and mean objective at ``(deltas, x_adv)``; gradients in the deltas (accumulated) and in
        ``x_adv`` (per sample) when ``need_grad``."""
        n = len(x_adv)
        leaves = [d.detach().requires_grad_(need_grad) for d in deltas.values()]
        probe = dict(zip(deltas, leaves))
        grads: list[torch.Tensor] | None = None
        x_grad = torch.zeros_like(x_adv) if need_grad else None
        hits = torch.zeros((), device=x_adv.device)
        total = torch.zeros((), device=x_adv.device)
        for s in self._batches(n, self.batch_size):
            xb = x_adv[s].detach().requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                out = self.estimator.logits(self._preprocess(xb), probe)
                value = objective(out, labels[s], self.loss, False).sum() / n
            if need_grad:
                *g, gx = torch.autograd.grad(value, leaves + [xb])
                grads = list(g) if grads is None else [a.add_(b) for a, b in zip(grads, g)]
                x_grad[s] = gx
            hits += success(out.detach(), labels[s], False).sum()
            total += value.detach()
        return (float(hits) / max(1, n), float(total)), grads, x_grad

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
            clip = self.estimator.clip_values
            if clip is not None:
                low = torch.as_tensor(np.asarray(clip[0]), dtype=x_new.dtype, device=x_new.device)
                high = torch.as_tensor(np.asarray(clip[1]), dtype=x_new.dtype, device=x_new.device)
                x_new = torch.minimum(torch.maximum(x_new, low), high)
        return x_new

    def _ascend(
        self, x0: torch.Tensor, labels: torch.Tensor, param_balls: list[ParameterBall], bar: tqdm
    ) -> tuple[Deltas, torch.Tensor]:
        scale = 1.0
        deltas, x_adv = self._zero_deltas(param_balls), x0.clone()
        best_key, best, best_grads = (-1.0, float("-inf")), (deltas, x_adv), None
        best_value, stalled = float("-inf"), 0
        for it in range(self.max_iter + 1):
            key, grads, x_grad = self._value_and_grads(x_adv, labels, deltas, need_grad=it < self.max_iter)
            if key > best_key:
                best_key, best, best_grads = key, (deltas, x_adv), (grads, x_grad)
            if grads is None:
                break
            if self.eps_step is None:  # same control as WeightPGD: halve on stagnation, resume from the best pair
                if key[1] > best_value:
                    best_value, stalled = key[1], 0
                else:
                    stalled += 1
                if stalled >= self._patience and best_grads[0] is not None:
                    scale, stalled = scale / 2, 0
                    (deltas, x_adv), (grads, x_grad) = best, best_grads
            w_step = scale if self.eps_step is None else float(self.eps_step)
            x_step = self.input_eps_step if self.input_eps_step is not None else w_step * float(self.input_eps)
            deltas = self._ascent_step(param_balls, deltas, grads, w_step)
            x_adv = self._input_step(x_adv, x0, x_grad, float(x_step))
            bar.update(1)
            bar.set_postfix(success=f"{best_key[0]:.3f}", refresh=False)
        logger.info("JointWeightInputPGD: success rate %.4f, objective %.4f.", *best_key)
        return best
