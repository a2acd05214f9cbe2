"""
The exact answer for one flipped bit (docs/theory.md §8): every (weight, bit) pair of the selected layers flipped
alone, one batched forward pass each, in float64.

A flip of layer ``l`` leaves the activations before ``l`` clean, so only the rest of the network is evaluated: the
flipped layer's output is the clean one plus ``s·d_b(c)`` times the input entry the weight multiplies (Linear) or the
input patch of the kernel entry (convolution, through one-hot kernels), for all flips of a chunk at once. Used as the
reference of :class:`.BitFlipCertifier`'s tests and benchmark, and useful on its own on small networks.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from art_weightpert.certification.bit_flip_terms import check_flip_args, encode_weights, flip_changes
from art_weightpert.network import Affine, Network, UnsupportedModelError, read_network
from art_weightpert.quantization import as_weight_classifier
from art_weightpert.torch_tools import batch_slices, eval_mode, float64_copy
from art_weightpert.validation import check_positive_int

_CHUNK_ELEMENTS = 1 << 22


def _forward(network: Network, params: dict, h: torch.Tensor, start: int) -> torch.Tensor:
    """Layers ``start…`` of the chain on ``h``."""
    for layer in network.layers[start:]:
        if layer.weighted:
            h = layer.apply(h, params[layer.weight_name], params[layer.bias_name] if layer.bias_name else None)
        else:
            h = layer.apply(h)
    return h


def _unit_outputs(layer: Affine, h: torch.Tensor) -> torch.Tensor:
    """``(N, rows·fan_in, ...)``: the change of the output row of each weight entry per unit change of that entry,
    the entry's input (Linear) or its input patch over the output positions (convolution)."""
    if not layer.is_conv:
        return h
    mod = layer.module
    if mod.groups != 1:
        raise ValueError(f"layer {layer.name!r}: grouped convolutions are not enumerated.")
    fan_in = mod.weight[0].numel()
    eye = torch.eye(fan_in, dtype=h.dtype, device=h.device).reshape((fan_in,) + tuple(mod.weight.shape[1:]))
    return layer.apply(h, eye)  # (N, fan_in, H', W')


def single_flip_margins(
    network: Network, params: dict, index: int, changes: torch.Tensor, h: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """
    Per sample and class, the smallest margin ``f_y − f_i`` over every single flip of the affine layer
    ``network.layers[index]`` (and no flip), exactly.

    :param network: the chain (float64 parameters ``params``, the quantized values substituted).
    :param index: the flipped layer's index in ``network.layers``.
    :param changes: ``(bits,) + weight shape``, the single-flip changes (:func:`.flip_changes`).
    :param h: the layer's clean input ``(N, ...)``.
    :param labels: ``(N,)``.
    :return: ``(N, K)`` (0 in the label's column).
    """
    layer = network.layers[index]
    weight = params[layer.weight_name]
    z = _step(network, params, h, index)
    basis = _unit_outputs(layer, h)
    fan_in = weight[0].numel()
    flat = changes.reshape(len(changes), -1)  # (n_bits, rows·fan_in)
    pairs = flat.nonzero()  # (bit, weight) pairs that change something
    logits = _forward(network, params, z, index + 1)
    worst = logits.gather(1, labels.unsqueeze(1)) - logits
    step = max(1, _CHUNK_ELEMENTS // max(1, z[0].numel() * len(h)))
    for start in range(0, len(pairs), step):
        bit, w = pairs[start : start + step].unbind(1)
        row, col = w // fan_in, w % fan_in
        delta = flat[bit, w].reshape(-1, 1, *([1] * (z.dim() - 2))) * basis[:, col].movedim(1, 0)  # (F, N, ...)
        zf = z.unsqueeze(0).repeat((len(w),) + (1,) * z.dim())
        zf[torch.arange(len(w), device=z.device), :, row] += delta
        logits = _forward(network, params, zf.flatten(0, 1), index + 1).reshape(len(w), len(h), -1)
        margins = logits.gather(2, labels.reshape(1, -1, 1).expand(len(w), -1, 1)) - logits
        worst = torch.minimum(worst, margins.amin(dim=0))
    return worst


def single_flip_robustness(
    estimator,
    x: np.ndarray,
    y: np.ndarray | None = None,
    n_bits: int = 8,
    granularity: str = "tensor",
    layers: Iterable[str] | None = None,
    batch_size: int = 256,
    encoding: str = "int",
    bits: Iterable[int] | None = None,
) -> np.ndarray:
    """
    Exactly which samples keep their label under every single flipped bit of the quantized (or float) weights, in
    float64. A flip to ``±inf`` or NaN makes every sample whose margins it reaches count as not robust.

    :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` whose model is a chain.
    :param x: inputs ``(N,) + input_shape``.
    :param y: labels; ``None``: the quantized model's predictions. A sample the quantized model misclassifies is
        ``False``.
    :param n_bits: bits per code (as :meth:`.QuantizedWeights.from_estimator`).
    :param granularity: ``"tensor"`` or ``"channel"``.
    :param layers: the layers whose weights are quantized and flip (``None``: all).
    :param batch_size: samples per pass.
    :param encoding: ``"int"`` (quantized codes) or ``"float"`` (the float weights' IEEE bits), as
        :class:`.BitFlipCertifier`.
    :param bits: the bit positions that may flip (as :class:`.BitFlipCertifier`; ``None``: its default).
    :return: ``(N,)`` bool.
    """
    estimator = as_weight_classifier(estimator)
    check_positive_int(batch_size, "batch_size")
    bits = check_flip_args(estimator, encoding, n_bits, granularity, layers, bits)
    quantized = encode_weights(estimator, encoding, n_bits, granularity, layers, bits)
    model64 = float64_copy(estimator.base_model)
    with torch.no_grad():
        for name, value in quantized.dequantize().items():
            model64.get_parameter(name).copy_(value)
    network = read_network(model64, estimator.input_shape)
    if not network.is_chain:
        raise UnsupportedModelError("single_flip_robustness enumerates flips on chains of layers only.")
    params = network.params(dtype=torch.float64)
    x_t, y_t = estimator.prepare_inputs(x, y)
    out = []
    with torch.no_grad(), eval_mode(model64):
        for b in batch_slices(len(x_t), batch_size):
            xb = x_t[b].to(torch.float64)
            h, logits = xb, _forward(network, params, xb, 0)
            pred = logits.argmax(dim=1)
            labels = pred if y_t is None else y_t[b]
            alive = pred == labels
            for index, layer in enumerate(network.layers):
                if layer.weighted and layer.weight_name in quantized.param_names:
                    changes = flip_changes(quantized, layer.weight_name, bits).to(xb.device)
                    margins = single_flip_margins(network, params, index, changes, h, labels)
                    alive &= (margins.scatter(1, labels.unsqueeze(1), float("inf")) > 0).all(dim=1)
                h = _step(network, params, h, index)
            out.append(alive.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


def _step(network: Network, params: dict, h: torch.Tensor, index: int) -> torch.Tensor:
    layer = network.layers[index]
    if layer.weighted:
        return layer.apply(h, params[layer.weight_name], params[layer.bias_name] if layer.bias_name else None)
    return layer.apply(h)
