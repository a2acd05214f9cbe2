"""
TorchScript modules (scripted or traced) rebuilt as eager ``torch.fx.GraphModule`` s of standard layers joined by
additions.

Weight attacks and certificates need an eager module: ``torch.func.functional_call`` refuses TorchScript modules and
``torch.fx`` cannot trace them. :func:`torchscript_to_eager` reads the forward graphs of the module hierarchy call by
call, as :mod:`.rebuild` does for exported programs: calls of submodules and methods (so ``self.weight`` of
``layer1.0.conv1`` keeps its name ``layer1.0.conv1.weight``), ATen calls of standard layers and additions, the
functional forms (``F.relu``, ``F.batch_norm``, ...) that scripted modules call, constants, conditions on constants
(``self.training`` reads as eval mode), shape checks (a branch that only raises is not taken).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from art_weightpert.loading.rebuild import BATCH, GraphBuilder, Param
from art_weightpert.operators import UnsupportedModelError


@dataclass(frozen=True)
class _Module:
    path: str
    module: torch.jit.ScriptModule


@dataclass(frozen=True)
class _Function:
    name: str


@dataclass(frozen=True)
class _Context:
    """Where a graph is read: how errors name it, the path of a module without weights that it calls (the module
    itself when it is a leaf), the input rank of its batch norm when the module says it."""

    where: str
    hint: str | None
    rank: int | None


class _Unknown:
    """A scalar computed from the input (``x.dim()``), only read by shape checks."""

    def __repr__(self) -> str:
        return "a value computed from the input"


UNKNOWN = _Unknown()
_BATCH_NORM_RANKS = {"BatchNorm1d": 2, "BatchNorm2d": 4}
_SCALAR_TYPES = ("BoolType", "IntType", "FloatType", "NoneType", "StringType")


_CONSTANT_OPS: dict[str, Callable[..., Any]] = {
    "aten::__is__": operator.is_,
    "aten::__isnot__": operator.is_not,
    "aten::__not__": operator.not_,
    "aten::__and__": operator.and_,
    "aten::__or__": operator.or_,
    "aten::eq": operator.eq,
    "aten::ne": operator.ne,
    "aten::lt": operator.lt,
    "aten::le": operator.le,
    "aten::gt": operator.gt,
    "aten::ge": operator.ge,
    "aten::Bool": bool,
}
_PASS_THROUGH = ("prim::NumToTensor", "aten::Int", "aten::Float", "aten::ScalarImplicit", "prim::unchecked_cast")


def _max_pool(args: list[Any]) -> tuple[str, list[Any]]:
    """``F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)``."""
    if len(args) > 6 and args[6]:
        raise UnsupportedModelError("a max pooling that returns its indices cannot be certified.")
    return "max_pool2d", args[:6]


_FUNCTIONS: dict[str, Callable[[list[Any]], tuple[str, list[Any]]]] = {
    "relu": lambda a: ("relu", a[:1]),
    "relu6": lambda a: ("hardtanh", [a[0], 0.0, 6.0]),
    "hardtanh": lambda a: ("hardtanh", a[:3]),
    "leaky_relu": lambda a: ("leaky_relu", a[:2]),
    "sigmoid": lambda a: ("sigmoid", a[:1]),
    "tanh": lambda a: ("tanh", a[:1]),
    "elu": lambda a: ("elu", a[:2]),
    "softplus": lambda a: ("softplus", a[:3]),
    "silu": lambda a: ("silu", a[:1]),
    "gelu": lambda a: ("gelu", a[:2]),
    "adaptive_avg_pool2d": lambda a: ("adaptive_avg_pool2d", a[:2]),
    "_max_pool2d": _max_pool,
    "max_pool2d": _max_pool,
    "batch_norm": lambda a: ("batch_norm", [a[0], a[3], a[4], a[1], a[2], *a[5:8]]),
    **dict.fromkeys(("dropout", "dropout1d", "dropout2d", "alpha_dropout"), lambda a: ("dropout", a[:1])),
}
"""Python functionals (``F.relu``, ...) a scripted graph calls as functions → the ATen call and its arguments."""


def _key(value: torch._C.Value) -> int:
    return value.unique()


class _Reader:
    """Reads the forward graphs of a TorchScript module into a :class:`.GraphBuilder`."""

    def __init__(self, root: torch.jit.ScriptModule) -> None:
        self.builder = GraphBuilder(name for name, _ in root.state_dict().items())

    def module_call(self, target: _Module, method: str, args: list[Any]) -> Any:
        kind = getattr(target.module, "original_name", type(target.module).__name__)
        leaf = next(iter(target.module.named_children()), None) is None
        where = f"TorchScript module {target.path or '(root)'!r} ({kind})"
        context = _Context(where, target.path if leaf and target.path else None, _BATCH_NORM_RANKS.get(kind))
        graph = target.module.graph if method == "forward" else getattr(target.module, method).graph
        inputs = list(graph.inputs())
        if len(inputs) != len(args) + 1:
            raise UnsupportedModelError(f"{where}: its {method} takes {len(inputs) - 1} inputs.")
        env: dict[int, Any] = {_key(inputs[0]): target} | {_key(v): a for v, a in zip(inputs[1:], args)}
        outputs = self.block(graph, env, context)
        if len(outputs) != 1:
            raise UnsupportedModelError(f"{where} returns {len(outputs)} values.")
        return outputs[0]

    def block(self, block: Any, env: dict[int, Any], context: _Context) -> list[Any]:
        for node in block.nodes():
            self.node(node, env, context)
        return [env[_key(v)] for v in block.outputs()]

    def node(self, node: torch._C.Node, env: dict[int, Any], context: _Context) -> None:
        kind, where = node.kind(), context.where
        ins = [env.get(_key(v)) for v in node.inputs()]
        outs = list(node.outputs())
        if kind == "prim::If":
            self.branch(node, ins[0], env, context)
            return
        if kind == "prim::CallMethod":
            if not isinstance(ins[0], _Module):
                raise UnsupportedModelError(f"{where} calls a method of a value that is not a module.")
            values = [self.module_call(ins[0], node.s("name"), ins[1:])]
        elif kind == "prim::Constant":
            function = outs[0].type().kind() == "FunctionType"
            values = [_Function(node.s("name")) if function else outs[0].toIValue()]
        elif kind == "prim::GetAttr":
            values = [_attribute(ins[0], node.s("name"))]
        elif kind == "prim::CallFunction":
            values = [self.function(ins[0], ins[1:], context)]
        elif kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            values = [list(ins)]
        elif kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            values = list(ins[0])
        elif kind in _PASS_THROUGH:
            values = [ins[0]]
        elif kind in ("aten::size", "aten::dim") and isinstance(ins[0], torch.fx.Node):
            values = [BATCH if kind == "aten::size" and ins[1] == 0 else UNKNOWN]
        elif kind in _CONSTANT_OPS and not any(isinstance(a, torch.fx.Node) for a in ins):
            values = [UNKNOWN if any(a is UNKNOWN for a in ins) else _CONSTANT_OPS[kind](*ins)]
        elif kind in ("aten::warn", "prim::RaiseException"):
            if kind == "prim::RaiseException":
                raise UnsupportedModelError(f"{where} raises an exception in its forward.")
            values = []
        elif kind.startswith("aten::"):
            rank = _rank(node) or context.rank
            values = [self.builder.call(kind, ins, where, hint=context.hint, rank=rank)]
            if kind.endswith("_") and ins and isinstance(ins[0], torch.fx.Node):
                env[_key(node.inputsAt(0))] = values[0]  # an in-place call: later reads of its input see the result
        else:
            raise UnsupportedModelError(f"{where} calls {kind}, which is not a layer that can be rebuilt.")
        env.update({_key(v): value for v, value in zip(outs, values)})

    def branch(self, node: torch._C.Node, condition: Any, env: dict[int, Any], context: _Context) -> None:
        """``prim::If`` on a constant condition; on a condition computed from the input, the branch that does not
        raise, or unknown scalars when the branches only compute scalars (a shape check)."""
        blocks = list(node.blocks())
        outputs = list(node.outputs())
        raising = [any(n.kind() == "prim::RaiseException" for n in b.nodes()) for b in blocks]
        if isinstance(condition, bool):
            values = self.block(blocks[0] if condition else blocks[1], env, context)
        elif raising.count(True) == 1:
            values = self.block(blocks[raising.index(False)], env, context)
        elif all(v.type().kind() in _SCALAR_TYPES for v in outputs):
            values = [UNKNOWN] * len(outputs)
        else:
            raise UnsupportedModelError(
                f"{context.where} branches on a value computed from the input (data-dependent control flow)."
            )
        env.update({_key(v): value for v, value in zip(outputs, values)})

    def function(self, function: Any, args: list[Any], context: _Context) -> Any:
        name = function.name if isinstance(function, _Function) else str(function)
        if name not in _FUNCTIONS:
            raise UnsupportedModelError(
                f"{context.where} calls the function {name!r}, which is not a layer that can be rebuilt; "
                f"supported: {', '.join(sorted(_FUNCTIONS))}."
            )
        op, op_args = _FUNCTIONS[name](args)
        return self.builder.call(f"aten::{op}", op_args, context.where, hint=context.hint, rank=context.rank)


def _attribute(owner: Any, name: str) -> Any:
    """An attribute of a module: a submodule, a parameter or buffer (:class:`.Param`), or a constant (``training``
    reads as eval mode)."""
    if not isinstance(owner, _Module):
        raise UnsupportedModelError(f"the attribute {name!r} of a value that is not a module is read.")
    if name == "training":
        return False
    value = getattr(owner.module, name)
    path = f"{owner.path}.{name}" if owner.path else name
    if isinstance(value, torch.jit.ScriptModule):
        return _Module(path, value)
    if isinstance(value, torch.Tensor):
        return Param(path, value)
    return value


def _rank(node: torch._C.Node) -> int | None:
    """The rank of the call's first input, when the graph records it (traced graphs)."""
    try:
        dims = node.inputsAt(0).type().dim()
    except (RuntimeError, AttributeError, IndexError):
        return None
    return dims


def torchscript_to_eager(scripted: torch.jit.ScriptModule) -> torch.fx.GraphModule:
    """
    Rebuild a TorchScript module (scripted or traced) as an eager ``torch.fx.GraphModule`` of standard layers joined
    by additions, with the TorchScript module's parameter names and copied weights, in eval mode.

    :param scripted: the loaded TorchScript module.
    :raises UnsupportedModelError: naming the first module or call that cannot be rebuilt and why.
    """
    reader = _Reader(scripted)
    output = reader.module_call(_Module("", scripted), "forward", [reader.builder.input()])
    return reader.builder.build(output, getattr(scripted, "original_name", type(scripted).__name__))
