"""
Certify a digits MLP against weight perturbations.

Trains the bias-free ReLU MLP 64-128-64-10 of :mod:`art_weightpert.zoo` on scikit-learn's digits, then asks, for the
row-ℓ1 ball of the paper (docs/theory.md §2) at a few radii ε, which test points keep their prediction under *every*
perturbation of the ball, with the three certification methods: the closed-form bound in the setting of Tsai et al.
(``"paper"``, docs/theory.md §3), interval bounds (``"interval"``, §4) and backward linear bounds (``"linear"``, §4b).
The universal weight attack gives the other side: an upper bound on the robust accuracy.

Run: ``python examples/certify_digits_mlp.py`` (about 15 s on a CPU core).
"""

from __future__ import annotations

import numpy as np
import torch

from art_weightpert import PerturbationBudget, WeightPerturbationCertifier, WeightPGD
from art_weightpert.data import load_digits_data
from art_weightpert.metrics import certified_weight_radius, weight_certified_accuracy
from art_weightpert.zoo import DIGITS_RECIPE, train_standard


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data()
    x_test, y_test = x_test[:200], y_test[:200]
    classifier = DIGITS_RECIPE.classifier()  # a PyTorchWeightClassifier
    train_standard(classifier, x_train, y_train, DIGITS_RECIPE.epochs, DIGITS_RECIPE.batch_size, DIGITS_RECIPE.seed)
    clean = float(np.mean(classifier.predict(x_test).argmax(1) == y_test))
    print(f"clean accuracy: {clean:.3f}")

    print("   eps  paper  interval  linear  WeightPGD (upper bound)")
    for eps in (0.01, 0.03, 0.05):
        budget = PerturbationBudget(eps, norm="row_l1")  # every row of every weight matrix moves by ≤ eps in ℓ1
        certified = {
            method: weight_certified_accuracy(classifier, x_test, y_test, budget, method=method)
            for method in ("paper", "interval", "linear")
        }
        attacked = WeightPGD(classifier, budget, max_iter=10, verbose=False).generate_estimator(x_test, y_test)
        upper = float(np.mean(attacked.predict(x_test).argmax(1) == y_test))
        assert max(certified.values()) <= upper  # certificates are sound: certified points survive the attack too
        cells = "  ".join(f"{certified[m]:.3f}" for m in ("paper", "interval", "linear"))
        print(f"{eps:6.3f}  {cells}  {upper:.3f}")

    # The certifier object gives per-sample answers and the largest certified radius of each point.
    budget = PerturbationBudget(0.03, norm="row_l1")
    certifier = WeightPerturbationCertifier(classifier, budget, method="interval", verbose=False)
    margins = certifier.margin_lower_bounds(x_test[:3], y_test[:3])  # (3, 10), +inf at the label's column
    print("lower bounds of the margins f_y − f_i of the first point:", np.round(margins[0], 2))
    radii = certified_weight_radius(classifier, x_test, y_test, budget, method="interval")
    print(f"median certified row_l1 radius (interval): {np.median(radii):.4f}")


if __name__ == "__main__":
    main()
