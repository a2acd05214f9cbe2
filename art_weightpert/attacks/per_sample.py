"""
:class:`PerSampleWeightPGD`: a per-sample weight attack, the falsification test of weight certificates.

Every sample gets its *own* perturbation ``Δ_n`` in the ball, and projected gradient descent drives its worst
pairwise margin ``min_{i≠y} f_y − f_i`` down. Samples are processed together: the deltas carry a leading batch
dimension. A model that reads as a chain of layers (:func:`.read_network`) is evaluated with one batched product per
layer (:meth:`.Network.forward` with ``sample_deltas``, checked against the module on the clean batch); any other
model per sample with ``torch.func.vmap`` over ``torch.func.functional_call``. The steps are those of
:func:`.ascend`, the loop every weight attack shares. The user's module is never modified.

A certified sample must never flip under this attack, and no margin it observes may fall below a certified lower
bound; the share of samples it cannot flip is an upper bound on the robust accuracy.

Like every attack and certificate, it works on the estimator *as it is*: the ball is centred at the weights it
predicts with (base weights plus any carried perturbation), relative radii are relative to those weights, and by
default the model is evaluated in float64, so that observed margins can be compared with float64 bounds.

It is not a :class:`.WeightAttack` (which returns one :class:`.WeightPerturbation` for all samples): it shares the
ART plumbing of :class:`.WeightBudgetAttack`, and its :meth:`~PerSampleWeightPGD.generate` returns the margins it
observed.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch.func import vmap
from tqdm.auto import tqdm

from art_weightpert.attacks.ascent import CosineStep, Deltas, Score, ascend, projected_step
from art_weightpert.attacks.base import WeightBudgetAttack, objective
from art_weightpert.balls import Ball
from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.network import Network, UnsupportedModelError, read_network
from art_weightpert.torch_tools import batch_slices, eval_mode, run_with_parameters
from art_weightpert.validation import check_bool, check_non_negative_int, check_optional_positive, check_positive_int


class PerSampleWeightPGD(WeightBudgetAttack):
    """
    Per-sample projected gradient descent on the worst pairwise margin (one ``Δ_n`` per sample).

    Restart 0 starts at the centre, the others at random points of the ball (uniform, then extreme points,
    alternately). Each of the ``max_iter`` steps moves every ``Δ_n`` along its ball's steepest direction by a cosine
    schedule from ``eps_step`` down to ``eps_step / 100`` (fractions of the radius) and projects it back exactly.
    Every iterate is a point of the ball, and the lowest margin observed for each class over all iterates and restarts
    is kept.
    """

    attack_params = WeightBudgetAttack.attack_params + [
        "max_iter",
        "num_random_init",
        "eps_step",
        "batch_size",
        "float64",
    ]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        max_iter: int = 100,
        num_random_init: int = 2,
        eps_step: float | None = None,
        batch_size: int = 64,
        float64: bool = True,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.PerSampleWeightPGD` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param budget: the ball of weight perturbations.
        :param max_iter: gradient steps per restart.
        :param num_random_init: restarts from random points of the ball, in addition to the one from the centre.
        :param eps_step: first step, as a fraction of each radius (``None``: 0.5).
        :param batch_size: samples attacked together (memory grows with the batch times the perturbed weights).
        :param float64: evaluate the model in float64 (for comparisons with float64 certificates).
        :param verbose: show a progress bar over batches.
        """
        super().__init__(estimator, budget, verbose=verbose)
        self.max_iter = max_iter
        self.num_random_init = num_random_init
        self.eps_step = eps_step
        self.batch_size = batch_size
        self.float64 = float64
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_positive_int(self.max_iter, "max_iter")
        check_non_negative_int(self.num_random_init, "num_random_init")
        check_optional_positive(self.eps_step, "eps_step")
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.float64, "float64")

    # ------------------------------------------------------------------------------------------------ public API
    def generate(
        self, x: np.ndarray, y: np.ndarray | None = None, scale: np.ndarray | None = None, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """
        Attack every sample with its own weight perturbation.

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels (integer or one-hot); ``None``: the clean predictions of the estimator as it is.
        :param scale: optional per-sample factors ``(N,)`` ≥ 0 applied to every radius of the budget: sample ``n`` is
            attacked in the ball scaled by ``scale[n]`` (e.g. each sample at its own certified radius).
        :return: ``{"margins": (N, K)`` lowest margin ``f_y − f_i`` observed per class (``+inf`` at the label),
            ``"worst_margin": (N,)`` their minimum, ``"flipped": (N,)`` whether some perturbation in the ball changed
            the prediction away from ``y``, ``"labels": (N,)`` the labels attacked``}``.
        """
        x_t, y_t = self._target.prepare_inputs(x, y)
        factors = _check_scale(scale, len(x_t))
        dtype = torch.float64 if self.float64 else next(self._target.base_model.parameters()).dtype
        params = self._centre(dtype)
        param_balls = self._centre_param_balls(params)
        model = self._target.base_model
        network = self._network()
        margins, flipped, labels = [], [], []
        with eval_mode(model):
            for s in tqdm(
                list(batch_slices(len(x_t), self.batch_size)), desc="Per-sample weight PGD", disable=not self.verbose
            ):
                xb = x_t[s].to(dtype)
                network, clean = reproducing_network(network, model, params, xb)
                yb = clean.argmax(dim=1) if y_t is None else y_t[s]
                factor = torch.as_tensor(factors[s], dtype=dtype, device=xb.device)
                record = self._attack_batch(model, params, param_balls, xb, yb, factor, network)
                margins.append(record.low.cpu().numpy())
                flipped.append(record.flipped.cpu().numpy())
                labels.append(yb.cpu().numpy())
        nb_classes = self._target.nb_classes
        margins_np = np.concatenate(margins) if margins else np.zeros((0, nb_classes))
        return {
            "margins": margins_np,
            "worst_margin": margins_np.min(axis=1) if len(margins_np) else np.zeros(0),
            "flipped": np.concatenate(flipped) if flipped else np.zeros(0, dtype=bool),
            "labels": np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        }

    def robust_accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """
        Share of samples correctly classified that no per-sample perturbation found by the attack flips: an upper
        bound on the accuracy under every perturbation in the ball (per-sample threat model).

        :param x: inputs.
        :param y: labels.
        :return: the share (an empty ``x`` is a ``ValueError``).
        """
        result = self.generate(x, y)
        if len(result["flipped"]) == 0:
            return float("nan")
        return float(np.mean(~result["flipped"]))

    # ------------------------------------------------------------------------------------------------ internals
    def _network(self) -> Network | None:
        """The model read as a chain of layers (the fast batched path), or ``None`` when it cannot be read."""
        try:
            return read_network(self._target.base_model, self._target.input_shape)
        except UnsupportedModelError:
            return None

    def _centre(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every parameter and floating buffer of the base model at the estimator's centre weights, in ``dtype``."""
        model = self._target.base_model
        carried = self._target.current_deltas()
        out = {}
        for name, p in model.named_parameters():
            value = p.detach().to(dtype)
            out[name] = value + carried[name].detach().to(dtype) if name in carried else value
        for name, b in model.named_buffers():
            out[name] = b.to(dtype) if b.is_floating_point() else b
        return out

    def _centre_param_balls(self, params: dict[str, torch.Tensor]) -> list[ParameterBall]:
        """The budget resolved on the centre weights (relative radii follow the carried perturbation)."""
        param_balls = self.budget.parameter_balls(self._target.base_model)
        return [
            dataclasses.replace(b, radius=b.ball.radius(params[b.param_name], b.eps, self.budget.relative))
            for b in param_balls
        ]

    def _attack_batch(
        self,
        model: torch.nn.Module,
        params: dict[str, torch.Tensor],
        param_balls: list[ParameterBall],
        x: torch.Tensor,
        labels: torch.Tensor,
        factor: torch.Tensor,
        network: Network | None = None,
        keep_best: bool = False,
    ) -> LowestMargins:
        """Attack one batch (sample ``n`` in its ball scaled by ``factor[n]``): the record of the lowest margins
        ``(n, K)`` observed and whether each sample flipped; with ``keep_best``, also the perturbation of each sample's
        lowest worst margin (:class:`LowestMargins`)."""
        n = len(x)
        radii = {b.param_name: factor.reshape((n,) + (1,) * b.radius.dim()) * b.radius.to(x.dtype) for b in param_balls}
        forward = _per_sample_forward(model, params, network)
        record = LowestMargins(labels, self._target.nb_classes, x.dtype, keep_best)
        gen = torch.Generator(device="cpu").manual_seed(0)

        def start(restart: int) -> Deltas:
            return {
                b.param_name: self._start(b, radii[b.param_name], params[b.param_name], restart, gen)
                for b in param_balls
            }

        def evaluate(deltas: Deltas, need_grad: bool) -> tuple[Score, list[torch.Tensor] | None]:
            leaves = [d.detach().requires_grad_(need_grad) for d in deltas.values()]
            with torch.set_grad_enabled(need_grad):
                logits = forward(dict(zip(deltas, leaves)), x)
                value = objective(logits, labels, "margin", targeted=False).sum()
            flipped = record.add(logits.detach(), deltas)
            grads = list(torch.autograd.grad(value, leaves)) if need_grad else None
            return Score(float(flipped.float().mean()), float(value.detach()) / n), grads

        def step(deltas: Deltas, grads: list[torch.Tensor], fraction: float) -> Deltas:
            with torch.no_grad():
                return {
                    b.param_name: _per_sample_step(b.ball, deltas[b.param_name], g, radii[b.param_name], fraction)
                    for b, g in zip(param_balls, grads)
                }

        first = 0.5 if self.eps_step is None else float(self.eps_step)
        ascend(start, evaluate, step, CosineStep(first, self.max_iter), self.max_iter, 1 + self.num_random_init)
        return record

    @staticmethod
    def _start(
        param_ball: ParameterBall, radii: torch.Tensor, param: torch.Tensor, restart: int, gen: torch.Generator
    ) -> torch.Tensor:
        """Starting deltas ``(n,) + param.shape`` in the per-sample balls of radii ``radii`` (``(n,) + radius
        shape``): zero for restart 0, then uniform and extreme points in turn."""
        if restart == 0:
            return torch.zeros((len(radii),) + tuple(param.shape), dtype=param.dtype, device=param.device)
        distribution = "uniform" if restart % 2 else "extreme"
        points = [param_ball.ball.sample(r, param.shape, distribution, gen) for r in radii.detach().cpu()]
        return torch.stack(points).to(dtype=param.dtype, device=param.device)


class LowestMargins:
    """The lowest margin ``f_y − f_i`` observed for each sample and class (``+inf`` at the label), and whether the
    prediction ever left the label; with ``keep_best``, also each sample's lowest worst margin :attr:`best` ``(N,)``
    and the perturbation that gave it, :attr:`best_deltas` (every evaluated point is in the ball: the verifier's
    counterexample candidates)."""

    def __init__(self, labels: torch.Tensor, nb_classes: int, dtype: torch.dtype, keep_best: bool = False) -> None:
        self.own = labels.unsqueeze(1)
        self.labels = labels
        self.low = torch.full((len(labels), nb_classes), math.inf, dtype=dtype, device=labels.device)
        self.flipped = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
        self.best = torch.full((len(labels),), math.inf, dtype=dtype, device=labels.device)
        self.best_deltas: Deltas | None = {} if keep_best else None

    def add(self, logits: torch.Tensor, deltas: Deltas | None = None) -> torch.Tensor:
        """Record one evaluation (at the perturbation ``deltas``); returns which samples it flips."""
        margins = (logits.gather(1, self.own) - logits).scatter(1, self.own, math.inf)
        self.low = torch.minimum(self.low, margins)
        flipped = logits.argmax(dim=1) != self.labels
        self.flipped = self.flipped | flipped
        if self.best_deltas is not None:
            worst = margins.amin(dim=1)
            better = worst < self.best
            self.best = torch.where(better, worst, self.best)
            for name, delta in deltas.items():
                kept = self.best_deltas.setdefault(name, torch.zeros_like(delta.detach()))
                kept[better] = delta.detach()[better]
        return flipped


def reproducing_network(
    network: Network | None, model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[Network | None, torch.Tensor]:
    """``(network or None, the module's clean logits on x)``: the read network is kept only when its forward
    reproduces the module's on ``x`` (else the module itself is evaluated, sample by sample)."""
    with torch.no_grad():
        clean = run_with_parameters(model, params, x)
        if network is not None and not torch.allclose(
            network.forward(x, params), clean, rtol=1e-6, atol=1e-6 * float(clean.abs().max())
        ):
            network = None
    return network, clean


def _per_sample_forward(
    model: torch.nn.Module, params: dict[str, torch.Tensor], network: Network | None
) -> Callable[[Deltas, torch.Tensor], torch.Tensor]:
    """``forward(deltas, x)``: the logits where sample ``n`` uses the weights ``params + deltas[.][n]``: one batched
    forward of the read network, or the module mapped over the samples with ``torch.func.vmap``."""
    if network is not None:
        return lambda deltas, x: network.forward(x, params, sample_deltas=deltas)

    def one_sample(deltas: Deltas, x_n: torch.Tensor) -> torch.Tensor:
        p = dict(params)
        for name, delta in deltas.items():
            p[name] = params[name] + delta
        return run_with_parameters(model, p, x_n.unsqueeze(0)).squeeze(0)

    return vmap(one_sample)


def _per_sample_step(
    ball: Ball, delta: torch.Tensor, grad: torch.Tensor, radii: torch.Tensor, fraction: float
) -> torch.Tensor:
    """:func:`.projected_step` for deltas stacked on a leading sample dimension, each with its own radius (``radii``:
    ``(n,) + radius shape``).

    Balls whose radius has a leading row dimension (box, row_l1) act on each row independently: the samples are
    folded into the rows (one call). A radius over the whole tensor (l2) is mapped with ``torch.func.vmap``.
    """
    if radii.dim() == 1:
        return vmap(lambda d, g, r: projected_step(ball, d, g, r, fraction))(delta, grad, radii)

    def fold(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + tuple(t.shape[2:]))

    return projected_step(ball, fold(delta), fold(grad), fold(radii), fraction).reshape(delta.shape)


def _check_scale(scale: Any, n: int) -> np.ndarray:
    if scale is None:
        return np.ones(n)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().cpu().numpy()
    values = np.asarray(scale, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"`scale` must have shape ({n},), got {values.shape}.")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError("`scale` must hold finite factors ≥ 0.")
    return values
