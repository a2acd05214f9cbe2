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

from art_weightpert.torch_tools import vector_times_rows


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
    return torch.nextafter(t, t.new_full((), math.inf))  # a 0-d target, broadcast: no pass to fill it


def round_down(t: torch.Tensor) -> torch.Tensor:
    """The next float below every entry (``t`` itself at ``−inf``)."""
    return torch.nextafter(t, t.new_full((), -math.inf))


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
    # cuDNN's heuristics may pick FFT or Winograd convolutions even when deterministic (they are): off inside a
    # certificate, so CUDA convolutions run torch's own im2col + GEMM kernels, dot products in the sense of §5
    return switches + [
        (backends.cudnn, "deterministic", True),
        (backends.cudnn, "benchmark", False),
        (backends.cudnn, "enabled", False),
    ]


def flushes_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal numbers to zero (``torch.set_flush_denormal(True)``, or
    a library built with ``-ffast-math`` that set FTZ/DAZ when loaded): a float32 subnormal times one comes out 0.
    There is no getter for the mode; this probe is one scalar product."""
    return bool(torch.tensor(2.0**-140, dtype=torch.float32) * 1.0 == 0)


@contextlib.contextmanager
def exact_kernels() -> Iterator[None]:
    """
    Run the enclosed torch work with IEEE float32 products: no TF32 or bf16 internal precision in matrix products and
    convolutions (cuBLAS, cuDNN, oneDNN), float32 matmul precision ``"highest"``, cuDNN off (its heuristics may
    choose FFT or Winograd convolutions): CUDA convolutions run torch's im2col + GEMM kernels; NNPACK off (its
    Winograd and FFT convolutions serve float32 batches of 16 or more on the CPU when oneDNN is disabled,
    ``torch.backends.mkldnn.enabled = False``, and err by far more than a dot product); autocast off (an enclosing
    ``torch.autocast`` region would run the products in bfloat16 or float16); and gradual underflow
    on the CPU (subnormals not flushed to zero: the underflow terms of docs/theory.md §5 assume an absolute error of
    at most ``η = 2⁻¹⁴⁹`` per float32 operation, where flushing loses up to ``2⁻¹²⁶``). The user's settings are
    restored on exit, also after an exception or a keyboard interrupt.
    """
    switches = _precision_switches()
    saved = [getattr(obj, name) for obj, name, _ in switches]
    legacy = all(name != "fp32_precision" for _, name, _ in switches)
    saved_precision = torch.get_float32_matmul_precision()
    flushing = flushes_denormals()
    nnpack = torch.backends.nnpack.set_flags(False)[0]  # returns the flag it replaces
    try:
        if legacy:  # the new per-backend flags already cover it (and this setter would overwrite them)
            torch.set_float32_matmul_precision("highest")
        for obj, name, value in switches:
            setattr(obj, name, value)
        if flushing:
            torch.set_flush_denormal(False)
        with contextlib.ExitStack() as no_autocast:  # an enclosing torch.autocast would run products in bf16/fp16
            for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                no_autocast.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        for (obj, name, _), value in zip(switches, saved):
            setattr(obj, name, value)
        if legacy:
            torch.set_float32_matmul_precision(saved_precision)
        if flushing:
            torch.set_flush_denormal(True)
        torch.backends.nnpack.set_flags(nnpack)


# ------------------------------------------------------------------------------- error terms of the bounds (§5)
ROUNDING_SLACK = 10
"""Extra operations counted in every ``γ_{n+k}`` of the bounds (docs/theory.md §5): the casts of the weights, biases
and input to the bound's dtype, the sums around a product (``l + u``, ``c ± r``, adding a ball term) and the final
subtraction; each rounds by at most ``u`` relative to a quantity the error term already covers."""


def error_factor(n: int, dtype: torch.dtype) -> float:
    """``γ_{n+k} (1 + 2γ_{n+k})`` (``k`` = :data:`ROUNDING_SLACK`): the factor of a magnitude ``S`` whose product gives
    a bound on the rounding error of a length-``n`` dot product and the few operations around it (docs/theory.md §5).
    The factor ``1 + 2γ`` absorbs that ``S`` is itself computed in floating point (relative error ``≤ γ_{n+k} ≪ 1``)."""
    g = gamma(n + ROUNDING_SLACK, dtype)
    return g * (1 + 2 * g)


def down_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` rounded down (never above the value of ``t``): a lower end after a cast to a narrower
    dtype."""
    out = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return out
    return torch.where(out.to(t.dtype) > t, round_down(out), out)


def up_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` rounded up (never below the value of ``t``)."""
    out = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return out
    return torch.where(out.to(t.dtype) < t, round_up(out), out)


def smallest_subnormal(dtype: torch.dtype) -> float:
    """``η``, the smallest positive subnormal number of ``dtype`` (``2⁻¹⁴⁹`` in float32): below the normal range a
    product or a square rounds with an absolute error up to ``η/2`` instead of a relative one."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def underflow_error(length: int, m: torch.Tensor) -> torch.Tensor:
    """An upper bound, per sample ``(N, 1)``, of what coefficients computed with an absolute underflow error of at most
    ``length · η`` per entry (a dot product of ``length`` terms, docs/theory.md §5) change in their product with a
    value bounded by ``m`` (``(N, ...)``): ``length · η · Σ m``, rounded up generously."""
    eta = smallest_subnormal(m.dtype)
    total = m.flatten(1).sum(dim=1, keepdim=True)
    return (total * (1 + 2 * gamma(m[0].numel() + 2, m.dtype)) + 1) * (4 * (length + 2) * eta)


def norm_up(t: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """``t.norm(dim=dim)`` plus ``√(n η)`` (``n`` the entries reduced): the squares of entries below ``√η`` underflow
    to 0, each by less than ``η``, so the computed norm can miss up to ``√(n η)`` (docs/theory.md §5). The term is
    ~1e-22 in float32 and ~1e-161 in float64: it changes no bound of normal magnitude."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod(t.shape[d] for d in dims) if t.dim() else 1
    return t.norm(dim=dim, keepdim=keepdim) + math.sqrt(n * smallest_subnormal(t.dtype))


def finite_box(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A box whose ends overflowed made sound (docs/theory.md §5): a lower end that is ``+inf`` or NaN becomes
    ``−inf`` and an upper end that is ``−inf`` or NaN becomes ``+inf`` (the exact value is finite but unknown there);
    ``−inf`` below and ``+inf`` above stay. Without it a saturating function would turn an overflowed box
    ``[inf, inf]`` into a wrong finite one (tanh: ``[1, 1]``)."""
    return finite_lower(lo), torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=math.inf)


def finite_lower(bound: torch.Tensor) -> torch.Tensor:
    """Lower bounds with NaN and ``+inf`` (an overflow: the values of a network of finite weights are finite) replaced
    by ``−inf``; the caller of margin bounds sets the label's own column to ``+inf`` again where it has one."""
    return torch.nan_to_num(bound, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)


def magnitude(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``m = max(|lo|, |hi|)`` of a box (``|lo|`` for a known value, ``lo is hi``)."""
    return lo.abs() if lo is hi else torch.maximum(lo.abs(), hi.abs())


def abs_dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An upper bound of ``⟨|a|, v⟩`` (``v ≥ 0``) per sample and specification, ``(N, K, ...) × (N, ...) → (N, K)``:
    the computed sum of non-negative terms, inflated by its own rounding (``2γ`` of its length)."""
    length = max(1, a[0, 0].numel())
    out = vector_times_rows(v, a.abs().flatten(2))
    return out * (1 + 2 * gamma(length + 2, a.dtype))
