"""
Interval bound propagation with weight intervals (THEORY.md §4, the ``"interval"`` method; beyond the paper).

Boxes ``[l, u]`` of every activation of the perturbed network are propagated layer by layer with the rules in
:data:`INTERVAL_RULES` (one entry per layer type). For an affine layer ``ẑ = (W + Δ) ĥ + (b + Δb)`` with
``ĥ ∈ [c − r, c + r]`` and ``|ĥ| ≤ m``::

    ẑ ∈ W c + b ± ( |W| r + P(m) + β )

``P(m)`` is the ball's bound on ``|Δ ĥ|`` (:meth:`.Ball.interval_term`), ``β`` the bias ball's entry bound. The last
layer is folded into the margin specification (rows ``e_y − e_i``), as auto_LiRPA's C matrix: the margin
``(Ŵ_y − Ŵ_i)·ĥ + b_y − b_i`` gets the perturbation term ``P_y + P_i``.

Everything is plain torch: float64 for certificates (THEORY.md §5), float32 and differentiable for training.
"""

from __future__ import annotations

import torch

from art_weightpert.budget import Target
from art_weightpert.network import Activation, Affine, AvgPool, BatchNorm, Flatten, MaxPool, Network


def _monotone(fn):
    return lambda layer, lo, hi: (fn(layer, lo), fn(layer, hi))


def _batchnorm(layer: BatchNorm, lo: torch.Tensor, hi: torch.Tensor):
    c, r = (hi + lo) / 2, (hi - lo) / 2
    center = layer.apply(c)
    radius = r * layer.shaped(layer.scale, r).abs()
    return center - radius, center + radius


# Fixed layers: how a box [lo, hi] maps through them.
INTERVAL_RULES = {
    Activation: _monotone(lambda layer, t: layer.apply(t)),
    MaxPool: _monotone(lambda layer, t: layer.apply(t)),
    AvgPool: _monotone(lambda layer, t: layer.apply(t)),  # non-negative weights: monotone
    Flatten: _monotone(lambda layer, t: layer.apply(t)),
    BatchNorm: _batchnorm,
}


def perturbation_radius(
    layer: Affine, m: torch.Tensor, targets: dict[str, Target], dtype: torch.dtype
) -> torch.Tensor | float:
    """``P(m) + β``: bound on ``|Δ ĥ + Δb|`` at the output of ``layer`` for ``|ĥ| ≤ m`` (0 if not perturbed)."""
    out: torch.Tensor | float = 0.0
    wt = targets.get(layer.weight_name)
    if wt is not None:
        out = wt.ball.interval_term(layer, m, wt.radius.to(dtype))
    bt = targets.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        beta = bt.ball.entry_bound(bt.radius.to(dtype), layer.module.bias.shape)
        out = out + layer.rows_shape(beta)
    return out


def affine_interval(
    layer: Affine,
    params: dict[str, torch.Tensor],
    lo: torch.Tensor,
    hi: torch.Tensor,
    targets: dict[str, Target],
    exact_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box of ``(W + Δ) ĥ + b + Δb`` over the ball and ``ĥ ∈ [lo, hi]`` (``exact_input``: ``lo == hi``)."""
    weight = params[layer.weight_name]
    bias = params[layer.bias_name] if layer.bias_name else None
    center = layer.apply((lo + hi) / 2, weight, bias)
    radius = perturbation_radius(layer, torch.maximum(lo.abs(), hi.abs()), targets, lo.dtype)
    if not exact_input:
        radius = radius + layer.apply((hi - lo) / 2, weight.abs())
    return center - radius, center + radius


def margin_matrix(labels: torch.Tensor, nb_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Specification ``C`` of shape ``(N, K, K)``: row ``i`` is ``e_y − e_i`` (the row ``i = y`` is zero)."""
    eye = torch.eye(nb_classes, dtype=dtype, device=labels.device)
    return eye[labels].unsqueeze(1) - eye.unsqueeze(0)


def interval_preactivation_bounds(
    network: Network, targets: dict[str, Target], x: torch.Tensor, params: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Boxes of the input of every layer of ``network`` (index ``i``: the input of ``network.layers[i]``)."""
    lo = hi = x
    boxes = []
    exact = True
    for layer in network.layers:
        boxes.append((lo, hi))
        if isinstance(layer, Affine):
            lo, hi = affine_interval(layer, params, lo, hi, targets, exact_input=exact)
            exact = False
        else:
            lo, hi = INTERVAL_RULES[type(layer)](layer, lo, hi)
    return boxes


def interval_margin_bounds(
    network: Network,
    targets: list[Target] | dict[str, Target],
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    boxes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """
    Lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball (THEORY.md §4).

    :param network: the model read by :func:`.read_network`.
    :param targets: the budget resolved on the model (:meth:`.PerturbationBudget.targets`).
    :param x: preprocessed inputs ``(N, ...)``.
    :param labels: classes ``y`` ``(N,)`` (int64).
    :param dtype: float64 for certificates; float32 keeps the training graph cheap (differentiable either way).
    :param boxes: precomputed :func:`interval_preactivation_bounds` (in ``dtype``), to share them with other methods.
    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column.
    """
    targets = _by_name(targets)
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    if boxes is None:
        boxes = interval_preactivation_bounds(network, targets, x, params)
    last = network.layers[-1]
    lo, hi = boxes[-1]
    c, r = (lo + hi) / 2, (hi - lo) / 2
    m = torch.maximum(lo.abs(), hi.abs())
    weight = params[last.weight_name]
    nb_classes = weight.shape[0]
    spec = margin_matrix(labels, nb_classes, dtype)  # (N, K, K)
    w_spec = spec @ weight  # (N, K, n): rows W_y − W_i
    value = torch.einsum("nkj,nj->nk", w_spec, c)
    if last.bias_name:
        value = value + spec @ params[last.bias_name]
    exact_input = len(network.affine_layers) == 1
    if not exact_input:
        value = value - torch.einsum("nkj,nj->nk", w_spec.abs(), r)
    pert = perturbation_radius(last, m, targets, dtype)  # (N, K) or 0: bound per logit row
    if not isinstance(pert, float):
        pert = pert.expand(len(x), nb_classes)
        value = value - (pert.gather(1, labels.unsqueeze(1)) + pert)
    return _fill_label(value, labels)


def _fill_label(bounds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Set the label's own column to ``+inf``."""
    inf = torch.full_like(labels, 0, dtype=bounds.dtype).unsqueeze(1) + float("inf")
    return bounds.scatter(1, labels.unsqueeze(1), inf)


def _by_name(targets: list[Target] | dict[str, Target]) -> dict[str, Target]:
    return targets if isinstance(targets, dict) else {t.param_name: t for t in targets}
