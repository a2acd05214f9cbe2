"""
Contractions over margin specifications shared by the operators' rules and the bounds (docs/theory.md §4b):
coefficients ``(N, K, ...)`` hold one row per sample and specification.
"""

from __future__ import annotations

import torch

from art_weightpert.torch_tools import vector_times_rows


def flatten_specs(a: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(N, K, ...)`` as ``(N·K, ...)``: one row per sample and specification."""
    return a.reshape((-1,) + tuple(a.shape[2:]))


def sum_features(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension after ``(N, K)``."""
    return t.flatten(2).sum(dim=2) if t.dim() > 2 else t


def batched_dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_j a[n, k, j] v[n, j]`` over every feature dimension: ``(N, K, ...) × (N, ...) → (N, K)``
    (:func:`.vector_times_rows`)."""
    return vector_times_rows(v, a.flatten(2))


def concretize(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``min_{ĥ ∈ [lo, hi]} A·ĥ`` for coefficients ``a`` ``(N, K, ...)`` and a box ``(N, ...)``: ``(N, K)``."""
    if lo is hi:
        return batched_dot(a, lo)
    return batched_dot(a, (lo + hi) / 2) - batched_dot(a.abs(), (hi - lo) / 2)


def sample_factors(scale: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
    """Per-sample radius factors ``(N,)`` shaped to broadcast against ``(N, ...)`` tensors of ``ndim`` dimensions."""
    return None if scale is None else scale.reshape((-1,) + (1,) * (ndim - 1))


def abs_chord(centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chord of ``|·|`` on ``[c − r, c + r]``: ``(s, t)`` with ``|v| ≤ s v + t`` there, ``s = clamp(c / r, −1, 1)``,
    ``t = r (1 − s²)``. It is ``v`` itself when the box is non-negative (``s = 1, t = 0``), ``−v`` when it is
    non-positive, and ``sign(c)·v`` on a point."""
    slope = torch.div(centre, radius.clamp_min(torch.finfo(radius.dtype).tiny)).clamp_(-1.0, 1.0)
    return slope, torch.addcmul(radius, radius * slope, slope, value=-1)  # r − (r s) s: two passes, not three
