"""
:class:`WeightAttack`: the plugin's base class for attacks on the *weights* of a classifier, and
:class:`WeightBudgetAttack`, the ART plumbing it shares with the per-sample attack.

A weight attack is an ``art.attacks.Attack`` but never an ``EvasionAttack``: its ``generate`` returns a
:class:`.WeightPerturbation`, not adversarial inputs, so ART's input-space tooling (``AdversarialTrainer``,
``AutoAttack``, ``adversarial_accuracy``, ``SecurityCurve``: ART 1.20.1 accepts any ``EvasionAttack`` there and breaks
when ``generate`` returns no inputs) must not mistake it for one. The closest ART precedents are
``GradientMatchingAttack(Attack)`` and ``PoisoningAttackTransformer.poison_estimator``.

Every attack evaluates the *base* (unperturbed) module with ``W + Δ`` through
:meth:`.PyTorchWeightClassifier.logits` (``torch.func.functional_call``), so the user's weights are never modified,
whatever happens during the attack. Per-parameter balls come from
:meth:`.PerturbationBudget.parameter_balls`; the attacks contain no norm branches.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from art.attacks.attack import Attack
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.attacks.ascent import Score, ascend
from art_weightpert.budget import ParameterBall, PerturbationBudget, WeightPerturbation
from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import EffectiveWeights, as_weight_classifier
from art_weightpert.torch_tools import batch_slices, eval_mode
from art_weightpert.validation import check_bool, check_choice, check_non_negative_int, check_positive_int

logger = logging.getLogger(__name__)

LOSSES = ("ce", "margin")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
"""The quantiles of the accuracy that the random-fault attacks report."""


class WeightAttackBase(Settings, Attack):
    """
    ART plumbing of every attack on the weights: the estimator (any ART ``PyTorchClassifier``, wrapped by
    :func:`.as_weight_classifier`; nothing is copied), ``verbose``, settings that cannot go stale
    (:class:`.Settings`: ``set_params`` validates on a copy; assigning a setting goes through it), and the rule for an
    estimator that carries a perturbation: the attack starts from its effective weights ``W + Δ``
    (:attr:`_target`, docs/certification.md "Perturbed estimators").
    """

    attack_params = Attack.attack_params + ["verbose"]
    _estimator_requirements = (PyTorchWeightClassifier,)

    def __init__(self, estimator: PyTorchClassifier, verbose: bool = True) -> None:
        """
        Create a :class:`.WeightAttackBase` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param verbose: show progress bars.
        """
        super().__init__(estimator=as_weight_classifier(estimator))
        self._effective = EffectiveWeights(self._estimator)
        self.verbose = verbose

    @property
    def estimator(self) -> PyTorchWeightClassifier:
        """The (wrapped) estimator, as the user passed it."""
        return self._estimator

    @property
    def _target(self) -> PyTorchWeightClassifier:
        """The estimator the attack works on: :func:`.effective_estimator` of :attr:`estimator` (itself when it
        carries no perturbation), copied again only when its weights change."""
        return self._effective.get()

    def _check_params(self) -> None:
        super()._check_params()
        check_bool(self.verbose, "verbose")


class BitFlipAttackBase(WeightAttackBase):
    """
    Abstract base of the attacks whose threat model is a *number of flipped bits* of the weights (integer codes of
    the quantized weights, or IEEE bits of float weights), not a ball: no budget. The flips are bits of the
    estimator's effective weights (``W + Δ``, quantized by :func:`.effective_quantized_weights`). ``generate``
    returns the flips as a list (:class:`.BitFlip` or :class:`.FloatBitFlip`, in the order found or drawn), except
    the backdoor, which returns a :class:`.BackdoorResult` (flips, trigger and flipped estimator).
    """

    @abc.abstractmethod
    def generate(self, x: np.ndarray | None = None, y: np.ndarray | None = None, **kwargs: Any) -> Any:
        """
        Run the attack.

        :param x: inputs ``(N,) + input_shape`` (the attack batch), if the attack uses them.
        :param y: labels or targets, if the attack uses them.
        :return: a list of flips (:class:`.BackdoorResult` for the backdoor).
        """
        raise NotImplementedError


class WeightBudgetAttack(WeightAttackBase):
    """
    An attack on the weights inside a :class:`.PerturbationBudget` centred at the estimator's effective weights: the
    budget is checked against its model.

    It says nothing about what :meth:`generate` returns: :class:`WeightAttack` returns perturbations, the joint attack
    inputs and a perturbation, :class:`.PerSampleWeightPGD` per-sample margins.
    """

    attack_params = WeightAttackBase.attack_params + ["budget"]

    def __init__(self, estimator: PyTorchClassifier, budget: PerturbationBudget, verbose: bool = True) -> None:
        """
        Create a :class:`.WeightBudgetAttack` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param budget: the ball of weight perturbations, checked against the estimator's model.
        :param verbose: show progress bars.
        """
        super().__init__(estimator, verbose=verbose)
        self.budget = budget

    def _check_params(self) -> None:
        super()._check_params()
        if not isinstance(self.budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(self.budget).__name__}.")
        self.budget.layer_names(self.estimator.base_model)  # unknown layer names: ValueError listing valid ones


class WeightAttack(WeightBudgetAttack):
    """
    Abstract base of the attacks that return a perturbation of the weights (:class:`.WeightPerturbation`) in the
    budget centred at the estimator's *effective* weights ``W + Δ`` (its base weights when it carries no
    perturbation). The perturbation is relative to those weights; ``generate_estimator`` returns the estimator that
    predicts with ``W + Δ + δ``.
    """

    @abc.abstractmethod
    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> Any:
        """
        Run the attack.

        :param x: inputs of shape ``(N,) + input_shape``.
        :param y: integer or one-hot labels (or targets), if the attack uses them.
        :return: a :class:`.WeightPerturbation` (or, for joint attacks, adversarial inputs and one).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ shared helpers
    def _param_balls(self) -> list[ParameterBall]:
        """The budget resolved on the base model: one ball and radius per perturbed parameter (parameter dtype and
        device)."""
        return self.budget.parameter_balls(self._target.base_model)

    def _zero_deltas(self, param_balls: list[ParameterBall]) -> dict[str, torch.Tensor]:
        model = self._target.base_model
        return {t.param_name: torch.zeros_like(model.get_parameter(t.param_name)).detach() for t in param_balls}

    def _predict_labels(self, x_t: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Clean predictions of the base model on preprocessed ``x_t``."""
        return predict_labels(self._target, x_t, None, batch_size)

    def _score_and_grads(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        deltas: Mapping[str, torch.Tensor],
        need_grad: bool,
        *,
        loss: str,
        targeted: bool,
        batch_size: int,
        input_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[Score, list[torch.Tensor] | None, torch.Tensor | None]:
        """
        Score of the universal ``deltas`` on all of ``x`` (success rate and mean :func:`objective`) and, when
        ``need_grad``, the objective's gradient with respect to the deltas (accumulated over batches of
        ``batch_size``). In a process group each rank computes its batches (:func:`.distributed.my_batches`) and the
        sums are all-reduced: every rank holds the same score and gradients, the single-process ones up to the order
        of the floating-point sums.

        :param input_map: applied to each batch of ``x`` before the model (e.g. the estimator's torch preprocessing);
            when given, the gradient with respect to ``x`` (per sample) is returned too.
        :return: ``(score, weight gradients in the order of deltas, input gradient or None)``.
        """
        n = len(x)
        leaves = [d.detach().requires_grad_(need_grad) for d in deltas.values()]
        probe = dict(zip(deltas, leaves))
        grads: list[torch.Tensor] | None = None
        x_grad = torch.zeros_like(x) if need_grad and input_map is not None else None
        hits = torch.zeros((), device=x.device)
        total = torch.zeros((), device=x.device)
        for s in distributed.my_batches(n, batch_size):
            xb = x[s] if x_grad is None else x[s].detach().requires_grad_(True)
            with torch.set_grad_enabled(need_grad):
                out = self._target.logits(xb if input_map is None else input_map(xb), probe)
                value = objective(out, labels[s], loss, targeted).sum() / n
            if need_grad:
                g = list(torch.autograd.grad(value, leaves if x_grad is None else leaves + [xb]))
                if x_grad is not None:
                    x_grad[s] = g.pop()
                grads = g if grads is None else [a.add_(b) for a, b in zip(grads, g)]
            hits += success(out.detach(), labels[s], targeted).sum()
            total += value.detach()
        if distributed.is_distributed():
            grads = [torch.zeros_like(leaf) for leaf in leaves] if need_grad and grads is None else grads
            parts = [hits, total, *(grads or []), *([] if x_grad is None else [x_grad])]
            hits, total, *rest = distributed.all_reduce_sum_list(parts)
            grads, x_grad = (rest[: len(leaves)] if need_grad else None), (None if x_grad is None else rest[-1])
        return Score(float(hits) / max(1, n), float(total)), grads, x_grad

    def _run_ascent(self, max_iter: int, restarts: int = 1, **loop: Any) -> Any:
        """:func:`.ascend` on the base model in eval mode, with a progress bar named after the attack; logs and
        returns the best state.

        :param loop: ``start``, ``evaluate``, ``step`` and ``schedule``, as for :func:`.ascend`.
        """
        name = type(self).__name__
        with (
            eval_mode(self._target.base_model),
            tqdm(total=restarts * max_iter, desc=name, disable=not self.verbose) as bar,
        ):

            def on_step(best: Score) -> None:
                bar.update(1)
                bar.set_postfix(success=f"{best.success:.3f}", refresh=False)

            score, best = ascend(max_iter=max_iter, restarts=restarts, on_step=on_step, **loop)
        logger.info("%s: success rate %.4f, objective %.4f.", name, *score)
        return best

    def _perturbation(self, deltas: Mapping[str, torch.Tensor]) -> WeightPerturbation:
        """The attack's result: the deltas projected exactly (float64) by the budget, in the parameters' dtype."""
        projected = self.budget.project({k: v.detach() for k, v in deltas.items()}, self._target.base_model)
        model = self._target.base_model
        arrays = {}
        for name, value in projected.items():
            dtype = model.get_parameter(name).dtype
            arrays[name] = value.astype(np.float64 if dtype == torch.float64 else np.float32)
        return WeightPerturbation(arrays, budget=self.budget)


class _FlushSubnormalGrad(torch.autograd.Function):
    """Identity whose backward pass sets subnormal gradient entries to zero. Attacks saturate the softmax, so about
    half of the logits' gradient underflows to subnormal numbers, and matrix products with subnormal operands run
    several times slower on x86 CPUs; the entries dropped are below 1.2e-38 (float32)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: torch.Tensor) -> torch.Tensor:
        return logits.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0.0)


