"""
Reads a torch model as a chain of layers (THEORY.md §1), for the certificates.

:func:`read_network` traces the model with ``torch.fx`` and returns a :class:`Network`: a list of layer descriptions
(:class:`Affine`, :class:`Activation`, :class:`BatchNorm`, :class:`AvgPool`, :class:`MaxPool`, :class:`Flatten`;
defined in :mod:`art_weightpert.layers` and re-exported here). Anything that is not a chain of supported layers raises
:class:`UnsupportedModelError` naming the module and the reason. :meth:`Network.forward` is the one forward of a read
network, also with per-sample weight deltas (the per-sample attack). The estimator and the universal attacks do not
need this reader: they work on any differentiable model.

:func:`perturbable_modules` is the single definition of which layers a weight budget can select.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from art_weightpert.layers import (
    Activation,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    Layer,
    MaxPool,
    UnsupportedModelError,
    conv_padding,
)

__all__ = [
    "PERTURBABLE_TYPES",
    "Activation",
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
    """A model read as a chain ``layers[0] → layers[1] → …``; the last layer is an :class:`Affine` (the logits)."""

    model: nn.Module
    layers: list = field(default_factory=list)

    @property
    def affine_layers(self) -> list[Affine]:
        return [layer for layer in self.layers if isinstance(layer, Affine)]

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
        Run the chain (eval semantics) with the model's parameters or the given ones.

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
        h = x
        for layer in self.layers:
            if not isinstance(layer, Affine):
                h = layer.apply(h)
                continue
            out = layer.apply(h, p[layer.weight_name], p.get(layer.bias_name) if layer.bias_name else None)
            if layer.weight_name in deltas:
                out = out + layer.apply_per_sample(h, deltas[layer.weight_name])
            if layer.bias_name in deltas:
                bias = deltas[layer.bias_name]
                out = out + bias.reshape(bias.shape + (1,) * (out.dim() - 2))
            h = out
        return h


# ---------------------------------------------------------------------------------------------------- the reader
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_ACTIVATION_FUNCTIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.leaky_relu: "leaky_relu",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _activation(name: str, kind: str, negative_slope: float = 0.0) -> Activation:
    if negative_slope < 0:  # the bounds need a monotone activation (THEORY.md §1)
        raise UnsupportedModelError(f"{name!r}: LeakyReLU with negative_slope={negative_slope} is not monotone.")
    return Activation(name, kind, negative_slope)


def _module_layer(name: str, module: nn.Module):
    """Description of a leaf module, or ``None`` for an identity in eval mode."""
    if isinstance(module, nn.Linear):
        return Affine(name, module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"module {name!r}: Conv2d with padding_mode={module.padding_mode!r}.")
        conv_padding(module)  # rejects asymmetric "same" padding
        return Affine(name, module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    for cls, kind in _ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return _activation(name, kind, float(getattr(module, "negative_slope", 0.0)))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if module.running_mean is None or module.running_var is None:
            raise UnsupportedModelError(f"module {name!r}: BatchNorm without running statistics.")
        with torch.no_grad():
            scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
            if module.weight is not None:
                scale = scale * module.weight.double()
            shift = -module.running_mean.double() * scale
            if module.bias is not None:
                shift = shift + module.bias.double()
        return BatchNorm(name, scale, shift)
    if isinstance(module, nn.AvgPool2d):
        return AvgPool(name, module)
    if isinstance(module, nn.MaxPool2d):
        if module.return_indices:
            raise UnsupportedModelError(f"module {name!r}: MaxPool2d with return_indices=True.")
        return MaxPool(name, module)
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise UnsupportedModelError(f"module {name!r}: Flatten must flatten every dimension after the batch.")
        return Flatten(name)
    if isinstance(module, _IDENTITY_MODULES):
        return None
    reason = "a recurrent layer" if isinstance(module, nn.RNNBase) else "an unsupported layer type"
    if isinstance(module, nn.MultiheadAttention):
        reason = "an attention layer"
    raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) is {reason} for certification.")


def _is_flatten_call(node: torch.fx.Node) -> bool:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)``: every dimension after the batch (``end_dim`` -1)."""
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _is_shape_query(node: torch.fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` and ``x.shape[i]``: arguments of a later view/reshape, not layers."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] == "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and _is_shape_query(source)
    return False


def _is_batch_reshape(node: torch.fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` / ``x.reshape(-1, n)``-style flattening (checked on shapes afterwards)."""
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )


def read_network(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Network:
    """
    Read ``model`` as a chain of supported layers.

    :param model: the torch module (the user's module, not ART's wrapper).
    :param input_shape: shape of one input; needed to check ``view``/``reshape`` calls are flattening.
    :return: the :class:`Network`.
    :raises UnsupportedModelError: naming the module (or function) and why it cannot be read.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if isinstance(model, nn.Linear):  # a linear classifier: fx would trace into F.linear's tensor attributes
        return Network(model, [Affine("", model, "weight", "bias" if model.bias is not None else None)])
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not a static chain"
        raise UnsupportedModelError(
            f"model {type(model).__name__} cannot be traced as a static chain of layers ({type(err).__name__}: {err})."
        ) from err
    modules = dict(model.named_modules())
    layers: list = []
    reshapes: list[tuple[int, torch.fx.Node]] = []  # (layer index, node) of view/reshape calls
    current: torch.fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise UnsupportedModelError(f"model has more than one input ({node.name!r}).")
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedModelError("the model's output is not the end of a single chain of layers.")
            continue
        if node.op == "get_attr":
            raise UnsupportedModelError(f"the forward reads the tensor attribute {node.target!r} directly.")
        if _is_shape_query(node):
            continue  # only an argument of a later view/reshape
        what = _describe(node)
        _check_continues(node, current, what)
        layer = _node_layer(node, modules, what)
        if _is_batch_reshape(node):
            reshapes.append((len(layers), node))
        if layer is not None:
            layers.append(layer)
        current = node
    if not layers or not isinstance(layers[-1], Affine) or layers[-1].is_conv:
        last = f"; it ends with {layers[-1].name!r} ({type(layers[-1]).__name__})" if layers else ""
        raise UnsupportedModelError(f"the model must end with a Linear layer producing the logits{last}.")
    for layer in layers:
        if isinstance(layer, Affine) and not isinstance(layer.module, (nn.Linear, nn.Conv2d)):
            raise UnsupportedModelError(f"module {layer.name!r} ({type(layer.module).__name__}) is not supported.")
    network = Network(model, layers)
    if reshapes:
        _check_reshapes(network, reshapes, input_shape)
    return network


def _describe(node: torch.fx.Node) -> str:
    """How error messages name a node: the module, or the function and the node."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} (node {node.name!r})"


def _check_continues(node: torch.fx.Node, current: torch.fx.Node | None, what: str) -> None:
    """``node`` must take the single output of ``current``, and nothing else may read that output."""
    inputs = [a for a in node.all_input_nodes if not _is_shape_query(a)]
    if len(inputs) > 1:
        raise UnsupportedModelError(f"{what} combines several branches (residual or parallel paths).")
    if len(inputs) != 1 or inputs[0] is not current:
        raise UnsupportedModelError(f"{what} does not continue a single chain of layers.")
    if len([u for u in current.users if not _is_shape_query(u)]) > 1:
        raise UnsupportedModelError(
            f"the output of {current.name!r} feeds several layers (a residual or parallel branch)."
        )


def _node_layer(node: torch.fx.Node, modules: dict[str, nn.Module], what: str) -> Layer | None:
    """The layer description of one node of the chain (``None`` for an identity)."""
    if node.op == "call_module":
        return _module_layer(str(node.target), modules[str(node.target)])
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        kind = _ACTIVATION_FUNCTIONS[node.target]
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return _activation(node.name, kind, float(slope) if kind == "leaky_relu" else 0.0)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return Activation(node.name, _ACTIVATION_METHODS[node.target])
    if _is_flatten_call(node) or _is_batch_reshape(node):
        return Flatten(node.name)
    raise UnsupportedModelError(f"{what} is not a supported layer for certification.")


def _check_reshapes(network: Network, reshapes, input_shape) -> None:
    """A view/reshape is accepted when the chain, read with it as a flatten, reproduces the model's output."""
    if input_shape is None:
        raise UnsupportedModelError("view/reshape calls need the input shape to be checked as flattening.")
    model = network.model
    param = next(model.parameters())
    x = torch.randn((3, *input_shape), generator=torch.Generator().manual_seed(0)).to(param)
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x)
            got = network.forward(x)
    except RuntimeError as err:
        node = reshapes[0][1]
        raise UnsupportedModelError(f"{node.target} (node {node.name!r}) is not a flatten of each sample.") from err
    finally:
        for m, flag in flags.items():  # restore each submodule's own flag (model.train() would reset them all)
            m.training = flag
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        node = reshapes[0][1]
        raise UnsupportedModelError(f"{node.target} (node {node.name!r}) is not a flatten of each sample.")
