"""
The records of flipped bits and the checks of what may flip, shared by the integer codes of :mod:`.quantization` and
the float encodings of :mod:`.float_bits`: :class:`WeightBitFlip`, :class:`BitFlip`, the layers whose weights may
flip, bit positions, the entry a flip names, and bit counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from art_weightpert.network import perturbable_modules
from art_weightpert.validation import check_int

MIN_BITS, MAX_BITS = 2, 16
"""The widths of integer codes (and of the bit positions a flip may name)."""


@dataclass(frozen=True)
class WeightBitFlip:
    """
    One flipped bit of one weight: the fields and their validation, shared by :class:`BitFlip` (integer codes) and
    :class:`.FloatBitFlip` (float encodings), which say what ``bit`` numbers. Equal only to a flip of the same class.

    :param param_name: the weight's name as in ``model.named_parameters()`` (e.g. ``"0.weight"``).
    :param index: the entry of the weight tensor (a tuple of ints, one per dimension).
    :param bit: the bit position, 0 to :attr:`max_bit`.
    """

    param_name: str
    index: tuple[int, ...]
    bit: int
    max_bit = MAX_BITS - 1  # a class constant, not a field

    def __post_init__(self) -> None:
        if not isinstance(self.param_name, str):
            raise TypeError(f"`param_name` must be a str, got {type(self.param_name).__name__}.")
        index = (self.index,) if isinstance(self.index, (int, np.integer)) else self.index
        if not isinstance(index, Iterable):
            raise TypeError(f"`index` must be a tuple of ints, got {type(self.index).__name__}.")
        object.__setattr__(self, "index", tuple(check_int(i, "index", minimum=0) for i in index))
        object.__setattr__(self, "bit", check_int(self.bit, "bit", minimum=0, maximum=self.max_bit))


@dataclass(frozen=True)
class BitFlip(WeightBitFlip):
    """
    One flipped bit of one quantized weight.

    :param param_name: the weight's name as in ``model.named_parameters()`` (e.g. ``"0.weight"``).
    :param index: the entry of the weight tensor (a tuple of ints, one per dimension).
    :param bit: 0 (least significant) to ``n_bits - 1`` (the sign bit).
    """


def check_layers(layers: Any, model: torch.nn.Module) -> list[str]:
    """
    Validate the names of the Linear/Conv layers whose weights may flip.

    :return: the layer names (every Linear/Conv layer when ``layers`` is ``None``).
    :raises ValueError: unknown layer names (the valid ones are listed) or a model without Linear/Conv layers.
    """
    valid = list(perturbable_modules(model))
    if not valid:
        raise ValueError("`estimator`'s model has no Linear or Conv layer whose weights could be quantized.")
    if layers is None:
        return valid
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Iterable) or not all(isinstance(name, str) for name in layers):
        raise TypeError("`layers` must be a list of layer names or None.")
    layers = list(layers)
    if not layers:
        raise ValueError("`layers` must name at least one layer, or be None for every layer.")
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"`layers`: unknown layer name(s) {unknown}; the Linear/Conv layers are {valid}.")
    return layers


def check_bit_positions(bits: Any, width: int, name: str = "bits") -> tuple[int, ...] | None:
    """
    Validate bit positions of a ``width``-bit encoding.

    :return: the distinct positions, sorted; ``None`` when ``bits`` is ``None`` (every position).
    :raises TypeError: ``bits`` not a list (or other iterable) of ints.
    :raises ValueError: an empty list, or a position outside ``[0, width)``.
    """
    if bits is None:
        return None
    if isinstance(bits, (int, np.integer, str, bytes)) or not isinstance(bits, Iterable):
        raise TypeError(f"`{name}` must be a list of bit positions or None, got {type(bits).__name__}.")
    positions = {check_int(b, name, minimum=0, maximum=width - 1) for b in bits}
    if not positions:
        raise ValueError(f"`{name}` must name at least one bit position, or be None for all of them.")
    return tuple(sorted(positions))


def popcount(pattern: torch.Tensor, width: int) -> int:
    """Number of set bits among the low ``width`` bits of an integer tensor (two's complement)."""
    return sum(int(((pattern >> b) & 1).sum()) for b in range(width))


def check_flip_entry(flip: WeightBitFlip, weights: Mapping[str, torch.Tensor], unknown: str) -> None:
    """
    Check that ``flip`` names one of ``weights`` (``{name: tensor}``) and an entry inside it.

    :param unknown: the words after the weight's name in the error for an unknown weight.
    :raises ValueError: an unknown weight (the known ones are listed) or an index outside the weight.
    """
    if flip.param_name not in weights:
        raise ValueError(f"`flips`: {flip.param_name!r} {unknown} {list(weights)}.")
    shape = tuple(weights[flip.param_name].shape)
    if len(flip.index) != len(shape) or any(i >= n for i, n in zip(flip.index, shape)):
        raise ValueError(f"`flips`: index {flip.index} is outside {flip.param_name!r} of shape {shape}.")
