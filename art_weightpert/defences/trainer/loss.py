"""The regularisation terms of :class:`.WeightRobustTrainer`'s loss (docs/theory.md §7), differentiable in the
weights."""

from __future__ import annotations

import torch

from art_weightpert.network import Network


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


__all__ = ["operator_norm_sum", "robust_term"]
