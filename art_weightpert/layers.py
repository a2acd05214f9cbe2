"""
The import path of the layer records, which live in :mod:`art_weightpert.operators` (one module per layer type).
"""

from art_weightpert.operators import (
    Activation,
    Add,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    Layer,
    MaxPool,
    SpatialMean,
    UnsupportedModelError,
    conv_padding,
)

__all__ = [
    "Activation",
    "Add",
    "Affine",
    "AvgPool",
    "BatchNorm",
    "Flatten",
    "Layer",
    "MaxPool",
    "SpatialMean",
    "UnsupportedModelError",
    "conv_padding",
]
