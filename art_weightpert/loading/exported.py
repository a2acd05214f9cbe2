"""
``torch.export`` programs (``.pt2`` files of ``torch.export.save``).

An ``ExportedProgram`` is not an ``nn.Module``; ``program.module()`` is a ``torch.fx.GraphModule`` of ATen calls
(``aten.conv2d``, ``aten.batch_norm``, ``aten.add``, ...) that reads its weights as graph attributes, which the model
reader (:mod:`art_weightpert.network`) cannot follow. :func:`exported_to_eager` rebuilds the graph as an eager
``torch.fx.GraphModule`` of standard modules joined by additions (:mod:`.rebuild`), with the program's parameter names
(``layer1.0.conv1.weight``); modules without weights take the path of the module that called them
(``nn_module_stack``) when it is a standard layer.
"""

from __future__ import annotations

import operator
import zipfile
from typing import Any

import torch
import torch.fx
from torch import nn

from art_weightpert.loading.rebuild import BATCH, GraphBuilder, Param
from art_weightpert.operators import UnsupportedModelError


def is_exported_archive(path: str) -> bool:
    """True when ``path`` is a zip archive written by ``torch.export.save`` (it holds an ``archive_format`` record;
    TorchScript archives do not), so that other files are never handed to ``torch.export.load``, which logs a
    traceback for them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "archive_format" for name in archive.namelist())


def load_exported(path: str) -> Any:
    """``torch.export.load`` of the file (no pickled code is run; opened as a file object, which torch accepts
    whatever the file's extension)."""
    with open(path, "rb") as handle:
        return torch.export.load(handle)


def _schema_args(node: torch.fx.Node) -> list[Any]:
    """The node's arguments in its ATen schema's order, defaults filled in (keyword-only ones included)."""
    schema = node.target._schema
    args = list(node.args)
    for argument in schema.arguments[len(args) :]:
        if argument.name in node.kwargs:
            args.append(node.kwargs[argument.name])
        else:
            args.append(argument.default_value if argument.has_default_value() else None)
    return args


def _hint(node: torch.fx.Node) -> str | None:
    """The path of the ``torch.nn`` layer (not a container) that made the call, if any."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return None
    path, kind = stack[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    container = kind.rsplit(".", 1)[-1] in ("Sequential", "ModuleList", "ModuleDict")
    return path if path and kind.startswith("torch.nn.modules.") and not container else None


def _class_name(graph_module: torch.fx.GraphModule) -> str:
    """The class name of the exported module (the root entry of the ``nn_module_stack`` records)."""
    for node in graph_module.graph.nodes:
        for path, kind in node.meta.get("nn_module_stack", {}).values():
            if path == "":
                return (kind if isinstance(kind, str) else kind.__name__).rsplit(".", 1)[-1]
    return "ExportedModel"


def exported_to_eager(program: Any) -> torch.fx.GraphModule:
    """
    Rebuild an exported program as an eager ``torch.fx.GraphModule`` of standard layers joined by additions, with
    the program's parameter names and copied weights, in eval mode.

    :raises UnsupportedModelError: naming the first call that is not such a layer, or a second input.
    """
    graph_module = program.module()
    attributes = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    builder = GraphBuilder(attributes)
    output = next(n for n in reversed(graph_module.graph.nodes) if n.op == "output")
    needed = _ancestors(output)
    values: dict[torch.fx.Node, Any] = {}
    result = None
    for node in graph_module.graph.nodes:
        if node.op == "output":
            flat = node.args[0]
            while isinstance(flat, (tuple, list)) and len(flat) == 1:
                flat = flat[0]
            result = values.get(flat) if isinstance(flat, torch.fx.Node) else None
            continue
        if node not in needed:
            continue  # guards and assertions
        if node.op == "placeholder":
            if any(isinstance(v, torch.fx.Node) and v.op == "placeholder" for v in values.values()):
                raise UnsupportedModelError("the exported program takes more than one input.")
            values[node] = builder.input()
        elif node.op == "get_attr":
            values[node] = Param(str(node.target), attributes[str(node.target)])
        elif node.op == "call_function" and node.target is operator.getitem:
            values[node] = values[node.args[0]]  # the output of a batch norm that returns a tuple
        elif node.op == "call_function" and node.target is torch.ops.aten.sym_size.int and node.args[1] == 0:
            values[node] = BATCH
        elif node.op == "call_function" and hasattr(node.target, "_schema"):
            args = torch.fx.node.map_arg(_schema_args(node), lambda n: values[n])
            value = node.meta.get("val")
            source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
            rank = source.meta["val"].dim() if source is not None and "val" in source.meta else None
            out = builder.call(node.target._schema.name, args, f"the exported graph's node {node.name!r}",
                               hint=_hint(node), rank=rank)  # fmt: skip
            values[node] = out
            if node.target._schema.name.endswith("_") and source is not None and value is not None:
                values[source] = out  # an in-place call: later reads of its input see the result
        else:
            raise UnsupportedModelError(
                f"the exported graph calls {node.target} ({node.name}), which is not a layer that can be rebuilt."
            )
    return builder.build(result, _class_name(graph_module))


def _ancestors(output: torch.fx.Node) -> set[torch.fx.Node]:
    needed: set[torch.fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    return needed


class ExportedModule(nn.Module):
    """
    The ``.module()`` of an exported program as a plain ``nn.Module``: ``train()``/``eval()`` only set the flag, since
    an exported graph is fixed in the mode it was exported in (``GraphModule.eval()`` raises for exported programs).
    """

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.program = program.module()
        inputs = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        value = inputs[0].meta.get("val") if inputs else None
        self.input_shape: tuple[Any, ...] | None = tuple(value.shape) if value is not None else None
        """The input shape the program was exported with (the batch size symbolic when dynamic)."""
        size = self.input_shape[0] if self.input_shape else None
        self.static_batch: int | None = size if isinstance(size, int) else None
        """The batch size the program was exported with when it is not dynamic (``None``: dynamic)."""

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def example_input(self) -> torch.Tensor | None:
        """A random input of the exported shape (batch 2 when dynamic), ``None`` when the shape is not known."""
        if self.input_shape is None or not all(isinstance(d, int) for d in self.input_shape[1:]):
            return None
        generator = torch.Generator().manual_seed(0)
        return torch.rand((self.static_batch or 2, *self.input_shape[1:]), generator=generator)
