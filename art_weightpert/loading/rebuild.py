"""
Rebuilding a saved model's graph as an eager ``torch.fx.GraphModule`` of standard layers joined by additions.

The ``torch.export`` and TorchScript readers (:mod:`.exported`, :mod:`.torchscript`) walk their graphs and hand every
ATen call to :class:`GraphBuilder` with its arguments in the ATen schema's order: tensors computed by the graph as
``torch.fx.Node``, parameters and buffers as :class:`Param` (their name in the saved model), the batch size as
:data:`BATCH`, anything else as Python values. :data:`OP_LAYERS` turns each call into the standard module that
computes it (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, activations, pools, ``nn.Flatten``); an addition of
two values becomes ``operator.add``. Modules with weights are installed under the path of their weights
(``layer1.0.conv1`` for ``layer1.0.conv1.weight``), so the rebuilt module has the saved model's parameter names.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from art_weightpert.operators import UnsupportedModelError
from art_weightpert.torch_tools import eval_mode


@dataclass(frozen=True, eq=False)
class Param:
    """A parameter or buffer read by a graph: its name in the saved model and its value."""

    path: str
    tensor: torch.Tensor


class _Batch:
    """The batch size of the input (``x.size(0)``, a symbolic size of an exported program)."""

    def __repr__(self) -> str:
        return "BATCH"


BATCH = _Batch()


def _arg(args: Sequence[Any], i: int, default: Any = None) -> Any:
    return args[i] if len(args) > i and args[i] is not None else default


def _pair(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _tensor(value: Any) -> torch.Tensor | None:
    """The value of a weight argument (``None`` when absent); a weight computed by the graph is refused."""
    if value is None:
        return None
    if not isinstance(value, Param):
        raise UnsupportedModelError(f"a layer's weight ({value}) is computed, not a parameter of the model.")
    return value.tensor.detach().clone()


def _load(layer: nn.Module, **state: torch.Tensor | None) -> nn.Module:
    layer.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=False)
    return layer


def _linear(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    w, b = _tensor(args[1]), _tensor(_arg(args, 2))
    return _load(nn.Linear(w.shape[1], w.shape[0], bias=b is not None), weight=w, bias=b)


def _conv(weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any, groups: Any) -> nn.Module:
    w, b = _tensor(weight), _tensor(bias)
    if w.dim() != 4 or isinstance(padding, str):
        raise UnsupportedModelError("only 2-D convolutions with numeric padding can be rebuilt.")
    groups = int(groups or 1)
    layer = nn.Conv2d(
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_pair(stride or 1), padding=_pair(padding or 0),
        dilation=_pair(dilation or 1), groups=groups, bias=b is not None,
    )  # fmt: skip
    return _load(layer, weight=w, bias=b)


def _conv2d(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``conv2d(input, weight, bias, stride, padding, dilation, groups)``."""
    return _conv(args[1], _arg(args, 2), _arg(args, 3), _arg(args, 4), _arg(args, 5), _arg(args, 6))


def _convolution(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``convolution``/``_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
    groups, ...)``."""
    if _arg(args, 6, False):
        raise UnsupportedModelError("a transposed convolution cannot be certified.")
    return _conv(args[1], _arg(args, 2), _arg(args, 3), _arg(args, 4), _arg(args, 5), _arg(args, 8))


def _batch_norm_layer(args: Sequence[Any], rank: int | None, eps: float) -> nn.Module:
    w, b, mean, var = (_tensor(_arg(args, i)) for i in range(1, 5))
    if mean is None or var is None:
        raise UnsupportedModelError("a batch norm without running statistics (track_running_stats=False).")
    cls = nn.BatchNorm1d if rank in (2, 3) else nn.BatchNorm2d
    layer = cls(mean.numel(), eps=float(eps), affine=w is not None).eval()
    return _load(layer, weight=w, bias=b, running_mean=mean, running_var=var)


def _batch_norm(args: Sequence[Any], rank: int | None) -> nn.Module:
    """``batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled)``."""
    if _arg(args, 5, False):
        raise UnsupportedModelError("a batch norm in training mode (save the model in eval mode).")
    return _batch_norm_layer(args, rank, _arg(args, 7, 1e-5))


def _batch_norm_no_training(args: Sequence[Any], rank: int | None) -> nn.Module:
    """``_native_batch_norm_legit_no_training(input, weight, bias, running_mean, running_var, momentum, eps)``."""
    return _batch_norm_layer(args, rank, _arg(args, 6, 1e-5))


def _hardtanh(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    low, high = float(_arg(args, 1, -1.0)), float(_arg(args, 2, 1.0))
    return nn.ReLU6() if (low, high) == (0.0, 6.0) else nn.Hardtanh(low, high)


def _elu(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``elu(input, alpha, scale, input_scale)``: ELU when ``scale = input_scale = 1`` (not SELU/CELU forms)."""
    alpha, scale, input_scale = (float(_arg(args, i, 1.0)) for i in (1, 2, 3))
    if (scale, input_scale) != (1.0, 1.0):
        raise UnsupportedModelError(f"elu with scale={scale:g}, input_scale={input_scale:g} (SELU/CELU) has no layer.")
    return nn.ELU(alpha)


