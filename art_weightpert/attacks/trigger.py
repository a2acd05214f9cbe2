"""
:class:`PatchTrigger`: the trigger of a backdoor, fixed values written over a square patch of an image or a set of
features of a flat input, and the helpers that place it and optimise its values (used by :class:`.BitFlipBackdoor`).

The trigger lives in the units of the raw (unpreprocessed) inputs and inside the estimator's ``clip_values``; its
values are optimised through a sigmoid reparametrisation, so every step stays in range without projection.

| Paper link: https://arxiv.org/abs/1909.05193
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from art_weightpert.validation import check_int

logger = logging.getLogger(__name__)

TRIGGER_FRACTION = 0.1  # default share of the input covered by the trigger


class PatchTrigger:
    """
    A backdoor trigger: ``x`` keeps its values outside ``mask`` and takes ``pattern`` inside it. ``apply`` (or
    calling the object) works on numpy batches of shape ``(N,) + input_shape``.

    :param mask: boolean array of the input's shape, ``True`` where the trigger writes.
    :param pattern: the values written there (the same shape; entries outside ``mask`` are ignored).
    """

    def __init__(self, mask: np.ndarray, pattern: np.ndarray) -> None:
        """
        Create a :class:`.PatchTrigger` instance.

        :param mask: boolean array of the input's shape, ``True`` where the trigger writes.
        :param pattern: float array of the same shape: the trigger's values.
        """
        mask = np.asarray(mask)
        pattern = np.asarray(pattern, dtype=np.float32)
        if mask.dtype != np.bool_:
            raise TypeError(f"`mask` must be a boolean array, got dtype {mask.dtype}.")
        if mask.shape != pattern.shape:
            raise ValueError(f"`pattern` has shape {pattern.shape}; `mask` has shape {mask.shape}.")
        if not np.all(np.isfinite(pattern[mask])):
            raise ValueError("`pattern` contains NaN or inf values.")
        self._mask = mask.copy()
        self._pattern = np.where(mask, pattern, 0.0).astype(np.float32)

    @property
    def mask(self) -> np.ndarray:
        """Where the trigger writes (a copy)."""
        return self._mask.copy()

    @property
    def pattern(self) -> np.ndarray:
        """The trigger's values, zero outside :attr:`mask` (a copy)."""
        return self._pattern.copy()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self._mask.shape)

    @property
    def size(self) -> int:
        """Number of input entries the trigger overwrites."""
        return int(self._mask.sum())

    def __repr__(self) -> str:
        return f"PatchTrigger(input_shape={self.input_shape}, entries={self.size})"

    def apply(self, x: np.ndarray) -> np.ndarray:
        """
        Stamp the trigger on a batch.

        :param x: inputs of shape ``(N,) + input_shape``.
        :return: float32 copy of ``x`` with the trigger's values inside the mask.
        """
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"`x` has shape {x.shape}; expected (N, {', '.join(map(str, self.input_shape))}).")
        return np.where(self._mask, self._pattern, x).astype(np.float32)

    __call__ = apply

    def apply_tensor(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """Torch form of :meth:`apply`, differentiable in ``pattern`` (default: the trigger's own values)."""
        mask = torch.as_tensor(self._mask, device=x.device)
        pattern = torch.as_tensor(self._pattern, device=x.device) if pattern is None else pattern
        return torch.where(mask, pattern.to(x.dtype), x)


def spatial_axes(input_shape: tuple[int, ...], channels_first: bool = True) -> tuple[int, int] | None:
    """The (height, width) axes of one input: ``None`` for flat inputs, the last two axes of ``(C, H, W)`` (or of
    ``(H, W)``), the first two of ``(H, W, C)`` when not ``channels_first``."""
    if len(input_shape) < 2:
        return None
    if len(input_shape) == 3 and not channels_first:
        return 0, 1
    return len(input_shape) - 2, len(input_shape) - 1


def default_trigger_size(
    input_shape: tuple[int, ...], channels_first: bool = True, fraction: float = TRIGGER_FRACTION
) -> int:
    """About ``fraction`` of the input (default 10%): the side of a square patch covering that share of the pixels,
    or that share of the features."""
    axes = spatial_axes(input_shape, channels_first)
    if axes is None:
        return max(1, min(int(np.prod(input_shape)), round(fraction * int(np.prod(input_shape)))))
    area = input_shape[axes[0]] * input_shape[axes[1]]
    return max(1, min(min(input_shape[a] for a in axes), round(math.sqrt(fraction * area))))


def check_trigger_size(size: Any, input_shape: tuple[int, ...], channels_first: bool = True) -> int:
    """``size`` as an int that fits the input: at most the image's height and width (the side of the patch), or the
    number of features."""
    axes = spatial_axes(input_shape, channels_first)
    limit = int(np.prod(input_shape)) if axes is None else min(input_shape[a] for a in axes)
    what = "features of the input" if axes is None else "pixels of the image's shorter side"
    size = check_int(size, "trigger_size", minimum=1)
    if size > limit:
        raise ValueError(f"`trigger_size` must be at most {limit} (the {what} {tuple(input_shape)}), got {size}.")
    return size


def select_mask(saliency: np.ndarray, size: int, channels_first: bool = True) -> np.ndarray:
    """
    Where to put the trigger: the ``size × size`` window (over every channel) with the largest total ``saliency``
    for images, the ``size`` features with the largest saliency for flat inputs (ties to the first position).

    :param saliency: non-negative array of the input's shape.
    :param size: side of the patch, or number of features.
    :return: boolean mask of the input's shape.
    """
    saliency = np.asarray(saliency, dtype=np.float64)
    mask = np.zeros(saliency.shape, dtype=bool)
    axes = spatial_axes(saliency.shape, channels_first)
    if axes is None:
        order = np.argsort(-saliency.reshape(-1), kind="stable")[:size]
        mask.reshape(-1)[order] = True
        return mask
    others = tuple(a for a in range(saliency.ndim) if a not in axes)
    plane = saliency.sum(axis=others) if others else saliency
    integral = np.pad(plane.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    windows = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    row, col = np.unravel_index(int(np.argmax(windows)), windows.shape)
    index = [slice(None)] * saliency.ndim
    index[axes[0]], index[axes[1]] = slice(row, row + size), slice(col, col + size)
    mask[tuple(index)] = True
    return mask


def clip_bounds(clip_values: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bound of every input entry: the estimator's ``clip_values``, or without them the range of the
    attack inputs ``x``; tensors of one input's shape."""
    shape = tuple(x.shape[1:])
    if clip_values is None:
        low, high = float(x.min()), float(x.max())
        logger.info("No clip_values: the trigger's values are kept in the inputs' range [%g, %g].", low, high)
        clip_values = (low, high)
    return tuple(
        torch.as_tensor(np.broadcast_to(np.asarray(v, dtype=np.float32), shape).copy(), device=x.device)
        for v in clip_values
    )


def optimise_pattern(
    objective: Callable[[torch.Tensor], torch.Tensor],
    low: torch.Tensor,
    high: torch.Tensor,
    steps: int,
    start: torch.Tensor | None = None,
    lr: float = 0.1,
    batch_shape: tuple[int, ...] = (),
) -> torch.Tensor:
    """
    Minimise ``objective(pattern)`` over patterns in ``[low, high]`` with Adam on ``z``, ``pattern = low +
    (high − low)·sigmoid(z)`` (deterministic: no random start).

    :param objective: scalar loss of a pattern tensor of shape ``batch_shape + low.shape``.
    :param low: lower bounds (one input's shape).
    :param high: upper bounds.
    :param steps: Adam steps.
    :param start: initial pattern (default: the middle of the range).
    :param lr: Adam's learning rate on ``z``.
    :param batch_shape: leading dimensions, to optimise several patterns at once.
    :return: the final pattern (detached), inside ``[low, high]``.
    """
    span = (high - low).clamp_min(0)
    if start is None:
        z = torch.zeros(batch_shape + tuple(low.shape), device=low.device)
    else:
        frac = ((start - low) / span.clamp_min(1e-12)).clamp(1e-4, 1 - 1e-4)
        z = torch.log(frac) - torch.log1p(-frac)
    z = z.detach().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)

    def pattern_of(z_value: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.maximum(low + span * torch.sigmoid(z_value), low), high)

    for _ in range(steps):
        optimizer.zero_grad()
        objective(pattern_of(z)).backward()
        optimizer.step()
    return pattern_of(z).detach()
