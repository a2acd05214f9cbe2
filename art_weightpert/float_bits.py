"""
:class:`FloatWeights` and :class:`FloatBitFlip`: the IEEE bit patterns of a float model's weights and their flips.

A flip of bit ``b`` of a weight ``w`` gives one value ``w'``, computed exactly in the weight's own dtype by an XOR of
its bit pattern (:func:`flip_float_bits`): the sign bit negates ``w``, a mantissa bit moves ``|w|`` by at most half of
it, an exponent bit multiplies ``|w|`` by ``2^{±2^j}`` and may give ``±inf`` or NaN (docs/theory.md §8.2). The
layouts of float32, float16, bfloat16 and float64 are in :data:`LAYOUTS`. :class:`FloatWeights` plays for float
encodings the role :class:`.QuantizedWeights` plays for integer codes, with the same method names, so the attacks and
the k-flip certificate consume either; the user's module is never touched.

| Paper link: https://arxiv.org/abs/1906.01017
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.budget import WeightPerturbation
from art_weightpert.estimators.quantized import deployed_layers
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.flips import WeightBitFlip, check_bit_positions, check_flip_entry, check_layers, popcount
from art_weightpert.quantization import as_weight_classifier, estimator_weights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FloatLayout:
    """
    The IEEE layout of a float dtype: bit 0 is the lowest mantissa bit, bit ``width - 1`` the sign.

    :param dtype: the float dtype.
    :param width: bits per value.
    :param exponent_width: exponent bits.
    :param int_dtype: the signed integer dtype of the same width (the view in which bits are flipped).
    """

    dtype: torch.dtype
    width: int
    exponent_width: int
    int_dtype: torch.dtype

    @property
    def sign_bit(self) -> int:
        """Position of the sign bit."""
        return self.width - 1

    @property
    def exponent_bits(self) -> tuple[int, ...]:
        """Positions of the exponent bits, lowest first."""
        return tuple(range(self.width - 1 - self.exponent_width, self.width - 1))

    @property
    def mantissa_bits(self) -> tuple[int, ...]:
        """Positions of the mantissa bits (without the implicit leading bit), lowest first."""
        return tuple(range(self.width - 1 - self.exponent_width))

    @property
    def masks(self) -> torch.Tensor:
        """``(width,)`` tensor of :attr:`int_dtype`: the pattern with only bit ``b`` set, at index ``b``."""
        values = [1 << b for b in range(self.width - 1)] + [-(1 << (self.width - 1))]
        return torch.tensor(values, dtype=self.int_dtype)


LAYOUTS: dict[torch.dtype, FloatLayout] = {
    torch.float32: FloatLayout(torch.float32, 32, 8, torch.int32),
    torch.float16: FloatLayout(torch.float16, 16, 5, torch.int16),
    torch.bfloat16: FloatLayout(torch.bfloat16, 16, 8, torch.int16),
    torch.float64: FloatLayout(torch.float64, 64, 11, torch.int64),
}
"""The supported float dtypes and their layouts."""


def float_layout(dtype: torch.dtype) -> FloatLayout:
    """
    The layout of ``dtype``.

    :raises TypeError: for a dtype that is not float32, float16, bfloat16 or float64.
    """
    if dtype not in LAYOUTS:
        names = [str(d).replace("torch.", "") for d in LAYOUTS]
        raise TypeError(f"bit flips of float weights need a dtype among {names}, got {dtype}.")
    return LAYOUTS[dtype]


def sign_bit(dtype: torch.dtype) -> int:
    """Position of the sign bit of ``dtype`` (31 for float32)."""
    return float_layout(dtype).sign_bit


def exponent_bits(dtype: torch.dtype) -> tuple[int, ...]:
    """Positions of the exponent bits of ``dtype`` (23–30 for float32)."""
    return float_layout(dtype).exponent_bits


def mantissa_bits(dtype: torch.dtype) -> tuple[int, ...]:
    """Positions of the mantissa bits of ``dtype`` (0–22 for float32)."""
    return float_layout(dtype).mantissa_bits


def check_float_bits(bits: Any, dtype: torch.dtype, name: str = "bits") -> tuple[int, ...]:
    """
    Validate bit positions of ``dtype`` (:func:`.check_bit_positions`).

    :return: the distinct positions, sorted (every position of the dtype when ``bits`` is ``None``).
    """
    width = float_layout(dtype).width
    return check_bit_positions(bits, width, name) or tuple(range(width))


def xor_float_bits(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``values`` with their bit patterns XOR ``masks`` (integer patterns, broadcastable), in ``values``' dtype."""
    layout = float_layout(values.dtype)
    masks = _as_pattern(torch.as_tensor(masks, device=values.device).to(torch.int64), layout)
    shape = torch.broadcast_shapes(values.shape, masks.shape)
    pattern = values.detach().expand(shape).contiguous().view(layout.int_dtype)
    return (pattern ^ masks.expand(shape)).view(values.dtype)


