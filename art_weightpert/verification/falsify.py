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

import numpy as np
import torch

from art_weightpert.attacks.ascent import Deltas
from art_weightpert.attacks.per_sample import PerSampleWeightPGD, reproducing_network
from art_weightpert.budget import PerturbationBudget, WeightPerturbation
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
        x = x.to(torch.float64)
        with eval_mode(model):
            network, _ = reproducing_network(self._network(), model, params, x)
            ones = torch.ones(len(x), dtype=x.dtype, device=x.device)
            record = self._attack_batch(model, params, param_balls, x, labels, ones, network, keep_best=True)
        return record.best, record.best_deltas


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
