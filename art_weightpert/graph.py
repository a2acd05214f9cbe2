"""
Reads the ``torch.fx`` graph of a model into layer records and the values they read (THEORY.md §1, §9).

:func:`read_graph` returns the layers in topological order and, for each, the indices of the values it reads: value 0
is the model's input, value ``i + 1`` the output of layer ``i``. A chain reads ``(i,)`` at layer ``i``; a residual
addition (:class:`.Add`) reads two values. Every node that is not a supported layer, or that combines branches other
than by an addition, raises :class:`.UnsupportedModelError` naming the module or node and the reason.
:func:`read_network` (:mod:`art_weightpert.network`) wraps this into a :class:`.Network`.

Batch norm is always read in eval mode (its running statistics), whatever the module's training flag: certificates
are for the model as it predicts in eval mode.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from art_weightpert.layers import (
    Activation,
    Add,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    Layer,
    MaxPool,
    SpatialMean,
    UnsupportedModelError,
    conv_padding,
)

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
_ADD_TARGETS = (operator.add, operator.iadd, torch.add)


def _activation(name: str, kind: str, negative_slope: float = 0.0) -> Activation:
    if negative_slope < 0:  # the bounds need a monotone activation (THEORY.md §1)
        raise UnsupportedModelError(f"{name!r}: LeakyReLU with negative_slope={negative_slope} is not monotone.")
    return Activation(name, kind, negative_slope)


def _hardtanh(name: str, module: nn.Hardtanh) -> Activation:
    """``nn.Hardtanh`` (also ``nn.ReLU6`` and a clipped ReLU ``Hardtanh(0, b)``) with ``min_val ≤ 0 ≤ max_val``, so
    that ``|σ(t)| ≤ |t|`` as the closed-form bound assumes."""
    low, high = float(module.min_val), float(module.max_val)
    if not low <= 0.0 <= high:
        raise UnsupportedModelError(f"module {name!r}: Hardtanh with min_val={low}, max_val={high} (0 must lie in it).")
    return Activation(name, "hardtanh", min_val=low, max_val=high)


def _batchnorm(name: str, module: nn.Module) -> BatchNorm:
    """Eval-mode batch norm as ``scale * h + shift`` from the running statistics (also for a module in training
    mode: certificates are for eval-mode predictions)."""
    if module.running_mean is None or module.running_var is None:
        raise UnsupportedModelError(
            f"module {name!r}: BatchNorm without running statistics (track_running_stats=False) normalizes with the "
            "statistics of the batch, also in eval mode; certify a model whose batch norm has running statistics."
        )
    with torch.no_grad():
        scale = 1.0 / torch.sqrt(module.running_var.double() + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.double()
        shift = -module.running_mean.double() * scale
        if module.bias is not None:
            shift = shift + module.bias.double()
    return BatchNorm(name, scale, shift)


def module_layer(name: str, module: nn.Module) -> Layer | None:
    """Description of a leaf module, or ``None`` for an identity in eval mode."""
    if getattr(module, "quantizes_activations", False):  # a deployed quantized layer (estimators.quantized)
        raise UnsupportedModelError(
            f"module {name!r} ({type(module).__name__}) quantizes its activations at run time, which the bounds do "
            "not model; certify a weight-only quantized model (the bit-flip attacks work on this one)."
        )
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise UnsupportedModelError(f"module {name!r}: Conv2d with padding_mode={module.padding_mode!r}.")
        if isinstance(module, nn.Conv2d):
            conv_padding(module)  # rejects asymmetric "same" padding
        return Affine(name, module, f"{name}.weight", f"{name}.bias" if module.bias is not None else None)
    if isinstance(module, nn.Hardtanh):
        return _hardtanh(name, module)
    for cls, kind in _ACTIVATION_MODULES.items():
        if isinstance(module, cls):
            return _activation(name, kind, float(getattr(module, "negative_slope", 0.0)))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batchnorm(name, module)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
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


# ------------------------------------------------------------------------------------------------ node predicates
def _arg(node: torch.fx.Node, index: int, key: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _is_flatten_call(node: torch.fx.Node) -> bool:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)``: every dimension after the batch (``end_dim`` -1)."""
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    return False


def is_shape_query(node: torch.fx.Node) -> bool:
    """``x.size(...)``, ``x.shape`` and ``x.shape[i]``: arguments of a later view/reshape, not layers."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] == "shape"
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, torch.fx.Node) and is_shape_query(source)
    return False


def is_batch_reshape(node: torch.fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` / ``x.reshape(-1, n)``-style flattening (checked on shapes afterwards)."""
    return (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_TARGETS) or (
        node.op == "call_method" and node.target in ("add", "__add__")
    )


def _spatial_mean(node: torch.fx.Node) -> AvgPool | None:
    """``x.mean((2, 3))`` / ``torch.mean(x, [-2, -1], keepdim=...)``: a global average pool (checked on shapes by
    the reader afterwards), else ``None``."""
    if not ((node.op == "call_method" and node.target == "mean") or node.target is torch.mean):
        return None
    dims = _arg(node, 1, "dim", None)
    if not isinstance(dims, (tuple, list)) or sorted(dims) not in ([2, 3], [-2, -1]) or "dtype" in node.kwargs:
        return None
    return AvgPool(node.name, SpatialMean(bool(_arg(node, 2, "keepdim", False))))


