"""
Loading a user's model for the command line: a ``torch.export`` program (``.pt2``, the preferred format; see
:mod:`.exported`), a TorchScript file, a whole module saved with ``torch.save``, or a ``package.module:callable`` that
returns an ``nn.Module``.

Weight attacks and certificates need an eager ``nn.Module``: ``torch.func.functional_call`` refuses TorchScript
modules and ``torch.fx`` cannot trace them. A TorchScript model that is an ``nn.Sequential`` of standard layers
(scripted or traced) is therefore rebuilt as the equivalent eager ``nn.Sequential`` with the same weights
(:func:`torchscript_to_eager`); the rebuilt module is checked against the TorchScript one on the user's data before
it is used (:func:`check_same_outputs`). Any other TorchScript module can only be evaluated clean.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)

PICKLE_WARNING = (
    "{path} is not a TorchScript file; loading it with torch.load(weights_only=False), which runs the pickled code "
    "inside it. Only do this with files you trust (TorchScript files load without running code)."
)


class ModelSpecError(ValueError):
    """The model argument names no usable model (missing file, import failure, not an ``nn.Module``)."""


@dataclass
class LoadedModel:
    """
    A model read from the command line's ``--model`` argument.

    :param module: the module to evaluate (eager when possible, else the TorchScript module itself).
    :param source: the argument as given.
    :param kind: ``"exported"``, ``"torchscript"``, ``"pickle"`` or ``"callable"``.
    :param eager: True when ``module`` is an eager module (attacks and certificates can run).
    :param note: how the model was read (shown in the report).
    :param unsupported_reason: why attacks and certificates cannot run on it (``None`` when they can).
    """

    module: nn.Module
    source: str
    kind: str
    eager: bool
    note: str = ""
    unsupported_reason: str | None = None
    scripted: torch.jit.ScriptModule | None = None
    """The TorchScript module or the exported program's module that an eager rebuild must reproduce."""


def is_callable_spec(spec: str) -> bool:
    """True when ``spec`` looks like ``package.module:callable`` (and is not an existing path)."""
    if os.path.exists(spec) or spec.count(":") != 1:
        return False
    module, func = spec.split(":")
    return bool(module) and bool(func) and all(part.isidentifier() for part in module.split(".") + func.split("."))


