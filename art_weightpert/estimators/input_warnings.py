"""
Warnings for inputs that are probably wrong (values outside the classifier's ``clip_values``, or 8-bit images given
to a classifier without ``clip_values``), issued once per call site in the user's code; and the input checks of the
estimator: torch's wrong-shape errors told apart from other failures, inputs cast to the model's dtype.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

import art
import numpy as np
import torch

# frames in these folders are library frames (ours and ART's: its input filter wraps predict and fit)
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep for path in (os.path.dirname(__file__), art.__file__)
)
_WARNED_SITES: set[tuple[str | None, int | None, str]] = set()


def warn_once_per_call_site(message: str, kind: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside this package and ART, issued once per such call site
    and ``kind``: a loop or an attack that calls ``predict`` many times warns once. (Not also logged: a program that
    routes warnings to logging would show it twice.)"""
    frame, level = sys._getframe(1), 2  # pylint: disable=protected-access
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    site = (frame.f_code.co_filename, frame.f_lineno, kind) if frame is not None else (None, None, kind)
    if site in _WARNED_SITES:
        return
    _WARNED_SITES.add(site)
    warnings.warn(message, UserWarning, stacklevel=level)


def out_of_range_warning(x: np.ndarray, clip_values: Any, is_uint8: bool = False) -> tuple[str, str] | None:
    """``(message, kind)`` when the raw inputs ``x`` are probably wrong for a classifier with ``clip_values``: values
    outside them, or, without ``clip_values``, what looks like 8-bit images (integers in [0, 255], not all in [0, 1]);
    ``None`` otherwise."""
    if x.size == 0:
        return None
    low, high = float(np.min(x)), float(np.max(x))
    if clip_values is not None:
        clip_low, clip_high = float(np.min(clip_values[0])), float(np.max(clip_values[1]))
        tolerance = 1e-6 * max(1.0, clip_high - clip_low)
        if low < clip_low - tolerance or high > clip_high + tolerance:
            return (
                f"`x` has values in [{low:.4g}, {high:.4g}], outside the classifier's clip_values "
                f"({clip_low:g}, {clip_high:g}): attacks and certificates assume inputs in that range. Was the data "
                "scaled as for training (e.g. x / 255)?",
                "clip_values",
            )
    elif 1.0 < high <= 255.0 and low >= 0.0 and (is_uint8 or bool(np.all(x == np.round(x)))):
        return (
            f"`x` looks like 8-bit images (integer values in [{low:g}, {high:g}]) and the classifier has no "
            "clip_values: models are usually trained on inputs in [0, 1]. Divide by 255 (or give the classifier "
            "clip_values=(0, 255) if the model really takes 0–255 inputs).",
            "uint8",
        )
    return None


_SHAPE_ERROR = re.compile(r"shape|size|channel|dimension|\bdims?\b", re.IGNORECASE)
"""Words of torch's errors for an input of the wrong shape (conv2d, linear, view, pooling)."""
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def is_shape_error(err: BaseException) -> bool:
    """Whether ``err`` is torch's error for an input of the wrong shape (a ``RuntimeError`` naming a size, shape,
    channel count or dimension), as opposed to other failures of a forward pass."""
    return isinstance(err, RuntimeError) and _SHAPE_ERROR.search(str(err)) is not None


def input_shape_error(input_shape: tuple[int, ...], model: torch.nn.Module, err: BaseException) -> ValueError:
    """The error of a wrong ``input_shape``: the shape, the model and torch's message."""
    return ValueError(
        f"`input_shape={tuple(input_shape)}` does not fit the model {type(model).__name__}: its forward on a zero "
        f"input of shape {(1, *input_shape)} failed with: {' '.join(str(err).split())}"
    )


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 when it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def cast_floating(x: Any, dtype: torch.dtype) -> Any:
    """Floating-point inputs (numpy array or tensor) in ``dtype`` (differentiable for tensors); others unchanged."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating) and dtype in _NUMPY_DTYPES:
        return x.astype(_NUMPY_DTYPES[dtype], copy=False)
    return x


__all__ = [
    "cast_floating",
    "input_shape_error",
    "is_shape_error",
    "out_of_range_warning",
    "parameter_dtype",
    "warn_once_per_call_site",
]