def describe(node: torch.fx.Node) -> str:
    """How error messages name a node: the module, or the function and the node."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} (node {node.name!r})"


def _node_layer(node: torch.fx.Node, modules: dict[str, nn.Module], what: str) -> Layer | None:
    """The layer description of a node with one input (``None`` for an identity)."""
    if node.op == "call_module":
        return module_layer(str(node.target), modules[str(node.target)])
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        kind = _ACTIVATION_FUNCTIONS[node.target]
        slope = _arg(node, 1, "negative_slope", 0.01)
        return _activation(node.name, kind, float(slope) if kind == "leaky_relu" else 0.0)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return Activation(node.name, _ACTIVATION_METHODS[node.target])
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return AvgPool(node.name, nn.AdaptiveAvgPool2d(_arg(node, 1, "output_size", None)))
    mean = _spatial_mean(node)
    if mean is not None:
        return mean
    if _is_flatten_call(node) or is_batch_reshape(node):
        return Flatten(node.name)
    raise UnsupportedModelError(f"{what} is not a supported layer for certification.")


def _add_inputs(node: torch.fx.Node, values: dict[torch.fx.Node, int], what: str) -> tuple[int, ...]:
    """The two values a residual addition reads; anything else (a constant, ``alpha``) is refused."""
    operands = [a for a in node.args if not (isinstance(a, torch.fx.Node) and is_shape_query(a))]
    if len(operands) != 2 or not all(isinstance(a, torch.fx.Node) for a in operands) or node.kwargs:
        raise UnsupportedModelError(f"{what} is not an addition of two branches (a constant or a scale factor).")
    return tuple(values[a] for a in operands)


class _Tracer(torch.fx.Tracer):
    """The default fx tracer, remembering the innermost module whose forward failed to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch's leaves, and the deployed quantized layers (they carry ``quantizes_activations``)."""
        return hasattr(m, "quantizes_activations") or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = (self.path_of_module(m), m)
                except NameError:
                    self.failed_in = ("?", m)
            raise


def trace(model: nn.Module) -> torch.fx.Graph:
    """The model's fx graph; a model fx cannot trace (data-dependent control flow, …) raises
    :class:`.UnsupportedModelError` naming the module whose forward failed."""
    tracer = _Tracer()
    try:
        return tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure means "not a static graph"
        where = ""
        if tracer.failed_in is not None and tracer.failed_in[0]:
            where = f" in module {tracer.failed_in[0]!r} ({type(tracer.failed_in[1]).__name__})"
        raise UnsupportedModelError(
            f"model {type(model).__name__} cannot be traced as a static graph of layers{where} "
            f"(data-dependent control flow?) ({type(err).__name__}: {err})."
        ) from err


def read_graph(model: nn.Module) -> tuple[list[Layer], list[tuple[int, ...]], list[torch.fx.Node]]:
    """
    Read the fx graph of ``model`` into layers in topological order.

    :return: ``(layers, inputs, checked)``: ``inputs[i]`` the values layer ``i`` reads (0: the model's input, ``j + 1``:
        the output of layer ``j``), ``checked`` the view/reshape/mean nodes whose shapes the caller must check.
    :raises UnsupportedModelError: naming the module or node and why it cannot be read.
    """
    graph = trace(model)
    modules = dict(model.named_modules())
    layers: list[Layer] = []
    inputs: list[tuple[int, ...]] = []
    checked: list[torch.fx.Node] = []
    values: dict[torch.fx.Node, int] = {}
    output: int | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if values:
                raise UnsupportedModelError(f"model has more than one input ({node.name!r}).")
            values[node] = 0
            continue
        if node.op == "output":
            if not isinstance(node.args[0], torch.fx.Node) or node.args[0] not in values:
                raise UnsupportedModelError("the model's output is not a single tensor computed by its layers.")
            output = values[node.args[0]]
            continue
        if node.op == "get_attr":
            raise UnsupportedModelError(f"the forward reads the tensor attribute {node.target!r} directly.")
        if is_shape_query(node):
            continue  # only an argument of a later view/reshape
        what = describe(node)
        read = [a for a in node.all_input_nodes if not is_shape_query(a)]
        if any(a not in values for a in read):
            raise UnsupportedModelError(f"{what} reads a value that is not a layer's output.")
        if _is_add(node):
            layer, reads = Add(node.name), _add_inputs(node, values, what)
        elif len(read) > 1:
            raise UnsupportedModelError(
                f"{what} combines branches (only an addition of two branches can be certified; not a product, a "
                "concatenation or a subtraction)."
            )
        elif not read:
            raise UnsupportedModelError(f"{what} does not read the model's input or a layer's output.")
        else:
            layer, reads = _node_layer(node, modules, what), (values[read[0]],)
        if layer is None:  # an identity: the node is its input
            values[node] = reads[0]
            continue
        if is_batch_reshape(node) or isinstance(layer, AvgPool) and isinstance(layer.module, SpatialMean):
            checked.append(node)
        layers.append(layer)
        inputs.append(reads)
        values[node] = len(layers)
    return _ancestors_of(layers, inputs, checked, output)


def _ancestors_of(layers, inputs, checked, output):
    """Only the layers the output depends on (fx keeps dead code), re-indexed; the output's layer comes last."""
    if output is None or output == 0:
        return layers, inputs, checked
    needed = {output}
    for index in range(output - 1, -1, -1):
        if index + 1 in needed:
            needed.update(inputs[index])
    keep = [i for i in range(output) if i + 1 in needed]
    new_value = {0: 0} | {i + 1: k + 1 for k, i in enumerate(keep)}
    kept_names = {layers[i].name for i in keep}
    return (
        [layers[i] for i in keep],
        [tuple(new_value[v] for v in inputs[i]) for i in keep],
        [node for node in checked if node.name in kept_names],
    )
