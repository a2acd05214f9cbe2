"""
:class:`WeightPerturbationCertifier`: which predictions no weight perturbation in a ball can change.

The certifier reads the estimator's model once as a chain of layers (:func:`.read_network`) and evaluates one of the
margin bounds of the registry :data:`.METHODS` on the estimator's device (docs/theory.md §3–§5), in float64 or in
float32 with the rounding-error terms of docs/theory.md §5 (``dtype=``; :mod:`.precision`):

* ``"paper"``: the closed-form bound of docs/theory.md §3 (formula B with the bias terms of §3.4), in the setting of
  Tsai et al.;
* ``"interval"``: interval bound propagation with weight intervals, docs/theory.md §4 (never looser than ``"paper"`` on
  ``row_l1`` budgets);
* ``"linear"``: backward linear bounds with exact weight absorption, docs/theory.md §4b (never looser than
``"interval"``).

What is certified is the estimator *as it is*: the centre of the ball is the weights the estimator predicts with, its
base weights plus the perturbation it carries (if any), and relative budgets are relative to those centre weights
(the rule of every attack, certificate and metric: docs/certification.md, "Perturbed estimators").
Certificates hold for exact arithmetic with eval-mode semantics (batch-norm running statistics, no dropout).

In a ``torch.distributed`` process group the samples are sharded by whole batches (batch ``b`` on rank ``b mod R``)
and the results gathered on every rank: each batch is computed as one process computes it, so the results equal the
single-process ones exactly (docs/distributed.md).

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.certification.common import BoundCache, CentredBox, fill_label, slice_boxes
from art_weightpert.certification.interval import float64_centre_rows, interval_preactivation_bounds
from art_weightpert.certification.precision import (
    certification_rtol,
    check_dtype,
    dtype_name,
    factors_in,
    radius_in,
    search_precision,
)
from art_weightpert.certification.radius_search import PrunedEvaluator, search_pruned, search_radius
from art_weightpert.certification.registry import METHODS, BoundMethod
from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import as_weight_classifier, weights_version
from art_weightpert.network import BatchNorm, Network, read_network
from art_weightpert.rounding import exact_kernels, finite_lower
from art_weightpert.torch_tools import eval_mode, float64_copy, keep_freed_memory
from art_weightpert.validation import check_bool, check_choice, check_positive_int

logger = logging.getLogger(__name__)

CERTIFICATION_RTOL = certification_rtol(torch.float64)
"""A float64 sample is certified when every margin lower bound exceeds ``CERTIFICATION_RTOL · (1 + max_i |f_i(x)|)``:
a safety margin, relative to the logit scale, far above the rounding error of the float64 bounds (docs/theory.md §5);
float32 certificates use :func:`.certification_rtol` of float32 on top of their rounding terms."""

_WARM_WIDTH = 0.25  # relative precision of the warm start's radius (the search goes on from it)


def load_centre_weights(
    model: torch.nn.Module, base: torch.nn.Module, carried: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """Write the centre weights of a certificate into its private ``model`` (in ``dtype``): ``base``'s parameters plus
    the ``carried`` perturbation, and ``base``'s buffers. float64: the sum in float64; float32: the sum as the
    estimator computes it (in the weights' own dtype), which must be exact in float32 (docs/theory.md §5).

    :raises ValueError: weights not exact in ``dtype``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = base.get_parameter(name).detach()
            if dtype == torch.float64:
                value = value.to(torch.float64)
            if name in carried:
                value = value + carried[name].detach().to(value.dtype)
            if value.dtype != dtype and not torch.equal(value.to(dtype).to(value.dtype), value):
                raise ValueError(
                    f"the weights of {name!r} ({value.dtype}) are not exact in {dtype}: certify them with "
                    "dtype=torch.float64."
                )
            p.copy_(value)
        for name, b in model.named_buffers():
            b.copy_(base.get_buffer(name))


def balls_in(budget: PerturbationBudget, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, ParameterBall]:
    """``budget`` resolved on ``model``'s (centre) weights, by parameter name: the radii computed in float64 and rounded
    up to the bounds' ``dtype`` (:func:`.precision.radius_in`), so that the ball in ``dtype`` contains the ball asked
    for (docs/theory.md §5)."""
    balls = budget.parameter_balls(model, torch.float64)
    return {t.param_name: replace(t, radius=radius_in(t.radius, dtype)) for t in balls}


class WeightPerturbationCertifier(Settings):
    """
    Certificates of pairwise-margin robustness under weight perturbation (docs/theory.md §3–§5).

    For every input the certifier bounds from below each pairwise margin ``f_y − f_i`` of *every* network whose
    weights lie in the budget's ball around the estimator's effective weights; a sample is certified when all these
    lower bounds are positive (beyond the tolerance :data:`CERTIFICATION_RTOL`). Settings: constructor arguments and
    :meth:`set_params` (assigning one goes through it); no cached bound outlives a change of settings or weights.
    """

    certifier_params = ["budget", "method", "batch_size", "verbose", "dtype"]
    params_attribute = "certifier_params"

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        method: str = "linear",
        batch_size: int = 128,
        verbose: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        """
        Create a :class:`.WeightPerturbationCertifier` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped, nothing
            copied) whose model is a DAG of Linear/Conv2d layers with fixed layers between them.
        :param budget: the ball of weight perturbations (its layer names are checked against the model).
        :param method: a name in the registry :data:`.METHODS`: ``"linear"`` (the default, the tightest), ``"interval"``
            or ``"paper"`` (chains only).
        :param batch_size: samples per bound computation.
        :param verbose: show a progress bar over batches.
        :param dtype: the precision of the bounds: ``torch.float32`` (with the rounding-error terms of docs/theory.md
            §5: sound for the exact network) or ``torch.float64``; ``None``: :data:`.precision.DEFAULT_DTYPE`.
        :raises UnsupportedModelError: when the model is not a DAG of supported layers (names the module), or the
            method does not apply to it.
        """
        estimator = as_weight_classifier(estimator)
        self._estimator: PyTorchWeightClassifier = estimator
        self.budget = budget
        self.method = method
        self.batch_size = batch_size
        self.verbose = verbose
        self.dtype = dtype
        # UnsupportedModelError (unreadable model, or a method that does not apply to it) before anything is copied
        self._network = read_network(estimator.base_model, estimator.input_shape)
        self._check_params()
        # A private copy of the model in the bounds' dtype holds the centre weights; the user's module is never written
        # to. (float64_copy also detaches; the float32 copy is cast back after.)
        self._model = float64_copy(estimator.base_model).to(self.dtype)
        self._network = read_network(self._model, estimator.input_shape)
        out_features = self._network.layers[-1].module.out_features
        if out_features != estimator.nb_classes:
            raise ValueError(
                f"the model's last layer has {out_features} outputs but the estimator has {estimator.nb_classes} "
                "classes."
            )
        self._key: tuple | None = None
        self._param_balls: dict[str, ParameterBall] = {}
        self._unit_param_balls: dict[str, ParameterBall] = {}

    def _check_params(self) -> None:
        if not isinstance(self.budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(self.budget).__name__}.")
        self.budget.layer_names(self.estimator.base_model)  # unknown layer names: ValueError listing the valid ones
        check_choice(self.method, "method", tuple(METHODS))
        self._method: BoundMethod = METHODS[self.method]
        self._method.check(self._network)  # UnsupportedModelError: the method does not apply to the model
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")
        dtype = check_dtype(self.dtype)
        model = getattr(self, "_model", None)
        if model is not None and dtype != next(model.parameters()).dtype:
            self._model = model.to(dtype)  # the centre weights are copied again at the next refresh (the key changed)
            self._network = read_network(self._model, self.estimator.input_shape)
        self.batch_size, self.verbose, self.dtype = int(self.batch_size), bool(self.verbose), dtype

    @property
    def estimator(self) -> PyTorchWeightClassifier:
        """The (wrapped) estimator."""
        return self._estimator

    @property
    def network(self) -> Network:
        """The model read as a graph of layers, holding the centre weights in the bounds' dtype."""
        self._refresh()
        return self._network

    @property
    def parameter_balls(self) -> dict[str, ParameterBall]:
        """The budget resolved on the centre weights (radii in the bounds' dtype, rounded up in float32):
        ``{parameter name: ParameterBall}``."""
        self._refresh()
        return dict(self._param_balls)

    # ------------------------------------------------------------------------------------------------ public API
    def margin_lower_bounds(
        self, x: np.ndarray, y: np.ndarray | None = None, scale: np.ndarray | None = None
    ) -> np.ndarray:
        """
        Lower bounds of every pairwise margin ``f_y(x) − f_i(x)`` over every network in the ball.

        :param x: inputs ``(N,) + input_shape`` (ART's preprocessing is applied).
        :param y: integer or one-hot labels; ``None``: the estimator's predicted classes.
        :param scale: optional per-sample factors ``(N,)`` ≥ 0 multiplying every radius of the budget (sample ``n``
            is bounded over the ball scaled by ``scale[n]``).
        :return: ``(N, nb_classes)`` float64 lower bounds (computed in the certifier's ``dtype``), ``+inf`` in the
            label's own column.
        """
        empty = np.zeros((0, self.estimator.nb_classes))
        if scale is None:
            out = [b.to(torch.float64).cpu().numpy() for b, _, _ in self._batches(x, y, "margin bounds", predict=False)]
            return self._gathered(out, len(x), empty)
        factors = np.asarray(scale, dtype=np.float64)
        if factors.shape != (len(x),) or not np.all(np.isfinite(factors)) or np.any(factors < 0):
            raise ValueError(f"`scale` must hold {len(x)} finite factors ≥ 0, got shape {factors.shape}.")
        out = []
        batches = self._prepared_batches(x, y, "margin bounds", predict=False)
        for rows, (x_t, labels, _, _) in zip(distributed.my_batches(len(x), self.batch_size), batches):
            factor = torch.as_tensor(factors[rows], device=x_t.device)
            out.append(self._bounds(x_t, labels, self._param_balls, factor).to(torch.float64).cpu().numpy())
        return self._gathered(out, len(x), empty)

    def certify(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Which predictions provably survive every weight perturbation in the ball.

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels; with labels, a wrong clean prediction is never certified. ``None``: certify the
            predicted classes.
        :return: ``(N,)`` bool, True where a sound lower bound of every margin exceeds the tolerance (the cascade
            below).

        A method never looser than a cheaper one (``"linear"`` than ``"interval"``, ``"alpha"`` than ``"linear"``:
        :attr:`.BoundMethod.never_above`) evaluates the cheaper ones first and bounds only the margins they leave
        open, of the correctly predicted samples: every margin is decided by a sound bound, with the decisions of the
        method's own bounds up to their rounding (in float32 also up to the cheaper bound's own boxes, which may
        certify a margin at the edge that the method's would not). In float32, ``"interval"`` (whose boxes keep
        float32 centres, for its speed) bounds the margins it leaves open once more on boxes with float64 centres
        (docs/theory.md §5): tighter, and paid only for the samples not yet certified whose boxes that changes;
        :meth:`certified_radius` searches with the same rule.
        """
        out = []
        for x_t, labels, tol, correct in self._prepared_batches(x, y, "certify"):
            out.append(self._certified(x_t, labels, tol, correct).cpu().numpy())
        return self._gathered(out, len(x), np.zeros(0, dtype=bool))

    def _certified(self, x_t: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor, correct: torch.Tensor):
        """Whether every margin lower bound of the correctly predicted samples exceeds ``tol``, by the cascade of
        :meth:`certify`: the cheapest method of the :attr:`.BoundMethod.never_above` chain on every open sample, each
        next one on the (sample, class) pairs still open (its ``classes=`` rows, per-class methods)."""
        chain = [self._method]
        while chain[-1].never_above in METHODS:
            chain.append(METHODS[chain[-1].never_above])
        open_pairs = correct.unsqueeze(1) & (
            torch.arange(self.estimator.nb_classes, device=labels.device) != labels.unsqueeze(1)
        )
        refine = self._refines(self._method)
        for method in reversed(chain):
            idx = torch.nonzero(open_pairs.any(dim=1)).squeeze(1)
            if len(idx) == 0:
                break
            if method.per_class and method is not chain[-1]:
                classes = _open_classes(open_pairs[idx])
                lb = self._bounds(x_t[idx], labels[idx], self._param_balls, method=method, classes=classes)
                decided = open_pairs.new_zeros((len(idx), open_pairs.shape[1]))
                decided.scatter_(1, classes, lb > tol[idx].unsqueeze(1))
            elif refine and method is self._method:  # float32 centres, then float64 ones where still open
                threshold = tol[idx].unsqueeze(1)
                boxes = self._interval_boxes(x_t[idx], self._param_balls)
                lb = self._bounds(x_t[idx], labels[idx], self._param_balls, method=method, boxes=boxes)
                lb = self._refined(x_t[idx], labels[idx], lb, threshold, boxes, self._param_balls, None, method)
                decided = lb > threshold
            else:
                decided = self._bounds(x_t[idx], labels[idx], self._param_balls, method=method) > tol[idx].unsqueeze(1)
            open_pairs[idx] &= ~decided
        return correct & ~open_pairs.any(dim=1)

    def _refines(self, method: BoundMethod) -> bool:
        """Whether ``method``'s bounds are taken again on boxes with float64 centres where they leave a margin open: in
        float32, a method whose boxes keep float32 centres (``"interval"``, for its speed; docs/theory.md §5)."""
        return bool(self._rounding()) and method.takes_boxes and not method.float64_centres

    def _interval_boxes(self, x_t, param_balls, scale=None, float64_centres: bool = False, known=None):
        """The interval boxes of ``x_t`` at the radius factors ``scale`` as the certificate computes them (in float32
        with the rounding terms, with or without float64 centres), with the ``known`` centres of the layers on the
        known input (:func:`.interval_preactivation_bounds`)."""
        params = self._network.params(dtype=self.dtype)
        with torch.no_grad(), exact_kernels():
            return interval_preactivation_bounds(
                self._network, param_balls, x_t.to(self.dtype), params, factors_in(scale, self.dtype), self._cache,
                known, **self._rounding(), float64_centres=float64_centres,
            )  # fmt: skip

    def _refined(self, x_t, labels, lb, threshold, boxes, param_balls, scale, method: BoundMethod) -> torch.Tensor:
        """``lb``, ``method``'s bounds on ``boxes`` (float32 centres), raised to the same bound on boxes with float64
        centres (the larger of two sound bounds) for the samples with a margin at most ``threshold`` whose boxes those
        change (:func:`.float64_centre_rows`): the float32 interval certificate's second bound, paid only where it can
        decide something (:meth:`certify`, the radius search)."""
        params = self._network.params(dtype=self.dtype)
        rows = torch.nonzero((lb <= threshold).any(dim=1) & float64_centre_rows(self._network, boxes, params))
        rows = rows.squeeze(1)
        if len(rows) == 0:
            return lb
        factors = None if scale is None else scale[rows]
        wide = self._interval_boxes(x_t[rows], param_balls, factors, float64_centres=True)
        better = self._bounds(x_t[rows], labels[rows], param_balls, factors, method, boxes=wide)
        lb = lb.clone()
        lb[rows] = torch.maximum(lb[rows], better.to(lb.dtype))
        return lb

    def certified_radius(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Per sample, the largest radius for which the prediction is certified: an ``eps`` in the budget's units for a
        single ``eps``, the factor applied to every entry for a per-layer ``eps`` dict. ``0`` where the clean
        prediction is wrong or not certified at any radius, ``inf`` where no radius breaks the certificate.

        Closed form where the bound is affine in the radius (``paper`` with one perturbed layer, ``interval`` with
        only the last layer perturbed: docs/theory.md §5), otherwise a search vectorized over the batch
        (:mod:`.radius_search`: bracket by secant extrapolation, then secant steps to a relative precision of about
        1.5e-11 in float64 and 1e-6 in float32, :func:`.search_precision`; the returned radius is one at which the
        bound was evaluated certified). ``"linear"`` starts from the ``"interval"`` radius, whose per-class bounds
        also choose the classes it evaluates until the last step.

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels (wrong clean predictions get 0); ``None``: the predicted classes.
        :return: ``(N,)`` float64 radii.
        """
        batches = self._prepared_batches(x, y, "certified radius")  # the weights and balls refreshed once, here
        # float32 bounds carry rounding terms that are not exactly affine in the radius: always searched
        affine = self.dtype == torch.float64 and self._method.affine_in_radius(self._network, self._unit_param_balls)
        out = []
        for x_t, labels, tol, correct in batches:
            if affine:
                radius = self._closed_form_radius(x_t, labels, tol)
            else:
                radius = self._searched_radius(x_t, labels, tol)
            out.append(torch.where(correct, radius, torch.zeros_like(radius)).cpu().numpy())
        return self._gathered(out, len(x), np.zeros(0))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(budget={self.budget!r}, method={self.method!r}, batch_size={self.batch_size}, "
            f"verbose={self.verbose}, dtype=torch.{dtype_name(self.dtype)})"
        )

    # ------------------------------------------------------------------------------------------------ internals
    def _refresh(self) -> None:
        """Copy the estimator's current centre weights (base + carried perturbation) into the private model, and
        resolve the budget on them, when the weights changed since the last call.

        float64: the sum in float64. float32: the sum as the estimator computes it (in the weights' own dtype), which
        must be exact in float32; the radii are computed from those weights in float64 and rounded up to float32
        (:func:`.precision.radius_in`), so that the float32 ball contains the ball asked for (docs/theory.md §5)."""
        base = self.estimator.base_model
        carried = self.estimator.current_deltas()
        key = (self.settings_key(), weights_version(self.estimator))  # every setting, every weight, by value
        if key == self._key:
            return
        load_centre_weights(self._model, base, carried, self.dtype)
        if self._key is not None and any(isinstance(layer, BatchNorm) for layer in self._network.layers):
            self._network = read_network(self._model, self.estimator.input_shape)  # batch-norm constants changed
        self._cache = BoundCache()  # the radius tensors below are new: drop the old entries (memory only)
        self._param_balls = self._balls(self.budget)
        self._unit_param_balls = self._balls(self._unit_budget())
        self._key = key

    def _balls(self, budget: PerturbationBudget) -> dict[str, ParameterBall]:
        """``budget`` resolved on the centre weights (:func:`balls_in`)."""
        return balls_in(budget, self._model, self.dtype)

    def _unit_eps(self) -> float:
        """The budget's own position on the radius scale searched by :meth:`certified_radius` (its ``eps``; 1 for a
        per-layer dict)."""
        return 1.0 if isinstance(self.budget.eps, dict) else float(self.budget.eps)

    def _unit_budget(self) -> PerturbationBudget:
        """The budget at scale 1 (``eps = 1``; a per-layer dict as it is): radii scale linearly with it."""
        return self.budget if isinstance(self.budget.eps, dict) else self.budget.with_eps(1.0)

    def _prepared_batches(self, x: np.ndarray, y: np.ndarray | None, desc: str, predict: bool = True):
        """Validated, preprocessed batches in the bounds' dtype: ``(x, labels, tolerance, clean prediction correct)``.

        The clean prediction (the estimator's own float32 forward pass, as it predicts) gives the labels when ``y`` is
        None and the tolerance; without ``predict`` (bounds for given labels) it is skipped and both are ``None``. The
        centre weights and the balls are brought up to date now, before the first batch (:meth:`_refresh`)."""
        self._refresh()
        return self._batch_stream(x, y, desc, predict)

    def _batch_stream(self, x: np.ndarray, y: np.ndarray | None, desc: str, predict: bool):
        """The generator behind :meth:`_prepared_batches`."""
        x_t, y_t = self.estimator.prepare_inputs(x, y)
        distributed.check_same_data(np.asarray(x), None if y is None else np.asarray(y), name="x")
        base = self.estimator.base_model
        carried = self.estimator.current_deltas()
        mine = list(distributed.my_batches(len(x_t), self.batch_size))  # in a process group: this rank's batches
        verbose = self.verbose and distributed.is_main_process()
        for rows in tqdm(mine, desc=f"Weight certificates ({desc})", disable=not verbose):
            xb = x_t[rows]
            labels = None if y_t is None else y_t[rows]
            tol = correct = None
            if predict or labels is None:
                with torch.no_grad(), eval_mode(base):
                    logits = self.estimator.logits(xb, carried)
                pred = logits.argmax(dim=1)
                labels = pred if labels is None else labels
                tol = certification_rtol(self.dtype) * (1.0 + logits.abs().amax(dim=1).to(self.dtype))
                correct = pred == labels
            yield xb.to(self.dtype), labels, tol, correct

    def _gathered(self, pieces: list[np.ndarray], n: int, empty: np.ndarray) -> np.ndarray:
        """The per-batch results in sample order (``empty`` for no sample); in a process group each rank computed its
        own batches (:func:`.distributed.my_batches`) and every rank receives all of them, in single-process order."""
        return distributed.gather_batches(pieces, n, self.batch_size) if n else empty

    def _batches(self, x: np.ndarray, y: np.ndarray | None, desc: str, predict: bool = True):
        """``(bounds, tolerance, correct)`` per batch at the budget itself."""
        for x_t, labels, tol, correct in self._prepared_batches(x, y, desc, predict):
            yield self._bounds(x_t, labels, self._param_balls), tol, correct

    def _bounds(
        self,
        x_t: torch.Tensor,
        labels: torch.Tensor,
        param_balls: dict[str, ParameterBall],
        scale: torch.Tensor | None = None,
        method: BoundMethod | None = None,
        **rows,
    ) -> torch.Tensor:
        """Margin lower bounds ``(N, K)`` in the bounds' dtype of ``method`` (default: the certifier's); ``scale``
        multiplies every radius per sample; ``rows``: the method's ``boxes=`` or ``classes=`` (then ``(N, J)``)."""
        method = self._method if method is None else method
        keep_freed_memory()  # the bounds' temporaries reuse freed memory instead of faulting pages in afresh
        with torch.no_grad(), exact_kernels():
            bounds = method.bounds(
                self._network, param_balls, x_t, labels, self.dtype, factors_in(scale, self.dtype), self._cache,
                **rows, **self._rounding(),
            )  # fmt: skip
        bounds = finite_lower(bounds)  # an overflow never certifies (docs/theory.md §5)
        return bounds if "classes" in rows else fill_label(bounds, labels)

    def _rounding(self) -> dict[str, bool]:
        """The bound functions' rounding-error terms (docs/theory.md §5): on in float32; float64 bounds rely on the
        tolerance :data:`CERTIFICATION_RTOL`."""
        return {"rounding": True} if self.dtype != torch.float64 else {}

    def _closed_form_radius(self, x_t: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
        """Bounds affine in the radius factor ``s``: ``lb(s) = lb(0) − s·(lb(0) − lb(1))``, solved for
        ``lb(s) = tol`` per class."""
        zeros = torch.zeros(len(x_t), dtype=torch.float64, device=x_t.device)
        at0 = self._bounds(x_t, labels, self._unit_param_balls, zeros)
        at1 = self._bounds(x_t, labels, self._unit_param_balls, zeros + 1)
        at0, at1 = at0.to(torch.float64), at1.to(torch.float64)
        slope = at0 - at1  # η per unit radius (≥ 0); nan in the label's column (inf − inf)
        room = at0 - tol.unsqueeze(1)
        ratio = torch.where(slope > 0, room / slope.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
        ratio = torch.where(torch.isnan(slope), math.inf, ratio)
        radius = ratio.amin(dim=1).clamp_min(0)
        return torch.where(at0.amin(dim=1) > tol, radius, torch.zeros_like(radius))

    def _searched_radius(self, x_t: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
        """Largest certified radius factor per sample by the search of :mod:`.radius_search`, warm-started where a
        cheaper method's radius is certified for this one (:attr:`.BoundMethod.never_above`)."""
        width, margin = search_precision(self.dtype)  # accepted above the tolerance by a margin: see search_precision
        search = _SearchBounds(self, x_t, labels, (tol.to(torch.float64) * (1 + margin)).unsqueeze(1))
        bounds = search.bounds
        warm = METHODS.get(self._method.never_above or "")
        at_zero = search.at_zero(warm or self._method)  # every method: the exact margins
        g0 = at_zero.amin(dim=1)
        lower, at_lower = None, at_zero.clone()
        if warm is not None:

            def evaluate_warm(idx: torch.Tensor, s: torch.Tensor, closing: torch.Tensor) -> torch.Tensor:
                lb = bounds(warm, idx, s)
                g = lb.amin(dim=1)
                at_lower[idx[g > 0]] = lb[g > 0]  # the per-class bounds at the last certified point: the warm radius
                return g

            lower = search_radius(evaluate_warm, g0, self._unit_eps(), relative_width=_WARM_WIDTH)
        if not self._method.per_class:
            whole = lambda idx, s, closing: bounds(self._method, idx, s).amin(dim=1)  # noqa: E731
            return search_radius(whole, g0, self._unit_eps(), lower, relative_width=width)
        lower = torch.zeros_like(g0) if lower is None else lower

        def per_class(idx: torch.Tensor, s: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
            # rows repeating a sample (one per critical class, at the same factor) share its interval boxes: the
            # same boxes the bound would compute per row, computed once per sample
            unique, inverse = torch.unique(idx, return_inverse=True)
            if len(unique) == len(idx):
                return bounds(self._method, idx, s, classes=classes)
            first = torch.zeros_like(unique).scatter_(0, inverse, torch.arange(len(idx), device=idx.device))
            boxes = slice_boxes(search.boxes(unique, s[first], self._method), inverse)
            return bounds(self._method, idx, s, classes=classes, boxes=boxes)

        evaluate = PrunedEvaluator(per_class, labels, self.estimator.nb_classes, lower, at_zero)
        known = torch.nonzero((lower > 0) & torch.isfinite(lower)).squeeze(1)
        evaluate.predict(known, lower[known], at_lower[known])  # the critical classes from the warm start's bounds
        return search_pruned(evaluate, g0, self._unit_eps(), lower, relative_width=width)


def _open_classes(open_pairs: torch.Tensor) -> torch.Tensor:
    """``(N, J)`` class indices of each row's open entries of ``open_pairs`` ``(N, K)`` (every row has one), ``J`` the
    largest count, shorter rows padded with their first open class (bounded twice, same value)."""
    counts = open_pairs.sum(dim=1)
    order = torch.argsort((~open_pairs).to(torch.int8), dim=1, stable=True)  # open classes first, in class order
    width = int(counts.max())
    classes = order[:, :width]
    pad = torch.arange(width, device=open_pairs.device).unsqueeze(0) >= counts.unsqueeze(1)
    return torch.where(pad, classes[:, :1], classes)


class _SearchBounds:
    """The bounds a radius search evaluates: a method's bounds minus the search's threshold for some samples at some
    radius factors, with the interval boxes computed by the certifier so that the centres ``W x + b`` of the affine
    layers on the known input (independent of the radius) are computed once, at the first evaluation."""

    def __init__(self, certifier: WeightPerturbationCertifier, x_t, labels, threshold) -> None:
        self.certifier, self.x_t, self.labels, self.threshold = certifier, x_t, labels, threshold
        self.centres: dict[int, torch.Tensor] = {}

    def boxes(self, idx: torch.Tensor, s: torch.Tensor, method: BoundMethod):
        """The interval boxes of the samples ``idx`` at the factors ``s``, with the known centres, as ``method``
        computes them itself (:attr:`.BoundMethod.float64_centres`)."""
        c = self.certifier
        known = {value: centre[idx] for value, centre in self.centres.items()}
        wide = bool(c._rounding()) and method.float64_centres
        return c._interval_boxes(self.x_t[idx], c._unit_param_balls, s, wide, known)

    def at_zero(self, method: BoundMethod) -> torch.Tensor:
        """``method``'s bounds of every sample at radius 0 (the exact margins, minus the threshold); records the
        centres."""
        everyone = torch.arange(len(self.x_t), device=self.x_t.device)
        zeros = torch.zeros(len(self.x_t), dtype=torch.float64, device=self.x_t.device)  # factors: float64
        boxes = self.boxes(everyone, zeros, method)
        self.centres = {value: box.centre for value, box in enumerate(boxes) if isinstance(box, CentredBox)}
        return self.bounds(method, everyone, zeros, **({"boxes": boxes} if method.takes_boxes else {}))

    def bounds(self, method: BoundMethod, idx: torch.Tensor, s: torch.Tensor, **rows) -> torch.Tensor:
        """``method``'s bounds minus the search's threshold for the samples ``idx`` at the factors ``s``."""
        if method.takes_boxes and "boxes" not in rows:
            rows["boxes"] = self.boxes(idx, s, method)
        c = self.certifier
        lb = c._bounds(self.x_t[idx], self.labels[idx], c._unit_param_balls, s, method, **rows)
        if method is c._method and c._refines(method) and "classes" not in rows:  # as certify decides (float32)
            x, labels, threshold = self.x_t[idx], self.labels[idx], self.threshold[idx]
            lb = c._refined(x, labels, lb, threshold, rows["boxes"], c._unit_param_balls, s, method)
        return (lb - self.threshold[idx]).to(torch.float64)
