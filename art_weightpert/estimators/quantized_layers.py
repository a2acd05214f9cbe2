"""
Deployed int8 layers as ordinary ``nn.Linear`` / ``nn.Conv2d`` modules (built by :mod:`.estimators.quantized`).

Each layer holds a float ``weight`` Parameter equal to the deployed weight ``s·(c − z)`` (docs/theory.md §8), the
deployed scales ``s`` and zero points ``z`` as buffers, and how its activations are quantized. Its forward recovers the
int8 codes from the current weight, ``c = round(W / s) + z`` (exact when ``W = s·(c′ − z)``, e.g. after bit flips
applied as ``W + Δ``), and runs the deployed library's own quantized operator on them, so its output equals the
deployed model's with those codes. With gradients enabled the output is straight-through: the deployed value, the
gradient of the float layer ``F.linear(x, W, b)`` / ``F.conv2d``.

Inputs and outputs are float: a statically quantized activation travels as its dequantized value, which each layer
quantizes again with the activation's recorded scale and zero point (exact: the value lies on that grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CODE_MIN, CODE_MAX = -128, 127


def refuse_vmap(*tensors: torch.Tensor | None) -> None:
    """``RuntimeError`` under ``torch.func.vmap``: the quantized operators have no batching rule (the bit search's
    ``batched_logits`` then evaluates its candidates one by one)."""
    if any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors):
        raise RuntimeError("deployed quantized layers do not run under torch.func.vmap (no batching rule).")


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``surrogate``."""
    return value.detach() + (surrogate - surrogate.detach())


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class QuantizedInput(nn.Module):
    """Static quantization of the model's input (torch.ao ``Quantize``): ``x`` rounded onto the activation grid
    ``s·(q − z)``, the identity's gradient."""

    quantizes_activations = True

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.scale, self.zero_point, self.dtype = float(scale), int(zero_point), dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_vmap(x)
        value = torch.quantize_per_tensor(x.detach().float(), self.scale, self.zero_point, self.dtype).dequantize()
        return straight_through(value, x) if _needs_grad(x) else value

    def extra_repr(self) -> str:
        return f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.dtype}"


