"""
Warnings for inputs that are probably wrong (values outside the classifier's ``clip_values``, or 8-bit images given
to a classifier without ``clip_values``), issued once per call site in the user's code.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import art
import numpy as np

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


__all__ = ["out_of_range_warning", "warn_once_per_call_site"]
