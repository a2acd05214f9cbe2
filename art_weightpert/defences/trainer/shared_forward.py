"""
What :class:`.WeightRobustTrainer`'s cross-entropy forward shares with the margin bound.

The cross-entropy runs the model in train mode; the bound reads the network with eval semantics (:func:`.read_network`).
Where the two agree — no dropout and no batch norm, the only layers the reader accepts whose train-mode forward differs
— the trainer runs the cross-entropy's forward through the network (:meth:`.Network.values`), and a bound that takes its
values (:attr:`.BoundMethod.takes_clean_values`, ``clean_values=``) skips its own forward work: the margins ``m`` of the
``"paper"`` bound (THEORY.md §3) are the logits', and the ``"interval"`` bound centres the box of an affine layer on an
exact input (the first layer's) on that layer's clean output (§4). One backward pass through the shared values carries
the gradients of both terms; the values and gradients are those of the separate passes.
"""

from __future__ import annotations

import torch
from torch import nn

from art_weightpert.network import BatchNorm, Network

# modules the network reader reads as the identity (eval mode) whose train-mode forward is not the identity
_TRAIN_ONLY_MODULES = (nn.modules.dropout._DropoutNd,)  # pylint: disable=protected-access


def train_matches_eval(network: Network, model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether ``model`` in train mode computes what ``network`` (its eval-semantics reading) computes: no batch norm,
    no dropout, and the train-mode forward reproduces the network's on three random inputs (a forward that branches on
    ``self.training`` may not)."""
    if any(isinstance(layer, BatchNorm) for layer in network.layers):
        return False
    if any(isinstance(module, _TRAIN_ONLY_MODULES) for module in model.modules()):
        return False
    x = torch.rand((3, *input_shape), generator=torch.Generator().manual_seed(0)).to(next(model.parameters()))
    flags = {m: m.training for m in model.modules()}
    model.train()
    try:
        with torch.no_grad():
            return torch.allclose(model(x), network.forward(x), rtol=1e-5, atol=1e-6)
    finally:
        for m, flag in flags.items():  # each submodule's own flag (model.train() set them all)
            m.training = flag


__all__ = ["train_matches_eval"]
