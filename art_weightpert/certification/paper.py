"""
The closed-form margin bound in the setting of Tsai et al. (docs/theory.md §3, formula B with §3.4's bias terms; the
``"paper"`` method).

Two scalars per sample are carried through the chain: ``N ≥ ‖ĥ‖_∞`` (the perturbed activations) and
``D ≥ ‖ĥ − h‖_∞`` (their change). Starting from ``N = B = ‖x‖_∞`` and ``D = 0``, an affine layer ``k`` gives::

    D ← a_k D + ε_k N + β_k          N ← (a_k + ε_k) N + ‖b^k‖_∞ + β_k

with ``a_k = max_r ‖W^k_{r,:}‖_1``, ``ε_k`` the layer's row_l1 radius (other balls through the inclusions of §2) and
``β_k`` the bias perturbation bound. Fixed layers scale ``D`` by their ℓ∞ Lipschitz constant and ``N`` by their
norm bound (:meth:`.Operator.paper`). The last layer gives ``η_{y,i} = ‖W_y − W_i‖_1 D + (ε_y + ε_i) N + β_y + β_i``
and the bound ``m_{y,i}(x) − η_{y,i}``. Bias-free ReLU chains reduce exactly to formula B. The bound uses norm
products and ``‖x‖_∞`` only, not the data-dependent refinement of §3.2.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from art_weightpert.budget import ParameterBall
from art_weightpert.certification.common import BoundCache, ParamBalls, by_param_name, cached, fill_label
from art_weightpert.network import Affine, Network, UnsupportedModelError
from art_weightpert.operators import rule_table
from art_weightpert.rounding import gamma, round_down, up_cast

PAPER_RULES = rule_table("paper")
"""Formula B's step through every fixed operator (:meth:`.Operator.paper`), by operator class."""


def layer_constants(layer: Affine, params: dict[str, torch.Tensor], param_balls: dict[str, ParameterBall], dtype):
    """``(a, ε per row, β per row, ‖b‖_∞)`` of one affine layer; ε and β are ``None`` when unperturbed, ``‖b‖_∞`` is
    ``None`` without a bias (a zero term: the bound skips it, which changes neither its value nor its gradient)."""
    a, b_norm = _weight_constants(layer, params)
    return (a, *_radius_constants(layer, params, param_balls, dtype), b_norm)


def _weight_constants(layer: Affine, params: dict[str, torch.Tensor]):
    """``(a, ‖b‖_∞ or None)``: the largest row ℓ1 norm of the weight and the bias's largest entry."""
    weight = params[layer.weight_name]
    a = weight.reshape(weight.shape[0], -1).abs().sum(dim=1).max()
    return a, params[layer.bias_name].abs().max() if layer.bias_name else None


def _radius_constants(layer: Affine, params: dict[str, torch.Tensor], param_balls: dict[str, ParameterBall], dtype):
    """``(ε per row or None, β per row or None)``: row ℓ1 radii of the weight ball, entry bounds of the bias ball."""
    weight = params[layer.weight_name]
    wt = param_balls.get(layer.weight_name)
    eps = wt.ball.row_l1_radius(wt.radius.to(dtype), weight.shape) if wt is not None else None
    bt = param_balls.get(layer.bias_name) if layer.bias_name else None
    beta = bt.ball.entry_bound(bt.radius.to(dtype), (weight.shape[0],)) if bt is not None else None
    return eps, beta


def _constants(layer: Affine, params, param_balls: dict[str, ParameterBall], dtype, cache: BoundCache | None):
    """:func:`layer_constants`, memoized on the layer's parameters and radius tensors when a cache is given."""
    names = (layer.weight_name, layer.bias_name)
    radii = [t.radius for t in (param_balls.get(name) for name in names if name) if t is not None]
    tensors = [params[name] for name in names if name] + radii
    return cached(
        cache, f"paper_constants/{dtype}", tensors, lambda: layer_constants(layer, params, param_balls, dtype)
    )