def objective(logits: torch.Tensor, labels: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """
    Per-sample objective that an attack *maximizes*.

    * ``"ce"``: cross-entropy to the true labels (untargeted) or minus cross-entropy to the targets (targeted);
    * ``"margin"``: Carlini-Wagner margin ``max_{i≠y} f_i − f_y`` (untargeted) or ``f_t − max_{i≠t} f_i``
      (targeted), not clipped: samples already misclassified keep being pushed away from the boundary, which keeps a
      universal perturbation from trading them back.

    :param logits: ``(N, K)``.
    :param labels: ``(N,)`` true labels, or targets when ``targeted``.
    :param loss: ``"ce"`` or ``"margin"``.
    :param targeted: targeted mode.
    :return: ``(N,)`` objective values.
    """
    logits = _FlushSubnormalGrad.apply(logits)
    if loss == "ce":
        ce = F.cross_entropy(logits, labels, reduction="none")
        return -ce if targeted else ce
    own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, labels.unsqueeze(1), float("-inf")).amax(dim=1)
    return own - others if targeted else others - own


def check_ascent_params(max_iter: Any, loss: Any, batch_size: Any) -> None:
    """The parameters every universal gradient attack shares: ``max_iter`` ≥ 0 steps, a known ``loss``, a
    ``batch_size`` ≥ 1."""
    check_non_negative_int(max_iter, "max_iter")
    check_choice(loss, "loss", LOSSES)
    check_positive_int(batch_size, "batch_size")


