"""
Generalization measures under weight perturbation, in ART's function style (the classifier first, numpy in, JSON-able
dicts out):

* :func:`weight_sharpness`: worst-case (projected ascent, :class:`.WeightPGD`) or average-case (Gaussian) increase of
  the loss and the error in a weight ball, absolute or adaptive (scaled by ``|w|``), over batches of ``m`` samples
  (Andriushchenko et al., ICML 2023);
* :func:`pac_bayes_sigma`, :func:`pac_bayes_bound` (:mod:`.pac_bayes`): PAC-Bayes flatness and bound (Jiang et al.,
  ICLR 2020);
* :func:`generalization_bound`: the Rademacher margin bound under weight perturbation of docs/theory.md §6.

Every measure evaluates the *base* module with ``W + Δ`` (``torch.func.functional_call``): the user's weights are
never modified, even when an exception interrupts the computation.

| Paper links: https://arxiv.org/abs/2103.02200, https://arxiv.org/abs/2302.07011, https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.attacks import WeightPGD
from art_weightpert.budget import ParameterBall, PerturbationBudget
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.metrics.pac_bayes import pac_bayes_bound, pac_bayes_sigma
from art_weightpert.metrics.perturbed_evaluation import (
    checked_data,
    gaussian_deltas,
    loss_and_errors,
    seeded_generator,
    weight_estimator,
)
from art_weightpert.network import UnsupportedModelError, read_network
from art_weightpert.torch_tools import batch_slices
from art_weightpert.validation import (
    check_bool,
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    check_probability,
)

logger = logging.getLogger(__name__)

__all__ = ["weight_sharpness", "pac_bayes_sigma", "pac_bayes_bound", "generalization_bound"]

SHARPNESS_KINDS = ("worst", "average")
SHARPNESS_NORMS = ("inf", "l2")


def weight_sharpness(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    rho: float,
    norm: str = "inf",
    adaptive: bool = True,
    kind: str = "worst",
    m: int = 128,
    include_bias: bool = True,
    layers: Iterable[str] | None = None,
    max_iter: int = 20,
    num_random_init: int = 1,
    nb_samples: int = 10,
    batch_size: int = 128,
    seed: int = 0,
    verbose: bool = False,
    **deprecated: Any,
) -> dict[str, Any]:
    """
    Sharpness of the loss in a ball of weight perturbations (Andriushchenko et al. 2023), averaged over batches of
    ``m`` samples (``m``-sharpness: each batch gets its own perturbation; the samples are shuffled by ``seed``).

    * ``kind="worst"``: ``max_{δ ∈ B(ρ)} L_B(w + δ) − L_B(w)``, by :class:`.WeightPGD` on the cross-entropy
      (``loss="ce"``) in the :class:`.PerturbationBudget` ``(ρ, norm, relative=adaptive, include_bias)``. The iterate
      kept is WeightPGD's (the most errors, then the highest loss): a lower bound on the true maximum.
    * ``kind="average"``: ``E_δ L_B(w + δ) − L_B(w)`` over ``nb_samples`` Gaussian draws ``δ ~ N(0, ρ²·w²)`` per entry
      (adaptive) or ``N(0, ρ²)`` (``ρ`` is a standard deviation); ``norm`` only sets the units of
      ``perturbation_norm``.

    Adaptive balls scale with the weights: ``|δ_i| ≤ ρ·|w_i|`` for ``"inf"`` (Andriushchenko et al.'s adaptive ℓ∞
    ball), ``‖δ‖_F ≤ ρ·‖W‖_F`` per tensor for ``"l2"`` (the budget's relative ℓ2 ball, layer-wise; their elementwise
    ℓ2 variant is not implemented).

    :param classifier: any ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`).
    :param x: inputs ``(N,) + input_shape`` (usually the training set).
    :param y: integer or one-hot labels.
    :param rho: radius ρ ≥ 0 (relative factor when ``adaptive``).
    :param norm: ``"inf"`` or ``"l2"``.
    :param adaptive: scale the ball (or the noise) with ``|w|``.
    :param kind: ``"worst"`` or ``"average"``.
    :param m: samples per batch of the ``m``-sharpness (≥ 1).
    :param include_bias: also perturb the biases (each in its own ball, docs/theory.md §2).
    :param layers: Linear/Conv layers to perturb (``None``: all).
    :param max_iter: WeightPGD steps per batch (worst case).
    :param num_random_init: WeightPGD random starts per batch in addition to the one from ``w`` (worst case).
    :param nb_samples: Gaussian draws per batch (average case; formerly ``nb_draws``, still accepted with a
        ``DeprecationWarning``).
    :param batch_size: samples per forward pass.
    :param seed: seed of the shuffling, the noise and WeightPGD's starts (the global torch generator is restored).
    :param verbose: show a progress bar over the batches.
    :return: ``loss_increase``, ``error_increase`` (perturbed minus clean mean cross-entropy and error),
        ``perturbation_norm`` (mean over the perturbations of the smallest radius, in ρ's units, of the ball holding
        them; ≤ ρ for the worst case) and ``perturbation_norm_max``, ``clean_loss``, ``perturbed_loss``,
        ``clean_error``, ``perturbed_error``, and the settings (``rho``, ``norm``, ``adaptive``, ``kind``, ``m``,
        ``n_samples``, ``n_batches``).
    """
    rho = check_non_negative(rho, "rho")
    check_choice(norm, "norm", SHARPNESS_NORMS)
    check_choice(kind, "kind", SHARPNESS_KINDS)
    adaptive, include_bias = check_bool(adaptive, "adaptive"), check_bool(include_bias, "include_bias")
    m, batch_size = check_positive_int(m, "m"), check_positive_int(batch_size, "batch_size")
    nb_samples = renamed_keyword(deprecated, "nb_draws", "nb_samples", nb_samples, 10, "weight_sharpness")
    reject_unknown_keywords(deprecated, "weight_sharpness")
    nb_draws = check_positive_int(nb_samples, "nb_samples")
    seed, verbose = check_non_negative_int(seed, "seed"), check_bool(verbose, "verbose")
    est = weight_estimator(classifier)
    x, labels = checked_data(est, x, y)
    budget = PerturbationBudget(rho, norm, layers=layers, relative=adaptive, include_bias=include_bias)
    unit_balls = budget.with_eps(1.0).parameter_balls(est.base_model, torch.float64)
    if kind == "worst":
        draw = _worst_case_draw(est, budget, max_iter, num_random_init, batch_size)
    else:
        draw = _gaussian_draws(est, unit_balls, rho, adaptive, nb_draws, seed)
    sums, sizes = _sharpness_sums(est, x, labels, m, batch_size, seed, draw, unit_balls, verbose)
    n = len(x)
    clean_loss, loss, clean_error, error = (float(v) / n for v in sums)
    return {
        "loss_increase": loss - clean_loss, "error_increase": error - clean_error,
        "perturbation_norm": float(np.mean(sizes)), "perturbation_norm_max": float(np.max(sizes)),
        "clean_loss": clean_loss, "perturbed_loss": loss, "clean_error": clean_error, "perturbed_error": error,
        "rho": rho, "norm": norm, "adaptive": adaptive, "kind": kind, "m": m, "n_samples": n,
        "n_batches": math.ceil(n / m),
    }  # fmt: skip


def _worst_case_draw(est, budget: PerturbationBudget, max_iter: int, num_random_init: int, batch_size: int):
    """``draw(i, xb, yb)``: the one perturbation of batch ``i``, by :class:`.WeightPGD` on the cross-entropy."""
    attack = WeightPGD(
        est, budget, max_iter, num_random_init=num_random_init, loss="ce", batch_size=batch_size, verbose=False
    )
    return lambda i, xb, yb: [est.check_deltas(attack.generate(xb, yb))]


def _gaussian_draws(est, unit_balls: list[ParameterBall], rho: float, adaptive: bool, nb_draws: int, seed: int):
    """``draw(i, xb, yb)``: ``nb_draws`` Gaussian perturbations of batch ``i`` (standard deviation ``ρ·|w|`` when
    adaptive, else ``ρ``), each seeded by ``(seed, i, j)``."""
    params = {t.param_name: est.base_model.get_parameter(t.param_name) for t in unit_balls}
    std = (lambda p: rho * p.abs()) if adaptive else (lambda p: rho)
    return lambda i, xb, yb: [gaussian_deltas(params, std, seeded_generator(seed, i, j)) for j in range(nb_draws)]


def _sharpness_sums(est, x, labels, m, batch_size, seed, draw, unit_balls, verbose) -> tuple[np.ndarray, list[float]]:
    """Sum, over the shuffled batches of ``m`` samples, of the clean and perturbed loss and errors (the perturbed ones
    averaged over the batch's ``draw``), and the size of every perturbation drawn."""
    order = np.random.default_rng(seed).permutation(len(x))
    sums = np.zeros(4)  # clean loss, perturbed loss, clean errors, perturbed errors
    sizes = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # WeightPGD's random starts
        for i, rows in enumerate(tqdm(list(batch_slices(len(x), m)), desc="weight_sharpness", disable=not verbose)):
            idx = order[rows]
            draws = draw(i, x[idx], labels[idx])
            x_t, y_t = est.prepare_inputs(x[idx], labels[idx])
            clean_loss, clean_errors = loss_and_errors(est, x_t, y_t, None, batch_size)
            perturbed = np.mean([loss_and_errors(est, x_t, y_t, d, batch_size) for d in draws], axis=0)
            sums += (clean_loss, perturbed[0], clean_errors, perturbed[1])
            sizes += [ball_size(unit_balls, d) for d in draws]
    return sums, sizes


def ball_size(unit_balls: list[ParameterBall], deltas: Mapping[str, torch.Tensor], rel_tol: float = 1e-9) -> float:
    """
    The smallest radius ``s`` (in the budget's units) such that ``deltas`` lies in the budget's ball scaled to ``s``:
    the largest, over the parameters, of the gauge of each ``δ`` with respect to its ball at radius 1 (``unit_balls``,
    resolved in float64). Found by bisection on the balls' ``excess``, so it holds for every ball; ``inf`` when a
    parameter moves where its radius is 0.
    """
    size = 0.0
    for t in unit_balls:
        d = deltas[t.param_name].detach().to(torch.float64)
        if not d.numel() or float(d.abs().max()) == 0.0:
            continue
        hi = 1.0
        while float(t.ball.excess(d, hi * t.radius)) > 0:
            hi *= 2.0
            if hi > 1e300:
                return float("inf")
        lo = 0.0 if hi == 1.0 else hi / 2
        while hi - lo > rel_tol * hi:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if float(t.ball.excess(d, mid * t.radius)) <= 0 else (mid, hi)
        size = max(size, hi)
    return size


def generalization_bound(
    classifier: PyTorchClassifier,
    x_train: np.ndarray,
    y_train: np.ndarray,
    budget: PerturbationBudget,
    margin: float = 1.0,
    delta: float = 0.05,
    method: str = "linear",
    batch_size: int = 128,
) -> dict[str, Any]:
    """
    The multi-class margin bound under weight perturbation of docs/theory.md §6, term by term.

    With probability at least ``1 − delta`` over the training sample, for the class ``F_{M,ε}`` of networks whose
    layers have ℓ∞ operator norms at most ``M_k`` (the trained model's) perturbed within row-ℓ1 radii ``ε_k``::

        error ≤ (1/n) Σ_j 1[m(x_j) ≤ γ] + (4K/γ) · R + sqrt(ln(1/δ) / (2n)),
        R = 2^{d−1} · Π_k (M_k + ε_k) · B · sqrt(2 ln(2 n_0) / n)

    (``K`` classes, ``d`` affine layers, ``B = max_j ‖x_j‖_∞``, ``n_0`` input features). With the clean margin
    ``m = f_y − max_{i≠y} f_i`` it bounds the error of the model; with the certified margin (the certifier's lower
    bound at the budget) it bounds the error of every network in the ball. The constants are the standard ones of
    Rademacher margin bounds (Massart's lemma, peeling for 1-Lipschitz activations with ``σ(0) = 0``); as usual, no
    union bound over the norms ``M_k`` is taken. Balls other than ``row_l1`` enter through their row-ℓ1 inclusions
    (§2). Biases are handled as weights on a constant input feature 1 (each ``M_k`` becomes the largest row norm of
    ``[W b]``, at least 1; ``B`` at least 1), which needs activations with ``σ(1) = 1`` (ReLU, LeakyReLU, ELU).

    :param classifier: an ART ``PyTorchClassifier`` whose model is a chain of Linear/Conv2d layers with ReLU,
        LeakyReLU (|slope| ≤ 1), ELU, hardtanh or tanh activations, average pooling and flattening between them (a
        residual network is refused with every ``method``: :class:`.UnsupportedModelError`).
    :param x_train: training inputs.
    :param y_train: training labels.
    :param budget: the ball of weight perturbations.
    :param margin: the margin γ > 0.
    :param delta: the confidence parameter δ in (0, 1).
    :param method: certification method of the certified margins (default ``"linear"``, the tightest).
    :param batch_size: samples per bound computation.
    :return: a dict with ``empirical_margin_loss``, ``certified_margin_loss``, ``rademacher_complexity`` (R),
        ``margin_factor`` (4K/γ), ``rademacher_term`` ((4K/γ)·R), ``confidence_term``, ``total`` (clean model) and
        ``total_certified`` (every network in the ball), and the ingredients ``operator_norms``, ``eps``, ``depth``,
        ``input_bound``, ``input_dim``, ``n_samples``, ``nb_classes``, ``margin``, ``delta``, ``method``.
    """
    margin = check_positive(margin, "margin")
    delta = check_probability(delta, "delta", open_interval=True)
    estimator = weight_estimator(classifier)
    if not read_network(estimator.base_model, estimator.input_shape).is_chain:
        raise UnsupportedModelError(
            "generalization_bound (docs/theory.md §6) multiplies operator norms along one chain of layers, with every "
            "method; this model has branches (residual additions). What works on it: the certified accuracy and "
            "radius with method 'interval' or 'linear' (weight_certified_accuracy, certified_weight_radius, "
            "WeightPerturbationCertifier) and the generalization measures weight_sharpness and pac_bayes_bound."
        )
    certifier = WeightPerturbationCertifier(estimator, budget, method=method, batch_size=batch_size, verbose=False)
    estimator = certifier.estimator
    x_t, y_t = estimator.prepare_inputs(x_train, y_train, require_labels=True)
    n = len(x_t)
    if n == 0:
        raise ValueError("`x_train` must hold at least one sample.")
    network = certifier.network
    norms, eps = _layer_norms(certifier)
    nb_classes = estimator.nb_classes
    clean_margin = _clean_margins(network, x_t, y_t, batch_size)
    certified_margin = certifier.margin_lower_bounds(x_train, y_train).min(axis=1)
    input_bound = float(x_t.abs().amax()) if x_t.numel() else 0.0
    input_dim = int(np.prod(estimator.input_shape))
    if any(layer.bias_name for layer in network.affine_layers):
        input_bound, input_dim = max(input_bound, 1.0), input_dim + 1
    depth = len(network.affine_layers)
    rademacher = (
        2 ** (depth - 1)
        * math.prod(m + e for m, e in zip(norms, eps))
        * input_bound
        * math.sqrt(2 * math.log(2 * input_dim) / n)
    )
    factor = 4 * nb_classes / margin
    confidence = math.sqrt(math.log(1 / delta) / (2 * n))
    empirical = float((clean_margin <= margin).double().mean())
    certified = float(np.mean(certified_margin <= margin))
    return {
        "empirical_margin_loss": empirical,
        "certified_margin_loss": certified,
        "rademacher_complexity": rademacher,
        "margin_factor": factor,
        "rademacher_term": factor * rademacher,
        "confidence_term": confidence,
        "total": empirical + factor * rademacher + confidence,
        "total_certified": certified + factor * rademacher + confidence,
        "operator_norms": norms,
        "eps": eps,
        "depth": depth,
        "input_bound": input_bound,
        "input_dim": input_dim,
        "n_samples": n,
        "nb_classes": nb_classes,
        "margin": margin,
        "delta": delta,
        "method": certifier.method,
    }


def _clean_margins(network, x_t: torch.Tensor, y_t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``f_y(x) − max_{i≠y} f_i(x)`` per sample, in float64."""
    with torch.no_grad():
        logits = torch.cat([network.forward(x_t[b].to(torch.float64)) for b in batch_slices(len(x_t), batch_size)])
    own = logits.gather(1, y_t.unsqueeze(1)).squeeze(1)
    return own - logits.scatter(1, y_t.unsqueeze(1), -math.inf).amax(dim=1)


def _layer_norms(certifier: WeightPerturbationCertifier) -> tuple[list[float], list[float]]:
    """``M_k`` (ℓ∞ operator norm, max row ℓ1 of ``[W b]``) and ``ε_k`` (row-ℓ1 radius, plus the bias radius) per
    affine layer of the certifier's network, checked against the assumptions of the bound."""
    network = certifier.network
    has_bias = any(layer.bias_name for layer in network.affine_layers)
    for layer in network.layers:
        reason = layer.rademacher_refusal(has_bias)
        if reason is not None:
            raise UnsupportedModelError(reason)
    params = network.params(dtype=torch.float64)
    param_balls = certifier.parameter_balls
    norms, eps = [], []
    for layer in network.affine_layers:
        weight = params[layer.weight_name]
        rows = weight.reshape(weight.shape[0], -1).abs().sum(dim=1)
        if layer.bias_name:
            rows = rows + params[layer.bias_name].abs()
        radius = torch.zeros_like(rows)
        wt = param_balls.get(layer.weight_name)
        if wt is not None:
            radius = radius + wt.ball.row_l1_radius(wt.radius, weight.shape)
        bt = param_balls.get(layer.bias_name) if layer.bias_name else None
        if bt is not None:
            radius = radius + bt.ball.entry_bound(bt.radius, (len(rows),))
        norms.append(max(float(rows.max()), 1.0) if has_bias else float(rows.max()))
        eps.append(float(radius.max()))
    return norms, eps