def _sum(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not ``None`` (absent terms are zeros), left to right; ``None`` when all are."""
    total = None
    for t in terms:
        if t is not None:
            total = t if total is None else total + t
    return total


def _times(factor: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor | None:
    """``factor · t``, ``None`` when ``t`` is absent (zero); ``factor=None`` is a factor of 1."""
    return t if t is None or factor is None else factor * t


def _propagate(network: Network, params, param_balls, n: torch.Tensor, s: torch.Tensor | None, dtype, cache):
    """``(N, D)`` at the input of the last layer, from ``N = ‖x‖_∞`` and ``D = 0`` (``D`` is ``None`` while it is
    exactly zero, so that zero terms are skipped); ``s``: per-sample radius factors or ``None``."""
    d = None
    for layer in network.layers[:-1]:
        if layer.weighted:
            a, eps, beta, b_norm = _constants(layer, params, param_balls, dtype, cache)
            eps_max = _times(s, None if eps is None else eps.max())
            beta_max = _times(s, None if beta is None else beta.max())
            d = _sum(None if d is None else a * d, None if eps_max is None else eps_max * n, beta_max)
            n = _sum((a if eps_max is None else a + eps_max) * n, b_norm, beta_max)
        else:
            n, d_out = PAPER_RULES[type(layer)](layer, n, torch.zeros_like(n) if d is None else d)
            d = None if d is None else d_out
    return n, d


def paper_margin_bounds(
    network: Network,
    param_balls: ParamBalls,
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    scale: torch.Tensor | None = None,
    cache: BoundCache | None = None,
    *,
    clean_values: Mapping[int, torch.Tensor] | None = None,
    rounding: bool = False,
) -> torch.Tensor:
    """
    Lower bounds ``m_{y,i}(x) − η_{y,i}`` of every pairwise margin over the ball (docs/theory.md §3, formula B).

    Arguments and return value as :func:`.interval_margin_bounds` (``scale``: optional per-sample factors ``(N,)``
    multiplying every radius; ``cache``: optional :class:`.BoundCache` of the per-layer constants).

    :param clean_values: values of the clean network on ``x`` that the caller has already (``{value index:
        tensor}``, the trainer's cross-entropy forward where train and eval semantics agree): the margins ``m`` are
        taken from the logits among them (index ``len(network.layers)``) instead of a second forward pass, and their
        gradient joins the caller's.
    :param rounding: sound for the exact real-number network despite floating-point evaluation (docs/theory.md §5):
        the clean margins' lower bound from the interval bound without a ball (with its rounding terms), ``η`` from
        float64 constants inflated by the rounding of its recursion and rounded up to ``dtype``.
    """
    if rounding:
        return _rounded_paper(network, param_balls, x, labels, dtype, scale, cache)
    if not network.is_chain:  # the registry's check (chains_only) says why; also for direct calls
        raise UnsupportedModelError(
            "formula B (method 'paper') is defined for chains of layers; this model has branches (residual additions)."
        )
    param_balls = by_param_name(param_balls)
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    logits = (clean_values or {}).get(len(network.layers))
    logits = network.forward(x, params) if logits is None else logits.to(dtype)
    eta = _eta(network, params, param_balls, x, labels, dtype, scale, cache)
    margins = logits.gather(1, labels.unsqueeze(1)) - logits
    return fill_label(margins if eta is None else margins - eta, labels)


def _eta(network: Network, params, param_balls, x, labels, dtype, scale, cache) -> torch.Tensor | None:
    """``η_{y,i}`` ``(N, K)`` of formula B, ``None`` when it is zero (nothing perturbed)."""
    s = None if scale is None else scale.to(dtype)
    n, d = _propagate(network, params, param_balls, x.flatten(1).abs().amax(dim=1), s, dtype, cache)  # N₀ = ‖x‖_∞
    last = network.layers[-1]
    balls = [param_balls.get(name) for name in (last.weight_name, last.bias_name) if name]
    eps, beta = cached(
        cache,
        f"paper_radii/{last.name}/{dtype}",
        [t.radius for t in balls if t is not None],
        lambda: _radius_constants(last, params, param_balls, dtype),
    )
    s_col = None if s is None else s.unsqueeze(1)
    eta = None
    if d is not None:
        weight = params[last.weight_name]
        pair_dw = cached(  # ‖W_y − W_i‖_1, (K, K)
            cache, "pair_dw", (weight,), lambda: (weight.unsqueeze(1) - weight.unsqueeze(0)).abs().sum(dim=2)
        )
        eta = pair_dw[labels] * d.unsqueeze(1)
    if eps is not None:  # (ε_y + ε_i) N
        eta = _sum(eta, _times(s_col, eps[labels].unsqueeze(1) + eps.unsqueeze(0)) * n.unsqueeze(1))
    if beta is not None:  # β_y + β_i
        eta = _sum(eta, _times(s_col, beta[labels].unsqueeze(1) + beta.unsqueeze(0)))
    return eta


def _rounded_paper(network: Network, param_balls, x, labels, dtype, scale, cache) -> torch.Tensor:
    """:func:`paper_margin_bounds` with ``rounding`` (docs/theory.md §5)."""
    from art_weightpert.certification.interval import interval_margin_bounds  # interval imports nothing from here

    if not network.is_chain:
        raise UnsupportedModelError(
            "formula B (method 'paper') is defined for chains of layers; this model has branches (residual additions)."
        )
    param_balls = by_param_name(param_balls)
    clean = interval_margin_bounds(network, {}, x, labels, dtype, rounding=True)  # ≤ the exact clean margins
    params = network.params(dtype=torch.float64)  # new tensors at each call: no cache
    eta = _eta(network, params, param_balls, x.double(), labels, torch.float64, scale, None)
    if eta is None:
        return clean
    # the float64 recursion: a few roundings per layer and the norms' sums, each within γ of the value
    length = sum(t.numel() for t in params.values()) + 64 * len(network.layers)
    eta = up_cast(eta * (1 + 2 * gamma(length, torch.float64)), dtype)
    return fill_label(round_down(clean - eta), labels)
