"""
The precision a certificate computes in (``dtype=`` of every certificate, docs/theory.md §5): float64, or float32 with
the rounding-error terms that keep the bounds sound for the exact real-number network.

What a float32 certificate adds around the bound functions, which take ``rounding=True`` for the terms inside them:

* the centre weights are the estimator's effective weights as it computes them in float32 (its base weights plus the
  perturbation it carries, summed in float32), and the radii of the ball are computed from them in float64 and rounded
  *up* to float32 (:func:`radius_in`): the float32 ball contains the ball asked for;
* the radius factors of a search are rounded up as well (:func:`factors_in`);
* the acceptance threshold is relative to the logit scale and covers the differences of rounding between two batch
  compositions of the same sample (:func:`certification_rtol`).
"""

from __future__ import annotations

import torch

from art_weightpert.rounding import up_cast

DTYPES = (torch.float32, torch.float64)
"""The precisions a certificate computes in."""

DEFAULT_DTYPE = torch.float64
"""The precision of a certificate created with ``dtype=None``."""


def check_dtype(dtype: torch.dtype | str | None, name: str = "dtype") -> torch.dtype:
    """``dtype`` as a torch dtype in :data:`DTYPES` (``None``: :data:`DEFAULT_DTYPE`; also ``"float32"``/``"float64"``).

    :raises TypeError: not a torch dtype or a name.
    :raises ValueError: another precision."""
    if dtype is None:
        return DEFAULT_DTYPE
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float64") else dtype
        if isinstance(dtype, str):
            raise ValueError(f"`{name}` must be 'float32' or 'float64', got {dtype!r}.")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`{name}` must be torch.float32 or torch.float64, got {type(dtype).__name__}.")
    if dtype not in DTYPES:
        raise ValueError(f"`{name}` must be torch.float32 or torch.float64, got {dtype}.")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` or ``"float64"``."""
    return str(dtype).removeprefix("torch.")


def certification_rtol(dtype: torch.dtype) -> float:
    """The relative acceptance threshold of a certificate in ``dtype``: a sample is certified when every margin lower
    bound exceeds ``rtol · (1 + max_i |f_i(x)|)``. The bounds are sound without it (float32 ones by their rounding
    terms); it keeps a certificate from depending on the rounding of one batch composition, so that a radius found
    certified stays certified when the sample is evaluated in another batch."""
    return 1e-9 if dtype == torch.float64 else 2.0**-18


def search_precision(dtype: torch.dtype) -> tuple[float, float]:
    """``(relative width, margin)`` of a certified-radius search in ``dtype`` (:mod:`.radius_search`): the search stops
    when its bracket is narrower than the width relative to the radius, and accepts a radius where every bound exceeds
    the tolerance by the margin, relative to the tolerance.

    float64: a width of ``2⁻³⁶`` and a margin of ``2⁻¹⁰`` (≈ 1e-12 of the logit scale, far above float64 rounding).
    float32: the radius factors are rounded up to float32 (:func:`factors_in`), so brackets narrower than a few ulps
    evaluate the same factors again: a width of ``2⁻²⁰`` (8 ulps); the bounds of one sample computed in two batch
    compositions differ by ~3e-8 of the logit scale (other products, other rounding), so the margin is ``2⁻³`` of the
    tolerance (``2⁻²¹`` of the scale). Either lowers a radius far less than the tolerance does."""
    return (2.0**-36, 2.0**-10) if dtype == torch.float64 else (2.0**-20, 2.0**-3)


def radius_in(radius64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ball's radius computed in float64 (from centre weights exact in ``dtype``), in ``dtype`` and never smaller:
    inflated by a relative 2⁻³⁰ (float64 computed the radius, a product or a norm of up to ~10⁶ terms, with a relative
    error far below it) and rounded up. The ball in ``dtype`` contains the ball asked for."""
    if dtype == torch.float64:
        return radius64
    return up_cast(radius64 * (1 + 2.0**-30), dtype)


def factors_in(scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-sample radius factors in ``dtype``, rounded up (a larger ball: the bound stays sound for the factor
    asked)."""
    return None if scale is None else up_cast(scale, dtype)
