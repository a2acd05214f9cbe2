"""
:class:`WeightPerturbationCertifier`: which predictions no weight perturbation in a ball can change.

The certifier reads the estimator's model once as a chain of layers (:func:`.read_network`) and evaluates one of the
margin bounds of :data:`METHODS` in float64 on the estimator's device (THEORY.md §3–§5):

* ``"paper"``: the closed-form bound of THEORY.md §3 (formula B with the bias terms of §3.4), in the setting of
  Tsai et al.;
* ``"interval"``: interval bound propagation with weight intervals, THEORY.md §4 (never looser than ``"paper"`` on
  ``row_l1`` budgets);
* ``"linear"``: backward linear bounds with exact weight absorption, THEORY.md §4b (imported on first use).

What is certified is the estimator *as it is*: the centre of the ball is the weights the estimator predicts with, its
base weights plus the perturbation it carries (if any), and relative budgets are relative to those centre weights.
Certificates hold for exact arithmetic with eval-mode semantics (batch-norm running statistics, no dropout).

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode
from art_weightpert.network import BatchNorm, Network, read_network

logger = logging.getLogger(__name__)

CERTIFICATION_RTOL = 1e-9
"""A sample is certified when every margin lower bound exceeds ``CERTIFICATION_RTOL · (1 + max_i |f_i(x)|)``: a
safety margin, relative to the logit scale, far above the rounding error of the float64 bounds (THEORY.md §5)."""

_BISECTION_STEPS = 36  # halvings of a [s, 2s] bracket: relative precision 2^-36 ≈ 1.5e-11
_BRACKET_STEPS = 64  # doublings/halvings allowed to find the bracket (factor 2^64 either way)


def _perturbed_layers(network: Network, param_balls: dict[str, ParameterBall]) -> set[str]:
    names = {t.layer_name for t in param_balls.values()}
    return {layer.name for layer in network.affine_layers if layer.name in names}


@dataclass(frozen=True)
class BoundMethod:
    """
    One entry of :data:`METHODS`: where its bound function lives and whether its lower bounds are affine in a common
    factor ``s`` of every radius (then the certified radius has a closed form).

    The bound function has the signature ``(network, param_balls, x, labels, dtype) -> (N, K)`` lower bounds
    with ``+inf`` at the label; an optional ``scale`` keyword (per-sample radius factors) makes the radius
    search vectorized.
    """

    module: str
    function: str
    affine_in_radius: Callable[[Network, dict[str, ParameterBall]], bool]

    def load(self) -> Callable[..., torch.Tensor]:
        """The bound function (``ImportError`` naming the method's module when it is not available)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise ImportError(f"this bound needs the module {self.module!r}, which cannot be imported: {err}") from err
        return getattr(module, self.function)


METHODS: dict[str, BoundMethod] = {
    # Formula B is affine in the radii when a single affine layer is perturbed (THEORY.md §3.1, A and A').
    "paper": BoundMethod(
        "art_weightpert.certification.paper",
        "paper_margin_bounds",
        lambda network, param_balls: len(_perturbed_layers(network, param_balls)) <= 1,
    ),
    # With only the last layer perturbed every box before it is exact and the bound is m − s·(P_y + P_i).
    "interval": BoundMethod(
        "art_weightpert.certification.interval",
        "interval_margin_bounds",
        lambda network, param_balls: _perturbed_layers(network, param_balls) <= {network.layers[-1].name},
    ),
    "linear": BoundMethod(
        "art_weightpert.certification.linear",
        "linear_margin_bounds",
        lambda network, param_balls: False,
    ),
}
"""Method name → bound function (imported lazily)."""


def available_methods() -> list[str]:
    """The names in :data:`METHODS` whose module imports."""
    out = []
    for name, method in METHODS.items():
        try:
            method.load()
        except ImportError:
            continue
        out.append(name)
    return out


class WeightPerturbationCertifier:
    """
    Certificates of pairwise-margin robustness under weight perturbation (THEORY.md §3–§5).

    For every input the certifier bounds from below each pairwise margin ``f_y − f_i`` of *every* network whose
    weights lie in the budget's ball around the estimator's weights; a sample is certified when all these lower
    bounds are positive (beyond the tolerance :data:`CERTIFICATION_RTOL`).
    """

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        method: str = "paper",
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.WeightPerturbationCertifier` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped, nothing
            copied) whose model is a chain of Linear/Conv2d layers with fixed layers between them.
        :param budget: the ball of weight perturbations (its layer names are checked against the model).
        :param method: ``"paper"``, ``"interval"`` or ``"linear"`` (see :data:`METHODS`).
        :param batch_size: samples per bound computation.
        :param verbose: show a progress bar over batches.
        :raises UnsupportedModelError: when the model is not a chain of supported layers (names the module).
        """
        if isinstance(estimator, PyTorchClassifier) and not isinstance(estimator, PyTorchWeightClassifier):
            estimator = PyTorchWeightClassifier.from_classifier(estimator)
        self._check_params(estimator, budget, method, batch_size, verbose)
        self._estimator: PyTorchWeightClassifier = estimator
        self.budget = budget
        self.method = method
        self.batch_size = int(batch_size)
        self.verbose = bool(verbose)
        self._bound_function = METHODS[method].load()
        keywords = inspect.signature(self._bound_function).parameters
        self._supports_scale = "scale" in keywords
        self._supports_cache = "cache" in keywords
        self._cache: dict = {}  # per-layer constants of the bound, valid while the weights are unchanged
        read_network(estimator.base_model, estimator.input_shape)  # UnsupportedModelError before anything is copied
        # A private float64 copy of the model holds the centre weights; the user's module is never written to.
        self._model64 = copy.deepcopy(estimator.base_model).to(torch.float64).requires_grad_(False)
        self._network = read_network(self._model64, estimator.input_shape)
        out_features = self._network.layers[-1].module.out_features
        if out_features != estimator.nb_classes:
            raise ValueError(
                f"the model's last layer has {out_features} outputs but the estimator has {estimator.nb_classes} "
                "classes."
            )
        self._key: tuple | None = None
        self._param_balls: dict[str, ParameterBall] = {}
        self._unit_param_balls: dict[str, ParameterBall] = {}

    @staticmethod
    def _check_params(estimator: Any, budget: Any, method: Any, batch_size: Any, verbose: Any) -> None:
        if not isinstance(estimator, PyTorchWeightClassifier):
            raise TypeError(f"`estimator` must be an ART PyTorchClassifier, got {type(estimator).__name__}.")
        if not isinstance(budget, PerturbationBudget):
            raise TypeError(f"`budget` must be a PerturbationBudget, got {type(budget).__name__}.")
        budget.layer_names(estimator.base_model)  # unknown layer names: ValueError listing the valid ones
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}, got {method!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"`batch_size` must be an int, got {type(batch_size).__name__}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        if not isinstance(verbose, (bool, np.bool_)):
            raise TypeError("`verbose` must be a bool.")

    @property
    def estimator(self) -> PyTorchWeightClassifier:
        """The (wrapped) estimator."""
        return self._estimator

    @property
    def network(self) -> Network:
        """The model read as a chain of layers, holding the float64 centre weights."""
        self._refresh()
        return self._network

    @property
    def parameter_balls(self) -> dict[str, ParameterBall]:
        """The budget resolved on the centre weights (float64): ``{parameter name: ParameterBall}``."""
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
        :return: ``(N, nb_classes)`` float64 lower bounds, ``+inf`` in the label's own column.
        """
        if scale is None:
            out = [bounds.cpu().numpy() for bounds, _, _ in self._batches(x, y, "margin bounds", predict=False)]
            return np.concatenate(out) if out else np.zeros((0, self.estimator.nb_classes))
        factors = np.asarray(scale, dtype=np.float64)
        if factors.shape != (len(x),) or not np.all(np.isfinite(factors)) or np.any(factors < 0):
            raise ValueError(f"`scale` must hold {len(x)} finite factors ≥ 0, got shape {factors.shape}.")
        out, start = [], 0
        for x_t, labels, _, _ in self._prepared_batches(x, y, "margin bounds", predict=False):
            factor = torch.as_tensor(factors[start : start + len(x_t)], device=x_t.device)
            out.append(self._bounds(x_t, labels, self._param_balls, factor).cpu().numpy())
            start += len(x_t)
        return np.concatenate(out) if out else np.zeros((0, self.estimator.nb_classes))

    def certify(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Which predictions provably survive every weight perturbation in the ball.

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels; with labels, a wrong clean prediction is never certified. ``None``: certify the
            predicted classes.
        :return: ``(N,)`` bool, True where every margin lower bound exceeds the tolerance.
        """
        out = []
        for bounds, tol, correct in self._batches(x, y, "certify"):
            out.append((correct & (bounds.amin(dim=1) > tol)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)

    def certified_radius(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Per sample, the largest radius for which the prediction is certified: an ``eps`` in the budget's units for a
        single ``eps``, the factor applied to every entry for a per-layer ``eps`` dict. ``0`` where the clean
        prediction is wrong or not certified at any radius, ``inf`` where no radius breaks the certificate.

        Closed form where the bound is affine in the radius (``paper`` with one perturbed layer, ``interval`` with
        only the last layer perturbed: THEORY.md §3.1), otherwise a bisection vectorized over the batch (bracket by
        doubling or halving, then halvings to a relative precision of about 1e-11; the certified end is returned).

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels (wrong clean predictions get 0); ``None``: the predicted classes.
        :return: ``(N,)`` float64 radii.
        """
        self._refresh()
        unit = self._unit_budget()
        affine = METHODS[self.method].affine_in_radius(self._network, self._unit_param_balls)
        out = []
        for x_t, labels, tol, correct in self._prepared_batches(x, y, "certified radius"):
            if affine:
                radius = self._closed_form_radius(x_t, labels, tol)
            else:
                radius = self._bisection_radius(x_t, labels, tol, start=unit)
            out.append(torch.where(correct, radius, torch.zeros_like(radius)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(budget={self.budget!r}, method={self.method!r}, batch_size={self.batch_size}, "
            f"verbose={self.verbose})"
        )

    # ------------------------------------------------------------------------------------------------ internals
    def _refresh(self) -> None:
        """Copy the estimator's current centre weights (base + carried perturbation) into the float64 model, and
        resolve the budget on them, when the weights changed since the last call."""
        base = self.estimator.base_model
        carried = self.estimator.current_deltas()
        tensors = list(base.parameters()) + list(base.buffers()) + list(carried.values())
        key = tuple((t.data_ptr(), t._version) for t in tensors)
        if key == self._key:
            return
        with torch.no_grad():
            for name, p in self._model64.named_parameters():
                value = base.get_parameter(name).detach().to(torch.float64)
                if name in carried:
                    value = value + carried[name].detach().to(torch.float64)
                p.copy_(value)
            for name, b in self._model64.named_buffers():
                b.copy_(base.get_buffer(name))
        if self._key is not None and any(isinstance(layer, BatchNorm) for layer in self._network.layers):
            self._network = read_network(self._model64, self.estimator.input_shape)  # batch-norm constants changed
        self._cache = {}
        self._param_balls = {t.param_name: t for t in self.budget.parameter_balls(self._model64, torch.float64)}
        self._unit_param_balls = {
            t.param_name: t for t in self._unit_budget_object().parameter_balls(self._model64, torch.float64)
        }
        self._key = key

    def _unit_budget(self) -> float:
        """The budget's own position on the radius scale searched by :meth:`certified_radius`."""
        return 1.0 if isinstance(self.budget.eps, dict) else float(self.budget.eps)

    def _unit_budget_object(self) -> PerturbationBudget:
        """The budget at scale 1 (``eps = 1``; a per-layer dict as it is): radii scale linearly with it."""
        return self.budget if isinstance(self.budget.eps, dict) else self.budget.with_eps(1.0)

    def _prepared_batches(self, x: np.ndarray, y: np.ndarray | None, desc: str, predict: bool = True):
        """Validated, preprocessed float64 batches: ``(x, labels, tolerance, clean prediction correct)``.

        The clean prediction (the estimator's own float32 forward pass, as it predicts) gives the labels when ``y`` is
        None and the tolerance; without ``predict`` (bounds for given labels) it is skipped and both are ``None``."""
        self._refresh()
        x_t, y_t = self.estimator.prepare_inputs(x, y)
        base = self.estimator.base_model
        carried = self.estimator.current_deltas()
        starts = range(0, len(x_t), self.batch_size)
        for start in tqdm(starts, desc=f"Weight certificates ({desc})", disable=not self.verbose):
            xb = x_t[start : start + self.batch_size]
            labels = None if y_t is None else y_t[start : start + self.batch_size]
            tol = correct = None
            if predict or labels is None:
                with torch.no_grad(), eval_mode(base):
                    logits = self.estimator.logits(xb, carried)
                pred = logits.argmax(dim=1)
                labels = pred if labels is None else labels
                tol = CERTIFICATION_RTOL * (1.0 + logits.abs().amax(dim=1).to(torch.float64))
                correct = pred == labels
            yield xb.to(torch.float64), labels, tol, correct

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
    ) -> torch.Tensor:
        """Margin lower bounds ``(N, K)`` in float64; ``scale`` multiplies every radius per sample."""
        extra = {"cache": self._cache} if self._supports_cache else {}
        with torch.no_grad():
            if scale is None:
                return self._bound_function(self._network, param_balls, x_t, labels, torch.float64, **extra)
            if self._supports_scale:
                return self._bound_function(
                    self._network, param_balls, x_t, labels, torch.float64, scale=scale, **extra
                )
            out = torch.empty((len(x_t), self.estimator.nb_classes), dtype=torch.float64, device=x_t.device)
            for value in torch.unique(scale):  # a bound without per-sample radii: one call per distinct scale
                rows = scale == value
                scaled = {k: dataclasses.replace(t, radius=t.radius * value) for k, t in param_balls.items()}
                out[rows] = self._bound_function(self._network, scaled, x_t[rows], labels[rows], torch.float64)
            return out

    def _min_bound(self, x_t: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._bounds(x_t, labels, self._unit_param_balls, scale).amin(dim=1)

    def _closed_form_radius(self, x_t: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
        """Bounds affine in the radius factor ``s``: ``lb(s) = lb(0) − s·(lb(0) − lb(1))``, solved for
        ``lb(s) = tol`` per class."""
        zeros = torch.zeros(len(x_t), dtype=torch.float64, device=x_t.device)
        at0 = self._bounds(x_t, labels, self._unit_param_balls, zeros)
        at1 = self._bounds(x_t, labels, self._unit_param_balls, zeros + 1)
        slope = at0 - at1  # η per unit radius (≥ 0); nan in the label's column (inf − inf)
        room = at0 - tol.unsqueeze(1)
        ratio = torch.where(slope > 0, room / slope.clamp_min(torch.finfo(torch.float64).tiny), math.inf)
        ratio = torch.where(torch.isnan(slope), math.inf, ratio)
        radius = ratio.amin(dim=1).clamp_min(0)
        return torch.where(at0.amin(dim=1) > tol, radius, torch.zeros_like(radius))

    def _bisection_radius(
        self, x_t: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor, start: float
    ) -> torch.Tensor:
        """Largest certified radius factor per sample by bracketing then bisection (bounds decrease with it)."""
        n = len(x_t)
        zeros = torch.zeros(n, dtype=torch.float64, device=x_t.device)
        eligible = self._min_bound(x_t, labels, zeros) > tol
        lo = zeros.clone()  # certified
        hi = torch.full_like(zeros, math.inf)  # not certified
        s = torch.full_like(zeros, start if start > 0 else 1.0)
        for _ in range(_BRACKET_STEPS):
            active = eligible & ((lo == 0) | torch.isinf(hi))
            if not bool(active.any()):
                break
            ok = self._min_bound(x_t, labels, s) > tol
            lo = torch.where(active & ok, s, lo)
            hi = torch.where(active & ~ok, s, hi)
            s = torch.where(torch.isinf(hi), s * 2, s / 2)
        bracketed = eligible & (lo > 0) & torch.isfinite(hi)
        for _ in range(_BISECTION_STEPS):
            if not bool(bracketed.any()):
                break
            mid = torch.where(bracketed, (lo + hi) / 2, lo)
            ok = self._min_bound(x_t, labels, mid) > tol
            lo = torch.where(bracketed & ok, mid, lo)
            hi = torch.where(bracketed & ~ok, mid, hi)
        radius = torch.where(eligible & torch.isinf(hi) & (lo > 0), math.inf, lo)  # never broken within 2^64
        return torch.where(eligible, radius, zeros)
