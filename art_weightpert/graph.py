"""
Reads the ``torch.fx`` graph of a model into operators (:mod:`art_weightpert.operators`) and the values they read
(docs/theory.md §1, §9).

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
from torch import nn

from art_weightpert.operators import READERS, Add, AvgPool, Layer, UnsupportedModelError
from art_weightpert.operators.flatten import is_batch_reshape

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def module_layer(name: str, module: nn.Module) -> Layer | None:
    """The operator of a leaf module (:data:`.READERS`), or ``None`` for an identity in eval mode."""
    if getattr(module, "quantizes_activations", False):  # a deployed quantized layer (estimators.quantized)
        raise UnsupportedModelError(
            f"module {name!r} ({type(module).__name__}) quantizes its activations at run time, which the bounds do "
            "not model; certify a weight-only quantized model (the bit-flip attacks work on this one)."
        )
    for reader in READERS:
        if isinstance(module, reader.modules):
            return reader.from_module(name, module)
    if isinstance(module, _IDENTITY_MODULES):
        return None
    reason = "a recurrent layer" if isinstance(module, nn.RNNBase) else "an unsupported layer type"
    if isinstance(module, nn.MultiheadAttention):
        reason = "an attention layer"
    raise UnsupportedModelError(f"module {name!r} ({type(module).__name__}) is {reason} for certification.")


# ------------------------------------------------------------------------------------------------ node predicates
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


def describe(node: torch.fx.Node) -> str:
    """How error messages name a node: the module, or the function and the node."""
    if node.op == "call_module":
        return f"module {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} (node {node.name!r})"


def _node_layer(node: torch.fx.Node, modules: dict[str, nn.Module], what: str) -> Layer | None:
    """The operator of a node with one input (``None`` for an identity)."""
    if node.op == "call_module":
        return module_layer(str(node.target), modules[str(node.target)])
    for reader in READERS:
        layer = reader.from_node(node)
        if layer is not None:
            return layer
    raise UnsupportedModelError(f"{what} is not a supported layer for certification.")


def check_rules(layer: Layer, what: str) -> None:
    """Refuse an operator without a complete rule set (:meth:`.Operator.missing_rules`), naming ``what``."""
    missing = layer.missing_rules()
    if missing:
        operator = " ".join([type(layer).__name__] + ([layer.kind] if hasattr(layer, "kind") else []))
        rules = " or ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise UnsupportedModelError(f"{what} ({operator}) has no {rules} rule for the bounds.")


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
        if Add.matches(node):
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
        check_rules(layer, what)
        if is_batch_reshape(node) or isinstance(layer, AvgPool) and layer.is_spatial_mean:
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
