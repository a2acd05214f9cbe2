"""Metrics in ART's function style: the classifier first, numpy in and out."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "weight_certified_accuracy": "art_weightpert.metrics.certification",
    "certified_weight_radius": "art_weightpert.metrics.certification",
    "weight_verified_accuracy": "art_weightpert.metrics.verification",
    "generalization_bound": "art_weightpert.metrics.generalization",
    "weight_sharpness": "art_weightpert.metrics.generalization",
    "pac_bayes_sigma": "art_weightpert.metrics.generalization",
    "pac_bayes_bound": "art_weightpert.metrics.generalization",
    "weight_robustness_curve": "art_weightpert.metrics.robustness",
    "plot_robustness_curve": "art_weightpert.metrics.plots",
    "plot_robustness_curves": "art_weightpert.metrics.plots",
    "plot_certified_radius_histogram": "art_weightpert.metrics.plots",
    "plot_bit_flip_curves": "art_weightpert.metrics.plots",
    "bit_flip_curve": "art_weightpert.metrics.bit_flips",
    "default_eps_grid": "art_weightpert.metrics.summaries",
    "radius_summary": "art_weightpert.metrics.summaries",
    "flips_to_halve": "art_weightpert.metrics.summaries",
    "flip_counts": "art_weightpert.metrics.summaries",
    "generalization_gap": "art_weightpert.metrics.summaries",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'art_weightpert.metrics' has no attribute {name!r}")
