"""
Deployed int8 models as weight classifiers: :func:`deployed_module` (behind
:meth:`.PyTorchWeightClassifier.from_quantized`) and :func:`is_quantized_model`.

Supported deployments (docs/theory.md §8, ``w = s·(c − z)``):

* torchao: ``nn.Linear`` layers whose weight is an ``Int8Tensor`` (``quantize_(model, Int8WeightOnlyConfig())`` or
  ``Int8DynamicActivationInt8WeightConfig()``), per tensor or per row;
* ``torch.ao.quantization`` eager mode: ``quantize_dynamic`` (``nn.quantized.dynamic.Linear``, qint8) and static
  ``prepare``/``convert`` (``QuantStub``/``DeQuantStub``, ``nn.quantized.Linear`` and ``Conv2d``, fused ``LinearReLU``
  and ``ConvReLU2d``), per-tensor or per-channel weights, zero points included.

Each quantized layer becomes a :class:`.DeployedLayer` (an ``nn.Linear``/``nn.Conv2d`` with the dequantized weight,
running the deployed operator on the codes of its current weight); every other module is carried over. The user's
model is never modified: the conversion works on a deep copy.

Layers that quantize their activations at run time (dynamic or static) set ``quantizes_activations``: the certifiers,
whose bounds model float activations, refuse them (:func:`.module_layer`); the attacks work on them. Dynamic
quantization picks the activations' scale per batch, so the deployed outputs depend on how inputs are batched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.intrinsic.quantized.dynamic as nniqd
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn

from art_weightpert.estimators.quantized_layers import (
    DeployedLayer,
    DynamicQuantizedLinear,
    QuantizedInput,
    StaticQuantizedConv2d,
    StaticQuantizedLinear,
    TorchAOLinear,
)
from art_weightpert.estimators.weight_classifier import eval_mode
from art_weightpert.operators import UnsupportedModelError

__all__ = [
    "DEPLOYED_BITS",
    "DeployedLayer",
    "check_deployed",
    "deployed_encoding",
    "deployed_layers",
    "deployed_module",
    "is_quantized_model",
]

DEPLOYED_BITS = 8

_STATIC = (nnq.Linear, nniq.LinearReLU, nnq.Conv2d, nniq.ConvReLU2d)
_DYNAMIC = (nnqd.Linear, nniqd.LinearReLU)
# Modules that may receive a statically quantized activation: on its dequantized value they compute the same values.
_GRID_PRESERVING = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nnq.DeQuantize,
)
_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)


def _is_torchao_weight(weight: Any) -> bool:
    return isinstance(weight, torch.Tensor) and type(weight).__module__.split(".")[0] == "torchao"


def _is_quantized_layer(module: nn.Module) -> bool:
    """A torch.ao quantized Linear/Conv (static or dynamic) or a Linear with a torchao weight."""
    return isinstance(module, (nnq.Linear, nnq.Conv2d, nnq.Quantize)) or (
        isinstance(module, nn.Linear) and _is_torchao_weight(module.weight)
    )


def is_quantized_model(module: Any) -> bool:
    """
    Whether ``module`` holds deployed quantized layers that :func:`deployed_module` converts (torch.ao eager-mode
    quantized modules, torchao quantized Linear weights).

    :param module: any object; ``False`` unless a ``torch.nn.Module``.
    :return: ``True`` when a submodule is quantized (a converted module, whose layers are float, gives ``False``).
    """
    if not isinstance(module, nn.Module):
        return False
    return any(_is_quantized_layer(m) for m in module.modules())


def deployed_layers(model: nn.Module) -> dict[str, DeployedLayer]:
    """Every :class:`.DeployedLayer` of ``model`` by its name in ``model.named_modules()``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DeployedLayer)}


def check_deployed(model: nn.Module, n_bits: int, granularity: str, layers: list[str] | None) -> list[str] | None:
    """
    Check quantization arguments against a deployed int8 model, whose encoding is read, not chosen: ``n_bits`` must be
    8; ``granularity="tensor"`` (the default) reads whatever the layers deploy (per tensor or per channel),
    ``"channel"`` requires per-channel scales.

    :param model: the converted model (:func:`deployed_module`).
    :param n_bits: the bits per code asked for.
    :param granularity: the granularity asked for.
    :param layers: the selected layers (``None``: every deployed layer).
    :return: the selected layers; ``None`` when ``model`` has no deployed layer.
    :raises ValueError: a selected layer that is float in the deployed model, ``n_bits != 8``, or
        ``granularity="channel"`` on a layer deployed with one scale per tensor.
    """
    deployed = deployed_layers(model)
    if not deployed:
        return None
    layers = list(deployed) if layers is None else layers
    floats = [name for name in layers if name not in deployed]
    if floats:
        raise ValueError(f"`layers`: {floats} are float in the deployed model; its int8 layers are {list(deployed)}.")
    if n_bits != DEPLOYED_BITS:
        raise ValueError(
            f"`n_bits={n_bits}` contradicts the deployed model, whose layers {layers} store {DEPLOYED_BITS}-bit codes; "
            f"pass n_bits={DEPLOYED_BITS}."
        )
    per_tensor = [name for name in layers if not deployed[name].per_channel]
    if granularity == "channel" and per_tensor:
        raise ValueError(
            f"`granularity='channel'` contradicts the deployed model, whose layers {per_tensor} have one scale per "
            "tensor; pass granularity='tensor' (the default reads the deployed scales as they are)."
        )
    return layers