def _max_pool(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)``."""
    return nn.MaxPool2d(_pair(args[1]), _pair(_arg(args, 2) or None), _pair(_arg(args, 3, 0)),
                        _pair(_arg(args, 4, 1)), ceil_mode=bool(_arg(args, 5, False)))  # fmt: skip


def _avg_pool(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``."""
    return nn.AvgPool2d(_pair(args[1]), _pair(_arg(args, 2) or None), _pair(_arg(args, 3, 0)),
                        bool(_arg(args, 4, False)), bool(_arg(args, 5, True)), _arg(args, 6))  # fmt: skip


def _mean(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``mean(input, dim, keepdim, dtype)`` over the spatial dimensions: a global average pool."""
    dims = _arg(args, 1)
    if not isinstance(dims, (list, tuple)) or sorted(dims) not in ([2, 3], [-2, -1]) or _arg(args, 3) is not None:
        raise UnsupportedModelError(f"a mean over dimensions {dims} is not a mean over the spatial dimensions (2, 3).")
    pool = nn.AdaptiveAvgPool2d((1, 1))
    return pool if _arg(args, 2, False) else nn.Sequential(pool, nn.Flatten())


def _view(args: Sequence[Any], rank: int | None) -> nn.Module:  # noqa: ARG001
    """``view``/``reshape(input, shape)`` to ``(N, -1)`` (or ``(N, features)``): a flatten."""
    shape = list(args[1]) if isinstance(args[1], (list, tuple)) else None
    if shape is None or len(shape) != 2 or not all(d is BATCH or isinstance(d, int) for d in shape):
        raise UnsupportedModelError(f"a reshape to {shape} is not a flatten to (N, -1).")
    return nn.Flatten()


def _identity(args: Sequence[Any], rank: int | None) -> None:  # noqa: ARG001
    return None


def _simple(cls: type[nn.Module]) -> Callable[[Sequence[Any], int | None], nn.Module]:
    return lambda args, rank: cls()


OP_LAYERS: dict[str, Callable[[Sequence[Any], int | None], nn.Module | None]] = {
    "linear": _linear,
    "conv2d": _conv2d,
    "convolution": _convolution,
    "_convolution": _convolution,
    "batch_norm": _batch_norm,
    "_native_batch_norm_legit_no_training": _batch_norm_no_training,
    "relu": _simple(nn.ReLU),
    "sigmoid": _simple(nn.Sigmoid),
    "tanh": _simple(nn.Tanh),
    "leaky_relu": lambda args, rank: nn.LeakyReLU(float(_arg(args, 1, 0.01))),
    "hardtanh": _hardtanh,
    "elu": _elu,
    "softplus": lambda args, rank: nn.Softplus(float(_arg(args, 1, 1.0)), float(_arg(args, 2, 20.0))),
    "silu": _simple(nn.SiLU),
    "gelu": lambda args, rank: nn.GELU(str(_arg(args, 1, "none"))),
    "max_pool2d": _max_pool,
    "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": lambda args, rank: nn.AdaptiveAvgPool2d(_pair(args[1])),
    "mean": _mean,
    "flatten": lambda args, rank: nn.Flatten(int(_arg(args, 1, 0)), int(_arg(args, 2, -1))),
    "view": _view,
    "reshape": _view,
    "_unsafe_view": _view,
    **dict.fromkeys(("dropout", "feature_dropout", "alpha_dropout", "clone", "contiguous", "alias"), _identity),
}
"""ATen call (its name without namespace and in-place ``_``) → the standard module computing it, from the call's
arguments in schema order and the rank of its input when known (``None`` for an identity)."""

SUPPORTED = ", ".join(sorted({*OP_LAYERS, "add"} - {"_unsafe_view", "_convolution", "alias"}))


def op_name(qualified: str) -> str:
    """``"aten::relu_"`` → ``"relu"`` (the key of :data:`OP_LAYERS`); ``"aten::add.Tensor"`` → ``"add"``."""
    name = qualified.split("::")[-1].split(".")[0]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _same(a: nn.Module, b: nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return (
        type(a) is type(b)
        and repr(a) == repr(b)
        and state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    )


class GraphBuilder:
    """
    An fx graph of standard modules under chosen paths, joined by ``operator.add``.

    :param reserved: the saved model's parameter and buffer names: modules without weights never take a path that
        one of them needs.
    """

    def __init__(self, reserved: Iterable[str] = ()) -> None:
        self.graph = torch.fx.Graph()
        self.modules: dict[str, nn.Module] = {}
        self._taken = {prefix for name in reserved for prefix in _prefixes(name)}

    def input(self) -> torch.fx.Node:
        """The model's input."""
        return self.graph.placeholder("x")

    def call(
        self, qualified: str, args: Sequence[Any], where: str, hint: str | None = None, rank: int | None = None
    ) -> Any:
        """
        The value of the ATen call ``qualified`` (e.g. ``"aten::conv2d"``) on ``args``.

        :param where: how errors name the call (the node, the module).
        :param hint: the path of the module that made the call, for a module without weights.
        :param rank: the rank of the call's input when known (batch norm 1-D or 2-D).
        :raises UnsupportedModelError: if the call is not a standard layer or an addition of two values.
        """
        name = op_name(qualified)
        if name == "add":
            return self.add(args, where)
        if name not in OP_LAYERS:
            raise UnsupportedModelError(
                f"{where} calls {qualified}, which is not a layer that can be rebuilt as an eager module; "
                f"supported: {SUPPORTED}."
            )
        nodes = [a for a in args if isinstance(a, torch.fx.Node)]
        if len(nodes) != 1 or args[0] is not nodes[0]:
            raise UnsupportedModelError(f"{where}: {qualified} does not read exactly one value of the graph.")
        try:
            module = OP_LAYERS[name](args, rank)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{where}: {err}") from err
        if module is None:
            return args[0]
        params = [a.path for a in args if isinstance(a, Param)]
        path = params[0].rpartition(".")[0] if params else None
        return self.call_module(path, module, args[0], hint=hint, default=name)

    def add(self, args: Sequence[Any], where: str) -> torch.fx.Node:
        """``a + b`` of two values of the graph (``alpha`` 1)."""
        if len(args) < 2 or not all(isinstance(a, torch.fx.Node) for a in args[:2]) or _arg(args, 2, 1) != 1:
            raise UnsupportedModelError(f"{where} is not an addition of two branches (a constant or a scale factor).")
        return self.graph.call_function(operator.add, (args[0], args[1]))

    def call_module(
        self, path: str | None, module: nn.Module, x: torch.fx.Node, hint: str | None = None, default: str = "layer"
    ) -> torch.fx.Node:
        """
        Call ``module`` on ``x``. A module with weights is installed at ``path`` (the path of its weights), where the
        same module may already be (shared weights); one without weights at ``path`` or ``hint`` when free, else at a
        new top-level name made from ``default``.
        """
        weighted = next(iter(module.state_dict()), None) is not None
        if path and weighted:
            if path in self.modules and not _same(self.modules[path], module):
                raise UnsupportedModelError(f"the weights of {path!r} are used by layers of different settings.")
        else:
            path = next((p for p in (path, hint) if p and self._free(p, module)), None)
            index = 0
            while path is None or not self._free(path, module):
                path = default if path is None else f"{default}_{index}"
                index += 1
        if path not in self.modules:
            self.modules[path] = module.eval()
            self._taken.update(_prefixes(path))
        return self.graph.call_module(path, (x,))

    def _free(self, path: str, module: nn.Module) -> bool:
        if path in self.modules:
            return _same(self.modules[path], module)
        return path not in self._taken and not any(p in self.modules for p in _prefixes(path))

    def build(self, output: Any, class_name: str) -> torch.fx.GraphModule:
        """The eager module (eval mode) returning ``output``, a value of the graph."""
        if not isinstance(output, torch.fx.Node) or output.op == "placeholder":
            raise UnsupportedModelError("the model's output is not a single tensor computed by its layers.")
        self.graph.output(output)
        name = class_name if class_name.isidentifier() else "RebuiltModel"
        module = torch.fx.GraphModule(self.modules, self.graph, class_name=name)
        module.graph.eliminate_dead_code()
        module.delete_all_unused_submodules()
        module.recompile()
        return module.eval()


def check_same_outputs(eager: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """
    Check that the rebuilt eager module reproduces the saved model (the TorchScript module or the exported program's
    module) on ``x``, both in eval mode.

    :raises UnsupportedModelError: if the outputs differ or the saved model cannot be run on ``x``.
    """
    eager.eval()
    try:
        with eval_mode(reference), torch.no_grad():
            expected, got = reference(x), eager(x)
    except Exception as err:  # noqa: BLE001 - e.g. an exported program's guard on the batch size
        raise UnsupportedModelError(f"the saved model cannot be compared with its eager rebuild: {err}") from err
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError("the eager rebuild of the saved model does not reproduce its outputs.")
