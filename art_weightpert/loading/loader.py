"""
Loading a model from where users keep it: a ``torch.export`` program (``.pt2``, the preferred format), a TorchScript
file, a whole module saved with ``torch.save`` (after a warning: unpickling runs code), a ``.onnx`` file (through
``onnx2torch``, the ``[onnx]`` extra) or a ``package.module:callable`` returning an ``nn.Module``.

Weight attacks and certificates need an eager module whose forward ``torch.fx`` can trace; exported programs and
TorchScript modules are therefore rebuilt as eager ``torch.fx.GraphModule`` s of standard layers joined by additions
(:func:`.exported_to_eager`, :func:`.torchscript_to_eager`), with the saved model's parameter names, and the rebuild
is checked against the saved model (:func:`.check_same_outputs`) on an example input when one is known.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from art_weightpert.loading.exported import ExportedModule, exported_to_eager, is_exported_archive, load_exported
from art_weightpert.loading.rebuild import check_same_outputs
from art_weightpert.loading.torchscript import torchscript_to_eager
from art_weightpert.operators import UnsupportedModelError

logger = logging.getLogger(__name__)

PICKLE_WARNING = (
    "{path} is not a TorchScript file; loading it with torch.load(weights_only=False), which runs the pickled code "
    "inside it. Only do this with files you trust (TorchScript and .pt2 files load without running code)."
)


class ModelSpecError(ValueError):
    """The model argument names no usable model (not a model file, import failure, not an ``nn.Module``)."""


@dataclass
class LoadedModel:
    """
    A loaded model and how it was read.

    :param module: the module to evaluate (eager when possible, else the saved model itself).
    :param source: the path or spec as given.
    :param kind: ``"exported"``, ``"torchscript"``, ``"pickle"``, ``"onnx"`` or ``"callable"``.
    :param eager: True when ``module`` is an eager module (attacks and certificates can run).
    :param note: how the model was read.
    :param unsupported_reason: why attacks and certificates cannot run on it (``None`` when they can).
    :param scripted: the TorchScript module or the exported program's module that an eager rebuild must reproduce
        (``None`` when ``module`` is the user's own module).
    """

    module: nn.Module
    source: str
    kind: str
    eager: bool
    note: str = ""
    unsupported_reason: str | None = None
    scripted: nn.Module | None = None


def is_callable_spec(spec: str) -> bool:
    """True when ``spec`` looks like ``package.module:callable`` (and is not an existing path)."""
    if os.path.exists(spec) or spec.count(":") != 1:
        return False
    module, func = spec.split(":")
    return bool(module) and bool(func) and all(part.isidentifier() for part in module.split(".") + func.split("."))


def load_model(path_or_spec: str | os.PathLike, example: torch.Tensor | None = None) -> nn.Module:
    """
    Load a model as an eager ``nn.Module`` that weight attacks and certificates can analyse.

    :param path_or_spec: a ``.pt2`` file (``torch.export.save``), a TorchScript file (``torch.jit.save``), a file of
        ``torch.save(module)`` (loaded after a warning: unpickling runs code), a ``.onnx`` file (needs ``onnx2torch``
        and a torchvision built for the installed torch; chains of Gemm/Conv/activations convert, while onnx2torch 1.5
        fails on residual networks exported by torch 2.13: use ``.pt2`` for those) or ``package.module:callable``
        (imported from the working directory too).
    :param example: inputs on which a rebuilt ``.pt2``/TorchScript model must reproduce the saved one (an exported
        program is always checked on random inputs of its exported shape).
    :return: the module in eval mode; exported programs and TorchScript modules as eager ``torch.fx.GraphModule`` s
        with the saved parameter names (``layer1.0.conv1.weight``).
    :raises FileNotFoundError: if ``path_or_spec`` is neither an existing file nor a ``module:callable``.
    :raises ModelSpecError: if the file or callable gives no ``nn.Module``.
    :raises UnsupportedModelError: if a saved graph cannot be rebuilt as an eager module of standard layers, or the
        rebuild does not reproduce it.
    """
    loaded = load_model_record(path_or_spec)
    if not loaded.eager:
        raise UnsupportedModelError(f"{loaded.source}: {loaded.unsupported_reason}")
    if example is not None and loaded.scripted is not None:
        check_same_outputs(loaded.module, loaded.scripted, example)
    return loaded.module.eval()


def load_model_record(path_or_spec: str | os.PathLike) -> LoadedModel:
    """
    :func:`load_model` without raising for a saved graph that cannot be rebuilt: such a model comes back with
    ``eager=False``, the saved model as ``module`` (for its clean accuracy) and the reason.

    :raises FileNotFoundError: if ``path_or_spec`` is neither an existing file nor a ``module:callable``.
    :raises ModelSpecError: if the file or callable gives no ``nn.Module``.
    """
    spec = os.fspath(path_or_spec)
    if is_callable_spec(spec):
        return LoadedModel(_load_callable(spec), spec, "callable", eager=True, note=f"built by {spec}()")
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"model file not found: {spec} (nor a package.module:callable)")
    if spec.endswith(".onnx"):
        return _load_onnx(spec)
    if is_exported_archive(spec):
        return _load_exported(spec)
    if spec.endswith(".pt2"):
        raise ModelSpecError(f"{spec} is not a torch.export archive (written by torch.export.save).")
    try:
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; .pt2 is the preferred format
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(spec, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not a TorchScript archive: try a pickled module next
        logger.debug("torch.jit.load(%s) failed: %s", spec, err)
    else:
        return _rebuilt(spec, "torchscript", scripted, lambda: torchscript_to_eager(scripted))
    return _load_pickle(spec)


def _rebuilt(spec: str, kind: str, saved: nn.Module, rebuild: Any) -> LoadedModel:
    """The eager rebuild of a saved graph, checked on an example input when the saved model records its shape."""
    try:
        eager = rebuild()
        example = _example_input(saved)
        if example is not None:
            check_same_outputs(eager, saved, example)
    except UnsupportedModelError as err:
        return LoadedModel(saved, spec, kind, eager=False, unsupported_reason=str(err), scripted=saved)
    what = "torch.export program" if kind == "exported" else "TorchScript module"
    note = f"{what} rebuilt as an eager module of the same layers (outputs checked on the data)"
    return LoadedModel(eager, spec, kind, eager=True, note=note, scripted=saved)


def _example_input(saved: nn.Module) -> torch.Tensor | None:
    """Random inputs of the shape an exported program or a traced TorchScript module records, else ``None``."""
    if isinstance(saved, ExportedModule):
        return saved.example_input()
    try:
        sizes = list(saved.graph.inputs())[1].type().sizes()
    except (AttributeError, RuntimeError, IndexError):
        return None
    if not sizes or any(s is None for s in sizes):
        return None
    return torch.rand(sizes, generator=torch.Generator().manual_seed(0))


def _load_exported(spec: str) -> LoadedModel:
    """A ``torch.export`` program, rebuilt as an eager module when its graph is made of standard layers, else run as
    its graph module (clean accuracy only)."""
    try:
        program = load_exported(spec)
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise ModelSpecError(f"cannot load {spec} with torch.export.load: {type(err).__name__}: {err}") from err
    reference = ExportedModule(program)
    loaded = _rebuilt(spec, "exported", reference, lambda: exported_to_eager(program))
    if not loaded.eager:
        reason = loaded.unsupported_reason
        if reference.static_batch is not None:
            raise ModelSpecError(
                f"{spec} was exported with a fixed batch size of {reference.static_batch} and cannot be rebuilt as "
                f"an eager module ({reason}); export it with a dynamic batch dimension: torch.export.export(model, "
                "(x,), dynamic_shapes=({0: torch.export.Dim('batch')},))"
            )
        loaded.unsupported_reason = (
            f"{reason} Weight attacks and certificates need the model's Linear/Conv modules: pass the eager model as "
            "package.module:callable to analyse it."
        )
    return loaded


def _load_pickle(spec: str) -> LoadedModel:
    """A whole module saved with ``torch.save`` (unpickled after a warning)."""
    try:  # plain tensors and dicts (a state_dict) load safely
        obj = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a pickled module needs weights_only=False
        warnings.warn(PICKLE_WARNING.format(path=spec), UserWarning, stacklevel=3)
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


def _load_onnx(spec: str) -> LoadedModel:
    """An ONNX file converted by ``onnx2torch`` into an eager ``torch.fx.GraphModule``."""
    try:
        from onnx2torch import convert
    except ImportError as err:
        raise ModelSpecError(
            f"{spec}: reading .onnx files needs onnx2torch, which imports torchvision: install both for your torch "
            "(docs/install.md), or export the PyTorch model as .pt2 (torch.export) instead"
        ) from err
    try:
        module = convert(spec)
    except Exception as err:  # noqa: BLE001 - reported as one line
        raise ModelSpecError(f"cannot convert {spec} with onnx2torch: {type(err).__name__}: {err}") from err
    return LoadedModel(module.eval(), spec, "onnx", eager=True, note="ONNX graph converted by onnx2torch")


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
        raise ModelSpecError(f"cannot import module {module_name!r} of {spec}: {err}") from err
    for part in func_name.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_name!r} has no attribute {func_name!r} ({spec}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec} is not callable.")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model
