"""
Small reference models for the embedded digits data, wrapped as :class:`.PyTorchWeightClassifier`. Used by the demo,
the examples, the benchmarks and the tests, so that they all train the same networks.
"""

from __future__ import annotations

import torch
from torch import nn

from art_weightpert.estimators import PyTorchWeightClassifier


def digits_mlp(
    hidden: tuple[int, ...] = (128, 64), bias: bool = False, seed: int = 0, in_features: int = 64, nb_classes: int = 10
) -> nn.Sequential:
    """A ReLU MLP ``in_features → hidden… → nb_classes`` (bias-free by default, the paper's setting)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h, bias=bias), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, nb_classes, bias=bias))
    return nn.Sequential(*layers)


def digits_cnn(
    channels: tuple[int, int] = (8, 16), bias: bool = True, seed: int = 0, nb_classes: int = 10
) -> nn.Sequential:
    """A small CNN for ``(1, 8, 8)`` digits: conv-ReLU-conv(stride 2)-ReLU-flatten-linear-ReLU-linear."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=bias),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=bias),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, 64, bias=bias),
        nn.ReLU(),
        nn.Linear(64, nb_classes, bias=bias),
    )


def make_classifier(
    model: nn.Module,
    input_shape: tuple[int, ...],
    nb_classes: int = 10,
    lr: float = 3e-3,
    device_type: str = "cpu",
    clip_values: tuple[float, float] | None = (0.0, 1.0),
) -> PyTorchWeightClassifier:
    """Wrap ``model`` with cross-entropy and Adam(``lr``) as a :class:`.PyTorchWeightClassifier`."""
    return PyTorchWeightClassifier(
        model,
        nn.CrossEntropyLoss(),
        input_shape,
        nb_classes,
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        clip_values=clip_values,
        device_type=device_type,
    )
