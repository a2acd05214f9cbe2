"""
What :class:`.WeightRobustTrainer`'s cross-entropy forward shares with the margin bound.

The cross-entropy runs the model in train mode; the bound reads the network with eval semantics (:func:`.read_network`).
Where the two agree — no dropout and no batch norm, the only layers the reader accepts whose train-mode forward
differs — the model's logits *are* the network's clean logits, so a bound that takes them (``logits=``: the margins
``m`` of the ``"paper"`` bound, THEORY.md §3) skips its own forward pass, and one backward pass through the model
carries the gradients of both terms. The values and gradients are those of the separate passes.
"""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn

from art_weightpert.certification.registry import METHODS
from art_weightpert.network import BatchNorm, Network

# modules the network reader reads as the identity (eval mode) whose train-mode forward is not the identity
_TRAIN_ONLY_MODULES = (nn.modules.dropout._DropoutNd,)  # pylint: disable=protected-access


def train_matches_eval(network: Network, model: nn.Module) -> bool:
    """Whether ``model`` in train mode computes what ``network`` (its eval-semantics reading) computes: no batch norm
    and no dropout."""
    if any(isinstance(layer, BatchNorm) for layer in network.layers):
        return False
    return not any(isinstance(module, _TRAIN_ONLY_MODULES) for module in model.modules())


@cache
def takes_logits(bound: str) -> bool:
    """Whether the bound function of the method ``bound`` accepts the clean logits (a ``logits`` keyword)."""
    return "logits" in inspect.signature(METHODS[bound].bounds).parameters


__all__ = ["takes_logits", "train_matches_eval"]
