"""Defences that transform a classifier into a more robust one (ART's ``art.defences.transformer`` grammar)."""

from art_weightpert.defences.transformer.activation_clipping import (
    ActivationClipping,
    ChannelClippedReLU,
    clip_activations,
)

__all__ = ["ActivationClipping", "ChannelClippedReLU", "clip_activations"]
