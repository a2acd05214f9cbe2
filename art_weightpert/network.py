"""
Reads a torch model as a directed acyclic graph of layers (docs/theory.md §1, §9), for the certificates.

:func:`read_network` traces the model with ``torch.fx`` (:mod:`.graph`) and returns a :class:`Network`: layer
operators in topological order (:class:`Affine`, :class:`Activation`, :class:`BatchNorm`, :class:`AvgPool`,
:class:`MaxPool`, :class:`Flatten`, :class:`Add`; defined in :mod:`art_weightpert.operators` and re-exported here) and
the values each one reads. Anything else raises :class:`UnsupportedModelError` naming the module or node and the reason.
:meth:`Network.forward` is the one forward of a read network, also with per-sample weight deltas (the per-sample
attack). The estimator and the universal attacks do not need this reader: they work on any differentiable model.

:func:`perturbable_modules` is the single definition of which layers a weight budget can select.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from art_weightpert.graph import describe, read_graph
from art_weightpert.operators import (
    Activation,
    Add,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    Layer,
    MaxPool,
    UnsupportedModelError,
    conv_padding,
)
from art_weightpert.torch_tools import eval_mode

__all__ = [
    "PERTURBABLE_TYPES",
    "Activation",
    "Add",
    "Affine",
    "AvgPool",
    "BatchNorm",
    "Flatten",
    "Layer",
    "MaxPool",
    "Network",
    "UnsupportedModelError",
    "conv_padding",
    "perturbable_modules",
    "read_network",
]

PERTURBABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def perturbable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv module of ``model`` by its name in ``model.named_modules()``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PERTURBABLE_TYPES)}


@dataclass(eq=False)
class Network:
    """
    A model read as a directed acyclic graph of layers in topological order; the last layer is an :class:`Affine`
    (the logits).

    Value 0 is the model's input and value ``i + 1`` the output of ``layers[i]``; ``inputs[i]`` lists the values
    ``layers[i]`` reads (one, or several for an :class:`Add`). ``inputs=None`` makes a chain: ``inputs[i] = (i,)``.
    """

    model: nn.Module
    layers: list = field(default_factory=list)
    inputs: list | None = None
    _sizes: dict = field(default_factory=dict, init=False, repr=False)  # memo of value_sizes

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = [(i,) for i in range(len(self.layers))]

    @property
    def is_chain(self) -> bool:
        """Whether every layer reads the output of the layer before it (a chain: no branch)."""
        return all(tuple(reads) == (i,) for i, reads in enumerate(self.inputs))

    @property
    def affine_layers(self) -> list[Affine]:
        return [layer for layer in self.layers if layer.weighted]

    def params(self, overrides: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        """``{parameter name: tensor}`` of the affine layers, with ``overrides`` substituted, cast to ``dtype``."""
        named = dict(self.model.named_parameters())
        out = {}
        for layer in self.affine_layers:
            for name in (layer.weight_name, layer.bias_name):
                if name is None:
                    continue
                t = overrides[name] if overrides is not None and name in overrides else named[name]
                out[name] = t if dtype is None else t.to(dtype)
        return out

    def forward(
        self,
        x: torch.Tensor,
        params: Mapping[str, torch.Tensor] | None = None,
        sample_deltas: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Run the network (eval semantics) with the model's parameters or the given ones.

        :param x: inputs ``(N,) + input shape``.
        :param params: parameters that replace the model's, by name (cast to ``x``'s dtype).
        :param sample_deltas: per-sample perturbations ``{parameter name: (N,) + parameter shape}`` of affine
            parameters: sample ``n`` uses ``W + sample_deltas[name][n]``. The shared weights still take one
            matmul/convolution; the deltas one batched product per layer (much cheaper than mapping the model over
            the samples).
        :return: the logits ``(N, K)``.
        """
        p = self.params(params, dtype=x.dtype)
        deltas = dict(sample_deltas or {})
        unknown = [name for name in deltas if name not in p]
        if unknown:
            raise ValueError(f"`sample_deltas` names {unknown}, which are not affine parameters of {list(p)}.")
        return self._values(x, p, deltas, keep=False)[-1]

    def _values(self, x: torch.Tensor, p: dict, deltas: dict, keep: bool) -> list:
        """Every value: the input, then each layer's output (``keep=False``: values no later layer reads are dropped
        on the way, for the memory of deep networks)."""
        values = [x]
        last_use = self._last_uses()
        for index, (layer, reads) in enumerate(zip(self.layers, self.inputs)):
            h = values[reads[0]]
            if layer.weighted:
                out = _affine_forward(layer, h, p, deltas)
            else:
                out = layer.apply(*(values[v] for v in reads))
            for v in reads:
                if not keep and last_use[v] == index:
                    values[v] = None
            values.append(out)
        return values

    def value_sizes(self, input_shape: tuple[int, ...]) -> list[int]:
        """Entries per sample of every value (the input, then each layer's output) for inputs of ``input_shape``
        (one sample through the network, once per shape)."""
        key = tuple(input_shape)
        if key not in self._sizes:
            p = self.params()
            like = next(iter(p.values()))
            with torch.no_grad():
                x = torch.zeros((1, *key), dtype=like.dtype, device=like.device)
                self._sizes[key] = [v[0].numel() for v in self._values(x, p, {}, keep=True)]
        return self._sizes[key]

    def nb_readers(self, value: int) -> int:
        """How many times the layers read ``value`` (an addition reading it twice counts twice)."""
        return sum(reads.count(value) for reads in self.inputs)

    def _last_uses(self) -> list[int]:
        """Per value, the index of the last layer that reads it."""
        last = [-1] * (len(self.layers) + 1)
        for index, reads in enumerate(self.inputs):
            for v in reads:
                last[v] = index
        return last


