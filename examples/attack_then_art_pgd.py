"""
Attack the weights, then run ART's input-space PGD on the perturbed model.

:class:`.WeightPGD` finds one perturbation of the weights, inside an entry-wise box of relative radius 2 %
(``|ΔW| ≤ 0.02·|W|``, a model of hardware faults or quantization noise), that lowers the accuracy on the whole test
set. ``generate_estimator`` returns a new :class:`.PyTorchWeightClassifier` carrying it: an ordinary ART classifier,
so ART's own ``ProjectedGradientDescent`` runs on it unchanged. The user's model is never modified.

Run: ``python examples/attack_then_art_pgd.py`` (about 15 s on a CPU core).
"""

from __future__ import annotations

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent

from art_weightpert import PerturbationBudget, RandomWeightPerturbation, WeightPGD
from art_weightpert.data import load_digits_data
from art_weightpert.zoo import DIGITS_RECIPE, train_standard


def accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.predict(x).argmax(1) == y))


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data()
    x_test, y_test = x_test[:200], y_test[:200]
    classifier = DIGITS_RECIPE.classifier()
    train_standard(classifier, x_train, y_train, DIGITS_RECIPE.epochs, DIGITS_RECIPE.batch_size, DIGITS_RECIPE.seed)
    before = {name: p.detach().clone() for name, p in classifier.model.named_parameters()}

    budget = PerturbationBudget(0.02, norm="inf", relative=True)
    faults = RandomWeightPerturbation(classifier, budget, nb_samples=10, seed=0, verbose=False).evaluate(x_test, y_test)
    attack = WeightPGD(classifier, budget, max_iter=20, verbose=False)
    perturbed = attack.generate_estimator(x_test, y_test)
    delta = perturbed.weight_perturbation
    print(f"clean accuracy:                 {accuracy(classifier, x_test, y_test):.3f}")
    print(f"random faults in the ball:      {faults['mean']:.3f} (worst of 10: {faults['min']:.3f})")
    print(f"WeightPGD perturbation:         {accuracy(perturbed, x_test, y_test):.3f}")
    print("largest |ΔW| / |W| per layer:  ", {
        name: round(float(np.max(np.abs(d) / (np.abs(before[name].numpy()) + 1e-12))), 4) for name, d in delta.items()
    })  # fmt: skip
    assert budget.contains(delta, classifier.model)

    # ART's PGD on the inputs, for the clean and for the weight-perturbed classifier.
    pgd = dict(eps=0.05, eps_step=0.01, max_iter=10, verbose=False)
    x_adv = ProjectedGradientDescent(classifier, **pgd).generate(x_test)
    x_adv_perturbed = ProjectedGradientDescent(perturbed, **pgd).generate(x_test)
    print(f"input PGD (ε=0.05), clean weights:     {accuracy(classifier, x_adv, y_test):.3f}")
    print(f"input PGD (ε=0.05), perturbed weights: {accuracy(perturbed, x_adv_perturbed, y_test):.3f}")

    # The user's module was never touched.
    assert all(torch.equal(p, before[name]) for name, p in classifier.model.named_parameters())
    print("user's weights unchanged: True")


if __name__ == "__main__":
    main()
