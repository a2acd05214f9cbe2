"""
Certification metrics in ART's function style (the classifier first, numpy in and out): certified accuracy, certified
radii and the Rademacher generalization bound under weight perturbation (THEORY.md §3–§6).

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.network import Activation, Affine, AvgPool, Flatten, UnsupportedModelError

logger = logging.getLogger(__name__)


def weight_certified_accuracy(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    method: str = "interval",
    batch_size: int = 128,
    verbose: bool = False,
) -> float:
    """
    Share of ``(x, y)`` classified correctly by *every* network in the weight ball, as certified by ``method``.

    :param classifier: an ART ``PyTorchClassifier`` (or :class:`.PyTorchWeightClassifier`).
    :param x: inputs ``(N,) + input_shape``.
    :param y: integer or one-hot labels.
    :param budget: the ball of weight perturbations.
    :param method: a bound method of the registry :data:`.METHODS` (``"paper"``, ``"interval"``, ``"linear"``).
    :param batch_size: samples per bound computation.
    :param verbose: show a progress bar.
    :return: the certified accuracy (``nan`` for an empty set).
    """
    certifier = WeightPerturbationCertifier(classifier, budget, method=method, batch_size=batch_size, verbose=verbose)
    certified = certifier.certify(x, _required(y))
    return float(np.mean(certified)) if len(certified) else float("nan")


def certified_weight_radius(
    classifier: PyTorchClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget,
    method: str = "interval",
    batch_size: int = 128,
    verbose: bool = False,
) -> np.ndarray:
    """
    Per sample, the largest radius of ``budget``'s ball for which the correct prediction is certified (``eps`` in the
    budget's units, or the factor applied to a per-layer ``eps`` dict; 0 where the clean prediction is wrong).

    :param classifier: an ART ``PyTorchClassifier``.
    :param x: inputs.
    :param y: integer or one-hot labels.
    :param budget: the ball (its ``eps`` sets the starting point of the search and the units of a dict).
    :param method: a bound method of the registry :data:`.METHODS`.
    :param batch_size: samples per bound computation.
    :param verbose: show a progress bar.
    :return: ``(N,)`` radii.
    """
    certifier = WeightPerturbationCertifier(classifier, budget, method=method, batch_size=batch_size, verbose=verbose)
    return certifier.certified_radius(x, _required(y))


def generalization_bound(
    classifier: PyTorchClassifier,
    x_train: np.ndarray,
    y_train: np.ndarray,
    budget: PerturbationBudget,
    margin: float = 1.0,
    delta: float = 0.05,
    method: str = "paper",
    batch_size: int = 128,
) -> dict[str, Any]:
    """
    The multi-class margin bound under weight perturbation of THEORY.md §6, term by term.

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
    ``[W b]``, at least 1; ``B`` at least 1), which needs ReLU or LeakyReLU activations.

    :param classifier: an ART ``PyTorchClassifier`` whose model is a chain of Linear/Conv2d layers with ReLU,
        LeakyReLU (|slope| ≤ 1) or tanh activations, average pooling and flattening between them.
    :param x_train: training inputs.
    :param y_train: training labels.
    :param budget: the ball of weight perturbations.
    :param margin: the margin γ > 0.
    :param delta: the confidence parameter δ in (0, 1).
    :param method: certification method of the certified margins.
    :param batch_size: samples per bound computation.
    :return: a dict with ``empirical_margin_loss``, ``certified_margin_loss``, ``rademacher_complexity`` (R),
        ``margin_factor`` (4K/γ), ``rademacher_term`` ((4K/γ)·R), ``confidence_term``, ``total`` (clean model) and
        ``total_certified`` (every network in the ball), and the ingredients ``operator_norms``, ``eps``, ``depth``,
        ``input_bound``, ``input_dim``, ``n_samples``, ``nb_classes``, ``margin``, ``delta``, ``method``.
    """
    margin = _positive_number(margin, "margin")
    delta = _positive_number(delta, "delta")
    if not delta < 1:
        raise ValueError(f"`delta` must lie in (0, 1), got {delta}.")
    certifier = WeightPerturbationCertifier(classifier, budget, method=method, batch_size=batch_size, verbose=False)
    estimator = certifier.estimator
    x_t, y_t = estimator.prepare_inputs(x_train, _required(y_train), require_labels=True)
    n = len(x_t)
    if n == 0:
        raise ValueError("`x_train` must hold at least one sample.")
    network = certifier.network
    norms, eps = _layer_norms(certifier)
    nb_classes = estimator.nb_classes
    with torch.no_grad():
        logits = torch.cat(
            [network.forward(x_t[s : s + batch_size].to(torch.float64)) for s in range(0, n, batch_size)]
        )
    own = logits.gather(1, y_t.unsqueeze(1)).squeeze(1)
    clean_margin = own - logits.scatter(1, y_t.unsqueeze(1), -math.inf).amax(dim=1)
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


def _layer_norms(certifier: WeightPerturbationCertifier) -> tuple[list[float], list[float]]:
    """``M_k`` (ℓ∞ operator norm, max row ℓ1 of ``[W b]``) and ``ε_k`` (row-ℓ1 radius, plus the bias radius) per
    affine layer of the certifier's network, checked against the assumptions of the bound."""
    network = certifier.network
    has_bias = any(layer.bias_name for layer in network.affine_layers)
    for layer in network.layers:
        if isinstance(layer, Activation):
            if layer.kind == "sigmoid" or (layer.kind == "leaky_relu" and abs(layer.negative_slope) > 1):
                raise UnsupportedModelError(
                    f"generalization_bound needs 1-Lipschitz activations with σ(0) = 0; {layer.name!r} is {layer.kind}."
                )
            if has_bias and layer.kind == "tanh":
                raise UnsupportedModelError(
                    f"generalization_bound handles biases with ReLU/LeakyReLU activations only; {layer.name!r} is tanh."
                )
        elif not isinstance(layer, (Affine, AvgPool, Flatten)):
            raise UnsupportedModelError(
                f"generalization_bound supports Linear/Conv2d, activations, average pooling and flattening; "
                f"{layer.name!r} is a {type(layer).__name__}."
            )
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


def _required(y: Any) -> Any:
    if y is None:
        raise ValueError("labels `y` are required.")
    return y


def _positive_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
    return value
