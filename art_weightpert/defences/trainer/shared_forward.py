"""
What :class:`.WeightRobustTrainer`'s cross-entropy forward shares with the margin bound.

The cross-entropy runs the model in train mode; the bound reads the network with eval semantics (:func:`.read_network`).
Where the two agree — no dropout, and no batch norm unless it is frozen in eval mode (:mod:`.batch_norm`): the only
layers the reader accepts whose train-mode forward differs — the model's own forward (``est.logits``) serves the bound
too, which then skips that work (:attr:`.BoundMethod.clean_values`, ``clean_values=``): the margins ``m`` of the
``"paper"`` bound (docs/theory.md §3) are the logits', and the ``"interval"`` bound centres the box of an affine layer
on an exact input (the first layer's) on that layer's clean output (§4), which :func:`affine_outputs` keeps on the way.
One backward pass through the shared values carries the gradients of both terms. The values are those of the separate
passes; the gradients equal theirs up to rounding (a shared layer's weight gradient is one product of the summed output
gradients instead of the sum of two products).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Collection, Iterator

import torch
from torch import nn

from art_weightpert.defences.trainer.batch_norm import frozen_batch_norm
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.network import Affine, BatchNorm, Network
from art_weightpert.torch_tools import kept_training_flags

# modules the network reader reads as the identity (eval mode) whose train-mode forward is not the identity
_TRAIN_ONLY_MODULES = (nn.modules.dropout._DropoutNd,)  # pylint: disable=protected-access


def train_matches_eval(
    network: Network, model: nn.Module, input_shape: tuple[int, ...], batch_norm_frozen: bool = False
) -> bool:
    """Whether ``model`` in train mode computes what ``network`` (its eval-semantics reading) computes: no dropout, no
    batch norm unless ``batch_norm_frozen`` (kept in eval mode, :func:`.frozen_batch_norm`), and the train-mode forward
    reproduces the network's on three random inputs (a forward that branches on ``self.training`` may not)."""
    if not batch_norm_frozen and any(isinstance(layer, BatchNorm) for layer in network.layers):
        return False
    if any(isinstance(module, _TRAIN_ONLY_MODULES) for module in model.modules()):
        return False
    x = torch.rand((3, *input_shape), generator=torch.Generator().manual_seed(0)).to(next(model.parameters()))
    with kept_training_flags(model):  # each submodule's own flag back (model.train() sets them all)
        with frozen_batch_norm(model) if batch_norm_frozen else contextlib.nullcontext(), torch.no_grad():
            model.train()
            return torch.allclose(model(x), network.forward(x), rtol=1e-5, atol=1e-6)


class SharedForward:
    """
    The cross-entropy forward of a trainer on ``network`` (its model read once), shared with the bound: which values
    the bound takes (:meth:`values`), the forward that keeps them (:meth:`forward`) and the hooks that keep the affine
    outputs during a run (:meth:`hooks`).
    """

    def __init__(self, estimator: PyTorchWeightClassifier, network: Network) -> None:
        self.estimator, self.network = estimator, network
        self.outputs: dict[int, torch.Tensor] | None = None  # kept by the hooks while they are active
        self._matches: dict[bool, bool] = {}  # train_matches_eval by "batch norm frozen", checked once each

    def values(self, clean_values: str | None, batch_norm_frozen: bool) -> str | None:
        """What of the forward serves a bound that takes ``clean_values`` (:attr:`.BoundMethod.clean_values`):
        ``clean_values`` itself, or ``None`` where train and eval semantics differ."""
        if batch_norm_frozen not in self._matches:
            model, shape = self.estimator.base_model, self.estimator.input_shape
            self._matches[batch_norm_frozen] = train_matches_eval(self.network, model, shape, batch_norm_frozen)
        return clean_values if self._matches[batch_norm_frozen] else None

    def forward(
        self, x: torch.Tensor, values: str, perturbed: Collection[str]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The logits of the model's own forward and the clean values the bound takes: for ``"affine"`` also the
        outputs of the affine modules, kept by the hooks of :meth:`hooks` (a run's, or outside a run this call's)."""
        if values == "affine" and self.outputs is None:
            with self.hooks(values, perturbed):
                return self.forward(x, values, perturbed)
        outputs = self.outputs if self.outputs is not None else {}
        outputs.clear()  # (an attack may have run the model since the last step)
        logits = self.estimator.logits(x)
        return logits, {**outputs, len(self.network.layers): logits}

    @contextlib.contextmanager
    def hooks(self, values: str | None, perturbed: Collection[str]) -> Iterator[None]:
        """While active, :attr:`outputs` holds the outputs of the affine modules whose centres the bound takes
        (:func:`affine_outputs`), when it takes them (``"affine"``); a trainer keeps the hooks for an epoch, since
        registering them at every step costs 20 µs, and a hooked module about 20 µs more per forward."""
        if values != "affine":
            yield
            return
        with affine_outputs(self.network, perturbed) as outputs:
            self.outputs = outputs
            try:
                yield
            finally:
                self.outputs = None


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


__all__ = ["SharedForward", "affine_outputs", "train_matches_eval"]