def success(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-sample success of an attack: prediction ≠ label (untargeted) or = target (targeted)."""
    hit = logits.argmax(dim=1) == labels
    return hit if targeted else ~hit


def predict_labels(
    estimator: PyTorchWeightClassifier, x_t: torch.Tensor, deltas: Mapping[str, torch.Tensor] | None, batch_size: int
) -> torch.Tensor:
    """Predictions of ``estimator``'s base model with weights ``W + deltas`` on preprocessed ``x_t`` (eval mode)."""
    estimator = as_weight_classifier(estimator)
    with torch.no_grad(), eval_mode(estimator.base_model):
        out = [estimator.logits(x_t[b], deltas).argmax(dim=1) for b in batch_slices(len(x_t), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x_t.device)


def accuracy_with_deltas(
    estimator: PyTorchWeightClassifier,
    x_t: torch.Tensor,
    labels: torch.Tensor,
    deltas: Mapping[str, torch.Tensor] | None,
    batch_size: int,
    sharded: bool = False,
) -> float:
    """
    Share of preprocessed ``x_t`` classified as ``labels`` with weights ``W + deltas``, in eval mode (nan for no
    input): the number of correct samples divided by ``len(x_t)``.

    :param sharded: in a process group, this rank classifies its batches (:func:`.distributed.my_batches`) and the
        counts are summed over the ranks: the single-process value exactly, on every rank. A collective: every rank
        must call it, with the same ``x_t`` and ``labels`` (the random-fault attacks' :meth:`evaluate` check this).
    """
    if len(x_t) == 0:
        return float("nan")
    estimator = as_weight_classifier(estimator)
    batches = distributed.my_batches(len(x_t), batch_size) if sharded else batch_slices(len(x_t), batch_size)
    correct = torch.zeros((), dtype=torch.float64, device=x_t.device)
    with torch.no_grad(), eval_mode(estimator.base_model):
        for s in batches:
            correct += (estimator.logits(x_t[s], deltas).argmax(dim=1) == labels[s]).sum()
    if sharded:
        (correct,) = distributed.all_reduce_sum_list([correct.to(distributed.collective_device())])
    return float(correct) / len(x_t)


def accuracy_summary(accuracies: np.ndarray) -> dict[str, Any]:
    """The statistics of the accuracies of random draws that every random-fault attack reports: ``mean``, ``std``,
    ``min``, ``max``, ``quantiles`` (``{q: accuracy}`` for :data:`QUANTILES`) and the ``accuracies`` themselves."""
    return {
        "mean": float(accuracies.mean()),
        "std": float(accuracies.std()),
        "min": float(accuracies.min()),
        "max": float(accuracies.max()),
        "quantiles": {q: float(np.quantile(accuracies, q)) for q in QUANTILES},
        "accuracies": accuracies,
    }
