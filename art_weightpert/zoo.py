"""
Small reference models for the embedded digits data, wrapped as :class:`.PyTorchWeightClassifier`. Used by the demo,
the examples, the benchmarks and the tests, so that they all train the same networks. The residual networks
(:func:`digits_resnet`, :func:`resnet18_cifar`, torchvision's structure) live in :mod:`.resnets`, re-exported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from art_weightpert.budget import NORMS, PerturbationBudget
from art_weightpert.estimators import PyTorchWeightClassifier
from art_weightpert.estimators.settings import reject_unknown_keywords, renamed_keyword
from art_weightpert.resnets import digits_resnet
from art_weightpert.resnets import resnet18_cifar as resnet18_cifar  # re-exported
from art_weightpert.validation import (
    check_choice,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)


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


@dataclass(frozen=True)
class DigitsRecipe:
    """
    The digits training recipe shared by the demo, ``art-weightpert train``'s defaults, the examples and the
    benchmarks: a bias-free ReLU MLP, Adam, and :class:`.WeightRobustTrainer`'s robust loss (docs/theory.md §7) on a
    ``norm`` ball of absolute radius ``eps`` on every weight of every layer (biases unperturbed).

    :param hidden: hidden widths of :func:`digits_mlp`.
    :param eps: radius of the training ball.
    :param norm: the ball: ``"inf"``, ``"row_l1"`` (the paper's norm, docs/theory.md §2) or ``"l2"``.
    :param epochs: training epochs of each model.
    :param batch_size: samples per step.
    :param lr: Adam's learning rate.
    :param lam: λ, weight of the robust term.
    :param mu: μ, weight of the operator-norm term.
    :param kappa: κ, safety margin of the robust term.
    :param method: the margin bound η of the robust loss (a name of :data:`art_weightpert.certification.METHODS`).
    :param warmup: epochs of λ warm-up.
    :param seed: seed of the initialisation and of the batch order.
    """

    hidden: tuple[int, ...] = (128, 64)
    eps: float = DIGITS_EPS
    norm: str = "row_l1"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    lam: float = 1.0
    mu: float = 0.0
    kappa: float = 0.0
    method: str = "interval"
    warmup: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for width in self.hidden:
            check_positive_int(width, "hidden")
        check_non_negative(self.eps, "eps")
        check_choice(self.norm, "norm", NORMS)
        check_positive_int(self.epochs, "epochs")
        check_positive_int(self.batch_size, "batch_size")
        check_positive(self.lr, "lr")
        for name in ("lam", "mu", "kappa"):
            check_non_negative(getattr(self, name), name)
        check_non_negative_int(self.warmup, "warmup")
        check_non_negative_int(self.seed, "seed")

    def budget(self) -> PerturbationBudget:
        """The training ball of this recipe."""
        return PerturbationBudget(self.eps, norm=self.norm)

    def classifier(self, in_features: int = 64, nb_classes: int = 10) -> PyTorchWeightClassifier:
        """A fresh, untrained :func:`digits_mlp` of this recipe (initialised by ``seed``), with Adam(``lr``)."""
        model = digits_mlp(self.hidden, bias=False, seed=self.seed, in_features=in_features, nb_classes=nb_classes)
        return make_classifier(model, (in_features,), nb_classes, lr=self.lr)

    def trainer_params(self) -> dict[str, float | int | str]:
        """The keyword arguments of :class:`.WeightRobustTrainer` set by this recipe."""
        return {"lam": self.lam, "mu": self.mu, "kappa": self.kappa, "method": self.method, "warmup": self.warmup}


DIGITS_RECIPE = DigitsRecipe()
"""The recipe of the demo and of the experiments in docs/results.md."""


@dataclass
class TrainedModel:
    """A classifier trained by :func:`train_digits_pair`, with the trainer's history (``None`` for plain training)
    and the training time in seconds."""

    classifier: PyTorchWeightClassifier
    history: dict[str, list] | None
    seconds: float


def default_digits_budget(eps: float = DIGITS_EPS) -> PerturbationBudget:
    """The budget of the digits demo and experiments: :data:`DIGITS_RECIPE`'s ball (``row_l1``, the paper's norm,
    docs/theory.md §2) of absolute radius ``eps`` on every weight of every layer, biases unperturbed."""
    return replace(DIGITS_RECIPE, eps=eps).budget()


def train_standard(
    classifier: PyTorchWeightClassifier,
    x: np.ndarray,
    y: np.ndarray,
    nb_epochs: int = DIGITS_RECIPE.epochs,
    batch_size: int = DIGITS_RECIPE.batch_size,
    seed: int = 0,
    verbose: bool = False,
) -> PyTorchWeightClassifier:
    """Plain training with ART's ``fit`` (batch order fixed by ``seed``; ``verbose``: ART's progress bar); returns
    ``classifier``, trained in place."""
    torch.manual_seed(seed)
    classifier.fit(x, y, batch_size=batch_size, nb_epochs=nb_epochs, verbose=verbose)
    return classifier


def train_robust(
    classifier: PyTorchWeightClassifier,
    x: np.ndarray,
    y: np.ndarray,
    budget: PerturbationBudget | None = None,
    nb_epochs: int = DIGITS_RECIPE.epochs,
    batch_size: int = DIGITS_RECIPE.batch_size,
    lam: float = DIGITS_RECIPE.lam,
    mu: float = DIGITS_RECIPE.mu,
    kappa: float = DIGITS_RECIPE.kappa,
    method: str = DIGITS_RECIPE.method,
    warmup: int = DIGITS_RECIPE.warmup,
    seed: int = 0,
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    verbose: bool = False,
    batch_norm: str = "auto",
    **kwargs: Any,
) -> dict[str, list]:
    """Training with :class:`.WeightRobustTrainer` (docs/theory.md §7) at ``budget`` (default
    :func:`default_digits_budget`), batch order fixed by ``seed``; ``classifier`` is trained in place.
    ``method`` and ``batch_norm``: the trainer's settings (``bound``: the deprecated spelling of ``method``).

    :return: the trainer's history.
    """
    from art_weightpert.defences.trainer import WeightRobustTrainer

    method = renamed_keyword(kwargs, "bound", "method", method, DIGITS_RECIPE.method, "train_robust")
    reject_unknown_keywords(kwargs, "train_robust")

    budget = default_digits_budget() if budget is None else budget
    trainer = WeightRobustTrainer(
        classifier, budget, lam=lam, mu=mu, kappa=kappa, method=method, warmup=warmup, batch_norm=batch_norm,
        verbose=verbose,
    )  # fmt: skip
    torch.manual_seed(seed)
    return trainer.fit(x, y, validation_data=validation_data, batch_size=batch_size, nb_epochs=nb_epochs)


def train_digits_pair(
    recipe: DigitsRecipe = DIGITS_RECIPE,
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    budget: PerturbationBudget | None = None,
    verbose: bool = False,
) -> dict[str, TrainedModel]:
    """
    The demo's pair of bias-free ReLU MLPs from the same initialisation, trained by ``recipe``: ``"standard"``
    (plain training, :func:`train_standard`) and ``"robust"`` (:func:`train_robust`).

    :param recipe: hidden widths, epochs, batch size, learning rate, robust-loss parameters and seed.
    :param x_train: flattened training inputs (default: :func:`.load_digits_data`'s training split).
    :param y_train: their labels.
    :param budget: the ball of the robust model (default: ``recipe.budget()``).
    :param verbose: progress bars of both trainings.
    :return: ``{"standard": TrainedModel, "robust": TrainedModel}``.
    """
    if x_train is None or y_train is None:
        from art_weightpert.data import load_digits_data

        x_train, y_train, _, _ = load_digits_data()
    in_features = int(np.prod(x_train.shape[1:]))
    budget = recipe.budget() if budget is None else budget
    classifiers = {name: recipe.classifier(in_features) for name in ("standard", "robust")}
    trained = {}
    start = time.perf_counter()
    train_standard(
        classifiers["standard"], x_train, y_train, recipe.epochs, recipe.batch_size, recipe.seed, verbose=verbose
    )
    trained["standard"] = TrainedModel(classifiers["standard"], None, time.perf_counter() - start)
    start = time.perf_counter()
    history = train_robust(
        classifiers["robust"],
        x_train,
        y_train,
        budget,
        nb_epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        seed=recipe.seed,
        verbose=verbose,
        **recipe.trainer_params(),
    )
    trained["robust"] = TrainedModel(classifiers["robust"], history, time.perf_counter() - start)
    return trained


def train_digits_models(
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    budget: PerturbationBudget | None = None,
    nb_epochs: int = DIGITS_RECIPE.epochs,
    hidden: tuple[int, ...] = DIGITS_RECIPE.hidden,
    lam: float = DIGITS_RECIPE.lam,
    method: str = DIGITS_RECIPE.method,
    warmup: int = DIGITS_RECIPE.warmup,
    seed: int = 0,
    verbose: bool = False,
    **kwargs: Any,
) -> dict[str, PyTorchWeightClassifier]:
    """
    :func:`train_digits_pair` with :data:`DIGITS_RECIPE` changed by the given values; returns the classifiers only:
    ``{"standard": classifier, "robust": classifier}`` (``bound``: the deprecated spelling of ``method``).
    """
    method = renamed_keyword(kwargs, "bound", "method", method, DIGITS_RECIPE.method, "train_digits_models")
    reject_unknown_keywords(kwargs, "train_digits_models")
    recipe = replace(
        DIGITS_RECIPE, epochs=nb_epochs, hidden=tuple(hidden), lam=lam, method=method, warmup=warmup, seed=seed
    )
    return {name: t.classifier for name, t in train_digits_pair(recipe, x_train, y_train, budget, verbose).items()}


DIGITS_RESNET_EPOCHS = 30
"""Epochs of plain :func:`train_digits_resnet` (test accuracy 0.98 on the embedded digits)."""

DIGITS_RESNET_ROBUST_EPOCHS = 40
"""Epochs of robust :func:`train_digits_resnet` (``budget=``): 10 of warm-up, then 30 at the full ball."""


def train_digits_resnet(
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    nb_epochs: int | None = None,
    budget: PerturbationBudget | None = None,
    method: str = "interval",
    seed: int = 0,
    verbose: bool = False,
    lam: float = 1.0,
    warmup: int | None = None,
    batch_norm: str = "auto",
    **kwargs: Any,
) -> PyTorchWeightClassifier:
    """
    The digits ResNet recipe: :func:`digits_resnet` on ``(1, 8, 8)`` images, Adam(3e-3), batches of 64; plain
    training (:func:`train_standard`) without ``budget``, else :func:`train_robust` at ``budget`` with ``method``,
    λ = ``lam`` and batch norm frozen at the fresh modules' statistics (``batch_norm="auto"``: batch norm is the
    learnable map ``γ·h + β`` that the certificates read; with batch statistics the robust run ends at chance,
    docs/training.md). A robust run that ends at chance (in eval mode, on the training data) raises instead of
    returning the model.

    :param x_train: training images ``(N, 1, 8, 8)`` (default: :func:`.load_digits_data`'s training split).
    :param y_train: their labels.
    :param nb_epochs: epochs (default :data:`DIGITS_RESNET_EPOCHS` plain, :data:`DIGITS_RESNET_ROBUST_EPOCHS` robust).
    :param budget: the ball of robust training; ``None``: plain training.
    :param method: the margin bound of the robust loss (``"interval"``, the cheaper and better trainer here, or
        ``"linear"``; docs/training.md).
    :param seed: seed of the initialisation and of the batch order.
    :param verbose: progress bar.
    :param lam: λ, weight of the robust term.
    :param warmup: epochs of warm-up of λ and ε (default ``min(10, nb_epochs // 2)``).
    :param batch_norm: :class:`.WeightRobustTrainer`'s ``batch_norm`` (``"auto"``, ``"frozen"`` or ``"train"``).
    :param kwargs: ``bound``, the deprecated spelling of ``method``.
    :return: the trained classifier.
    :raises TrainingCollapsedError: the robust run collapsed or ended at chance (:func:`.raise_if_collapsed`).
    """
    method = renamed_keyword(kwargs, "bound", "method", method, "interval", "train_digits_resnet")
    reject_unknown_keywords(kwargs, "train_digits_resnet")
    if x_train is None or y_train is None:
        from art_weightpert.data import load_digits_data

        x_train, y_train, _, _ = load_digits_data(flatten=False)
    classifier = make_classifier(digits_resnet(seed=seed), (1, 8, 8), lr=3e-3)
    if budget is None:
        nb_epochs = DIGITS_RESNET_EPOCHS if nb_epochs is None else nb_epochs
        return train_standard(classifier, x_train, y_train, nb_epochs, 64, seed, verbose)
    from art_weightpert.defences.trainer import raise_if_collapsed

    nb_epochs = check_positive_int(DIGITS_RESNET_ROBUST_EPOCHS if nb_epochs is None else nb_epochs, "nb_epochs")
    warmup = min(10, nb_epochs // 2) if warmup is None else warmup
    history = train_robust(
        classifier, x_train, y_train, budget, nb_epochs, 64, lam=lam, method=method, warmup=warmup, seed=seed,
        verbose=verbose, batch_norm=batch_norm,
    )  # fmt: skip
    raise_if_collapsed(history, y_train, classifier.predict(x_train).argmax(axis=1))  # eval mode, as certified
    return classifier
