"""
:class:`WeightPerturbationVerifier`: complete verification of predictions under weight perturbation — certified,
falsified by a concrete perturbation, or unknown at a time limit (docs/theory.md §11).

Pipeline per batch of samples:

1. the clean float64 forward pass: a sample the model already misclassifies is falsified by the zero perturbation;
2. the margin bound (``method``, default ``"linear"``) on the interval boxes: certified where every margin bound
   exceeds the certifiers' tolerance in the bounds' dtype (:func:`.certification_rtol`);
3. intermediate bounds by backward passes (``intermediate="backward"``, through ``intermediate_depth`` activations)
   and the bound again on the boxes clipped to them;
4. a per-sample weight attack (:class:`.CounterexampleSearch`, i.e. :class:`.PerSampleWeightPGD`) on the others: a
   perturbation that changes the float64 prediction and lies in the ball (the budget's own projection and
   membership test) falsifies the sample;
5. branch and bound over ReLU phases (:class:`.BranchAndBound`) until every leaf is certified or the sample's wall
   clock reaches ``time_limit``;
6. a stronger attack on the samples still unknown that have time left.

The phases 1-4 always run (their time is shared equally by the samples of the batch); ``time_limit`` stops the branch
and bound, and the last attack only runs for samples below it.

Every bound is computed on a private copy of the model holding the estimator's effective weights (its base weights
plus any perturbation it carries), in float64 or, with ``dtype=torch.float32``, in float32 with the rounding-error
terms of docs/theory.md §5 (sound for the exact network, as float64 ones are): the ball is centred there and
counterexamples are relative to those weights (a float64 copy of the same centre checks them). The user's module is
never written to, also when an exception interrupts the verification.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.budget import ParameterBall, PerturbationBudget, WeightPerturbation
from art_weightpert.certification.certifier import balls_in, load_centre_weights
from art_weightpert.certification.common import BoundCache, slice_boxes
from art_weightpert.certification.precision import certification_rtol, check_dtype
from art_weightpert.certification.registry import METHODS
from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import as_weight_classifier, weights_version
from art_weightpert.network import BatchNorm, read_network
from art_weightpert.rounding import exact_kernels
from art_weightpert.torch_tools import batch_slices, eval_mode, float64_copy, keep_freed_memory, run_with_parameters
from art_weightpert.validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)
from art_weightpert.verification.branching import (
    BETA_STEPS,
    BoundFunction,
    BoxBound,
    BranchAndBound,
    GradientScore,
    backward_intermediate_splits,
    make_bound,
    split_values,
)
from art_weightpert.verification.falsify import CounterexampleSearch, checked_counterexample, zero_perturbation
from art_weightpert.verification.result import VerificationResult

logger = logging.getLogger(__name__)

INTERMEDIATE = ("backward", "interval")
"""Intermediate bounds of the pre-activation values: ``"backward"`` (backward passes, full CROWN, docs/theory.md §11)
or ``"interval"`` (the interval boxes of §4 only)."""


class WeightPerturbationVerifier(Settings):
    """
    Verdicts per sample under every weight perturbation of a ball (docs/theory.md §11): ``"certified"`` (proved robust),
    ``"falsified"`` (a concrete perturbation in the ball changes the prediction, checked in float64) or ``"unknown"``
    (neither within ``time_limit`` seconds).

    Settings: constructor arguments and :meth:`set_params` (validated on a copy before any is assigned); the keyword
    settings are listed in :attr:`verifier_params` after the first five.
    """

    verifier_params = [
        "budget",
        "time_limit",
        "batch_size",
        "dtype",
        "verbose",
        "method",
        "bound",
        "intermediate",
        "intermediate_depth",
        "beta_steps",
        "attack_iter",
        "attack_restarts",
        "max_branches",
    ]
    params_attribute = "verifier_params"

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        time_limit: float = 1.0,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Create a :class:`.WeightPerturbationVerifier` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped, nothing
            copied) whose model is a DAG of supported layers (:func:`.read_network`).
        :param budget: the ball of weight perturbations (its layer names are checked against the model).
        :param time_limit: wall-clock seconds per sample, in total (its share of the batched phases included); branch
            and bound stops there and the sample is ``"unknown"``.
        :param batch_size: samples verified together.
        :param dtype: the precision of the bounds: ``torch.float64`` (``None``) or ``torch.float32`` (with the
            rounding-error terms of docs/theory.md §5 in every bound, intermediate bound and branch: sound for the
            exact network; the clean prediction and the counterexamples are still checked in float64).
        :param verbose: show a progress bar over samples.
        :param kwargs: further settings:

            * ``method``: the margin bound, ``"linear"`` (default), ``"interval"`` or ``"alpha"`` (optimized slopes,
              when :mod:`art_weightpert.certification.alpha` is installed);
            * ``bound``: a :data:`.BoundFunction` ``bound(x, labels, splits) -> (lower bounds (B, K), boxes)`` that
              replaces ``method`` (``None``: the method's);
            * ``intermediate``: ``"backward"`` (default; backward-pass intermediate bounds before branching) or
              ``"interval"``;
            * ``intermediate_depth``: the backward pass of an intermediate bound goes back through this many
              activations and concretizes on the boxes there (default 2; ``None``: to the input, tighter and slower);
            * ``beta_steps``: gradient steps on the multipliers of the split constraints in every branch's bound
              (β-CROWN; default :data:`.BETA_STEPS`, 0: none; ``"linear"`` only);
            * ``attack_iter`` (default 50) and ``attack_restarts`` (default 1): steps and random restarts of the
              per-sample attack (``attack_iter=0``: no attack);
            * ``max_branches`` (default 256): branches per bound call of branch and bound.
        :raises UnsupportedModelError: the model cannot be read (names the module).
        """
        estimator = as_weight_classifier(estimator)
        self._estimator: PyTorchWeightClassifier = estimator
        self.budget = budget
        self.time_limit = time_limit
        self.batch_size = batch_size
        self.dtype = dtype
        self.verbose = verbose
        unknown = [key for key in kwargs if key not in self.verifier_params[5:]]
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; valid keyword settings: {self.verifier_params[5:]}.")
        self.method = kwargs.get("method", "linear")
        self.bound = kwargs.get("bound")
        self.intermediate = kwargs.get("intermediate", "backward")
        self.intermediate_depth = kwargs.get("intermediate_depth", 2)
        self.beta_steps = kwargs.get("beta_steps", BETA_STEPS)
        self.attack_iter = kwargs.get("attack_iter", 50)
        self.attack_restarts = kwargs.get("attack_restarts", 1)
        self.max_branches = kwargs.get("max_branches", 256)
        self._network = read_network(estimator.base_model, estimator.input_shape)  # UnsupportedModelError first
        self._check_params()
        self._model64 = float64_copy(estimator.base_model)  # the centre weights, float64; never the user's module
        self._model = self._model_in(self.dtype)
        self._network = read_network(self._model, estimator.input_shape)
        self._key: tuple | None = None
        self._param_balls: dict[str, ParameterBall] = {}

    def _check_params(self) -> None:
        if not isinstance(self.budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(self.budget).__name__}.")
        self.budget.layer_names(self.estimator.base_model)  # unknown layer names: ValueError listing the valid ones
        self.time_limit = check_positive(self.time_limit, "time_limit")
        if not math.isfinite(self.time_limit):
            raise ValueError(f"`time_limit` must be finite, got {self.time_limit}.")
        self.batch_size = check_positive_int(self.batch_size, "batch_size")
        self.dtype = check_dtype(self.dtype)
        model = getattr(self, "_model", None)
        if model is not None and self.dtype != next(model.parameters()).dtype:  # set_params: the bounds' model moves
            self._model = self._model_in(self.dtype)
            self._network = read_network(self._model, self.estimator.input_shape)  # weights again at the refresh
        self.verbose = check_bool(self.verbose, "verbose")
        check_choice(self.method, "method", tuple(METHODS) + ("alpha",))
        if self.method not in ("linear", "interval", "alpha"):
            raise ValueError(f"`method` {self.method!r} takes no boxes; use 'linear', 'interval' or 'alpha'.")
        if self.method in METHODS:
            METHODS[self.method].check(self._network)
        if self.bound is not None and not callable(self.bound):
            raise TypeError(f"`bound` must be callable or None, got {type(self.bound).__name__}.")
        check_choice(self.intermediate, "intermediate", INTERMEDIATE)
        if self.intermediate_depth is not None:
            self.intermediate_depth = check_positive_int(self.intermediate_depth, "intermediate_depth")
        self.beta_steps = check_non_negative_int(self.beta_steps, "beta_steps")
        self.attack_iter = check_non_negative_int(self.attack_iter, "attack_iter")
        self.attack_restarts = check_non_negative_int(self.attack_restarts, "attack_restarts")
        self.max_branches = check_positive_int(self.max_branches, "max_branches")
        if self.max_branches < 2:
            raise ValueError(
                f"`max_branches` must be at least 2 (the two children of a split), got {self.max_branches}."
            )

    @property
    def estimator(self) -> PyTorchWeightClassifier:
        """The (wrapped) estimator."""
        return self._estimator

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.verifier_params)
        return f"{type(self).__name__}({settings})"

    # ------------------------------------------------------------------------------------------------ public API
    def verify(self, x: np.ndarray, y: np.ndarray | None = None) -> VerificationResult:
        """
        Verify every sample: certified, falsified (with a checked counterexample) or unknown.

        :param x: inputs ``(N,) + input_shape`` (ART's preprocessing is applied).
        :param y: integer or one-hot labels; ``None``: the clean (float64) predictions.
        :return: a :class:`.VerificationResult`.
        """
        x_t, y_t = self.estimator.prepare_inputs(x, y)
        self._refresh()
        n = len(x_t)
        status = np.full(n, "unknown", dtype=object)
        lower = np.full(n, -math.inf)
        seconds = np.zeros(n)
        counterexamples: dict[int, WeightPerturbation] = {}
        with tqdm(total=n, desc="Weight verification", disable=not self.verbose) as bar:
            for rows in batch_slices(n, self.batch_size):
                labels = None if y_t is None else y_t[rows]
                part = self._verify_batch(x_t[rows], labels)
                status[rows], lower[rows], seconds[rows] = part.status, part.lower_bounds, part.seconds
                for i, cex in part.counterexamples.items():
                    counterexamples[rows.start + i] = cex
                bar.update(rows.stop - rows.start)
        return VerificationResult(status, lower, counterexamples, seconds)

    # ------------------------------------------------------------------------------------------------ internals
    def _model_in(self, dtype: torch.dtype) -> torch.nn.Module:
        """The private model the bounds read in ``dtype``: the float64 one of the checks, or a float32 copy of it (its
        weights are loaded at the next refresh)."""
        return self._model64 if dtype == torch.float64 else float64_copy(self._model64).float()

    def _refresh(self) -> None:
        """Copy the estimator's effective weights into the bounds' model and resolve the budget on them, when the
        weights or the settings changed since the last call. float32: the centre as the estimator computes it (exact
        in float32, :func:`.load_centre_weights`), radii rounded up (:func:`.balls_in`), and the float64 model of the
        checks holds the same centre (an exact cast)."""
        key = (self.settings_key(), weights_version(self.estimator))
        if key == self._key:
            return
        load_centre_weights(self._model, self.estimator.base_model, self.estimator.current_deltas(), self.dtype)
        if self._model is not self._model64:
            with torch.no_grad():
                for target, source in zip(self._model64.state_dict().values(), self._model.state_dict().values()):
                    target.copy_(source)
        if any(isinstance(layer, BatchNorm) for layer in self._network.layers):
            self._network = read_network(self._model, self.estimator.input_shape)  # batch-norm constants
        self._cache = BoundCache()
        self._param_balls = balls_in(self.budget, self._model, self.dtype)
        self._key = key

    def _bound_function(self) -> BoundFunction:
        """The bound of every phase: the ``bound`` setting, or the method's (:func:`.make_bound`)."""
        if self.bound is not None:
            return self.bound
        return make_bound(self.method, self._network, self._param_balls, self._cache, self.beta_steps, self.dtype)

    def _attack(self, strength: int = 1) -> CounterexampleSearch:
        """The per-sample attack (``strength``: times more steps, and as many more restarts)."""
        return CounterexampleSearch(
            self.estimator, self.budget, max_iter=self.attack_iter * strength,
            num_random_init=self.attack_restarts + strength - 1, batch_size=self.batch_size, verbose=False,
        )  # fmt: skip

    def _verify_batch(self, x: torch.Tensor, labels: torch.Tensor | None) -> VerificationResult:
        """Verdicts of one batch (``x`` preprocessed, on the estimator's device)."""
        start = time.perf_counter()
        n = len(x)
        x64 = x.to(torch.float64)  # the clean prediction and the counterexamples' checks
        xb = x.to(self.dtype)  # the bounds
        spent = [0.0] * n
        status = np.full(n, "unknown", dtype=object)
        lower = np.full(n, -math.inf)
        counterexamples: dict[int, WeightPerturbation] = {}

        def charge(t0: float, rows: list[int], phase: str = "") -> None:  # a batched phase's time, shared equally
            logger.debug("%s: %d samples, %.3f s", phase, len(rows), time.perf_counter() - t0)
            if rows:
                share = (time.perf_counter() - t0) / len(rows)
                for i in rows:
                    spent[i] += share

        def settle(rows: list[int], worst: torch.Tensor) -> None:  # keep the best lower bound; certify above tol
            for k, i in enumerate(rows):
                lower[i] = max(lower[i], float(worst[k]))
                if worst[k] > tol[i]:
                    status[i] = "certified"

        # 1. the clean float64 prediction
        with torch.no_grad(), eval_mode(self._model64):
            logits = run_with_parameters(self._model64, dict(self._model64.named_parameters()), x64)
        labels = logits.argmax(dim=1) if labels is None else labels
        tol = certification_rtol(self.dtype) * (1.0 + logits.abs().amax(dim=1))
        wrong = logits.argmax(dim=1) != labels
        for i in torch.nonzero(wrong).squeeze(1).tolist():
            status[i] = "falsified"  # lower bound −inf: the clean margin only bounds the worst margin from above
            counterexamples[i] = zero_perturbation(self.budget, self._model64)
        todo = [i for i in range(n) if not wrong[i]]
        charge(start, list(range(n)))

        # 2. the bound on the interval boxes
        plain = self._bound_function()  # its settings (tightening in branches) are set on it below
        keep_freed_memory()

        def bound(x: torch.Tensor, labels: torch.Tensor, splits=None):  # IEEE float32 products (exact_kernels)
            with exact_kernels():
                return plain(x, labels, splits)

        t0 = time.perf_counter()
        if todo:
            idx = torch.as_tensor(todo)
            lb, _ = bound(xb[idx], labels[idx], None)
            settle(todo, lb.amin(dim=1))
        charge(t0, todo, "bound")
        todo = [i for i in todo if status[i] == "unknown"]

        # 3. intermediate bounds by backward passes, then the bound again
        values = split_values(self._network)
        root: dict = {}
        tightened = list(todo)  # the samples of the root clips, in their order
        if todo:
            t0 = time.perf_counter()
            idx = torch.as_tensor(todo)
            if self.intermediate == "backward" and values:
                with exact_kernels():
                    root = backward_intermediate_splits(
                        self._network, self._param_balls, xb[idx], values, None, self._cache, self.intermediate_depth,
                        self.dtype != torch.float64,
                    )  # fmt: skip
            lb, boxes = bound(xb[idx], labels[idx], root or None)
            worst = lb.amin(dim=1)
            settle(todo, worst)
            charge(t0, todo, "intermediate bounds")
            per_sample = (time.perf_counter() - t0) / len(todo)
            if isinstance(plain, BoxBound) and self.intermediate == "backward" and per_sample < self.time_limit / 100:
                plain.tighten, plain.depth = values[1:], self.intermediate_depth  # cheap: again in every branch
            todo = [i for i in todo if status[i] == "unknown"]

        # 4. the per-sample attack
        attack_cost = 0.0  # seconds per sample of this attack: the stronger one of phase 6 costs about twice as much
        if todo and self.attack_iter:
            attack_cost = self._falsify(self._attack(), x, x64, labels, todo, status, counterexamples, spent)
            todo = [i for i in todo if status[i] == "unknown"]

        # 5. branch and bound, from the root clips
        if todo and values:
            position = {i: k for k, i in enumerate(tightened)}
            keep_t = torch.as_tensor([position[i] for i in todo])
            idx = torch.as_tensor(todo)
            sub_root = {v: tuple(None if t is None else t[keep_t] for t in clip) for v, clip in root.items()}
            bab = BranchAndBound(
                bound, GradientScore(self._network, self._param_balls, self._cache), values, self.max_branches
            )
            sub_spent = [spent[i] for i in todo]
            verdicts, bounds = bab.run(
                xb[idx], labels[idx], tol[idx], sub_root, slice_boxes(boxes, keep_t), worst[keep_t], sub_spent,
                self.time_limit,
            )  # fmt: skip
            for k, i in enumerate(todo):
                spent[i] = sub_spent[k]
                status[i] = verdicts[k]
                lower[i] = max(lower[i], bounds[k])

        # 6. a stronger attack on the samples still unknown, within their time
        todo = [i for i in range(n) if status[i] == "unknown" and spent[i] + 2 * attack_cost < self.time_limit]
        if todo and self.attack_iter:
            self._falsify(self._attack(strength=2), x, x64, labels, todo, status, counterexamples, spent)
        return VerificationResult(status, lower, counterexamples, np.asarray(spent))

    def _falsify(self, attack, x, x64, labels, todo, status, counterexamples, spent) -> float:
        """Attack the samples ``todo``; mark those with a checked counterexample falsified; charge the time (returned
        per sample)."""
        t0 = time.perf_counter()
        idx = torch.as_tensor(todo)
        margins, deltas = attack.search(x[idx], labels[idx])
        for k, i in enumerate(todo):
            if margins[k] <= 0:
                delta = {name: d[k] for name, d in deltas.items()}
                cex = checked_counterexample(self.budget, self._model64, x64[i], int(labels[i]), delta)
                if cex is not None:
                    status[i], counterexamples[i] = "falsified", cex
        logger.debug("attack: %d samples, %.3f s", len(todo), time.perf_counter() - t0)
        share = (time.perf_counter() - t0) / len(todo)
        for i in todo:
            spent[i] += share
        return share