def _affine_forward(layer: Affine, h: torch.Tensor, p: dict, deltas: dict) -> torch.Tensor:
    """An affine layer with the shared parameters ``p`` plus the per-sample ``deltas`` (if any)."""
    out = layer.apply(h, p[layer.weight_name], p.get(layer.bias_name) if layer.bias_name else None)
    if layer.weight_name in deltas:
        out = out + layer.apply_per_sample(h, deltas[layer.weight_name])
    if layer.bias_name in deltas:
        bias = deltas[layer.bias_name]
        out = out + bias.reshape(bias.shape + (1,) * (out.dim() - 2))
    return out


# ---------------------------------------------------------------------------------------------------- the reader
def read_network(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Network:
    """
    Read ``model`` as a directed acyclic graph of supported layers (a chain is the graph with one path).

    Batch norm is read in eval mode (running statistics), whatever the module's training flag; the model is not
    modified.

    :param model: the torch module (the user's module, not ART's wrapper).
    :param input_shape: shape of one input; needed to check ``view``/``reshape``/``mean`` calls.
    :return: the :class:`Network`.
    :raises UnsupportedModelError: naming the module (or node) and why it cannot be read.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, nn.Linear):  # a linear classifier: fx would trace into F.linear's tensor attributes
        return Network(model, [Affine("", model, "weight", "bias" if model.bias is not None else None)])
    layers, inputs, checked = read_graph(model)
    if not layers or not layers[-1].weighted or layers[-1].is_conv:
        last = f"; it ends with {layers[-1].name!r} ({type(layers[-1]).__name__})" if layers else ""
        raise UnsupportedModelError(f"the model must end with a Linear layer producing the logits{last}.")
    network = Network(model, layers, inputs)
    if checked:
        _check_shapes(network, checked, input_shape)
    return network


def _check_shapes(network: Network, checked: list[torch.fx.Node], input_shape) -> None:
    """A view/reshape (read as a flatten) or a spatial mean is accepted when the network reproduces the model's
    output."""
    what = describe(checked[0])
    if input_shape is None:
        raise UnsupportedModelError(f"{what}: view/reshape/mean calls need the input shape to be checked.")
    model = network.model
    param = next(model.parameters())
    x = torch.randn((3, *input_shape), generator=torch.Generator().manual_seed(0)).to(param)
    try:
        with eval_mode(model), torch.no_grad():
            expected = model(x)
            got = network.forward(x)
    except RuntimeError as err:
        raise UnsupportedModelError(f"{what} is not a flatten of each sample.") from err
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(f"{what} is not a flatten of each sample.")