class DeployedLayer:
    """
    The deployed encoding of a Linear/Conv weight: int8 codes ``c``, scales ``s`` and zero points ``z`` per tensor or
    per output channel (buffers ``weight_scale``, float64, and ``weight_zero_point``, int64), ``w = s·(c − z)``.
    Subclasses set :attr:`quantizes_activations` (and :attr:`relu` for fused layers) and implement :meth:`_deployed`.
    """

    quantizes_activations = False
    relu = False
    weight: torch.Tensor
    bias: torch.Tensor | None

    def _set_encoding(
        self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """Take the dequantized deployed ``weight``, its scales and zero points (scalars or per output channel) and
        the float ``bias`` (``None``: none)."""
        self.register_buffer("weight_scale", scale.detach().to(torch.float64).clone())
        self.register_buffer("weight_zero_point", zero_point.detach().to(torch.int64).clone())
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The float layer the gradients go through: the Linear/Conv forward with the current weight, then the fused
        ReLU where there is one."""
        float_forward = nn.Conv2d.forward if isinstance(self, nn.Conv2d) else nn.Linear.forward
        out = float_forward(self, x)
        return F.relu(out) if self.relu else out

    @property
    def per_channel(self) -> bool:
        """Whether the scales are per output channel."""
        return self.weight_scale.ndim == 1

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((-1,) + (1,) * (self.weight.ndim - 1)) if t.ndim == 1 else t

    def codes(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The int64 codes ``round(W / s) + z`` of ``weight`` (default: the current weight), clamped to int8."""
        w = (self.weight if weight is None else weight).detach().to(torch.float64)
        scale, zero_point = self._broadcast(self.weight_scale.to(w.device)), self._broadcast(self.weight_zero_point)
        return (torch.round(w / scale) + zero_point.to(w.device)).clamp(CODE_MIN, CODE_MAX).to(torch.int64)

    def quantized_weight(self) -> torch.Tensor:
        """The current weight as a torch ``qint8`` tensor with the deployed scales and zero points."""
        codes = self.codes().to(torch.int8)
        if self.per_channel:
            return torch._make_per_channel_quantized_tensor(codes, self.weight_scale, self.weight_zero_point, 0)
        return torch._make_per_tensor_quantized_tensor(codes, float(self.weight_scale), int(self.weight_zero_point))

    def float_bias(self) -> torch.Tensor | None:
        """The current bias as the quantized operators take it (float32), or ``None``."""
        return None if self.bias is None else self.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refuse_vmap(x, self.weight, self.bias)
        value = self._deployed(x.detach())
        return straight_through(value, self._surrogate(x)) if _needs_grad(x, self.weight, self.bias) else value

    def _deployed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StaticActivations:
    """The activation grids of a statically quantized layer: its input's (recorded from the deployed model), its
    output's, and a fused ReLU."""

    def _set_activations(self, input_qparams: tuple[float, int, torch.dtype], module: nn.Module, relu: bool) -> None:
        self.input_scale, self.input_zero_point, self.input_dtype = input_qparams
        self.output_scale, self.output_zero_point = float(module.scale), int(module.zero_point)
        self.relu = relu

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.quantize_per_tensor(x.float(), self.input_scale, self.input_zero_point, self.input_dtype)


class StaticQuantizedLinear(DeployedLayer, StaticActivations, nn.Linear):
    """torch.ao ``nn.quantized.Linear`` (or the fused ``LinearReLU``): quantized input, int8 weight, quantized output
    (``torch.ops.quantized.linear``)."""

    quantizes_activations = True

    def __init__(self, module: nn.Module, input_qparams: tuple[float, int, torch.dtype], relu: bool) -> None:
        weight, bias = module.weight(), module.bias()
        nn.Linear.__init__(self, weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self._set_activations(input_qparams, module, relu)
        self._set_encoding(weight.dequantize(), *_torch_qparams(weight), bias)

    def _deployed(self, x: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.quantized.linear_prepack(self.quantized_weight(), self.float_bias())
        op = torch.ops.quantized.linear_relu if self.relu else torch.ops.quantized.linear
        xq = self._quantize_input(x)
        return op(xq, packed, self.output_scale, self.output_zero_point).dequantize()


class DynamicQuantizedLinear(DeployedLayer, nn.Linear):
    """torch.ao ``nn.quantized.dynamic.Linear`` (or ``LinearReLU``): the float input quantized per batch at run time,
    int8 weight, float output (``torch.ops.quantized.linear_dynamic``)."""

    quantizes_activations = True

    def __init__(self, module: nn.Module, relu: bool) -> None:
        weight, bias = module.weight(), module.bias()
        nn.Linear.__init__(self, weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.relu = relu
        self.reduce_range = not (module.version is None or module.version < 4)  # as the module's own forward
        self._set_encoding(weight.dequantize(), *_torch_qparams(weight), bias)

    def _deployed(self, x: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.quantized.linear_prepack(self.quantized_weight(), self.float_bias())
        op = torch.ops.quantized.linear_relu_dynamic if self.relu else torch.ops.quantized.linear_dynamic
        return op(x.float(), packed, reduce_range=self.reduce_range).to(x.dtype)


class StaticQuantizedConv2d(DeployedLayer, StaticActivations, nn.Conv2d):
    """torch.ao ``nn.quantized.Conv2d`` (or the fused ``ConvReLU2d``), zero padding: quantized input, int8 weight,
    quantized output (``torch.ops.quantized.conv2d``)."""

    quantizes_activations = True

    def __init__(self, module: nn.Module, input_qparams: tuple[float, int, torch.dtype], relu: bool) -> None:
        weight, bias = module.weight(), module.bias()
        nn.Conv2d.__init__(
            self,
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias is not None,
            device="meta",
        )
        self._set_activations(input_qparams, module, relu)
        self._set_encoding(weight.dequantize(), *_torch_qparams(weight), bias)

    def _deployed(self, x: torch.Tensor) -> torch.Tensor:
        packed = torch.ops.quantized.conv2d_prepack(
            self.quantized_weight(), self.float_bias(), self.stride, self.padding, self.dilation, self.groups
        )
        op = torch.ops.quantized.conv2d_relu if self.relu else torch.ops.quantized.conv2d
        xq = self._quantize_input(x)
        return op(xq, packed, self.output_scale, self.output_zero_point).dequantize()


class TorchAOLinear(DeployedLayer, nn.Linear):
    """``nn.Linear`` whose weight is a torchao ``Int8Tensor`` (``Int8WeightOnlyConfig``: float activations;
    ``Int8DynamicActivationInt8WeightConfig``: activations quantized per row at run time). The forward rebuilds the
    ``Int8Tensor`` with the current codes and calls torchao's ``F.linear``."""

    def __init__(self, module: nn.Linear) -> None:
        weight = module.weight
        nn.Linear.__init__(self, weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
        names, self._meta = weight.__tensor_flatten__()
        self._inner = [name for name in names if name != "qdata"]
        for name in self._inner:
            self.register_buffer(f"ao_{name}", getattr(weight, name).detach().clone())
        self.quantizes_activations = weight.act_quant_kwargs is not None
        scale = weight.scale.detach().reshape(-1)
        scale = scale[0] if scale.numel() == 1 else scale
        self._set_encoding(weight.dequantize(), scale, torch.zeros_like(scale, dtype=torch.int64), module.bias)
        self._weight_type = type(weight)

    def _deployed(self, x: torch.Tensor) -> torch.Tensor:
        inner = {name: getattr(self, f"ao_{name}") for name in self._inner}
        inner["qdata"] = self.codes().to(torch.int8)
        weight = self._weight_type.__tensor_unflatten__(inner, self._meta, None, None)
        return F.linear(x, weight, None if self.bias is None else self.bias.detach())


def _torch_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of a torch.ao quantized weight: scalars (per tensor) or along axis 0 (per channel)."""
    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return torch.tensor(weight.q_scale(), dtype=torch.float64), torch.tensor(weight.q_zero_point())
    return weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
