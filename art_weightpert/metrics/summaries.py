"""
The numbers a report derives from the library's results: the default ε grids, the summary of per-sample certified
radii, the flips that halve the accuracy, the numbers of flips of a bit-flip curve, the generalization gap, the accuracy
of a module that no estimator wraps, class and parameter counts (an estimator's accuracy is
:func:`.estimator_accuracy`).

The command line (:mod:`art_weightpert.cli`) computes no number itself: it calls these functions, so a script that
rebuilds a report gets the same numbers from the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from art_weightpert.budget import PerturbationBudget
from art_weightpert.torch_tools import batch_slices, eval_mode

EPS_FRACTIONS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
"""The fractions of :func:`default_eps_grid`: of the typical weight size, or the relative radii themselves."""
FLIP_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
"""The numbers of flipped bits of :func:`flip_counts` below its maximum."""


def typical_weight_size(model: nn.Module, budget: PerturbationBudget) -> float:
    """
    The typical size of the weights ``budget`` perturbs on ``model``, in its norm: the mean over its weight tensors of
    the mean ``|W|`` entry (``inf``), the mean row ℓ1 norm (``row_l1``) or the Frobenius norm (``l2``), i.e. the mean
    radius of the relative ball of ε = 1 (its ``eps`` and ``include_bias`` are ignored); 1 when it has no weight.
    """
    unit = PerturbationBudget(1.0, budget.norm, budget.layers, relative=True)
    sizes = [float(ball.radius.mean()) for ball in unit.parameter_balls(model, torch.float64) if ball.kind == "weight"]
    return float(np.mean(sizes)) if sizes else 1.0


def default_eps_grid(
    model: nn.Module, budget: PerturbationBudget, fractions: Sequence[float] = EPS_FRACTIONS
) -> list[float]:
    """
    The ε grid of a report when none is given: ``fractions`` (0, 0.2 %, 0.5 %, 1 %, 2 %, 5 % and 10 %) of
    :func:`typical_weight_size`, each to 3 significant digits; for a relative budget, the fractions themselves.

    :param model: the unperturbed module.
    :param budget: the ball (its ε is ignored).
    :param fractions: increasing fractions, the first 0 for a grid that starts at the clean model.
    :return: the grid.
    """
    if budget.relative:
        return [float(f) for f in fractions]
    scale = typical_weight_size(model, budget)
    return [float(f"{f * scale:.3g}") for f in fractions]


def multiples_grid(eps: float, multiples: Sequence[float]) -> list[float]:
    """The ε grid ``m · eps`` for each of ``multiples`` (to 6 significant digits, so that ``0.5 · 0.1`` is 0.05)."""
    return [float(f"{m * eps:.6g}") for m in multiples]


def radius_summary(radii: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """
    The summary of per-sample certified radii (:func:`.certified_weight_radius`; ``inf``: never broken).

    :return: ``{"mean", "max"}`` over the finite radii (nan when none is), ``"median"`` over all (nan for no
        sample), ``"median_certified"`` over the positive ones (0 when none is), ``"fraction_positive"`` (nan for no
        sample), ``"infinite"`` (how many) and ``"values"`` (the radii, ``None`` for ``inf``).
    """
    values = np.asarray(radii, dtype=np.float64)
    finite = values[np.isfinite(values)]
    positive = values[values > 0]
    return {
        "mean": float(finite.mean()) if len(finite) else math.nan,
        "median": float(np.median(values)) if len(values) else math.nan,
        "median_certified": float(np.median(positive)) if len(positive) else 0.0,
        "max": float(finite.max()) if len(finite) else math.nan,
        "fraction_positive": float(np.mean(values > 0)) if len(values) else math.nan,
        "infinite": int(np.sum(np.isinf(values))),
        "values": [float(v) if math.isfinite(v) else None for v in values],
    }


def flips_to_halve(attack_accuracy: Sequence[float], start: float) -> int | None:
    """The number of flips after which ``attack_accuracy`` (a bit-flip attack's accuracy after each flip, as
    :func:`.bit_flip_curve`'s ``bfa_attack_accuracy``) is at most half of ``start`` (``None``: never)."""
    return next((i + 1 for i, a in enumerate(attack_accuracy) if a <= start / 2), None)


def flip_counts(max_flips: int, steps: Sequence[int] = FLIP_STEPS) -> list[int]:
    """The numbers of flips of a bit-flip curve: ``steps`` below ``max_flips`` (1, 2, 5, 10, 20, 50, ...), then
    ``max_flips`` itself."""
    return sorted({k for k in steps if k < max_flips} | {int(max_flips)})


def module_accuracy(module: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """The accuracy on ``(x, y)`` (integer labels) of a torch module that no estimator wraps, run in eval mode on its
    parameters' device in batches of ``batch_size`` (its training flags are restored)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    predictions = []
    with eval_mode(module), torch.no_grad():
        for batch in batch_slices(len(x), batch_size):
            inputs = torch.as_tensor(x[batch], dtype=torch.float32, device=device)
            predictions.append(module(inputs).argmax(1).cpu().numpy())
    return float(np.mean(np.concatenate(predictions) == np.asarray(y))) if predictions else math.nan


def generalization_gap(
    classifier: Any, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], batch_size: int = 128
) -> dict[str, float]:
    """
    The error and mean loss of the unperturbed ``classifier`` (ART's ``predict`` and ``compute_loss``) on the training
    and the test data, and the gaps, test minus training.

    :return: ``{"train_error", "train_loss", "test_error", "test_loss", "error_gap", "loss_gap"}``.
    """
    values = {}
    for name, (x, y) in (("train", train), ("test", test)):
        predictions = classifier.predict(x, batch_size=batch_size).argmax(axis=1)
        values[f"{name}_error"] = float(np.mean(predictions != np.asarray(y)))
        values[f"{name}_loss"] = float(np.mean(classifier.compute_loss(x, y, reduction="mean")))
    values["error_gap"] = values["test_error"] - values["train_error"]
    values["loss_gap"] = values["test_loss"] - values["train_loss"]
    return values


def classes_seen(*labels: np.ndarray | None) -> int:
    """The number of classes that integer label arrays imply: the largest label of any of them (``None``: none), plus
    one (0 without labels)."""
    return int(max([-1] + [int(np.max(y)) for y in labels if y is not None and len(y)]) + 1)


def parameter_count(model: nn.Module) -> int:
    """The number of parameter entries of ``model``."""
    return int(sum(p.numel() for p in model.parameters()))


__all__ = [
    "EPS_FRACTIONS",
    "FLIP_STEPS",
    "classes_seen",
    "default_eps_grid",
    "flip_counts",
    "flips_to_halve",
    "generalization_gap",
    "module_accuracy",
    "multiples_grid",
    "parameter_count",
    "radius_summary",
    "typical_weight_size",
]
