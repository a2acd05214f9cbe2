"""
:class:`RandomWeightPerturbation`: Monte-Carlo fault injection in a weight ball.

Random perturbations model hardware faults and noise rather than an adversary: ``uniform`` draws fill the ball,
``extreme`` draws sit on its extreme points (box vertices, i.e. every weight moved by ±its radius as under
bit errors or quantization noise; one ±r entry per row for ``row_l1``; the sphere for ``l2``) and ``gaussian`` draws
are Gaussian directions rescaled onto the boundary. The spread of accuracy over draws is a flatness (sharpness)
measure of the model at the chosen radius; the gap to :class:`.WeightPGD` shows how much worse an adversary is.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert import distributed
from art_weightpert.attacks.base import WeightAttack, accuracy_summary, accuracy_with_deltas
from art_weightpert.budget import DISTRIBUTIONS, ParameterBall, PerturbationBudget, WeightPerturbation
from art_weightpert.validation import check_choice, check_non_negative_int, check_positive_int


class RandomWeightPerturbation(WeightAttack):
    """
    Random weight perturbations in a :class:`.PerturbationBudget`, drawn reproducibly.

    With a ``seed``, :meth:`generate` always returns the first draw and :meth:`evaluate` the first ``nb_samples``
    draws of the same stream; with ``seed=None`` the stream is seeded from torch's global generator (so
    ``torch.manual_seed`` makes runs reproducible).
    """

    attack_params = WeightAttack.attack_params + ["nb_samples", "distribution", "seed", "batch_size"]

    def __init__(
        self,
        estimator: PyTorchClassifier,
        budget: PerturbationBudget,
        nb_samples: int = 10,
        distribution: str = "uniform",
        seed: int | None = None,
        batch_size: int = 128,
        verbose: bool = True,
    ) -> None:
        """
        Create a :class:`.RandomWeightPerturbation` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped on the fly).
        :param budget: the weight ball to sample from.
        :param nb_samples: number of draws in :meth:`evaluate`.
        :param distribution: ``"uniform"`` (in the ball), ``"extreme"`` (its extreme points) or ``"gaussian"`` (a
            Gaussian direction on the boundary).
        :param seed: seed of the draws (``None``: drawn from torch's global generator).
        :param batch_size: samples per forward pass in :meth:`evaluate`.
        :param verbose: show a progress bar over the draws.
        """
        super().__init__(estimator, budget, verbose=verbose)
        self.nb_samples = nb_samples
        self.distribution = distribution
        self.seed = seed
        self.batch_size = batch_size
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_positive_int(self.nb_samples, "nb_samples")
        check_choice(self.distribution, "distribution", DISTRIBUTIONS)
        if self.seed is not None:
            check_non_negative_int(self.seed, "seed")
        check_positive_int(self.batch_size, "batch_size")

    def generate(self, x: np.ndarray | None = None, y: np.ndarray | None = None, **kwargs: Any) -> WeightPerturbation:
        """
        One random perturbation in the budget (``x`` and ``y`` are not needed; accepted for ART's signature).

        :return: the draw, carrying the budget.
        """
        param_balls = self._param_balls()
        return self._perturbation(self._draw(param_balls, self._generator()))

    def evaluate(self, x: np.ndarray, y: np.ndarray | None = None) -> dict[str, Any]:
        """
        Accuracy on ``(x, y)`` under ``nb_samples`` random perturbations. In a process group every rank draws the
        same perturbations (rank 0's seed), classifies its batches of ``x`` and the counts are summed: the
        single-process result exactly, on every rank (each rank must pass the same ``x`` and ``y``).

        :param x: inputs.
        :param y: integer or one-hot labels (``None``: agreement with the clean predictions).
        :return: ``{"mean", "std", "min", "max": float, "quantiles": {q: accuracy} for q in 0.05, 0.25, 0.5, 0.75,
            0.95, "accuracies": np.ndarray (nb_samples,), "clean": float}``.
        """
        x_t, labels = self._target.prepare_inputs(x, y)
        if distributed.is_distributed():  # (the inputs' host copy only where there are ranks to compare)
            distributed.check_same_data(x_t.cpu().numpy(), None if y is None else np.asarray(y), name="x")
        if labels is None:
            labels = self._predict_labels(x_t, self.batch_size)
        param_balls = self._param_balls()
        gen = self._generator()
        clean = accuracy_with_deltas(self._target, x_t, labels, None, self.batch_size, sharded=True)
        accuracies = np.empty(self.nb_samples)
        verbose = self.verbose and distributed.is_main_process()
        with tqdm(total=self.nb_samples, desc="RandomWeightPerturbation", disable=not verbose) as bar:
            for i in range(self.nb_samples):
                deltas = self._draw(param_balls, gen)
                accuracies[i] = accuracy_with_deltas(self._target, x_t, labels, deltas, self.batch_size, sharded=True)
                bar.update(1)
        return {
            **accuracy_summary(accuracies),
            "clean": clean,
        }

    # ------------------------------------------------------------------------------------------------ internals
    def _generator(self) -> torch.Generator:
        seed = distributed.broadcast_object(int(torch.randint(0, 2**62, (1,)))) if self.seed is None else self.seed
        return torch.Generator().manual_seed(int(seed))

    def _draw(self, param_balls: list[ParameterBall], gen: torch.Generator) -> dict[str, torch.Tensor]:
        model = self._target.base_model
        return {
            t.param_name: t.ball.sample(t.radius, model.get_parameter(t.param_name).shape, self.distribution, gen)
            for t in param_balls
        }
