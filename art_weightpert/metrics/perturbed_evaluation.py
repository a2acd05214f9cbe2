"""
Shared plumbing of the generalization measures: the model's loss and error with weights ``W + Δ`` (through
:meth:`.PyTorchWeightClassifier.logits`, so the user's weights are never modified), Gaussian weight noise drawn with a
*standard deviation* per entry, and the checks of the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from art.estimators.classification import PyTorchClassifier

from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.estimators.wrapping import effective_estimator
from art_weightpert.torch_tools import batch_slices, eval_mode

Deltas = dict[str, torch.Tensor]


def weight_estimator(classifier: PyTorchClassifier) -> PyTorchWeightClassifier:
    """``classifier`` as the estimator the measures perturb: its effective weights ``W + Δ`` as base weights
    (:func:`.effective_estimator`; ART's ``EstimatorError`` for anything but an ART ``PyTorchClassifier``)."""
    return effective_estimator(classifier, "classifier")


def checked_data(estimator: PyTorchWeightClassifier, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` as float32 and ``y`` as integer class indices, checked (shapes, finiteness, label range, non-empty)."""
    x = estimator.check_inputs(x)
    labels = estimator.check_labels(y, len(x), required=True)
    if len(x) == 0:
        raise ValueError("`x` must hold at least one sample.")
    return x, labels


def loss_and_errors(
    estimator: PyTorchWeightClassifier,
    x_t: torch.Tensor,
    y_t: torch.Tensor,
    deltas: Mapping[str, torch.Tensor] | None,
    batch_size: int,
) -> tuple[float, int]:
    """Summed cross-entropy and number of misclassified samples of ``(x_t, y_t)`` (preprocessed tensors) with weights
    ``W + deltas``, in eval mode, without gradients."""
    loss, errors = 0.0, 0
    with torch.no_grad(), eval_mode(estimator.base_model):
        for b in batch_slices(len(x_t), batch_size):
            out = estimator.logits(x_t[b], deltas)
            labels = y_t[b]
            loss += float(F.cross_entropy(out.double(), labels, reduction="sum"))
            errors += int((out.argmax(dim=1) != labels).sum())
    return loss, errors


def gaussian_deltas(
    params: Mapping[str, torch.Tensor], std: Callable[[torch.Tensor], torch.Tensor | float], gen: torch.Generator
) -> Deltas:
    """
    One draw ``δ ~ N(0, std(p)²)`` per entry of every parameter ``p`` (``std`` is a standard deviation: ``torch.normal``
    and ``randn`` take standard deviations, not variances — the pitfall of several reference implementations).
    The standard normal draws come from ``gen`` on the CPU, so a seed gives the same noise on every device.
    """
    out = {}
    for name, p in params.items():
        z = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        out[name] = z * std(p.detach())
    return out


def seeded_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for the draw numbered ``stream`` (e.g. batch, draw) of a seeded computation: independent
    streams, reproducible."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))
