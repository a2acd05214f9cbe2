"""
Counterexamples for the verifier (docs/theory.md §11): a per-sample weight attack that keeps the perturbation it
found, and the float64 check every reported counterexample passes.

:class:`CounterexampleSearch` is :class:`.PerSampleWeightPGD` keeping, for every sample, the perturbation with the
lowest worst margin it evaluated (every iterate is a point of the ball). :func:`checked_counterexample` projects a
candidate onto the budget with the budget's own projection, checks membership, and re-evaluates the perturbed model
in float64 with the module's own forward: only a perturbation that passes both is reported.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import math

import numpy as np
import torch

from art_weightpert.attacks.ascent import CosineStep, Deltas, Score, ascend
from art_weightpert.attacks.base import objective
from art_weightpert.attacks.per_sample import PerSampleWeightPGD, _per_sample_forward, _per_sample_step
from art_weightpert.budget import ParameterBall, PerturbationBudget, WeightPerturbation
from art_weightpert.network import Network
from art_weightpert.torch_tools import eval_mode, run_with_parameters


class CounterexampleSearch(PerSampleWeightPGD):
    """:class:`.PerSampleWeightPGD` that also returns, per sample, the perturbation with the lowest worst margin it
    evaluated (:meth:`search`)."""

    def search(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Deltas]:
        """
        Attack the preprocessed inputs ``x`` (a tensor on the estimator's device) with labels ``labels``.

        :return: ``(worst margins (N,), {parameter name: (N,) + shape deltas})``: the lowest worst margin observed per
            sample and the perturbation that gave it (relative to the estimator's effective weights, float64).
        """
        params = self._centre(torch.float64)
        param_balls = self._centre_param_balls(params)
        model = self._target.base_model
        network = self._network()
        x = x.to(torch.float64)
        with eval_mode(model), torch.no_grad():
            clean = run_with_parameters(model, params, x)
            if network is not None and not torch.allclose(
                network.forward(x, params), clean, rtol=1e-6, atol=1e-6 * float(clean.abs().max())
            ):
                network = None
        with eval_mode(model):
            return self._search_batch(model, params, param_balls, x, labels, network)

    def _search_batch(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        param_balls: list[ParameterBall],
        x: torch.Tensor,
        labels: torch.Tensor,
        network: Network | None,
    ) -> tuple[torch.Tensor, Deltas]:
        n = len(x)
        radii = {b.param_name: b.radius.to(x.dtype).expand((n,) + tuple(b.radius.shape)) for b in param_balls}
        forward = _per_sample_forward(model, params, network)
        own = labels.unsqueeze(1)
        best = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        best_deltas = {
            b.param_name: torch.zeros((n,) + tuple(params[b.param_name].shape), dtype=x.dtype, device=x.device)
            for b in param_balls
        }
        gen = torch.Generator(device="cpu").manual_seed(0)

        def start(restart: int) -> Deltas:
            return {
                b.param_name: self._start(b, radii[b.param_name], params[b.param_name], restart, gen)
                for b in param_balls
            }

        def evaluate(deltas: Deltas, need_grad: bool) -> tuple[Score, list[torch.Tensor] | None]:
            nonlocal best
            leaves = [d.detach().requires_grad_(need_grad) for d in deltas.values()]
            with torch.set_grad_enabled(need_grad):
                logits = forward(dict(zip(deltas, leaves)), x)
                value = objective(logits, labels, "margin", targeted=False).sum()
            with torch.no_grad():
                worst = (logits.gather(1, own) - logits).scatter(1, own, math.inf).amin(dim=1)
                better = worst < best
                if bool(better.any()):
                    best = torch.where(better, worst, best)
                    for name, d in deltas.items():
                        best_deltas[name][better] = d.detach()[better]
            grads = list(torch.autograd.grad(value, leaves)) if need_grad else None
            return Score(float((worst < 0).float().mean()), float(value.detach()) / n), grads

        def step(deltas: Deltas, grads: list[torch.Tensor], fraction: float) -> Deltas:
            with torch.no_grad():
                return {
                    b.param_name: _per_sample_step(b.ball, deltas[b.param_name], g, radii[b.param_name], fraction)
                    for b, g in zip(param_balls, grads)
                }

        first = 0.5 if self.eps_step is None else float(self.eps_step)
        ascend(start, evaluate, step, CosineStep(first, self.max_iter), self.max_iter, 1 + self.num_random_init)
        return best, best_deltas


def zero_perturbation(budget: PerturbationBudget, model: torch.nn.Module) -> WeightPerturbation:
    """The all-zero perturbation of every parameter of ``budget`` (the counterexample of a sample the clean model
    already misclassifies)."""
    return WeightPerturbation(
        {t.param_name: np.zeros(tuple(model.get_parameter(t.param_name).shape)) for t in budget.parameter_balls(model)},
        budget=budget,
    )


def checked_counterexample(
    budget: PerturbationBudget,
    model64: torch.nn.Module,
    x: torch.Tensor,
    label: int,
    delta: dict[str, torch.Tensor],
) -> WeightPerturbation | None:
    """
    ``delta`` as a :class:`.WeightPerturbation` when it is a counterexample: projected onto the budget
    (:meth:`.PerturbationBudget.project`), inside it (:meth:`.PerturbationBudget.contains`), and the float64 forward
    of ``model64`` (the centre weights in float64) with ``W + Δ`` on the single input ``x`` predicts another class
    than ``label`` (a tie counts as a change); else ``None``.
    """
    projected = budget.project({k: v.detach().to(torch.float64).cpu() for k, v in delta.items()}, model64)
    if not budget.contains(projected, model64, atol=0.0):
        return None
    params = {name: p.detach() for name, p in model64.named_parameters()}
    for name, value in projected.items():
        params[name] = params[name] + torch.as_tensor(value, dtype=torch.float64, device=params[name].device)
    for name, b in model64.named_buffers():
        params[name] = b
    with eval_mode(model64), torch.no_grad():
        logits = run_with_parameters(model64, params, x.to(torch.float64).unsqueeze(0))[0]
    others = torch.cat([logits[:label], logits[label + 1 :]])
    if len(others) and bool(others.max() >= logits[label]):
        return projected
    return None
