"""
Small reference models for the embedded digits data, wrapped as :class:`.PyTorchWeightClassifier`. Used by the demo,
the examples, the benchmarks and the tests, so that they all train the same networks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from art_weightpert.budget import PerturbationBudget
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


# ------------------------------------------------------------------------------------------------ training recipes
DIGITS_EPS = 0.1
"""Default row_l1 radius for the digits MLP: a standard ``digits_mlp`` certifies under 5% of the test points there
(interval bound), a robustly trained one over 80% (docs/results.md)."""


def default_digits_budget(eps: float = DIGITS_EPS) -> PerturbationBudget:
    """The budget of the digits demo and experiments: ``row_l1`` (the paper's norm, THEORY.md §2) of absolute radius
    ``eps`` on every weight of every layer, biases unperturbed."""
    return PerturbationBudget(eps, norm="row_l1")


def train_standard(
    classifier: PyTorchWeightClassifier,
    x: np.ndarray,
    y: np.ndarray,
    nb_epochs: int = 20,
    batch_size: int = 128,
    seed: int = 0,
) -> PyTorchWeightClassifier:
    """Plain training with ART's ``fit`` (batch order fixed by ``seed``); returns ``classifier``, trained in place."""
    torch.manual_seed(seed)
    classifier.fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs)
    return classifier


def train_robust(
    classifier: PyTorchWeightClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget | None = None,
    nb_epochs: int = 20,
    batch_size: int = 128,
    lam: float = 1.0,
    mu: float = 0.0,
    kappa: float = 0.0,
    bound: str = "interval",
    warmup: int = 5,
    seed: int = 0,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    verbose: bool = False,
) -> dict[str, list]:
    """Training with :class:`.WeightRobustTrainer` (THEORY.md §7) at ``budget`` (default
    :func:`default_digits_budget`), batch order fixed by ``seed``; ``classifier`` is trained in place.

    :return: the trainer's history.
    """
    from art_weightpert.defences.trainer import WeightRobustTrainer

    budget = default_digits_budget() if budget is None else budget
    trainer = WeightRobustTrainer(
        classifier, budget, lam=lam, mu=mu, kappa=kappa, bound=bound, warmup=warmup, verbose=verbose
    )
    torch.manual_seed(seed)
    return trainer.fit(x, y, validation_data=validation_data, batch_size=batch_size, nb_epochs=nb_epochs)


def train_digits_models(
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    budget: PerturbationBudget | None = None,
    nb_epochs: int = 20,
    hidden: tuple[int, ...] = (128, 64),
    lam: float = 1.0,
    bound: str = "interval",
    warmup: int = 5,
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, PyTorchWeightClassifier]:
    """
    The demo's pair of bias-free ReLU MLPs on digits, from the same initialisation: ``"standard"`` (plain training)
    and ``"robust"`` (:func:`train_robust` at ``budget``, default :func:`default_digits_budget`).

    :param x_train: flattened training inputs (default: :func:`.load_digits_data`'s training split).
    :param y_train: their labels.
    :param budget: the budget of the robust model.
    :param nb_epochs: epochs of each model (about 0.2 s per epoch for the robust one on a CPU core).
    :param hidden: hidden widths.
    :param lam: λ of the robust loss.
    :param bound: η of the robust loss (``"interval"`` or ``"paper"``).
    :param warmup: epochs of λ warm-up.
    :param seed: seed of the initialisation and of the batch order.
    :param verbose: show the trainer's progress bar.
    :return: ``{"standard": classifier, "robust": classifier}``.
    """
    if x_train is None or y_train is None:
        from art_weightpert.data import load_digits_data

        x_train, y_train, _, _ = load_digits_data()
    in_features = int(np.prod(x_train.shape[1:]))
    models = {}
    for name in ("standard", "robust"):
        model = digits_mlp(hidden, bias=False, seed=seed, in_features=in_features)
        models[name] = make_classifier(model, (in_features,))
    train_standard(models["standard"], x_train, y_train, nb_epochs=nb_epochs, seed=seed)
    train_robust(
        models["robust"],
        x_train,
        y_train,
        budget,
        nb_epochs=nb_epochs,
        lam=lam,
        bound=bound,
        warmup=warmup,
        seed=seed,
        verbose=verbose,
    )
    return models
