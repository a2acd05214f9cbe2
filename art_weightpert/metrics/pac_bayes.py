"""
PAC-Bayes flatness and bound (Jiang, Neyshabur, Mobahi, Krishnan and Bengio, "Fantastic generalization measures and
where to find them", ICLR 2020), on any differentiable ART ``PyTorchClassifier``.

The posterior is Gaussian noise around the trained weights on every weight and bias of every Linear/Conv layer:
``N(0, σ²)`` per entry, or ``N(0, σ²·w² + ε²)`` (magnitude-aware, ``ε = 1e-3``). ``σ`` is a standard deviation
throughout (the reference scripts pass ``σ²`` where ``torch.normal`` expects a standard deviation). Draw ``j`` of every
evaluation uses the same standard normal numbers (seeded by ``(seed, j)``), so the accuracy drop is evaluated with
common random numbers along the σ search and in the bound.

| Paper link: https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.metrics.perturbed_evaluation import (
    checked_data,
    gaussian_deltas,
    loss_and_errors,
    seeded_generator,
    weight_estimator,
)
from art_weightpert.validation import (
    check_bool,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    check_probability,
)

logger = logging.getLogger(__name__)

MAX_SIGMA = 1e6  # the search gives up above this σ (the noise then no longer lowers the accuracy enough)


def pac_bayes_sigma(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    target_deviation: float = 0.1,
    magnitude_aware: bool = False,
    tolerance: float = 0.01,
    nb_samples: int = 10,
    magnitude_eps: float = 1e-3,
    max_evaluations: int = 40,
    batch_size: int = 128,
    seed: int = 0,
    verbose: bool = False,
    **deprecated: Any,
) -> float:
    """
    The largest σ such that Gaussian noise on every weight and bias lowers the accuracy on ``(x, y)`` by at most
    ``target_deviation`` on average (Jiang et al. 2020, "PAC-Bayes flatness"; they use the training set and 0.1).

    Search: from σ = 1, σ is multiplied or divided by 4 until the target is bracketed, then bisected geometrically.
    Guarantee (the stated tolerance): the returned σ lowers the mean accuracy over the ``nb_samples`` seeded draws by a
    deviation ``d`` with ``target_deviation − tolerance ≤ d ≤ target_deviation``. If ``max_evaluations`` runs out
    first (the accuracy can jump by more than ``tolerance`` between two σ on tiny data sets), the largest σ found with
    ``d ≤ target_deviation`` is returned and a warning is logged.

    :param classifier: any ART ``PyTorchClassifier``.
    :param x: inputs (the training set, for the measure and the bound).
    :param y: integer or one-hot labels.
    :param target_deviation: accuracy drop in (0, 1).
    :param magnitude_aware: noise ``N(0, σ²·w² + magnitude_eps²)`` per entry instead of ``N(0, σ²)``.
    :param tolerance: accepted shortfall of the drop, in (0, target_deviation].
    :param nb_samples: Monte Carlo draws per evaluation (formerly ``nb_draws``: ``DeprecationWarning``).
    :param magnitude_eps: the additive standard deviation ε of the magnitude-aware noise.
    :param max_evaluations: most evaluations of the mean accuracy.
    :param batch_size: samples per forward pass.
    :param seed: seed of the draws.
    :param verbose: show a progress bar over the evaluations.
    :return: σ (for the magnitude-aware noise, the relative factor σ').
    """
    nb_samples = renamed_keyword(deprecated, "nb_draws", "nb_samples", nb_samples, 10, "pac_bayes_sigma")
    reject_unknown_keywords(deprecated, "pac_bayes_sigma")
    target = check_probability(target_deviation, "target_deviation", open_interval=True)
    tolerance = check_positive(tolerance, "tolerance")
    if tolerance > target:
        raise ValueError(f"`tolerance` must be at most `target_deviation` ({target}), got {tolerance}.")
    check_positive_int(max_evaluations, "max_evaluations")
    drop = _AccuracyDrop.build(classifier, x, y, magnitude_aware, nb_samples, magnitude_eps, batch_size, seed)
    if target >= 1 - drop.clean_error:
        raise ValueError(
            f"`target_deviation` ({target}) must be below the clean accuracy ({1 - drop.clean_error:.4f}) on `x`."
        )
    lo, hi, sigma = 0.0, math.inf, 1.0
    with tqdm(total=max_evaluations, desc="pac_bayes_sigma", disable=not check_bool(verbose, "verbose")) as bar:
        for _ in range(max_evaluations):
            deviation = drop(sigma)
            bar.update(1)
            bar.set_postfix(sigma=f"{sigma:.4g}", deviation=f"{deviation:.4f}", refresh=False)
            if target - tolerance <= deviation <= target:
                return sigma
            lo, hi = (lo, sigma) if deviation > target else (sigma, hi)
            sigma = math.sqrt(lo * hi) if 0 < lo and hi < math.inf else (sigma / 4 if lo == 0 else sigma * 4)
            if sigma > MAX_SIGMA:
                raise ValueError(
                    f"Gaussian noise up to σ = {MAX_SIGMA:g} lowers the accuracy by at most {deviation:.4f} < "
                    f"`target_deviation` ({target})."
                )
    logger.warning(
        "pac_bayes_sigma: no σ within the tolerance after %d evaluations; returning σ = %.6g (deviation ≤ target).",
        max_evaluations,
        lo,
    )
    return lo


def pac_bayes_bound(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    sigma: float | None = None,
    magnitude_aware: bool = False,
    initial_weights: Mapping[str, Any] | None = None,
    delta: float = 0.05,
    target_deviation: float = 0.1,
    nb_samples: int = 10,
    magnitude_eps: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    verbose: bool = False,
    **search_params: Any,
) -> dict[str, Any]:
    """
    The PAC-Bayes bound of Jiang et al. 2020 (McAllester's form) for the Gaussian posterior ``Q`` around the trained
    weights ``w`` with the σ of :func:`pac_bayes_sigma`, and its terms. With probability ≥ 1 − δ over the ``m``
    training samples ``(x, y)``::

        E_{w'~Q} err(w') ≤ E_{w'~Q} err_S(w') + sqrt( (KL(Q‖P) + ln(m/δ)) / (2(m − 1)) )

    Prior ``P`` centred at ``initial_weights`` ``w0`` (default 0: Jiang's "orig"; pass the initialization for
    "init"). Isotropic noise: ``P = N(w0, σ²)``, ``KL = ‖w − w0‖²/(2σ²)``. Magnitude-aware noise (posterior variance
    ``s_i² = σ²w_i² + ε²``): the isotropic prior of least KL, ``σ_P² = (Σ s_i² + ‖w − w0‖²)/ω`` (ω parameters), as in
    Jiang et al.'s formula. The empirical term is a Monte Carlo estimate (its standard error is returned, not added),
    and σ (and σ_P) are chosen on the data without a union bound, as in Jiang et al.: treat the value as their
    complexity measure, not as a certified bound.

    :param classifier: any ART ``PyTorchClassifier``.
    :param x: the training inputs.
    :param y: their integer or one-hot labels.
    :param sigma: the noise level; ``None`` runs :func:`pac_bayes_sigma` (with ``target_deviation`` and
        ``search_params``, e.g. ``tolerance``).
    :param magnitude_aware: magnitude-aware noise.
    :param initial_weights: ``{parameter name: array}`` of the prior's centre for every weight and bias of the
        Linear/Conv layers (``None``: zeros).
    :param delta: confidence δ in (0, 1).
    :param target_deviation: accuracy drop of the σ search.
    :param nb_samples: Monte Carlo draws of the empirical term (formerly ``nb_draws``: ``DeprecationWarning``).
    :param magnitude_eps: ε of the magnitude-aware noise.
    :param batch_size: samples per forward pass.
    :param seed: seed of the draws (the same draws as the σ search).
    :param verbose: progress bar of the σ search.
    :return: ``bound``, ``expected_error`` (mean training error under the noise), ``expected_error_stderr``,
        ``clean_error``, ``complexity_term``, ``kl``, ``jiang_measure`` (their ``KL/2 + ln(m/δ) + 10``),
        ``flatness`` (``1/σ²``), ``sigma``, ``prior_sigma``, ``distance_sq`` (``‖w − w0‖²``), ``n_parameters``,
        ``n_samples``, ``delta``, ``magnitude_aware``, ``nb_draws``.
    """
    nb_samples = renamed_keyword(search_params, "nb_draws", "nb_samples", nb_samples, 10, "pac_bayes_bound")
    delta = check_probability(delta, "delta", open_interval=True)
    if sigma is None:
        sigma = pac_bayes_sigma(
            classifier, x, y, target_deviation, magnitude_aware, nb_samples=nb_samples, magnitude_eps=magnitude_eps,
            batch_size=batch_size, seed=seed, verbose=verbose, **search_params,
        )  # fmt: skip
    sigma = check_positive(sigma, "sigma")
    drop = _AccuracyDrop.build(classifier, x, y, magnitude_aware, nb_samples, magnitude_eps, batch_size, seed)
    m = len(drop.y_t)
    if m < 2:
        raise ValueError("`x` must hold at least two samples for the PAC-Bayes bound.")
    w = torch.cat([p.detach().double().flatten() for p in drop.params.values()])
    w0 = _initial_weights(drop.estimator, drop.params, initial_weights)
    dist = (w - w0).pow(2)
    post_var = torch.as_tensor(drop.std(w, sigma), dtype=torch.float64).pow(2).expand_as(w)
    prior_var = float(post_var.mean() + dist.mean()) if magnitude_aware else sigma**2
    kl = 0.5 * float(((post_var + dist) / prior_var - 1 + torch.log(prior_var / post_var)).sum())
    errors = drop.errors(sigma)
    expected = float(np.mean(errors))
    complexity = math.sqrt((kl + math.log(m / delta)) / (2 * (m - 1)))
    return {
        "bound": expected + complexity,
        "expected_error": expected,
        "expected_error_stderr": float(np.std(errors, ddof=1) / math.sqrt(len(errors))) if len(errors) > 1 else 0.0,
        "clean_error": drop.clean_error,
        "complexity_term": complexity,
        "kl": kl,
        "jiang_measure": kl / 2 + math.log(m / delta) + 10,
        "flatness": 1 / sigma**2,
        "sigma": sigma,
        "prior_sigma": math.sqrt(prior_var),
        "distance_sq": float(dist.sum()),
        "n_parameters": int(w.numel()),
        "n_samples": m,
        "delta": delta,
        "magnitude_aware": bool(magnitude_aware),
        "nb_draws": len(errors),
    }


class _AccuracyDrop:
    """Training error of ``W + δ`` under seeded Gaussian noise of level σ (draw ``j`` always from ``(seed, j)``)."""

    def __init__(self, estimator: PyTorchWeightClassifier, x_t: torch.Tensor, y_t: torch.Tensor, std: Callable,
                 nb_draws: int, batch_size: int, seed: int) -> None:  # fmt: skip
        self.estimator, self.x_t, self.y_t, self.std = estimator, x_t, y_t, std
        self.nb_draws, self.batch_size, self.seed = nb_draws, batch_size, seed
        base = estimator.base_model
        self.params = {name: base.get_parameter(name) for name in estimator.perturbable_parameters}
        if not self.params:
            raise ValueError("the model has no Linear or Conv parameter to perturb.")
        self.clean_error = loss_and_errors(estimator, x_t, y_t, None, batch_size)[1] / len(y_t)

    @classmethod
    def build(cls, classifier: PyTorchClassifier, x: np.ndarray, y: np.ndarray, magnitude_aware: bool,
              nb_draws: int, magnitude_eps: float, batch_size: int, seed: int) -> _AccuracyDrop:  # fmt: skip
        """Validate the arguments shared by the σ search and the bound."""
        magnitude_aware = check_bool(magnitude_aware, "magnitude_aware")
        nb_draws, batch_size = check_positive_int(nb_draws, "nb_samples"), check_positive_int(batch_size, "batch_size")
        eps = check_positive(magnitude_eps, "magnitude_eps")
        seed = check_non_negative_int(seed, "seed")
        est = weight_estimator(classifier)
        x, labels = checked_data(est, x, y)
        x_t, y_t = est.prepare_inputs(x, labels)
        if magnitude_aware:
            std = lambda p, s: torch.sqrt(s**2 * p.double() ** 2 + eps**2).to(p.dtype)  # noqa: E731
        else:
            std = lambda p, s: s  # noqa: E731
        return cls(est, x_t, y_t, std, nb_draws, batch_size, seed)

    def errors(self, sigma: float) -> list[float]:
        """Training error of each of the ``nb_draws`` draws at σ."""
        out = []
        for j in range(self.nb_draws):
            deltas = gaussian_deltas(self.params, lambda p: self.std(p, sigma), seeded_generator(self.seed, j))
            out.append(loss_and_errors(self.estimator, self.x_t, self.y_t, deltas, self.batch_size)[1] / len(self.y_t))
        return out

    def __call__(self, sigma: float) -> float:
        """Mean accuracy drop at σ."""
        return float(np.mean(self.errors(sigma))) - self.clean_error


def _initial_weights(
    estimator: PyTorchWeightClassifier, params: Mapping[str, torch.Tensor], initial: Mapping[str, Any] | None
) -> torch.Tensor:
    """The prior's centre, flattened in the order of ``params`` (float64)."""
    if initial is None:
        return torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64, device=_device(params))
    if not isinstance(initial, Mapping):
        raise TypeError(
            f"`initial_weights` must be a mapping of parameter names to arrays, got {type(initial).__name__}."
        )
    missing = [name for name in params if name not in initial]
    if missing:
        raise ValueError(f"`initial_weights` has no value for parameter(s) {missing}.")
    tensors = estimator.check_deltas({name: initial[name] for name in params})
    return torch.cat([tensors[name].double().flatten() for name in params])


def _device(params: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(params.values())).device
