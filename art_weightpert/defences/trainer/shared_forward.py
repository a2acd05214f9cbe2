"""
What :class:`.WeightRobustTrainer`'s cross-entropy forward shares with the margin bound.

The cross-entropy runs the model in train mode; the bound reads the network with eval semantics (:func:`.read_network`).
Where the two agree — no dropout and no batch norm, the only layers the reader accepts whose train-mode forward differs
— the model's own forward (``est.logits``) serves the bound too, which then skips that work
(:attr:`.BoundMethod.clean_values`, ``clean_values=``): the margins ``m`` of the ``"paper"`` bound (THEORY.md §3) are
the logits', and the ``"interval"`` bound centres the box of an affine layer on an exact input (the first layer's) on
that layer's clean output (§4), which :func:`affine_outputs` keeps on the way. One backward pass through the shared
values carries the gradients of both terms. The values are those of the separate passes; the gradients equal theirs up
to rounding (a shared layer's weight gradient is one product of the summed output gradients instead of the sum of two
products).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Collection, Iterator

import torch
from torch import nn

from art_weightpert.network import Affine, BatchNorm, Network

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


@contextlib.contextmanager
def affine_outputs(network: Network, perturbed: Collection[str] = ()) -> Iterator[dict[int, torch.Tensor]]:
    """
    While active, the outputs of ``network``'s affine modules (Linear, Conv2d) in the model's own forward passes, by
    value index (``i + 1`` for ``network.layers[i]``, the indexing of :func:`.interval_preactivation_bounds`), for
    the layers whose input depends on none of the ``perturbed`` parameters (by name): the centres the interval bound
    can take. A module that several layers share is left out; the hooks are removed on exit, also after an
    exception.
    """
    uses = Counter(id(layer.module) for layer in network.affine_layers)
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    perturbed = set(perturbed)
    exact = [True]  # per value: depends on no perturbed parameter
    try:
        for index, (layer, reads) in enumerate(zip(network.layers, network.inputs)):
            exact_input = all(exact[v] for v in reads)
            affine = isinstance(layer, Affine)
            if affine and exact_input and uses[id(layer.module)] == 1:
                handles.append(layer.module.register_forward_hook(_keep_output(outputs, index + 1)))
            perturbed_here = affine and bool({layer.weight_name, layer.bias_name} & perturbed)
            exact.append(exact_input and not perturbed_here)
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _keep_output(outputs: dict[int, torch.Tensor], index: int):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs[index] = output

    return hook


__all__ = ["affine_outputs", "train_matches_eval"]
