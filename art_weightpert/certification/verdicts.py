"""
:class:`VerificationResult`: the per-sample verdicts of a complete verifier (docs/theory.md §11), shared by the
weight-ball verifier and :meth:`.BitFlipCertifier.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUSES = ("certified", "falsified", "unknown")
"""The verdicts, in the order of :meth:`VerificationResult.shares`."""


@dataclass
class VerificationResult:
    """
    Verdicts of a verifier on ``N`` samples.

    :param status: ``(N,)`` array of ``"certified"`` (every perturbation of the threat set keeps the label),
        ``"falsified"`` (a concrete perturbation in the threat set changes the prediction, or the sample is already
        misclassified) or ``"unknown"`` (neither within the time limit).
    :param lower_bounds: ``(N,)`` float64, the best lower bound found of the smallest margin ``f_y − f_i`` over the
        threat set (``−inf`` where none was computed).
    :param counterexamples: ``{sample index: counterexample}`` for the falsified samples (a
        :class:`.WeightPerturbation` for weight balls, a ``list[BitFlip]`` for bit flips; an all-zero perturbation
        or an empty list for a sample that is misclassified already).
    :param seconds: ``(N,)`` float64, the time spent on each sample.
    """

    status: np.ndarray
    lower_bounds: np.ndarray
    counterexamples: dict[int, Any] = field(default_factory=dict)
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.status = np.asarray(self.status, dtype=object)
        self.lower_bounds = np.asarray(self.lower_bounds, dtype=np.float64)
        self.seconds = np.asarray(self.seconds, dtype=np.float64)
        unknown = set(self.status.tolist()) - set(STATUSES)
        if unknown:
            raise ValueError(f"`status` holds {sorted(unknown)}; verdicts are {list(STATUSES)}.")
        if self.lower_bounds.shape != self.status.shape:
            raise ValueError(f"`lower_bounds` has shape {self.lower_bounds.shape}, `status` {self.status.shape}.")

    def shares(self) -> dict[str, float]:
        """``{"certified": f, "falsified": f, "unknown": f}``: the share of the samples with each verdict (``nan`` for
        no sample)."""
        n = len(self.status)
        return {s: float(np.sum(self.status == s)) / n if n else float("nan") for s in STATUSES}

    def __len__(self) -> int:
        return len(self.status)

    def __repr__(self) -> str:
        shares = ", ".join(f"{k}={v:.3f}" for k, v in self.shares().items())
        return f"VerificationResult(n={len(self)}, {shares}, seconds={float(np.sum(self.seconds)):.2f})"
