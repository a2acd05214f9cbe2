"""
:class:`WeightRobustTrainer`: training with the theory-driven loss of docs/theory.md §7, as an ART defence trainer.

For a batch ``(x_j, y_j)`` the loss is::

    L = (1/n) Σ_j [ CE(f(x_j), y_j) + λ_t · max_{i≠y_j} relu(η_{y_j,i} − m_{y_j,i} + κ) ] + μ · Σ_k ‖W^k‖_op∞

where ``m_{y,i} − η_{y,i}`` is a lower bound of the pairwise margin ``f_y − f_i`` over the weight ball (computed
differentiably in float32 by the chosen bound: ``"interval"`` docs/theory.md §4, ``"paper"`` §3 formula B, or
``"linear"`` §4b), ``κ ≥ 0`` a safety margin and ``‖W‖_op∞`` the largest row ℓ1 norm (for a conv, the largest ℓ1 norm
of an output channel's kernel). During the first ``warmup`` epochs ``λ_t`` grows linearly from 0 to ``λ`` and the ball's
radii from 0 to the budget's (per step, :mod:`.schedule`): without the warm-up this loss collapses training
(docs/theory.md §7). A run that collapses anyway is detected and reported (``history["collapsed"]``,
``history["warnings"]``). ``λ = μ = 0`` is plain training.

The paper's exact choice of the terms is not available offline; this loss is the project's reading of it.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.data_generators import DataGenerator
from art.defences.trainer.trainer import Trainer
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.certification.registry import METHODS
from art_weightpert.defences.trainer import data_parallel as dp
from art_weightpert.defences.trainer.batch_norm import BATCH_NORM_MODES, TrainingNetwork, frozen_batch_norm
from art_weightpert.defences.trainer.batches import Batch, array_batches, generator_batches, with_adversarial_inputs
from art_weightpert.defences.trainer.loss import operator_norm_sum, robust_term
from art_weightpert.defences.trainer.monitoring import EpochTotals, check_validation_data, validation_metrics
from art_weightpert.defences.trainer.schedule import (
    CollapseDetector,
    check_scheduler,
    ramp_factor,
    scale_param_balls,
    step_scheduler,
)
from art_weightpert.defences.trainer.settings import ValidatedSettings
from art_weightpert.defences.trainer.shared_forward import SharedForward
from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.network import Network
from art_weightpert.validation import (
    check_bool,
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive_int,
    check_probability,
)

logger = logging.getLogger(__name__)

# default warm-up (epochs) of λ and ε: 5 is enough for the digits MLP, a 3x32x32 CNN needs ~10 (docs/training.md)
WARMUP_EPOCHS = 10

HISTORY_KEYS = ("epoch", "loss", "ce", "robust", "norm", "lam", "eps_scale", "accuracy", "lr", "time")


class WeightRobustTrainer(ValidatedSettings, Trainer):
    """
    Trains a PyTorch classifier in place so that its predictions provably survive weight perturbations in a
    :class:`.PerturbationBudget`, with the loss of docs/theory.md §7 (see the module docstring), optionally jointly with
    adversarial inputs from an ART ``EvasionAttack``.

    The cross-entropy term runs the model in train mode (dropout active); the bound is computed with eval semantics
    (the model read by :func:`.read_network`: dropout is the identity, batch norm the affine map ``s·h + t`` of its
    running statistics), batch norm as ``batch_norm`` says (:mod:`.batch_norm`, docs/theory.md §13; the parameter
    below). The classifier's own optimizer takes the steps; every module's training flag is restored after ``fit``.

    | Paper link: https://arxiv.org/abs/2103.02200
    """

    trainer_params = [
        "budget", "lam", "mu", "kappa", "method", "warmup", "ramp_eps", "collapse_patience", "stop_on_collapse",
        "batch_norm", "attack", "ratio", "verbose",
    ]  # fmt: skip

    def __init__(
        self,
        classifier: PyTorchClassifier,
        budget: PerturbationBudget,
        lam: float = 1.0,
        mu: float = 0.0,
        kappa: float = 0.0,
        method: str = "interval",
        warmup: int = WARMUP_EPOCHS,
        ramp_eps: bool = True,
        collapse_patience: int = 3,
        stop_on_collapse: bool = True,
        batch_norm: str = "auto",
        attack: EvasionAttack | None = None,
        ratio: float = 0.5,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Create a :class:`.WeightRobustTrainer` instance.

        :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`) with an optimizer; its
            module must be readable by :func:`.read_network` (a chain of Linear/Conv2d and fixed layers).
        :param budget: the ball of weight perturbations the model is trained to withstand.
        :param lam: weight λ ≥ 0 of the robust term (after the warm-up).
        :param mu: weight μ ≥ 0 of the operator-norm term ``Σ_k ‖W^k‖_op∞``.
        :param kappa: safety margin κ ≥ 0: the robust term is zero once every margin lower bound exceeds κ.
        :param method: margin bound used for η: ``"interval"`` (docs/theory.md §4, default), ``"paper"`` (§3 formula B)
        or
            ``"linear"`` (§4b): a name in the registry :data:`.METHODS`.
        :param warmup: number of epochs over which λ (and, with ``ramp_eps``, the ball's radii) grow linearly from 0
            (per step); 0 starts at the full λ and ε. Each call of ``fit`` restarts the warm-up.
        :param ramp_eps: also ramp the radii of the ball from 0 to the budget's during the warm-up (the standard
            remedy against collapse in certified training); False ramps λ only, at the full ε.
        :param collapse_patience: a robust run (λ > 0) whose training accuracy stays at chance for this many
            epochs after it had learned is reported as collapsed (a ``UserWarning`` with the numbers and what to
            change, ``history["collapsed"]`` and ``history["warnings"]``).
        :param stop_on_collapse: stop training at the epoch where the collapse is detected (it does not recover).
        :param batch_norm: ``"frozen"`` (batch norm in eval mode during ``fit``: the module's running statistics
            fixed, γ and β trained through the bound too), ``"train"`` (batch statistics in the cross-entropy, running
            statistics updated and read by the bound as constants) or ``"auto"`` (``"frozen"`` when the model has
            batch norm and λ > 0, else ``"train"``); see :mod:`.batch_norm`.
        :param attack: optional ART ``EvasionAttack``: a ``ratio`` of every batch is replaced by its adversarial inputs,
            generated on the current model.
        :param ratio: share of each batch replaced by adversarial inputs when ``attack`` is given (0 to 1).
        :param verbose: show a progress bar over the epochs.
        :param kwargs: ``bound``, the deprecated spelling of ``method`` (a ``DeprecationWarning``).
        """
        method = renamed_keyword(kwargs, "bound", "method", method, "interval", "WeightRobustTrainer")
        reject_unknown_keywords(kwargs, "WeightRobustTrainer")
        estimator = self._trainable(classifier)
        params = {key: value for key, value in locals().items() if key in self.trainer_params}
        params = self._validated(params, estimator)
        super().__init__(classifier)
        self._estimator = estimator
        self._reading = TrainingNetwork(estimator.base_model, estimator.input_shape)
        METHODS[params["method"]].check(self._reading.network)  # e.g. "paper" on a model with branches
        self._shared = SharedForward(estimator, self._reading.network)
        for key, value in params.items():
            setattr(self, key, value)
        self.history: dict[str, list] = {}

    # ------------------------------------------------------------------------------------------------ parameters
    def _check_params(self) -> None:
        """Validate the current settings, the method against the network included (on a copy, before a change of
        settings is kept)."""
        super()._check_params()
        METHODS[self.method].check(self._reading.network)

    @staticmethod
    def _validated(params: dict[str, Any], estimator: PyTorchWeightClassifier) -> dict[str, Any]:
        """The validated parameters, as plain Python values."""
        params = dict(params)
        budget = params["budget"]
        if not isinstance(budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(budget).__name__}.")
        budget.layer_names(estimator.base_model)  # unknown layer names: ValueError listing the valid ones
        for name in ("lam", "mu", "kappa"):
            params[name] = check_non_negative(params[name], name)
        if params["method"] not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {params['method']!r}.")
        params["warmup"] = check_non_negative_int(params["warmup"], "warmup")
        params["collapse_patience"] = check_positive_int(params["collapse_patience"], "collapse_patience")
        attack = params["attack"]
        if attack is not None and not isinstance(attack, EvasionAttack):
            raise TypeError(f"`attack` must be an ART EvasionAttack or None, got {type(attack).__name__}.")
        params["ratio"] = check_probability(params["ratio"], "ratio")
        params["batch_norm"] = check_choice(params["batch_norm"], "batch_norm", BATCH_NORM_MODES)
        for name in ("ramp_eps", "stop_on_collapse", "verbose"):
            params[name] = check_bool(params[name], name)
        return params

    # ------------------------------------------------------------------------------------------------ training
    def fit(  # pylint: disable=arguments-differ
        self,
        x: np.ndarray,
        y: np.ndarray,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        batch_size: int = 128,
        nb_epochs: int = 20,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        **kwargs: Any,
    ) -> dict[str, list]:
        """
        Train the classifier in place on ``(x, y)``. Batches are drawn like ``PyTorchClassifier.fit`` draws them (a
        shuffling ``DataLoader`` on torch's global random generator), so with ``λ = μ = 0`` and no attack the run
        reproduces ART's plain training.

        :param x: training inputs ``(N,) + input_shape``.
        :param y: integer labels ``(N,)`` or one-hot ``(N, nb_classes)``.
        :param validation_data: optional ``(x_val, y_val)``: clean and certified accuracy (interval bound, float64)
            are evaluated after every epoch.
        :param batch_size: samples per step.
        :param nb_epochs: number of epochs (fewer when a collapse stops the run, see ``stop_on_collapse``).
        :param scheduler: optional ``torch.optim.lr_scheduler.LRScheduler`` of the classifier's optimizer, stepped once
            per epoch (``ReduceLROnPlateau`` gets the epoch's mean loss).
        :param kwargs: ignored (ART trainer signature).
        :return: the history: per-epoch lists ``epoch``, ``loss``, ``ce``, ``robust`` (mean robust term, NaN when
            ``λ = 0``), ``norm`` (``Σ_k ‖W^k‖_op∞`` after the epoch), ``lam`` (λ_t at the epoch's last step),
            ``eps_scale`` (the factor of the budget's radii at the epoch's last step), ``accuracy`` (training accuracy
            of the epoch's steps, in train mode), ``lr``, ``time`` (seconds), with validation data ``val_accuracy``
            and ``val_certified_accuracy``; and ``collapsed`` (bool) and ``warnings`` (list of messages) for the run.
        """
        est = self._estimator
        x = est.check_inputs(x)
        labels = est.check_labels(y, len(x), required=True)
        batch_size = check_positive_int(batch_size, "batch_size")
        nb_epochs = check_positive_int(nb_epochs, "nb_epochs")
        if len(x) == 0:
            raise ValueError("`x` holds no samples.")
        distributed.check_same_data(x, labels, name="x")
        check_scheduler(scheduler, self._classifier._optimizer)  # pylint: disable=protected-access
        validation = check_validation_data(self._estimator, validation_data)
        batches, nb_batches = array_batches(self._estimator, x, labels, batch_size, keep_raw=self.attack is not None)
        return self._train(batches, nb_batches, nb_epochs, scheduler, validation)

    def fit_generator(  # pylint: disable=arguments-differ
        self,
        generator: DataGenerator,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        nb_epochs: int = 20,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        **kwargs: Any,
    ) -> dict[str, list]:
        """
        Train the classifier in place on batches of an ART ``DataGenerator`` (``ceil(size / batch_size)`` batches per
        epoch, as ART's trainers do).

        :param generator: the ART data generator (``get_batch()`` returns ``(x, y)``).
        :param validation_data: as in :meth:`fit`.
        :param nb_epochs: number of epochs.
        :param scheduler: as in :meth:`fit`.
        :param kwargs: ignored (ART trainer signature).
        :return: the history, as in :meth:`fit`.
        """
        batches, nb_batches = generator_batches(self._estimator, generator)
        nb_epochs = check_positive_int(nb_epochs, "nb_epochs")
        check_scheduler(scheduler, self._classifier._optimizer)  # pylint: disable=protected-access
        validation = check_validation_data(self._estimator, validation_data)
        return self._train(batches, nb_batches, nb_epochs, scheduler, validation)

    # ------------------------------------------------------------------------------------------------ internals
    def _param_balls(self) -> dict[str, ParameterBall]:
        return {t.param_name: t for t in self.budget.parameter_balls(self._estimator.base_model)}

    def _batch_norm_frozen(self) -> bool:
        return self._reading.frozen(self.batch_norm, self.lam)

    def _network_now(self) -> Network:
        """The network the bound reads now (:class:`.TrainingNetwork`)."""
        return self._reading.now(self._batch_norm_frozen())

    def _shared_values(self) -> str | None:
        """What of the cross-entropy's forward serves the bound (:mod:`.shared_forward`)."""
        return self._shared.values(METHODS[self.method].clean_values, self._batch_norm_frozen())

    def loss_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        lam: float | None = None,
        param_balls: dict[str, ParameterBall] | None = None,
        eps_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """
        The terms of the loss on a preprocessed batch, differentiable in the model's parameters. The model's mode is
        the caller's (train mode while training).

        :param x: preprocessed inputs on the estimator's device.
        :param labels: int64 class indices.
        :param lam: λ to use (default: the trainer's λ).
        :param param_balls: the budget resolved on the model (default: resolved now; always re-resolved for a
            relative budget, whose radii follow the weights).
        :param eps_scale: factor applied to every radius of the ball (the warm-up's ε ramp; 1: the budget itself).
        :return: ``{"loss", "ce", "robust", "norm", "accuracy"}`` scalars; ``robust`` is the batch mean of
            ``max_{i≠y} relu(η − m + κ)`` (not computed, NaN, when both ``lam`` and the trainer's λ are 0), ``norm`` is
            ``Σ_k ‖W^k‖_op∞`` (not computed, NaN, when ``μ = 0``), ``accuracy`` the batch accuracy of the logits.
        """
        lam = self.lam if lam is None else lam
        est = self._estimator
        robust_on = lam > 0 or self.lam > 0
        if robust_on and (param_balls is None or self.budget.relative):
            param_balls = self._param_balls()
        values = self._shared_values() if robust_on else None
        if values:  # one forward for both terms
            logits, clean = self._shared.forward(x, values, param_balls)
            shared = {"clean_values": clean}
        else:
            shared, logits = {}, est.logits(x)
        ce = est._loss(logits, labels)  # pylint: disable=protected-access
        loss = ce
        network = self._network_now()  # after the forward: with this step's batch-norm statistics and γ, β
        if robust_on:
            balls = scale_param_balls(param_balls, eps_scale)
            bounds = METHODS[self.method].bounds(network, balls, x, labels, dtype=torch.float32, **shared)
            robust = robust_term(bounds, float(self.kappa)).mean()
            loss = loss + lam * robust
        else:
            robust = torch.full((), float("nan"), device=logits.device)
        if self.mu > 0:
            norm = operator_norm_sum(network)
            loss = loss + self.mu * norm
        else:
            norm = torch.full((), float("nan"), device=logits.device)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "ce": ce, "robust": robust, "norm": norm, "accuracy": accuracy}

    def _train(
        self,
        batches: Callable[[], Iterator[Batch]],
        nb_batches: int,
        nb_epochs: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        validation: tuple[np.ndarray, np.ndarray] | None,
    ) -> dict[str, list]:
        model = self._estimator.base_model
        history: dict[str, Any] = {key: [] for key in HISTORY_KEYS}
        if validation is not None:
            history.update(val_accuracy=[], val_certified_accuracy=[])
        history.update(collapsed=False, warnings=[])
        self.history = history
        detector = CollapseDetector(self.collapse_patience, self.warmup)
        state = {"step": 0, "warmup_steps": self.warmup * nb_batches, "param_balls": self._param_balls()}
        dp.check_loss_reduction(self._estimator)
        main = distributed.is_main_process()
        values = self._shared_values() if self.lam > 0 else None
        with frozen_batch_norm(model, freeze=self._batch_norm_frozen()):  # every module's flag restored after
            bar = tqdm(range(nb_epochs), desc="WeightRobustTrainer", disable=not (self.verbose and main))
            for epoch in bar:
                start = time.perf_counter()
                with dp.data_parallel(model), self._shared.hooks(values, state["param_balls"]):
                    record, chance = self._epoch(batches, state)
                step_scheduler(scheduler, record["loss"])
                record["lr"] = float(self._classifier._optimizer.param_groups[0]["lr"])  # pylint: disable=W0212
                record = {"epoch": epoch + 1, **record, "time": time.perf_counter() - start}
                if validation is not None:
                    record.update(validation_metrics(self._estimator, self.budget, *validation))
                for key, value in record.items():
                    history[key].append(value)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "accuracy", "robust")})
                if main:
                    logger.info("epoch %d: " + ", ".join(f"{k}=%.4g" for k in record if k != "epoch"), *record.values())
                final = epoch == nb_epochs - 1
                verdict = detector.update(record["accuracy"], chance, final=final)
                if self.lam > 0 and verdict is not None and not history["collapsed"]:
                    stopped = self.stop_on_collapse and not final
                    detector.report(verdict, history, self.budget, self.lam, stopped, logger if main else None)
                    if self.stop_on_collapse:
                        break
        return history

    def _epoch(self, batches: Callable[[], Iterator[Batch]], state: dict[str, Any]) -> tuple[dict[str, float], float]:
        """One pass over the batches: the epoch's mean terms, λ_t and ε scale at its last step, and the accuracy of
        always predicting its most frequent label."""
        model = self._estimator.base_model
        optimizer = self._classifier._optimizer  # pylint: disable=protected-access
        trainable = [p for p in model.parameters() if p.requires_grad]
        totals = EpochTotals(self._estimator.nb_classes, self._estimator.device)
        lam_t, eps_scale = 0.0, 0.0
        for x_pre, y_pre, x_raw, labels, shard in batches():
            x_pre = with_adversarial_inputs(self.attack, self.ratio, self._estimator, x_pre, x_raw, labels, shard)
            factor = ramp_factor(state["step"], state["warmup_steps"])
            lam_t = self.lam * factor
            eps_scale = factor if self.ramp_eps else 1.0
            if not model.training:  # set once (an adversarial batch's eval mode is restored by its context)
                model.train()
            optimizer.zero_grad()
            if len(y_pre) == 0:  # a global batch smaller than the number of ranks: nothing here, but take part
                dp.empty_shard_loss(self._estimator.logits(x_pre)).backward()
            else:
                terms = self.loss_terms(x_pre, y_pre, lam=lam_t, param_balls=state["param_balls"], eps_scale=eps_scale)
                share = dp.share(shard, len(y_pre))
                (terms["loss"] if share == 1.0 else terms["loss"] * share).backward()
                totals.add(terms, y_pre)
            dp.reduce_gradients(trainable)
            optimizer.step()
            state["step"] += 1
        sums, label_counts = dp.reduce_epoch_sums(*totals.totals())
        seen = max(int(label_counts.sum()), 1)
        with torch.no_grad():
            norm = float(operator_norm_sum(self._network_now()))
        record = {key: value / seen for key, value in sums.items()}
        if self.lam == 0:
            record["robust"] = float("nan")
        record.update(norm=norm, lam=lam_t, eps_scale=eps_scale)
        return record, float(label_counts.max() / seen)


__all__ = ["WeightRobustTrainer", "operator_norm_sum", "robust_term"]
