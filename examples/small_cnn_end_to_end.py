"""
A small CNN end to end: train, attack the weights, certify, attack weights and inputs jointly, train robustly.

The digits CNN of :mod:`art_weightpert.zoo` (conv 8 → strided conv 16 → linear 64 → 10) on ``(1, 8, 8)`` images.
Convolutions are perturbed per output channel: for the ``row_l1`` ball a "row" is one output channel's kernel.

Run: ``python examples/small_cnn_end_to_end.py`` (about 20 s on a CPU core).
"""

from __future__ import annotations

import numpy as np
import torch

from art_weightpert import (
    JointWeightInputPGD,
    PerturbationBudget,
    RandomWeightPerturbation,
    WeightPerturbationCertifier,
    WeightPGD,
    WeightRobustTrainer,
)
from art_weightpert.data import load_digits_data
from art_weightpert.zoo import digits_cnn, make_classifier, train_standard


def accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.predict(x).argmax(1) == y))


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data(flatten=False)
    x_test, y_test = x_test[:100], y_test[:100]
    classifier = make_classifier(digits_cnn(), input_shape=(1, 8, 8))
    train_standard(classifier, x_train, y_train, nb_epochs=10)
    print(f"clean accuracy: {accuracy(classifier, x_test, y_test):.3f}")

    budget = PerturbationBudget(0.01, norm="inf", relative=True)  # |ΔW| ≤ 1 % of |W| for every weight
    random = RandomWeightPerturbation(classifier, budget, nb_samples=5, seed=0, verbose=False).evaluate(x_test, y_test)
    attacked = WeightPGD(classifier, budget, max_iter=10, verbose=False).generate_estimator(x_test, y_test)
    certified = WeightPerturbationCertifier(classifier, budget, method="linear", verbose=False).certify(x_test, y_test)
    print(f"relative box 1 %: random faults {random['mean']:.3f}, WeightPGD {accuracy(attacked, x_test, y_test):.3f}, "
          f"certified (linear) {certified.mean():.3f}")  # fmt: skip

    # Weights and inputs at once: a perturbation of the weights plus adversarial inputs (ℓ∞ 0.03).
    joint = JointWeightInputPGD(classifier, budget, input_eps=0.03, max_iter=10, verbose=False)
    x_adv, delta = joint.generate(x_test, y_test)
    both = classifier.with_weight_perturbation(delta)
    print(f"joint weight + input attack: {accuracy(both, x_adv, y_test):.3f}")

    # Robust training of a fresh CNN at a row_l1 budget on the convolutions and the linear layers.
    row_budget = PerturbationBudget(0.02, norm="row_l1")
    robust = make_classifier(digits_cnn(), input_shape=(1, 8, 8))
    torch.manual_seed(0)
    WeightRobustTrainer(robust, row_budget, lam=1.0, warmup=3, verbose=False).fit(x_train, y_train, nb_epochs=6)
    for name, model in (("standard", classifier), ("robust", robust)):
        cert = WeightPerturbationCertifier(model, row_budget, method="interval", verbose=False)
        print(f"{name:8} CNN: clean {accuracy(model, x_test, y_test):.3f}, "
              f"certified at row_l1 ε=0.02 {cert.certify(x_test, y_test).mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
