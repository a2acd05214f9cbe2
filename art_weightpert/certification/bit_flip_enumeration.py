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


def enumerable_layer(layer: Affine) -> bool:
    """Whether :func:`_unit_outputs` reads ``layer``: a Linear layer or an ungrouped convolution."""
    return not layer.is_conv or layer.module.groups == 1


def _unit_outputs(layer: Affine, h: torch.Tensor) -> torch.Tensor:
    """``(N, rows·fan_in, ...)``: the change of the output row of each weight entry per unit change of that entry,
    the entry's input (Linear) or its input patch over the output positions (convolution)."""
    if not layer.is_conv:
        return h
    mod = layer.module
    if not enumerable_layer(layer):
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


def greedy_flip_search(
    network: Network,
    params: dict,
    tables: dict,
    weights,
    bits: tuple[int, ...] | None,
    x: torch.Tensor,
    label: int,
    k: int,
    nb_candidates: int = 32,
    nb_targets: int = 3,
) -> list | None:
    """
    A greedy search for at most ``k`` flips that change the prediction of one sample (the falsification step of
    :meth:`.BitFlipCertifier.verify`, docs/theory.md §11): for each of the ``nb_targets`` classes closest to the
    label, flip by flip, the pair terms ``∂(f_y − f_t)/∂w · D`` rank every (weight, bit) pair, the
    ``nb_candidates`` most negative are evaluated exactly (one batched forward) and the one giving the smallest
    margin is kept, until the margin is negative.

    :param network: the chain, in float64 with the certified weights ``params``.
    :param tables: ``{weight name: FlipTable}`` of the weights that may flip.
    :param weights: the :class:`.QuantizedWeights` or :class:`.FloatWeights` the tables were made from.
    :param bits: the allowed bit positions the tables hold (``None``: every bit of integer codes).
    :param x: one input ``(1,) + input shape``, float64.
    :param label: its label.
    :param k: most flips.
    :return: the flips (:class:`.BitFlip` or :class:`.FloatBitFlip`), or ``None`` when none was found. The caller
        checks them on the model itself.
    """
    from art_weightpert.flips import BitFlip  # noqa: PLC0415
    from art_weightpert.float_bits import FloatBitFlip, FloatWeights  # noqa: PLC0415

    is_float = isinstance(weights, FloatWeights)
    flip_type = FloatBitFlip if is_float else BitFlip
    positions = list(bits) if bits is not None else list(range(weights.n_bits))
    names = list(tables)
    if not names or k == 0:
        return None
    logits = network.forward(x, params)[0]
    margins = logits[label] - logits
    margins[label] = float("inf")
    for target in margins.argsort()[: min(nb_targets, len(margins) - 1)].tolist():
        chosen: list[tuple[str, int, int]] = []  # (name, flat pair index into (rows, fan_in, bits))
        delta = {n: torch.zeros_like(params[n]) for n in names}
        for _ in range(k):
            with torch.enable_grad():
                probe = {n: (params[n] + delta[n]).requires_grad_() for n in names}
                out = network.forward(x, {**params, **probe})[0]
                grads = torch.autograd.grad(out[label] - out[target], [probe[n] for n in names])
            pool_values, pool_keys = [], []
            for n, g in zip(names, grads):
                changes = tables[n].changes
                terms = (g.reshape(changes.shape[:2]).unsqueeze(2) * changes).flatten()
                for m, pair in chosen:
                    if m == n:  # a chosen bit flips once; float encodings: one bit per weight
                        if is_float:
                            w = pair // changes.shape[2]
                            terms[w * changes.shape[2] : (w + 1) * changes.shape[2]] = float("inf")
                        else:
                            terms[pair] = float("inf")
                terms = torch.nan_to_num(terms, nan=float("inf"))
                top = terms.topk(min(nb_candidates, len(terms)), largest=False)
                pool_values.append(top.values)
                pool_keys += [(n, int(i)) for i in top.indices]
            values = torch.cat(pool_values)
            order = values.topk(min(nb_candidates, len(values)), largest=False).indices.tolist()
            candidates = [pool_keys[j] for j in order if bool(torch.isfinite(values[j]))]
            if not candidates:
                break
            sample = {n: delta[n].unsqueeze(0).repeat((len(candidates),) + (1,) * delta[n].dim()) for n in names}
            for j, (n, pair) in enumerate(candidates):
                changes = tables[n].changes
                w, b = divmod(pair, changes.shape[2])
                sample[n][j].view(-1)[w] += changes.view(-1, changes.shape[2])[w, b]
            batch = x.expand((len(candidates),) + tuple(x.shape[1:]))
            out = network.forward(batch, params, sample)
            m = out.gather(1, torch.full((len(candidates), 1), label, device=x.device)) - out
            m[:, label] = float("inf")
            worst = m.amin(dim=1)
            best = int(worst.argmin())
            n, pair = candidates[best]
            chosen.append((n, pair))
            delta[n] = sample[n][best].clone()
            if worst[best] < 0:
                return [_as_flip(flip_type, tables, params, n, p, positions) for n, p in chosen]
    return None


def _as_flip(flip_type, tables: dict, params: dict, name: str, pair: int, positions: list[int]):
    """The flip of flat pair index ``pair`` of ``tables[name]`` (rows, fan_in, bits)."""
    n_bits = tables[name].changes.shape[2]
    w, b = divmod(pair, n_bits)
    index = tuple(int(i) for i in np.unravel_index(w, tuple(params[name].shape)))
    return flip_type(name, index, positions[b])
