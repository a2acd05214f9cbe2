"""
``torch.export`` programs (``.pt2`` files of ``torch.export.save``) for the command line.

An ``ExportedProgram`` is not an ``nn.Module``; ``program.module()`` is a ``torch.fx.GraphModule`` of ATen calls
(``aten.linear``, ``aten.conv2d``, ...) that reads its weights as graph attributes, which the model reader
(:mod:`art_weightpert.network`) cannot follow. A program whose graph is a chain of standard layers is therefore
rebuilt as the same eager ``nn.Sequential`` with the same weights (:func:`exported_to_eager`; layers named after the
exported module's parameters, e.g. ``"0"``, ``"features_3"``), and the rebuilt module is checked against the program
on the user's data before it is used. Any other program is run as its ``.module()`` for its clean accuracy only
(weight attacks and certificates need the Linear/Conv modules, which the graph no longer has).
"""

from __future__ import annotations

import operator
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from art_weightpert.network import UnsupportedModelError

aten = torch.ops.aten


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


def _arg(args: tuple, i: int, default: Any) -> Any:
    return args[i] if len(args) > i else default


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _linear(args, weights) -> nn.Module:
    w, b = weights(args[1]), weights(_arg(args, 2, None))
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    layer.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
    return layer


def _conv2d(args, weights) -> nn.Module:
    w, b = weights(args[1]), weights(_arg(args, 2, None))
    groups = int(_arg(args, 6, 1))
    layer = nn.Conv2d(
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_pair(_arg(args, 3, 1)),
        padding=_pair(_arg(args, 4, 0)), dilation=_pair(_arg(args, 5, 1)), groups=groups, bias=b is not None,
    )  # fmt: skip
    if isinstance(layer.padding, str):
        raise UnsupportedModelError("a conv2d with string padding cannot be rebuilt.")
    layer.load_state_dict({"weight": w, **({"bias": b} if b is not None else {})})
    return layer


def _batch_norm(args, weights) -> nn.Module:
    w, b, mean, var = (weights(a) for a in args[1:5])
    if mean is None or var is None or _arg(args, 5, False):
        raise UnsupportedModelError("a batch norm in training mode or without running statistics.")
    value = getattr(args[0], "meta", {}).get("val")
    cls = nn.BatchNorm1d if value is not None and value.dim() == 2 else nn.BatchNorm2d
    layer = cls(mean.numel(), eps=float(_arg(args, 7, 1e-5)), affine=w is not None)
    state = {"running_mean": mean, "running_var": var, **({"weight": w, "bias": b} if w is not None else {})}
    layer.load_state_dict(state, strict=False)
    return layer


def _max_pool(args, weights) -> nn.Module:  # noqa: ARG001 - no weights
    stride = _arg(args, 2, []) or None
    return nn.MaxPool2d(_pair(args[1]), _pair(stride), _pair(_arg(args, 3, 0)), _pair(_arg(args, 4, 1)),
                        ceil_mode=bool(_arg(args, 5, False)))  # fmt: skip


def _avg_pool(args, weights) -> nn.Module:  # noqa: ARG001 - no weights
    stride = _arg(args, 2, []) or None
    return nn.AvgPool2d(_pair(args[1]), _pair(stride), _pair(_arg(args, 3, 0)), bool(_arg(args, 4, False)),
                        bool(_arg(args, 5, True)), _arg(args, 6, None))  # fmt: skip


def _view(args, weights) -> nn.Module:  # noqa: ARG001 - no weights
    shape = list(args[1])
    if len(shape) != 2 or shape[1] != -1:
        raise UnsupportedModelError(f"a reshape to {shape} is not a flatten to (N, -1).")
    return nn.Flatten()


REBUILDERS: dict[Any, Callable[..., nn.Module]] = {
    aten.linear.default: _linear,
    aten.conv2d.default: _conv2d,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.max_pool2d.default: _max_pool,
    aten.avg_pool2d.default: _avg_pool,
    aten.relu.default: lambda a, w: nn.ReLU(),
    aten.leaky_relu.default: lambda a, w: nn.LeakyReLU(float(_arg(a, 1, 0.01))),
    aten.sigmoid.default: lambda a, w: nn.Sigmoid(),
    aten.tanh.default: lambda a, w: nn.Tanh(),
    aten.flatten.using_ints: lambda a, w: nn.Flatten(int(_arg(a, 1, 0)), int(_arg(a, 2, -1))),
    aten.view.default: _view,
    aten.reshape.default: _view,
    aten.dropout.default: lambda a, w: nn.Identity(),
    aten.clone.default: lambda a, w: nn.Identity(),
}
"""ATen call of an exported graph → the eager layer that computes it (from the call's arguments and weights)."""


def exported_to_eager(program: Any) -> nn.Sequential:
    """
    Rebuild an exported program whose graph is a chain of standard layers (each call taking the previous one's
    output) as the same eager ``nn.Sequential`` with copied weights, in eval mode.

    :raises UnsupportedModelError: naming the first call that is not such a layer.
    """
    graph_module = program.module()
    attributes = dict(graph_module.named_parameters()) | dict(graph_module.named_buffers())
    layers: list[tuple[str, nn.Module]] = []
    previous = None
    for node in graph_module.graph.nodes:
        if node.op in ("get_attr", "output") or (node.op == "call_module" and "guards" in str(node.target)):
            continue
        if node.op == "placeholder":
            if previous is not None:
                raise UnsupportedModelError("the exported program takes more than one input.")
            previous = node
            continue
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] is previous:
            previous = node  # the output of a batch norm that returns a tuple
            continue
        if node.op != "call_function" or node.target not in REBUILDERS:
            raise UnsupportedModelError(
                f"the exported graph calls {node.target} ({node.name}), which is not a layer that can be rebuilt as "
                f"an eager module; supported: {', '.join(sorted({str(k).split('.')[1] for k in REBUILDERS}))}."
            )
        if not node.args or node.args[0] is not previous:
            raise UnsupportedModelError(f"the exported graph is not a chain of layers at {node.name}.")
        names = [str(a.target) for a in node.args[1:] if getattr(a, "op", None) == "get_attr"]
        name = names[0].rsplit(".", 1)[0].replace(".", "_") if names else node.name
        layers.append((name, REBUILDERS[node.target](node.args, _weights(attributes))))
        previous = node
    return nn.Sequential(OrderedDict(layers)).eval()


def _weights(attributes: dict[str, torch.Tensor]) -> Callable[[Any], torch.Tensor | None]:
    def weight(arg: Any) -> torch.Tensor | None:
        if arg is None:
            return None
        if getattr(arg, "op", None) != "get_attr":
            raise UnsupportedModelError(f"a layer's weight {arg} is computed, not a parameter.")
        return attributes[str(arg.target)].detach().clone()

    return weight


class ExportedModule(nn.Module):
    """
    The ``.module()`` of an exported program as a plain ``nn.Module``: ``train()``/``eval()`` only set the flag, since
    an exported graph is fixed in the mode it was exported in (``GraphModule.eval()`` raises for exported programs).
    """

    def __init__(self, program: Any) -> None:
        super().__init__()
        self.program = program.module()
        inputs = [n for n in self.program.graph.nodes if n.op == "placeholder"]
        size = inputs[0].meta.get("val").shape[0] if inputs and inputs[0].meta.get("val") is not None else None
        self.static_batch: int | None = size if isinstance(size, int) else None
        """The batch size the program was exported with when it is not dynamic (``None``: dynamic)."""

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)