def load_model(spec: str) -> LoadedModel:
    """
    Load ``spec``: a TorchScript file (tried first), a file written by ``torch.save(module)`` (loaded with
    ``weights_only=False`` after a warning, since it runs pickled code) or ``package.module:callable``.

    :param spec: the ``--model`` argument.
    :return: the loaded model; TorchScript ``nn.Sequential`` models are rebuilt as eager modules.
    :raises FileNotFoundError: if ``spec`` is neither an existing file nor a ``module:callable``.
    :raises ModelSpecError: if the file or callable does not give an ``nn.Module``.
    """
    if is_callable_spec(spec):
        return LoadedModel(_load_callable(spec), spec, "callable", eager=True, note=f"built by {spec}()")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"model file not found: {spec} (nor a package.module:callable)")
    exported = _load_exported(spec)
    if exported is not None:
        return exported
    try:
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; .pt2 is the preferred format
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(spec, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not a TorchScript archive: try a pickled module next
        logger.debug("torch.jit.load(%s) failed: %s", spec, err)
    else:
        try:
            eager = torchscript_to_eager(scripted)
        except UnsupportedModelError as err:
            return LoadedModel(
                scripted, spec, "torchscript", eager=False, unsupported_reason=str(err), scripted=scripted
            )
        note = "TorchScript nn.Sequential rebuilt as the same eager nn.Sequential (outputs checked on the data)"
        return LoadedModel(eager, spec, "torchscript", eager=True, note=note, scripted=scripted)
    try:  # plain tensors and dicts (a state_dict) load safely
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module needs weights_only=False
        warnings.warn(PICKLE_WARNING.format(path=spec), UserWarning, stacklevel=2)
        _import_from_cwd()  # the pickle names the module's class by its import path
        try:
            obj = torch.load(spec, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - reported as one line by the CLI
            raise ModelSpecError(f"cannot load model file {spec}: {type(err).__name__}: {err}") from err
    if not isinstance(obj, nn.Module):
        hint = (
            " (a state_dict? save the whole module, or pass package.module:callable)" if isinstance(obj, dict) else ""
        )
        raise ModelSpecError(f"model file {spec} holds a {type(obj).__name__}, not a torch.nn.Module{hint}.")
    return LoadedModel(obj, spec, "pickle", eager=True, note="whole module loaded with torch.load(weights_only=False)")


def _load_exported(spec: str) -> LoadedModel | None:
    """A ``torch.export`` program (``None`` when ``spec`` is not one): rebuilt as the same eager ``nn.Sequential``
    when its graph is a chain of standard layers, else run as its graph module (clean accuracy only)."""
    from art_weightpert.cli.exported import ExportedModule, exported_to_eager, is_exported_archive, load_exported

    if not is_exported_archive(spec):
        if spec.endswith(".pt2"):
            raise ModelSpecError(f"{spec} is not a torch.export archive (written by torch.export.save).")
        return None
    try:
        program = load_exported(spec)
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise ModelSpecError(f"cannot load {spec} with torch.export.load: {type(err).__name__}: {err}") from err
    reference = ExportedModule(program)
    try:
        eager = exported_to_eager(program)
    except UnsupportedModelError as err:
        if reference.static_batch is not None:
            raise ModelSpecError(
                f"{spec} was exported with a fixed batch size of {reference.static_batch} and is not a chain of layers "
                f"that can be rebuilt ({err}); export it with a dynamic batch dimension: torch.export.export(model, "
                "(x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
            ) from err
        reason = (
            f"{err} Weight attacks and certificates need the model's Linear/Conv modules, which an exported graph "
            "of other calls does not keep: pass the eager model as package.module:callable to analyse it."
        )
        return LoadedModel(reference, spec, "exported", eager=False, unsupported_reason=reason)
    note = "torch.export program rebuilt as the same eager nn.Sequential (outputs checked on the data)"
    return LoadedModel(eager, spec, "exported", eager=True, note=note, scripted=reference)


def _import_from_cwd() -> None:
    """Make modules in the working directory importable, as ``python -m`` does (console scripts do not)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _load_callable(spec: str) -> nn.Module:
    module_name, func_name = spec.split(":")
    _import_from_cwd()
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelSpecError(f"cannot import module {module_name!r} of --model {spec}: {err}") from err
    for part in func_name.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_name!r} has no attribute {func_name!r} (--model {spec}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec} is not callable.")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


# ------------------------------------------------------------------------------------------- TorchScript → eager
def _graph_args(module: torch.jit.ScriptModule, op: str) -> list[Any] | None:
    """Constant arguments of the first ``op`` call (e.g. ``"aten::_convolution"``) in a traced module's graph."""
    try:
        graph = module.graph
    except (AttributeError, RuntimeError):
        return None
    for node in graph.nodes():
        if node.kind() != op:
            continue
        args = []
        for value in node.inputs():
            producer = value.node()
            if producer.kind() == "prim::Constant":
                args.append(value.toIValue())
            elif producer.kind() == "prim::ListConstruct":
                items = [v.toIValue() if v.node().kind() == "prim::Constant" else None for v in producer.inputs()]
                args.append(tuple(items))
            else:
                args.append(None)
        return args
    return None


def _attrs(module: torch.jit.ScriptModule, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The named attributes of a scripted module (``None`` if one is missing, as in traced modules)."""
    try:
        return {name: getattr(module, name) for name in names}
    except AttributeError:
        return None


def _state(module: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _rebuild_linear(m: torch.jit.ScriptModule) -> nn.Module:
    state = _state(m)
    out_features, in_features = state["weight"].shape
    layer = nn.Linear(in_features, out_features, bias="bias" in state)
    layer.load_state_dict(state)
    return layer


def _rebuild_conv2d(m: torch.jit.ScriptModule) -> nn.Module:
    state = _state(m)
    out_channels, in_per_group, kh, kw = state["weight"].shape
    attrs = _attrs(m, ("stride", "padding", "dilation", "groups", "padding_mode"))
    if attrs is None:  # traced: aten::_convolution(input, weight, bias, stride, padding, dilation, transposed, ...)
        args = _graph_args(m, "aten::_convolution")
        if args is None or len(args) < 9 or args[6]:
            raise UnsupportedModelError("cannot read the Conv2d settings from the traced graph.")
        attrs = {"stride": args[3], "padding": args[4], "dilation": args[5], "groups": args[8], "padding_mode": "zeros"}
    if isinstance(attrs["padding"], str) or any(v is None for v in (attrs["stride"], attrs["padding"])):
        raise UnsupportedModelError("a Conv2d with non-numeric padding cannot be rebuilt.")
    groups = int(attrs["groups"])
    layer = nn.Conv2d(
        in_per_group * groups,
        out_channels,
        (kh, kw),
        stride=tuple(attrs["stride"]),
        padding=tuple(attrs["padding"]),
        dilation=tuple(attrs["dilation"]),
        groups=groups,
        bias="bias" in state,
        padding_mode=attrs["padding_mode"],
    )
    layer.load_state_dict(state)
    return layer


def _rebuild_pool(cls: type[nn.Module], op: str) -> Any:
    def rebuild(m: torch.jit.ScriptModule) -> nn.Module:
        if cls is nn.MaxPool2d:
            attrs = _attrs(m, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"))
            if attrs is None:
                args = _graph_args(m, op)  # max_pool2d(input, kernel, stride, padding, dilation, ceil_mode)
                if args is None or len(args) < 6:
                    raise UnsupportedModelError("cannot read the MaxPool2d settings from the traced graph.")
                attrs = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:6]))
            return nn.MaxPool2d(**attrs)
        attrs = _attrs(m, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"))
        if attrs is None:
            args = _graph_args(m, op)  # avg_pool2d(input, kernel, stride, padding, ceil_mode, count_include_pad, div)
            if args is None or len(args) < 7:
                raise UnsupportedModelError("cannot read the AvgPool2d settings from the traced graph.")
            keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            attrs = dict(zip(keys, args[1:7]))
        return nn.AvgPool2d(**attrs)

    return rebuild


def _rebuild_flatten(m: torch.jit.ScriptModule) -> nn.Module:
    attrs = _attrs(m, ("start_dim", "end_dim"))
    if attrs is None:
        args = _graph_args(m, "aten::flatten")
        if args is None or len(args) < 3:
            raise UnsupportedModelError("cannot read the Flatten settings from the traced graph.")
        attrs = {"start_dim": args[1], "end_dim": args[2]}
    return nn.Flatten(**attrs)


def _rebuild_batchnorm(cls: type[nn.Module]) -> Any:
    def rebuild(m: torch.jit.ScriptModule) -> nn.Module:
        state = _state(m)
        if "running_mean" not in state:
            raise UnsupportedModelError(f"{cls.__name__} without running statistics.")
        attrs = _attrs(m, ("eps",))
        if attrs is None:
            args = _graph_args(m, "aten::batch_norm")  # batch_norm(x, w, b, mean, var, training, momentum, eps, ...)
            if args is None or len(args) < 8:
                raise UnsupportedModelError(f"cannot read the {cls.__name__} settings from the traced graph.")
            attrs = {"eps": args[7]}
        layer = cls(state["running_mean"].numel(), eps=float(attrs["eps"]), affine="weight" in state)
        layer.load_state_dict(state, strict=False)
        return layer

    return rebuild


def _rebuild_activation(cls: type[nn.Module]) -> Any:
    def rebuild(m: torch.jit.ScriptModule) -> nn.Module:
        if cls is nn.LeakyReLU:
            attrs = _attrs(m, ("negative_slope",))
            if attrs is None:
                args = _graph_args(m, "aten::leaky_relu")
                if args is None or len(args) < 2:
                    raise UnsupportedModelError("cannot read the LeakyReLU slope from the traced graph.")
                attrs = {"negative_slope": args[1]}
            return nn.LeakyReLU(float(attrs["negative_slope"]))
        return cls()

    return rebuild


_REBUILDERS = {
    "Linear": _rebuild_linear,
    "Conv2d": _rebuild_conv2d,
    "ReLU": _rebuild_activation(nn.ReLU),
    "LeakyReLU": _rebuild_activation(nn.LeakyReLU),
    "Sigmoid": _rebuild_activation(nn.Sigmoid),
    "Tanh": _rebuild_activation(nn.Tanh),
    "Flatten": _rebuild_flatten,
    "MaxPool2d": _rebuild_pool(nn.MaxPool2d, "aten::max_pool2d"),
    "AvgPool2d": _rebuild_pool(nn.AvgPool2d, "aten::avg_pool2d"),
    "BatchNorm1d": _rebuild_batchnorm(nn.BatchNorm1d),
    "BatchNorm2d": _rebuild_batchnorm(nn.BatchNorm2d),
    "Dropout": lambda m: nn.Identity(),
    "Identity": lambda m: nn.Identity(),
}


def torchscript_to_eager(scripted: torch.jit.ScriptModule) -> nn.Sequential:
    """
    Rebuild a TorchScript ``nn.Sequential`` (scripted or traced; nested ``Sequential`` allowed) of standard layers as
    the same eager ``nn.Sequential`` with copied weights, in eval mode.

    :param scripted: the loaded TorchScript module.
    :return: the eager module.
    :raises UnsupportedModelError: naming the first module that cannot be rebuilt and why.
    """
    name = getattr(scripted, "original_name", type(scripted).__name__)
    if name != "Sequential":
        raise UnsupportedModelError(
            f"TorchScript module {name!r} is not an nn.Sequential: torch.fx cannot trace TorchScript code and "
            "torch.func cannot run it with other weights, so weight attacks and certificates need the eager module "
            "(pass package.module:callable, or torch.save the whole module)."
        )
    return _rebuild_sequential(scripted, prefix="")


def _rebuild_sequential(scripted: torch.jit.ScriptModule, prefix: str) -> nn.Sequential:
    children = []
    for child_name, child in scripted.named_children():
        kind = getattr(child, "original_name", type(child).__name__)
        where = f"{prefix}{child_name}"
        if kind == "Sequential":
            children.append((child_name, _rebuild_sequential(child, f"{where}.")))
            continue
        if kind not in _REBUILDERS:
            raise UnsupportedModelError(
                f"TorchScript module {where!r} ({kind}) is not a layer that can be rebuilt as an eager module; "
                f"supported: {sorted(_REBUILDERS)}."
            )
        try:
            children.append((child_name, _REBUILDERS[kind](child)))
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"TorchScript module {where!r} ({kind}): {err}") from err
    return nn.Sequential(OrderedDict(children)).eval()


def check_same_outputs(eager: nn.Module, scripted: torch.jit.ScriptModule, x: torch.Tensor) -> None:
    """
    Check that the rebuilt eager module reproduces the TorchScript module on ``x`` (both in eval mode).

    :raises UnsupportedModelError: if the outputs differ.
    """
    was_training = scripted.training
    scripted.eval()
    eager.eval()
    try:
        with torch.no_grad():
            expected, got = scripted(x), eager(x)
    except Exception as err:  # noqa: BLE001 - e.g. an exported program's guard on the batch size
        raise UnsupportedModelError(f"the saved model cannot be compared with its eager rebuild: {err}") from err
    finally:
        scripted.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError("the eager rebuild of the saved model does not reproduce its outputs.")