def flip_float_bits(values: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """
    ``values`` with bit ``bits`` flipped, exactly, in their own dtype (the bit pattern XOR ``1 << bits``).

    :param values: a float32, float16, bfloat16 or float64 tensor.
    :param bits: a bit position (IEEE numbering of the dtype: float32 0–22 mantissa, 23–30 exponent, 31 sign), or an
        integer tensor of positions broadcastable against ``values``.
    :return: a new tensor of the broadcast shape and ``values``' dtype.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"`values` must be a torch.Tensor, got {type(values).__name__}.")
    layout = float_layout(values.dtype)
    bits = torch.as_tensor(bits, device=values.device)
    if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
        raise TypeError(f"`bits` must be integer bit positions, got {bits.dtype}.")
    if bits.numel() and (int(bits.min()) < 0 or int(bits.max()) >= layout.width):
        raise ValueError(f"`bits` must lie in [0, {layout.width - 1}] for {values.dtype}, got {bits.tolist()}.")
    return xor_float_bits(values, layout.masks.to(values.device)[bits.to(torch.int64)])


def _as_pattern(masks: torch.Tensor, layout: FloatLayout) -> torch.Tensor:
    """int64 patterns (signed, or unsigned below ``2^width``) as signed integers of ``layout.int_dtype``."""
    if layout.width < 64:
        masks = masks & ((1 << layout.width) - 1)
        masks = torch.where(masks >= (1 << (layout.width - 1)), masks - (1 << layout.width), masks)
    return masks.to(layout.int_dtype)


@dataclass(frozen=True)
class FloatBitFlip(WeightBitFlip):
    """
    One flipped bit of one float weight.

    :param param_name: the weight's name as in ``model.named_parameters()`` (e.g. ``"0.weight"``).
    :param index: the entry of the weight tensor (a tuple of ints, one per dimension).
    :param bit: IEEE numbering of the weight's dtype (float32: 0–22 mantissa, 23–30 exponent, 31 sign; float16: 0–9,
        10–14, 15; bfloat16: 0–6, 7–14, 15; float64: 0–51, 52–62, 63).
    """

    max_bit = 63


class FloatWeights:
    """
    The float weights of selected layers and the bit positions that may flip (docs/theory.md §8.2). Immutable:
    :meth:`flip` returns a new object. Build it with :meth:`from_estimator`.

    :param values: ``{weight name: tensor}``, finite, all of one dtype among :data:`LAYOUTS`.
    :param bits: the bit positions that may flip (``None``: all of the dtype's).
    :raises TypeError: weights not float32, float16, bfloat16 or float64, or of several dtypes.
    :raises ValueError: a non-finite weight, no weight, or a position outside the dtype's width (names ``bits``).
    """

    def __init__(self, values: Mapping[str, torch.Tensor], bits: Iterable[int] | None = None) -> None:
        if not isinstance(values, Mapping) or not values:
            raise ValueError("`values` must map at least one weight name to its tensor.")
        tensors = {name: torch.as_tensor(v).detach().clone() for name, v in values.items()}
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) > 1:
            raise TypeError(f"the weights that may flip must share one dtype, got {sorted(map(str, dtypes))}.")
        self._layout = float_layout(dtypes.pop())
        for name in (name for name, t in tensors.items() if not bool(torch.isfinite(t).all())):
            raise ValueError(f"weight {name!r} holds NaN or inf: only finite weights can be flipped.")
        self._values = tensors
        self._bits = check_float_bits(bits, self._layout.dtype)

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_estimator(
        cls, estimator: PyTorchClassifier, layers: Iterable[str] | None = None, bits: Iterable[int] | None = None
    ) -> FloatWeights:
        """
        The weights of the selected layers of ``estimator``'s original (unperturbed) model.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param layers: names of the Linear/Conv layers whose weights may flip (``None``: all of them).
        :param bits: the bit positions that may flip, IEEE numbering of the weights' dtype (``None``: all).
        :return: the float weights.
        :raises ValueError: layers of a deployed int8 model (:meth:`.PyTorchWeightClassifier.from_quantized`).
        """
        estimator = as_weight_classifier(estimator)
        model = estimator.base_model
        if estimator.weight_perturbation is not None:
            logger.info("The estimator carries a weight perturbation; its original weights may flip.")
        names = [f"{layer}.weight" if layer else "weight" for layer in check_layers(layers, model)]
        deployed = [name for name in deployed_layers(model) if f"{name}.weight" in names]
        if deployed:
            raise ValueError(
                f"`estimator` is a deployed int8 model: the weights of {deployed} are stored as int8 codes, not as "
                "float bit patterns; flip their codes' bits with BitFlipAttack, RandomBitFlips or BitFlipCertifier."
            )
        return cls({name: model.get_parameter(name).detach() for name in names}, bits)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def values(self) -> dict[str, torch.Tensor]:
        """``{weight name: tensor}`` in the weights' dtype (copies)."""
        return {k: v.clone() for k, v in self._values.items()}

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self._layout.dtype

    @property
    def layout(self) -> FloatLayout:
        """The IEEE layout of the weights' dtype."""
        return self._layout

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit positions that may flip, sorted; row ``i`` of :meth:`bit_changes` is position ``bits[i]``."""
        return self._bits

    @property
    def param_names(self) -> list[str]:
        """The weights' names."""
        return list(self._values)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._values.items()}
        return f"FloatWeights({shapes}, dtype={self.dtype}, bits={list(self._bits)})"

    # ------------------------------------------------------------------------------------------------ values
    def dequantize(self) -> dict[str, torch.Tensor]:
        """``{weight name: values}`` in float64 (exact; the name is :class:`.QuantizedWeights`')."""
        return {name: v.to(torch.float64) for name, v in self._values.items()}

    def bit_values(self, name: str, flat_index: torch.Tensor | None = None) -> torch.Tensor:
        """
        The value of the entries of weight ``name`` with one allowed bit flipped, exactly, in the weights' dtype.

        :param name: a weight.
        :param flat_index: indices into the flattened weight (``None``: every entry).
        :return: ``(len(bits),) + weight shape``, or ``(len(bits), len(flat_index))``; may hold ``±inf`` and NaN.
        """
        values = self._entries(name, flat_index)
        positions = torch.tensor(self._bits, device=values.device).reshape((-1,) + (1,) * values.ndim)
        return flip_float_bits(values.unsqueeze(0), positions)

    def bit_changes(self, name: str, flat_index: torch.Tensor | None = None) -> torch.Tensor:
        """
        Change ``w' − w`` of the entries of weight ``name`` if one allowed bit were flipped alone (docs/theory.md
        §8.2), in float64: exact for sign and mantissa flips; an exponent flip between binades more than 2^29 apart
        is rounded to the nearest float64 (relative error 2^-53, as every float64 operation). A flip to ``±inf`` gives
        ``±inf`` and a flip to NaN gives NaN: callers must treat them.

        :param name: a weight.
        :param flat_index: indices into the flattened weight (``None``: every entry).
        :return: float64 tensor of shape ``(len(bits),) + weight shape``, or ``(len(bits), len(flat_index))``.
        """
        values = self._entries(name, flat_index)
        return self.bit_values(name, flat_index).to(torch.float64) - values.to(torch.float64).unsqueeze(0)

    def combined_change_range(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """
        Bounds ``(lo, hi)`` on the change ``w' − w`` of every entry of weight ``name`` when *several* allowed bits of
        that entry flip together (docs/theory.md §8.2), in float64 shaped like the weight; ``None`` when the allowed
        bits are all mantissa bits, whose changes add (the same exponent: ``w`` is linear in the mantissa bits).

        A sign or exponent bit does not add: the sign negates the mantissa bits' changes too, an exponent bit scales
        them. A magnitude is ordered as its bit pattern, so every pattern reachable from ``w`` lies between the one with
        every allowed exponent and mantissa bit cleared and the one with all of them set; with the sign allowed, either
        sign. A reachable ``±inf`` or NaN (every exponent bit set) gives infinite bounds.
        """
        layout, allowed = self._layout, set(self._bits)
        if allowed <= set(layout.mantissa_bits):
            return None
        values = self._values[name]
        full = (1 << layout.width) - 1
        pattern = values.view(layout.int_dtype).to(torch.int64) & full  # the unsigned pattern
        sign = 1 << layout.sign_bit
        magnitude_bits = sum(1 << b for b in allowed if b != layout.sign_bit)
        magnitude = pattern & (full ^ sign)

        def value(p: torch.Tensor) -> torch.Tensor:
            return _as_pattern(p, layout).view(values.dtype).to(torch.float64)

        low, high = value(magnitude & (full ^ magnitude_bits)), value(magnitude | magnitude_bits)
        if layout.sign_bit in allowed:
            v_lo, v_hi = -high, high
        else:
            negative = (pattern & sign) != 0
            v_lo, v_hi = torch.where(negative, -high, low), torch.where(negative, -low, high)
        w = values.to(torch.float64)
        return v_lo - w, v_hi - w

    def _entries(self, name: str, flat_index: torch.Tensor | None) -> torch.Tensor:
        values = self._values[name]
        return values if flat_index is None else values.reshape(-1)[flat_index]

    # ------------------------------------------------------------------------------------------------ bits
    def flip(self, flips: Iterable[FloatBitFlip]) -> FloatWeights:
        """
        A new :class:`FloatWeights` with ``flips`` applied (each bit XOR 1; a bit named twice flips back).

        :param flips: :class:`FloatBitFlip` objects naming these weights, valid indices and allowed bits.
        :return: the flipped weights (same allowed bits).
        """
        masks: dict[str, torch.Tensor] = {}
        table = self._layout.masks
        for flip, count in Counter(self._check_flip(f) for f in flips).items():
            if count % 2:
                values = self._values[flip.param_name]
                mask = masks.setdefault(flip.param_name, torch.zeros(values.shape, dtype=self._layout.int_dtype))
                mask[flip.index] |= table[flip.bit]
        return self.xor(masks)

    def xor(self, masks: Mapping[str, torch.Tensor]) -> FloatWeights:
        """
        A new :class:`FloatWeights` whose bit patterns are these XOR ``masks``: the vectorized form of :meth:`flip`.

        :param masks: ``{weight name: integer tensor}`` of the weight's shape, patterns of allowed bits only (int64
            patterns below ``2^width``, or signed patterns of the dtype's width).
        :return: the flipped weights (same allowed bits); a flip to ``±inf`` or NaN is kept.
        """
        allowed = _as_pattern(self._layout.masks[list(self._bits)].to(torch.int64).sum(), self._layout)
        values = dict(self._values)
        for name, mask in masks.items():
            if name not in values:
                raise ValueError(f"`masks`: {name!r} may not flip; the weights are {self.param_names}.")
            mask = torch.as_tensor(mask).to(device=values[name].device)
            if tuple(mask.shape) != tuple(values[name].shape):
                raise ValueError(f"`masks`: the mask of {name!r} must have shape {tuple(values[name].shape)}.")
            pattern = _as_pattern(mask.to(torch.int64), self._layout)
            if bool((pattern & ~allowed.to(pattern.device)).any()):
                raise ValueError(f"`masks` of {name!r} flip bits outside the allowed positions {list(self._bits)}.")
            values[name] = xor_float_bits(values[name], pattern)
        out = FloatWeights.__new__(FloatWeights)  # no finiteness check: a flip may give ±inf or NaN
        out._values, out._layout, out._bits = values, self._layout, self._bits
        return out

    def flipped_bits(self, other: FloatWeights) -> int:
        """Hamming distance between the bit patterns of ``self`` and ``other`` (same weights, shapes and dtype)."""
        if not isinstance(other, FloatWeights):
            raise TypeError(f"`other` must be a FloatWeights, got {type(other).__name__}.")
        same = other.dtype == self.dtype and set(other._values) == set(self._values)
        if not same or any(other._values[k].shape != v.shape for k, v in self._values.items()):
            raise ValueError("`other` must hold the same weights with the same shapes and dtype.")
        int_dtype = self._layout.int_dtype
        return sum(
            popcount(v.view(int_dtype) ^ other._values[k].to(v.device).view(int_dtype), self._layout.width)
            for k, v in self._values.items()
        )

    def _check_flip(self, flip: Any) -> FloatBitFlip:
        if not isinstance(flip, FloatBitFlip):
            raise TypeError(f"`flips` must hold FloatBitFlip objects, got {type(flip).__name__}.")
        check_flip_entry(flip, self._values, "may not flip; the weights are")
        if flip.bit not in self._bits:
            raise ValueError(f"`flips`: bit {flip.bit} is not among the allowed positions {list(self._bits)}.")
        return flip

    # ------------------------------------------------------------------------------------------------ estimators
    def deltas(self, estimator: PyTorchClassifier, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """
        ``{weight name: w' − W}`` in each weight's dtype and device, ``W`` the estimator's original weights. ``W + Δ``
        is exactly ``w'`` after sign and mantissa flips; after an exponent flip it may differ by a rounding, and a
        flip to ``±inf``/NaN gives a non-finite delta. ``names``: only these weights (``None``: all).
        """
        selected = self._values if names is None else {name: self._values[name] for name in names}
        params = estimator_weights(estimator, selected)
        out = {}
        for name, w in params.items():
            value = self._values[name]
            if w.dtype != value.dtype:
                raise TypeError(f"`estimator`'s weight {name!r} is {w.dtype}; these weights are {value.dtype}.")
            out[name] = value.to(w.device) - w
        return out

    def perturbation(self, estimator: PyTorchClassifier) -> WeightPerturbation:
        """
        The :class:`.WeightPerturbation` (budget ``None``) from ``estimator``'s original weights to these values.

        :raises ValueError: when a flip gave ``±inf`` or NaN (a perturbation is finite; :meth:`apply` takes them).
        """
        deltas = self.deltas(estimator)  # float16 and bfloat16 through float32, exactly
        return WeightPerturbation(
            {k: v.cpu().to(torch.float64 if v.dtype == torch.float64 else torch.float32) for k, v in deltas.items()}
        )

    def apply(self, estimator: PyTorchClassifier) -> PyTorchWeightClassifier:
        """
        A new estimator whose selected weights take exactly these values (``±inf`` and NaN included), written into its
        own copy of the module (so it carries no weight perturbation); neither ``estimator`` nor its module changes.
        """
        estimator = as_weight_classifier(estimator)
        self.deltas(estimator)  # names, shapes and dtypes checked
        out = estimator.with_weight_perturbation(None)
        with torch.no_grad():
            for name, value in self._values.items():
                param = out.base_model.get_parameter(name)
                param.copy_(value.to(param.device))
        return out