def deployed_encoding(model: nn.Module, layers: list[str]) -> tuple[dict, dict, dict, str]:
    """
    The deployed encoding of the weights of ``layers`` (deployed layers of ``model``): codes of the current weights.

    :return: ``(codes, scales, zero_points, granularity)``: ``{weight name: int64 codes}``, float64 scales and int64
        zero points per tensor, or per output channel for all weights (a per-tensor one repeated) when any layer is
        per channel, and that granularity (``"tensor"`` or ``"channel"``).
    """
    modules = deployed_layers(model)
    per_channel = any(modules[layer].per_channel for layer in layers)
    codes, scales, zero_points = {}, {}, {}
    for layer in layers:
        module, name = modules[layer], f"{layer}.weight"
        codes[name] = module.codes()
        shape = (len(codes[name]),) if per_channel else ()
        scales[name] = module.weight_scale.expand(shape).clone()
        zero_points[name] = module.weight_zero_point.expand(shape).clone()
    return codes, scales, zero_points, "channel" if per_channel else "tensor"


def deployed_module(qmodel: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """
    A module computing exactly what ``qmodel`` computes, with every quantized layer a :class:`.DeployedLayer`
    (module names kept; a quantized layer given alone is wrapped as ``nn.Sequential(layer)``, named ``"0"``).

    :param qmodel: the deployed quantized model (not modified).
    :param input_shape: shape of one input (a forward on a zero input records the statically quantized activations'
        grids).
    :return: the converted module, in ``qmodel``'s training mode.
    :raises TypeError: ``qmodel`` is not a ``torch.nn.Module``.
    :raises ValueError: ``qmodel`` has no quantized layer.
    :raises UnsupportedModelError: naming a module of an unsupported quantization (quint8 or float16 weights,
        per-group scales, other quantized module types, a module that cannot process a quantized activation).
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"`qmodel` must be a torch.nn.Module, got {type(qmodel).__name__}.")
    if not is_quantized_model(qmodel):
        raise ValueError(
            "`qmodel` has no quantized layer (torchao Int8Tensor weights, torch.ao quantized Linear/Conv2d); wrap a "
            "float model with PyTorchWeightClassifier instead."
        )
    model = copy.deepcopy(qmodel)
    grids = _input_grids(model, input_shape)
    if _is_quantized_layer(model):
        model = nn.Sequential(model)
        grids = {f"0{'.' + k if k else ''}": v for k, v in grids.items()}
    _replace_children(model, "", grids)
    return model


def _replace_children(parent: nn.Module, prefix: str, grids: dict[str, tuple[float, int, torch.dtype]]) -> None:
    """Convert the children of ``parent`` in place (``parent`` is the private copy), recursing into those kept."""
    for child_name, child in list(parent.named_children()):
        name = prefix + child_name
        replacement = _convert(name, child, grids.get(name))
        if replacement is child:
            _replace_children(child, name + ".", grids)
        else:
            setattr(parent, child_name, replacement)


def _convert(name: str, module: nn.Module, grid: tuple[float, int, torch.dtype] | None) -> nn.Module:
    """The replacement of one module (``module`` itself when it is carried over)."""
    kind = type(module)
    if kind is nnq.Quantize:
        return QuantizedInput(float(module.scale), int(module.zero_point), module.dtype)
    if kind is nnq.DeQuantize:
        return nn.Identity()
    if kind in _DYNAMIC:
        _check_torch_weight(name, module)
        return DynamicQuantizedLinear(module, relu=kind is nniqd.LinearReLU)
    if kind in _STATIC:
        _check_torch_weight(name, module)
        if grid is None:
            raise UnsupportedModelError(f"module {name!r} ({kind.__name__}) did not run on a quantized input.")
        if kind in (nnq.Linear, nniq.LinearReLU):
            return StaticQuantizedLinear(module, grid, relu=kind is nniq.LinearReLU)
        if module.padding_mode != "zeros":
            raise UnsupportedModelError(f"module {name!r} ({kind.__name__}): padding_mode={module.padding_mode!r}.")
        return StaticQuantizedConv2d(module, grid, relu=kind is nniq.ConvReLU2d)
    if isinstance(module, nn.Linear) and _is_torchao_weight(module.weight):
        _check_torchao_weight(name, module)
        return TorchAOLinear(module)
    if kind.__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic")) and not list(module.children()):
        raise UnsupportedModelError(f"module {name!r} ({kind.__name__}) is an unsupported quantized module.")
    return module


def _check_torch_weight(name: str, module: nn.Module) -> None:
    """A torch.ao module's weight must be qint8, per tensor or per output channel, with positive scales."""
    if type(module) in _DYNAMIC and module._packed_params.dtype != torch.qint8:
        raise UnsupportedModelError(
            f"module {name!r} ({type(module).__name__}): {module._packed_params.dtype} weights are not int8 codes."
        )
    weight = module.weight()
    what = f"module {name!r} ({type(module).__name__})"
    if weight.dtype != torch.qint8:
        raise UnsupportedModelError(f"{what}: {weight.dtype} weights; only qint8 (signed int8) codes are supported.")
    if weight.qscheme() not in _PER_TENSOR + _PER_CHANNEL or (
        weight.qscheme() in _PER_CHANNEL and weight.q_per_channel_axis() != 0
    ):
        raise UnsupportedModelError(f"{what}: {weight.qscheme()} weights; per tensor or per output channel only.")
    scales = weight.q_per_channel_scales() if weight.qscheme() in _PER_CHANNEL else torch.tensor(weight.q_scale())
    if not bool((scales > 0).all()):
        raise UnsupportedModelError(f"{what}: a weight scale is not positive.")


def _check_torchao_weight(name: str, module: nn.Linear) -> None:
    """A torchao weight must be an ``Int8Tensor`` of int8 codes, per tensor or per row, symmetric, positive scales."""
    weight = module.weight
    what = f"module {name!r} (Linear with a {type(weight).__name__} weight)"
    if type(weight).__name__ != "Int8Tensor" or weight.qdata.dtype != torch.int8 or weight.qdata.ndim != 2:
        raise UnsupportedModelError(f"{what}: only torchao Int8Tensor weights of 2-D int8 codes are supported.")
    if weight.block_size[-1] != weight.shape[-1] or weight.block_size[0] not in (1, weight.shape[0]):
        raise UnsupportedModelError(f"{what}: block size {weight.block_size}; per tensor or per row only.")
    if weight.zero_point is not None and bool((weight.zero_point != 0).any()):
        raise UnsupportedModelError(f"{what}: nonzero weight zero points (torchao's int8 matmul ignores them).")
    if weight.act_pre_scale is not None:
        raise UnsupportedModelError(f"{what}: an activation pre-scale (SmoothQuant/AWQ) is not supported.")
    if not bool((weight.scale > 0).all()):
        raise UnsupportedModelError(f"{what}: a weight scale is not positive.")


def _input_grids(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[float, int, torch.dtype]]:
    """
    ``{name: (scale, zero point, dtype)}`` of the quantized input of every statically quantized layer, recorded by one
    forward of ``model`` on a zero input (the grids are constants of the deployed model).

    :raises UnsupportedModelError: a leaf module that receives a quantized activation and is neither a quantized
        layer nor a module that computes the same on its dequantized value.
    """
    grids: dict[str, tuple[float, int, torch.dtype]] = {}
    refused: list[str] = []

    def record(name: str, module: nn.Module) -> Any:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not (isinstance(x, torch.Tensor) and x.is_quantized):
                return
            if type(module) in _STATIC:
                grids[name] = (float(x.q_scale()), int(x.q_zero_point()), x.dtype)
            elif not isinstance(module, _GRID_PRESERVING):
                refused.append(f"{name!r} ({type(module).__name__})")

        return hook

    leaves = [(n, m) for n, m in model.named_modules() if type(m) in _STATIC or not list(m.children())]
    handles = [m.register_forward_pre_hook(record(n, m)) for n, m in leaves]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    except Exception as err:
        raise UnsupportedModelError(
            f"the quantized model's forward on a zero input of shape {tuple(input_shape)} failed "
            f"({type(err).__name__}: {err})."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    if refused:
        raise UnsupportedModelError(
            f"module(s) {', '.join(refused)} receive quantized activations; only quantized Linear/Conv2d, ReLU, "
            "MaxPool2d, Flatten and DeQuantStub are supported there."
        )
    return grids
