"""
:class:`WeightRobustTrainer`: training with the theory-driven loss of THEORY.md §7, as an ART defence trainer.

For a batch ``(x_j, y_j)`` the loss is::

    L = (1/n) Σ_j [ CE(f(x_j), y_j) + λ_t · max_{i≠y_j} relu(η_{y_j,i} − m_{y_j,i} + κ) ] + μ · Σ_k ‖W^k‖_op∞

where ``m_{y,i} − η_{y,i}`` is a lower bound of the pairwise margin ``f_y − f_i`` over the weight ball (computed
differentiably in float32 by the chosen bound: ``"interval"`` THEORY.md §4, ``"paper"`` §3 formula B, or ``"linear"``
§4b), ``κ ≥ 0`` a safety margin and ``‖W‖_op∞`` the largest row ℓ1 norm (for a conv, the largest ℓ1 norm of an
output channel's kernel). ``λ_t`` grows linearly from 0 to ``λ`` over the first ``warmup`` epochs (per step): without
the warm-up this loss collapses training (THEORY.md §7). ``λ = μ = 0`` is plain training.

The paper's exact choice of the terms is not available offline; this loss is the project's reading of it.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.data_generators import DataGenerator
from art.defences.trainer.trainer import Trainer
from art.estimators.classification import PyTorchClassifier
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm.auto import tqdm

from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.certification.registry import METHODS
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode
from art_weightpert.network import BatchNorm, Network, read_network

logger = logging.getLogger(__name__)

HISTORY_KEYS = ("epoch", "loss", "ce", "robust", "norm", "lam", "lr", "time")


def operator_norm_sum(network: Network) -> torch.Tensor:
    """``Σ_k ‖W^k‖_op∞`` over the affine layers of ``network``: the largest row ℓ1 norm of each weight (a conv's row
    is one output channel's kernel), differentiable in the live parameters."""
    params = network.params()
    total = None
    for layer in network.affine_layers:
        weight = params[layer.weight_name]
        norm = weight.reshape(weight.shape[0], -1).abs().sum(dim=1).max()
        total = norm if total is None else total + norm
    return total


def robust_term(lower_bounds: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per sample ``max_{i≠y} relu(κ − (m_{y,i} − η_{y,i}))`` from the ``(N, K)`` margin lower bounds (``+inf`` at the
    label column, so that column contributes 0). Zero exactly when every margin is certified with margin ``κ``."""
    return torch.relu(kappa - lower_bounds).amax(dim=1)


class WeightRobustTrainer(Trainer):
    """
    Trains a PyTorch classifier in place so that its predictions provably survive weight perturbations in a
    :class:`.PerturbationBudget`, with the loss of THEORY.md §7 (see the module docstring), optionally jointly with
    adversarial inputs from an ART ``EvasionAttack``.

    The cross-entropy term runs the model in train mode (dropout active, batch norm on batch statistics, running
    statistics updated); the bound is computed with eval semantics (the model read by :func:`.read_network`: dropout
    is the identity and batch norm is the fixed affine map of its running statistics, re-read at every step, with its
    scale and shift not trained through the bound). The classifier's own optimizer takes the steps.

    | Paper link: https://arxiv.org/abs/2103.02200
    """

    trainer_params = ["budget", "lam", "mu", "kappa", "bound", "warmup", "attack", "ratio", "verbose"]

    def __init__(
        self,
        classifier: PyTorchClassifier,
        budget: PerturbationBudget,
        lam: float = 1.0,
        mu: float = 0.0,
        kappa: float = 0.0,
        bound: str = "interval",
        warmup: int = 5,
        attack: EvasionAttack | None = None,
        ratio: float = 0.5,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.WeightRobustTrainer` instance.

        :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`) with an optimizer; its
            module must be readable by :func:`.read_network` (a chain of Linear/Conv2d and fixed layers).
        :param budget: the ball of weight perturbations the model is trained to withstand.
        :param lam: weight λ ≥ 0 of the robust term (after the warm-up).
        :param mu: weight μ ≥ 0 of the operator-norm term ``Σ_k ‖W^k‖_op∞``.
        :param kappa: safety margin κ ≥ 0: the robust term is zero once every margin lower bound exceeds κ.
        :param bound: margin bound used for η: ``"interval"`` (THEORY.md §4, default), ``"paper"`` (§3 formula B) or
            ``"linear"`` (§4b): a name in the registry :data:`.METHODS`.
        :param warmup: number of epochs over which λ grows linearly from 0 (per step); 0 starts at λ.
        :param attack: optional ART ``EvasionAttack``: a ``ratio`` of every batch is replaced by its adversarial inputs,
            generated on the current model.
        :param ratio: share of each batch replaced by adversarial inputs when ``attack`` is given (0 to 1).
        :param verbose: show a progress bar over the epochs.
        """
        if not isinstance(classifier, PyTorchClassifier):
            raise TypeError(f"`classifier` must be an ART PyTorchClassifier, got {type(classifier).__name__}.")
        estimator = PyTorchWeightClassifier.from_classifier(classifier)
        if estimator.weight_perturbation is not None:
            raise ValueError("`classifier` carries a weight perturbation; train the unperturbed estimator instead.")
        if classifier._optimizer is None:  # pylint: disable=protected-access
            raise ValueError("`classifier` has no optimizer; build it with `optimizer=` to train it.")
        params = dict(
            budget=budget,
            lam=lam,
            mu=mu,
            kappa=kappa,
            bound=bound,
            warmup=warmup,
            attack=attack,
            ratio=ratio,
            verbose=verbose,
        )
        self._check_params(params, estimator)
        super().__init__(classifier)
        self._estimator = estimator
        self._network = read_network(estimator.base_model, estimator.input_shape)
        for key, value in params.items():
            setattr(self, key, value)
        self.history: dict[str, list] = {}

    # ------------------------------------------------------------------------------------------------ parameters
    def set_params(self, **kwargs: Any) -> None:
        """
        Set trainer parameters (names in :attr:`trainer_params`); all values are validated before any is assigned.

        :param kwargs: parameters to change.
        """
        unknown = [key for key in kwargs if key not in self.trainer_params]
        if unknown:
            raise ValueError(f"unknown trainer parameter(s) {unknown}; valid ones are {self.trainer_params}.")
        params = {key: getattr(self, key) for key in self.trainer_params}
        params.update(kwargs)
        self._check_params(params, self._estimator)
        for key, value in kwargs.items():
            setattr(self, key, value)

    @staticmethod
    def _check_params(params: dict[str, Any], estimator: PyTorchWeightClassifier) -> None:
        budget = params["budget"]
        if not isinstance(budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(budget).__name__}.")
        budget.layer_names(estimator.base_model)  # unknown layer names: ValueError listing the valid ones
        for name in ("lam", "mu", "kappa"):
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be finite and non-negative, got {value}.")
        if params["bound"] not in METHODS:
            raise ValueError(f"`bound` must be one of {list(METHODS)}, got {params['bound']!r}.")
        warmup = params["warmup"]
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"`warmup` must be a non-negative integer number of epochs, got {warmup!r}.")
        attack = params["attack"]
        if attack is not None and not isinstance(attack, EvasionAttack):
            raise TypeError(f"`attack` must be an ART EvasionAttack or None, got {type(attack).__name__}.")
        ratio = params["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)):
            raise TypeError(f"`ratio` must be a number, got {type(ratio).__name__}.")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`ratio` must lie in [0, 1], got {ratio}.")
        if not isinstance(params["verbose"], bool):
            raise TypeError("`verbose` must be a bool.")

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
        :param nb_epochs: number of epochs.
        :param scheduler: optional ``torch.optim.lr_scheduler.LRScheduler`` of the classifier's optimizer, stepped once
            per epoch (``ReduceLROnPlateau`` gets the epoch's mean loss).
        :param kwargs: ignored (ART trainer signature).
        :return: the history: per-epoch lists ``epoch``, ``loss``, ``ce``, ``robust`` (mean robust term, NaN when
            ``λ = 0``), ``norm`` (``Σ_k ‖W^k‖_op∞`` after the epoch), ``lam`` (λ_t at the epoch's last step), ``lr``,
            ``time`` (seconds), and with validation data ``val_accuracy`` and ``val_certified_accuracy``.
        """
        est = self._estimator
        x = est.check_inputs(x)
        labels = est.check_labels(y, len(x), required=True)
        batch_size = _positive_int(batch_size, "batch_size")
        nb_epochs = _positive_int(nb_epochs, "nb_epochs")
        if len(x) == 0:
            raise ValueError("`x` holds no samples.")
        self._check_scheduler(scheduler)
        validation = self._check_validation(validation_data)
        x_pre, y_pre = self._preprocess(x, labels)
        # The index sampler of DataLoader(..., shuffle=True), drawing whole batches of indices at once: the same
        # random numbers as PyTorchClassifier.fit's loader, without its per-sample indexing.
        sampler = BatchSampler(RandomSampler(range(len(x))), batch_size, drop_last=False)
        loader = DataLoader(_Indices(len(x)), batch_size=None, sampler=sampler)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray | None, np.ndarray | None]]:
            for index in loader:
                if self.attack is None:
                    yield x_pre[index], y_pre[index], None, None
                else:
                    idx = index.numpy()
                    yield x_pre[index], y_pre[index], x[idx], labels[idx]

        return self._train(batches, len(loader), nb_epochs, scheduler, validation)

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
        if not isinstance(generator, DataGenerator):
            raise TypeError(f"`generator` must be an ART DataGenerator, got {type(generator).__name__}.")
        if generator.size is None:
            raise ValueError("`generator` must know its size to define an epoch.")
        nb_epochs = _positive_int(nb_epochs, "nb_epochs")
        self._check_scheduler(scheduler)
        validation = self._check_validation(validation_data)
        est = self._estimator
        nb_batches = int(math.ceil(generator.size / generator.batch_size))

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray | None, np.ndarray | None]]:
            for _ in range(nb_batches):
                x_batch, y_batch = generator.get_batch()
                x_batch = est.check_inputs(np.asarray(x_batch))
                labels = est.check_labels(y_batch, len(x_batch), required=True)
                x_pre, y_pre = self._preprocess(x_batch, labels)
                yield x_pre, y_pre, x_batch, labels

        return self._train(batches, nb_batches, nb_epochs, scheduler, validation)

    # ------------------------------------------------------------------------------------------------ internals
    def _check_scheduler(self, scheduler: Any) -> None:
        if scheduler is None:
            return
        if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(
                f"`scheduler` must be a torch.optim.lr_scheduler.LRScheduler, got {type(scheduler).__name__}."
            )
        if scheduler.optimizer is not self._classifier._optimizer:  # pylint: disable=protected-access
            raise ValueError("`scheduler` must schedule the classifier's own optimizer.")

    def _check_validation(self, validation_data: Any) -> tuple[np.ndarray, np.ndarray] | None:
        if validation_data is None:
            return None
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("`validation_data` must be a tuple (x_val, y_val).")
        x_val = self._estimator.check_inputs(validation_data[0])
        y_val = self._estimator.check_labels(validation_data[1], len(x_val), required=True)
        return x_val, y_val

    def _preprocess(self, x: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """ART's preprocessing as in ``PyTorchClassifier.fit`` (``fit=True``, one-hot labels), as tensors on the
        estimator's device (labels as class indices)."""
        est = self._estimator
        one_hot = np.eye(est.nb_classes, dtype=np.float32)[labels]
        x_pre, y_pre = est._apply_preprocessing(x, one_hot, fit=True)  # pylint: disable=protected-access
        y_pre = np.asarray(y_pre)
        y_idx = np.argmax(y_pre, axis=1) if y_pre.ndim == 2 else y_pre
        x_t = torch.as_tensor(np.asarray(x_pre, dtype=np.float32), device=est.device)
        return x_t, torch.as_tensor(y_idx.astype(np.int64), device=est.device)

    def _param_balls(self) -> dict[str, ParameterBall]:
        return {t.param_name: t for t in self.budget.parameter_balls(self._estimator.base_model)}

    def _network_now(self) -> Network:
        """The network read once; re-read when it has batch norm (its running statistics change while training)."""
        if any(isinstance(layer, BatchNorm) for layer in self._network.layers):
            self._network = read_network(self._estimator.base_model, self._estimator.input_shape)
        return self._network

    def _adversarial(
        self, x_pre: torch.Tensor, y_pre: torch.Tensor, x_raw: np.ndarray | None, labels: np.ndarray | None
    ) -> torch.Tensor:
        """Replace the first ``round(ratio · n)`` inputs of the batch by the attack's adversarial inputs (generated on
        the current model from the raw inputs, then preprocessed)."""
        if self.attack is None or x_raw is None or labels is None:
            return x_pre
        nb_adv = int(round(self.ratio * len(x_raw)))
        if nb_adv == 0:
            return x_pre
        one_hot = np.eye(self._estimator.nb_classes, dtype=np.float32)[labels[:nb_adv]]
        with eval_mode(self._estimator.base_model):
            x_adv = self.attack.generate(x_raw[:nb_adv], y=one_hot)
        x_adv_pre, _ = self._preprocess(np.asarray(x_adv, dtype=np.float32), labels[:nb_adv])
        return torch.cat([x_adv_pre, x_pre[nb_adv:]])

    def loss_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        lam: float | None = None,
        param_balls: dict[str, ParameterBall] | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        The terms of the loss on a preprocessed batch, differentiable in the model's parameters. The model's mode is
        the caller's (train mode while training).

        :param x: preprocessed inputs on the estimator's device.
        :param labels: int64 class indices.
        :param lam: λ to use (default: the trainer's λ).
        :param param_balls: the budget resolved on the model (default: resolved now).
        :return: ``{"loss", "ce", "robust", "norm"}`` scalars; ``robust`` is the batch mean of
            ``max_{i≠y} relu(η − m + κ)`` (not computed, NaN, when both ``lam`` and the trainer's λ are 0), ``norm`` is
            ``Σ_k ‖W^k‖_op∞`` (not computed, NaN, when ``μ = 0``).
        """
        lam = self.lam if lam is None else lam
        est = self._estimator
        ce = est._loss(est.logits(x), labels)  # pylint: disable=protected-access
        loss = ce
        network = self._network_now()
        if lam > 0 or self.lam > 0:
            if param_balls is None or self.budget.relative:
                param_balls = self._param_balls()
            bounds = METHODS[self.bound].bounds(network, param_balls, x, labels, dtype=torch.float32)
            robust = robust_term(bounds, float(self.kappa)).mean()
            loss = loss + lam * robust
        else:
            robust = torch.full((), float("nan"))
        if self.mu > 0:
            norm = operator_norm_sum(network)
            loss = loss + self.mu * norm
        else:
            norm = torch.full((), float("nan"))
        return {"loss": loss, "ce": ce, "robust": robust, "norm": norm}

    def _train(
        self,
        batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray | None, np.ndarray | None]]],
        nb_batches: int,
        nb_epochs: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        validation: tuple[np.ndarray, np.ndarray] | None,
    ) -> dict[str, list]:
        est = self._estimator
        model = est.base_model
        optimizer = self._classifier._optimizer  # pylint: disable=protected-access
        param_balls = self._param_balls()
        warmup_steps = self.warmup * nb_batches
        history: dict[str, list] = {key: [] for key in HISTORY_KEYS}
        if validation is not None:
            history.update(val_accuracy=[], val_certified_accuracy=[])
        self.history = history
        flags = {m: m.training for m in model.modules()}
        step = 0
        try:
            bar = tqdm(range(nb_epochs), desc="WeightRobustTrainer", disable=not self.verbose)
            for epoch in bar:
                start = time.perf_counter()
                sums = {"loss": 0.0, "ce": 0.0, "robust": 0.0}
                seen = 0
                lam_t = 0.0
                for x_pre, y_pre, x_raw, labels in batches():
                    x_pre = self._adversarial(x_pre, y_pre, x_raw, labels)
                    lam_t = self.lam * min(1.0, step / warmup_steps) if warmup_steps else float(self.lam)
                    model.train()
                    optimizer.zero_grad()
                    terms = self.loss_terms(x_pre, y_pre, lam=lam_t, param_balls=param_balls)
                    terms["loss"].backward()
                    optimizer.step()
                    step += 1
                    n = len(y_pre)
                    seen += n
                    for key in sums:
                        sums[key] += float(terms[key].detach()) * n
                with torch.no_grad():
                    norm = float(operator_norm_sum(self._network_now()))
                mean_loss = sums["loss"] / max(seen, 1)
                if scheduler is not None:
                    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        scheduler.step(mean_loss)
                    else:
                        scheduler.step()
                record = {
                    "epoch": epoch + 1,
                    "loss": mean_loss,
                    "ce": sums["ce"] / max(seen, 1),
                    "robust": sums["robust"] / max(seen, 1) if self.lam > 0 else float("nan"),
                    "norm": norm,
                    "lam": lam_t,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "time": time.perf_counter() - start,
                }
                if validation is not None:
                    record.update(self._validate(*validation))
                for key, value in record.items():
                    history[key].append(value)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "robust", "lam")})
                logger.info(
                    "epoch %d: " + ", ".join(f"{k}=%.4g" for k in record if k != "epoch"),
                    *record.values(),
                )
        finally:
            for m, flag in flags.items():
                m.training = flag
        return history

    def _validate(self, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
        """Clean accuracy and certified accuracy at the budget (interval bound in float64, THEORY.md §4–§5)."""
        from art_weightpert.certification.certifier import WeightPerturbationCertifier

        est = self._estimator
        with eval_mode(est.base_model):
            predictions = np.argmax(est.predict(x_val, batch_size=512), axis=1)
            certifier = WeightPerturbationCertifier(est, self.budget, method="interval", verbose=False)
            certified = certifier.certify(x_val, y_val)
        return {
            "val_accuracy": float(np.mean(predictions == y_val)),
            "val_certified_accuracy": float(np.mean(certified)),
        }


class _Indices(Dataset):
    """The indices ``0..n-1``; indexing with a list of indices returns them as one tensor."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> torch.Tensor:
        return torch.as_tensor(index, dtype=torch.long)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


__all__ = ["WeightRobustTrainer", "operator_norm_sum", "robust_term"]
