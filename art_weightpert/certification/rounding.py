"""
Floating-point soundness of the bounds (docs/theory.md §5): the rounding-error terms that make a bound computed in
float32 (or float64) a sound bound of the exact real-number network, and the kernel settings the error terms assume.

For a dot product of length ``n`` evaluated in floating point in any order (blocked, pairwise, with or without FMA),
``|fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ_n Σ |aᵢ||bᵢ|`` with ``γ_n = n u / (1 − n u)`` and ``u`` the unit roundoff (Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1). A convolution evaluated directly or as im2col + GEMM is such a
dot product with ``n = C_in·k_h·k_w / groups``; Winograd, FFT, TF32 and bf16 internal precision are not, so a
certificate runs inside :func:`exact_kernels`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the machine epsilon of ``dtype`` (``2⁻²⁴`` for float32, ``2⁻⁵³`` for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """``γ_n = n u / (1 − n u)`` for ``dtype``, rounded up (a Python float, computed in float64 and inflated by one
    part in 2⁴⁰ so that its own rounding never makes it smaller than the real value)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"a dot product of length {n} is too long for a rounding bound in {dtype}.")
    return nu / (1 - nu) * (1 + 2.0**-40)


def round_up(t: torch.Tensor) -> torch.Tensor:
    """The next float above every entry (``t`` itself at ``+inf``): an upper bound of the real value ``t`` was computed
    as when its own last rounding was to nearest."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


def round_down(t: torch.Tensor) -> torch.Tensor:
    """The next float below every entry (``t`` itself at ``−inf``)."""
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def widen(lo: torch.Tensor, hi: torch.Tensor, error: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[lo − error, hi + error]`` rounded outward (each end moved one float further): a box holding every real value
    within ``error`` of the computed one."""
    return round_down(lo - error), round_up(hi + error)


def _precision_switches() -> list[tuple[object, str, object]]:
    """``(object, attribute, value inside a certificate)`` of every backend switch that lets float32 work run in lower
    internal precision: torch's per-backend ``fp32_precision`` flags where this torch has them (mixing them with the
    legacy ``allow_tf32`` flags is an error), else the legacy flags."""
    backends = torch.backends
    new_api = [
        getattr(backends.cuda, "matmul", None),
        getattr(getattr(backends, "cudnn", None), "conv", None),
        getattr(getattr(backends, "cudnn", None), "rnn", None),
        getattr(backends, "mkldnn", None),
        getattr(getattr(backends, "mkldnn", None), "matmul", None),
        getattr(getattr(backends, "mkldnn", None), "conv", None),
    ]
    switches: list[tuple[object, str, object]] = [
        (obj, "fp32_precision", "ieee") for obj in new_api if obj is not None and hasattr(obj, "fp32_precision")
    ]
    if not switches:
        switches = [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]
    return switches + [(backends.cudnn, "deterministic", True), (backends.cudnn, "benchmark", False)]


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """
    Run the enclosed torch work with IEEE float32 products: no TF32 or bf16 internal precision in matrix products and
    convolutions (cuBLAS, cuDNN, oneDNN), float32 matmul precision ``"highest"``, and cuDNN restricted to deterministic
    algorithms without autotuning (no FFT or Winograd kernels chosen by timing). The user's settings are restored on
    exit, also after an exception or a keyboard interrupt.
    """
    switches = _precision_switches()
    saved = [getattr(obj, name) for obj, name, _ in switches]
    legacy = all(name != "fp32_precision" for _, name, _ in switches)
    saved_precision = torch.get_float32_matmul_precision()
    try:
        if legacy:  # the new per-backend flags already cover it (and this setter would overwrite them)
            torch.set_float32_matmul_precision("highest")
        for obj, name, value in switches:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(switches, saved):
            setattr(obj, name, value)
        if legacy:
            torch.set_float32_matmul_precision(saved_precision)
