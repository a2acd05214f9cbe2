"""
:class:`QuantizedWeights` and :class:`BitFlip`: the integer codes of a quantized model's weights and their bits.

Quantization is simulated as in the bit-flip attack (Rakin et al., ICCV 2019): symmetric, uniform, ``n_bits`` two's
complement codes ``c`` and a float scale ``s`` per tensor or per output channel, ``w = s·c`` (docs/theory.md §8). Only
the weights of the selected Linear/Conv layers are quantized; biases, batch norm and every other parameter stay float.
The quantized model is the user's estimator with the perturbation ``s·c − W`` applied through
:meth:`.PyTorchWeightClassifier.with_weight_perturbation`, so ART's attacks, the certifiers and the metrics see it
unchanged, and the user's module is never touched.

A deployed int8 model (:meth:`.PyTorchWeightClassifier.from_quantized`) is read instead: ``w = s·(c − z)``.

| Paper link: https://arxiv.org/abs/1903.12269
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import WeightPerturbation
from art_weightpert.estimators.quantized import DEPLOYED_BITS, check_deployed, deployed_encoding, deployed_layers
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import as_weight_classifier, effective_estimator
from art_weightpert.flips import MAX_BITS, MIN_BITS, BitFlip, check_flip_entry, check_layers, popcount
from art_weightpert.validation import check_choice, check_int

logger = logging.getLogger(__name__)

__all__ = [
    "QuantizedWeights",
    "BitFlip",
    "GRANULARITIES",
    "as_weight_classifier",
    "effective_quantized_weights",
    "check_quantization_args",
    "estimator_weights",
]

GRANULARITIES = ("tensor", "channel")
_GRID_TOLERANCE = 1e-3  # in quantization steps: farther from the grid, a weight is not a code


def check_quantization_args(n_bits: Any, granularity: Any, layers: Any, model: torch.nn.Module) -> list[str]:
    """
    Validate the quantization arguments against ``model``.

    :return: the names of the quantized layers (every Linear/Conv layer when ``layers`` is ``None``; in a deployed
        model, every int8 layer).
    :raises ValueError: ``n_bits`` outside 2–16, an unknown granularity, unknown layer names (the valid ones are
        listed), a model without Linear/Conv layers, or a contradiction with a deployed model (:func:`.check_deployed`).
    """
    check_int(n_bits, "n_bits", minimum=MIN_BITS, maximum=MAX_BITS)
    check_choice(granularity, "granularity", GRANULARITIES)
    names = check_layers(layers, model)
    deployed = check_deployed(model, n_bits, granularity, None if layers is None else names)
    return names if deployed is None else deployed


def effective_quantized_weights(
    estimator: PyTorchClassifier,
    n_bits: int = 8,
    granularity: str = "tensor",
    layers: Iterable[str] | None = None,
    effective: PyTorchWeightClassifier | None = None,
) -> QuantizedWeights:
    """
    The quantized weights of ``estimator``'s *effective* weights ``W + Δ`` (:func:`.effective_estimator`), the ones
    every bit-flip attack, certificate and metric starts from. Where ``W + Δ`` lies on the grid of the base weights'
    quantization (an estimator from :meth:`QuantizedWeights.apply` or a bit-flip attack's ``generate_estimator``), its
    codes on that grid, so that the encoding is exactly the one the estimator predicts with; otherwise ``W + Δ``
    quantized afresh (:meth:`QuantizedWeights.from_estimator`).

    :param effective: ``effective_estimator(estimator)`` when the caller has it already (``None``: computed here).
    """
    estimator = as_weight_classifier(estimator)
    effective = effective_estimator(estimator) if effective is None else effective
    if effective is estimator:
        return QuantizedWeights.from_estimator(estimator, n_bits, granularity, layers)
    grid = QuantizedWeights.from_estimator(estimator, n_bits, granularity, layers)
    low, high = -(1 << (grid.n_bits - 1)), (1 << (grid.n_bits - 1)) - 1
    codes = {}
    for name in grid.param_names:
        ratio = grid.grid_position(name, effective.base_model.get_parameter(name).detach())
        code = torch.round(ratio)
        on_grid = bool(((ratio - code).abs() <= _GRID_TOLERANCE).all())  # float32 rounding of W + Δ: ~1e-5 of a step
        code = code + grid.zero_point_like(name).to(code.device)
        if not on_grid or int(code.min()) < low or int(code.max()) > high:
            return QuantizedWeights.from_estimator(effective, n_bits, granularity, layers)
        codes[name] = code.to(torch.int64)
    return QuantizedWeights(codes, grid.scales, grid.n_bits, grid.granularity, grid.zero_points)


def _unsigned(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Two's complement bit pattern of signed ``codes`` as a non-negative integer < 2^n_bits."""
    return codes & ((1 << n_bits) - 1)


def _signed(pattern: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Signed value of an ``n_bits`` two's complement bit pattern."""
    return torch.where(pattern >= (1 << (n_bits - 1)), pattern - (1 << n_bits), pattern)


class QuantizedWeights:
    """
    Integer codes and scales of the quantized weights of a model (docs/theory.md §8): ``w = s·c`` with ``c`` an
    ``n_bits`` two's complement integer, or ``w = s·(c − z)`` with zero points ``z`` (deployed models). Immutable:
    :meth:`flip` returns a new object. Build it with :meth:`from_estimator`.

    :param codes: ``{weight name: int64 tensor}`` of codes in ``[-2^(n_bits-1), 2^(n_bits-1) - 1]``.
    :param scales: ``{weight name: float64 tensor}``, a scalar (per tensor) or one per output channel.
    :param n_bits: bits per code.
    :param granularity: ``"tensor"`` or ``"channel"``.
    :param zero_points: ``{weight name: int tensor}`` shaped as the weight's scale (``None`` or a missing name: 0).
    """

    def __init__(
        self,
        codes: Mapping[str, torch.Tensor],
        scales: Mapping[str, torch.Tensor],
        n_bits: int,
        granularity: str,
        zero_points: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self._n_bits = check_int(n_bits, "n_bits", minimum=MIN_BITS, maximum=MAX_BITS)
        self._granularity = check_choice(granularity, "granularity", GRANULARITIES)
        if set(codes) != set(scales):
            raise ValueError("`codes` and `scales` must name the same weights.")
        low, high = -(1 << (self._n_bits - 1)), (1 << (self._n_bits - 1)) - 1
        self._codes = {}
        for name, c in codes.items():
            c = torch.as_tensor(c).detach()
            if c.is_floating_point() or int(c.min()) < low or int(c.max()) > high:
                raise ValueError(f"codes of {name!r} must be integers in [{low}, {high}].")
            self._codes[name] = c.to(torch.int64)
        self._scales = {name: torch.as_tensor(s).detach().to(torch.float64) for name, s in scales.items()}
        zero_points = {name: torch.as_tensor(z).detach() for name, z in (zero_points or {}).items()}
        if any(
            k not in self._codes or z.is_floating_point() or z.shape != scales[k].shape for k, z in zero_points.items()
        ):
            raise ValueError("`zero_points` must be integer tensors shaped as the scales of the same weights.")
        self._zero_points = {k: z.to(torch.int64) for k, z in zero_points.items() if bool((z != 0).any())}  # nonzero

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_estimator(
        cls,
        estimator: PyTorchClassifier,
        n_bits: int = 8,
        granularity: str = "tensor",
        layers: Iterable[str] | None = None,
    ) -> QuantizedWeights:
        """
        Quantize the weights of the selected layers of ``estimator``'s original (unperturbed) model: scale
        ``max|W| / (2^(n_bits-1) - 1)`` per tensor or per output channel, codes ``round(W / scale)``. An all-zero
        tensor (or channel) gets codes 0 and scale 0.

        A deployed int8 model (:meth:`.PyTorchWeightClassifier.from_quantized`) is read, not simulated: its codes,
        scales and zero points (``n_bits`` must be 8; ``granularity="tensor"`` reads per-channel scales too, see
        :func:`.check_deployed`).

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param n_bits: bits per code, 2 to 16.
        :param granularity: ``"tensor"`` (one scale per weight tensor) or ``"channel"`` (one per output channel).
        :param layers: names of the Linear/Conv layers to quantize (``None``: all of them; deployed: its int8 ones).
        :return: the codes and scales.
        """
        estimator = as_weight_classifier(estimator)
        model = estimator.base_model
        names = check_quantization_args(n_bits, granularity, layers, model)
        if estimator.weight_perturbation is not None:
            logger.info("The estimator carries a weight perturbation; its original weights are quantized.")
        if deployed_layers(model):
            codes, scales, zero_points, granularity = deployed_encoding(model, names)
            return cls(codes, scales, DEPLOYED_BITS, granularity, zero_points)
        level = (1 << (n_bits - 1)) - 1
        codes, scales = {}, {}
        for layer in names:
            name = f"{layer}.weight" if layer else "weight"
            w = model.get_parameter(name).detach().to(torch.float64)
            if granularity == "tensor":
                scale = w.abs().max() / level
            else:
                scale = w.abs().reshape(len(w), -1).amax(dim=1) / level
            safe = _broadcast(torch.where(scale > 0, scale, torch.ones_like(scale)), w.ndim)
            codes[name] = torch.round(w / safe).clamp(-level, level).to(torch.int64)
            scales[name] = scale
        return cls(codes, scales, n_bits, granularity)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def codes(self) -> dict[str, torch.Tensor]:
        """``{weight name: int64 code tensor}`` (copies)."""
        return {k: v.clone() for k, v in self._codes.items()}

    @property
    def scales(self) -> dict[str, torch.Tensor]:
        """``{weight name: float64 scale}``: a scalar per tensor, or one per output channel (copies)."""
        return {k: v.clone() for k, v in self._scales.items()}

    @property
    def zero_points(self) -> dict[str, torch.Tensor]:
        """``{weight name: int64 zero point}`` shaped as the weight's scale (zeros unless deployed with zero points)."""
        return {k: self._zero_points.get(k, torch.zeros_like(s, dtype=torch.int64)) for k, s in self._scales.items()}

    @property
    def n_bits(self) -> int:
        """Bits per code."""
        return self._n_bits

    @property
    def granularity(self) -> str:
        """``"tensor"`` or ``"channel"``."""
        return self._granularity

    @property
    def param_names(self) -> list[str]:
        """The quantized weights' names."""
        return list(self._codes)

    @property
    def nb_bits_total(self) -> int:
        """Number of flippable bits (codes times ``n_bits``)."""
        return self._n_bits * sum(c.numel() for c in self._codes.values())

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._codes.items()}
        return f"QuantizedWeights({shapes}, n_bits={self._n_bits}, granularity={self._granularity!r})"

    # ------------------------------------------------------------------------------------------------ values
    def scale_like(self, name: str) -> torch.Tensor:
        """The scale of every entry of weight ``name``, broadcastable to its shape (float64)."""
        return _broadcast(self._scales[name], self._codes[name].ndim)

    def zero_point_like(self, name: str) -> torch.Tensor:
        """The zero point of every entry of weight ``name``, broadcastable to its shape (int64; 0 without one)."""
        zero = self._zero_points.get(name, torch.zeros((), dtype=torch.int64))
        return _broadcast(zero, self._codes[name].ndim)

    def grid_position(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value / s`` for weight ``name`` (float64 steps of its grid; ``round(·) + z`` is the code), with 0 where
        the scale is 0 and the value too, and ``inf`` (off every grid) where the scale is 0 but the value is not."""
        value = value.to(torch.float64)
        scale = self.scale_like(name).to(value.device)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.where(scale > 0, value / safe, torch.where(value == 0, 0.0, float("inf")))

    def value(self, name: str) -> torch.Tensor:
        """``s·(c − z)`` of weight ``name`` in float64 (``s·c`` without zero point)."""
        codes = self._codes[name]
        codes = codes - self.zero_point_like(name).to(codes.device)
        return codes.to(torch.float64) * self.scale_like(name)

    def dequantize(self) -> dict[str, torch.Tensor]:
        """``{weight name: s·(c − z)}`` in float64 (the quantized weights' values)."""
        return {name: self.value(name) for name in self._codes}

    def bit_changes(self, name: str, flat_index: torch.Tensor | None = None) -> torch.Tensor:
        """
        Change of the entries of weight ``name`` if one of their bits were flipped alone (docs/theory.md §8):
        ``s·d_b(c)`` with ``d_b(c) = (1 − 2β_b)·2^b`` for ``b < n−1`` and ``(2β_{n−1} − 1)·2^{n−1}`` for the sign bit.

        :param name: a quantized weight.
        :param flat_index: indices into the flattened weight (``None``: every entry).
        :return: float64 tensor of shape ``(n_bits,) + weight shape``, or ``(n_bits, len(flat_index))``.
        """
        codes = self._codes[name]
        scale = self.scale_like(name).expand(codes.shape)
        if flat_index is not None:
            codes, scale = codes.reshape(-1)[flat_index], scale.reshape(-1)[flat_index]
        pattern = _unsigned(codes, self._n_bits)
        bits = torch.arange(self._n_bits, device=pattern.device).reshape((-1,) + (1,) * pattern.ndim)
        beta = (pattern.unsqueeze(0) >> bits) & 1
        d = (1 - 2 * beta) * (1 << bits)
        d[-1] = -d[-1]  # the sign bit weighs −2^(n−1)
        return d.to(torch.float64) * scale.unsqueeze(0)

    # ------------------------------------------------------------------------------------------------ bits
    def flip(self, flips: Iterable[BitFlip]) -> QuantizedWeights:
        """
        A new :class:`QuantizedWeights` with ``flips`` applied (each bit XOR 1; a bit named twice flips back).

        :param flips: :class:`BitFlip` objects naming quantized weights, valid indices and bits below ``n_bits``.
        :return: the flipped codes (same scales).
        """
        masks: dict[str, torch.Tensor] = {}
        for flip, count in Counter(self._check_flip(f) for f in flips).items():
            if count % 2:
                mask = masks.setdefault(flip.param_name, torch.zeros_like(self._codes[flip.param_name]))
                mask[flip.index] |= 1 << flip.bit
        return self.xor(masks)

    def xor(self, masks: Mapping[str, torch.Tensor]) -> QuantizedWeights:
        """A new :class:`QuantizedWeights` whose bit patterns are these XOR ``masks`` (``{weight name: int tensor}``
        of the weight's shape, values below ``2^n_bits``): the vectorized form of :meth:`flip`."""
        codes = dict(self._codes)
        for name, mask in masks.items():
            pattern = _unsigned(self._codes[name], self._n_bits) ^ mask.to(device=codes[name].device)
            codes[name] = _signed(pattern, self._n_bits)
        return QuantizedWeights(codes, self._scales, self._n_bits, self._granularity, self._zero_points)

    def flipped_bits(self, other: QuantizedWeights) -> int:
        """Hamming distance between the codes of ``self`` and ``other`` (same weights, shapes and ``n_bits``)."""
        if not isinstance(other, QuantizedWeights):
            raise TypeError(f"`other` must be a QuantizedWeights, got {type(other).__name__}.")
        same = other.n_bits == self._n_bits and set(other._codes) == set(self._codes)
        if not same or any(other._codes[k].shape != c.shape for k, c in self._codes.items()):
            raise ValueError("`other` must quantize the same weights with the same shapes and n_bits.")
        total = 0
        for name, c in self._codes.items():
            diff = _unsigned(c, self._n_bits) ^ _unsigned(other._codes[name].to(c.device), self._n_bits)
            total += popcount(diff, self._n_bits)
        return total

    def _check_flip(self, flip: Any) -> BitFlip:
        if not isinstance(flip, BitFlip):
            raise TypeError(f"`flips` must hold BitFlip objects, got {type(flip).__name__}.")
        check_flip_entry(flip, self._codes, "is not quantized; quantized weights are")
        if flip.bit >= self._n_bits:
            raise ValueError(f"`flips`: bit {flip.bit} does not exist in {self._n_bits}-bit codes.")
        return flip

    # ------------------------------------------------------------------------------------------------ estimators
    def deltas(self, estimator: PyTorchClassifier, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """``{weight name: s·(c − z) − W}`` in each weight's dtype and device, ``W`` the estimator's original weights
        (torch form of :meth:`perturbation`); ``names``: only these quantized weights (``None``: all)."""
        selected = self._codes if names is None else {name: self._codes[name] for name in names}
        params = estimator_weights(estimator, selected)
        out = {}
        for name, w in params.items():
            out[name] = (self.value(name).to(w.device) - w.to(torch.float64)).to(w.dtype)
        return out

    def perturbation(self, estimator: PyTorchClassifier) -> WeightPerturbation:
        """The :class:`.WeightPerturbation` (budget ``None``) from ``estimator``'s original weights to these values."""
        return WeightPerturbation({k: v.cpu().numpy() for k, v in self.deltas(estimator).items()})

    def apply(self, estimator: PyTorchClassifier) -> PyTorchWeightClassifier:
        """A new estimator whose quantized weights take these values (the others keep their float values); neither
        ``estimator`` nor its module changes."""
        estimator = as_weight_classifier(estimator)
        return estimator.with_weight_perturbation(self.perturbation(estimator))


def _broadcast(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """A scalar or per-channel scale reshaped to broadcast against a weight with ``ndim`` dimensions."""
    return scale if scale.ndim == 0 else scale.reshape((-1,) + (1,) * (ndim - 1))


def estimator_weights(estimator: PyTorchClassifier, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    The original (detached) parameters of ``estimator`` named in ``weights`` (``{name: tensor}``).

    :raises ValueError: when the estimator has no parameter of that name and shape.
    """
    params = dict(as_weight_classifier(estimator).base_model.named_parameters())
    out = {}
    for name, value in weights.items():
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            raise ValueError(f"`estimator` has no weight {name!r} of shape {tuple(value.shape)}.")
        out[name] = params[name].detach()
    return out
