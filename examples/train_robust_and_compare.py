"""
Train a weight-robust model and compare it with a standard one.

Both bias-free MLPs start from the same initialisation; the robust one is trained by :class:`.WeightRobustTrainer`
with the loss of docs/theory.md §7 (cross-entropy + λ · hinge on the interval lower bound of the margins over the
row-ℓ1 ball, λ warmed up from 0). :func:`.weight_robustness_curve` then sweeps ε for both, and
:func:`.plot_robustness_curve` draws the curves.

Run: ``python examples/train_robust_and_compare.py [--out DIR]`` (about 15 s on a CPU core; plots go to DIR, by
default a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace

import torch

from art_weightpert.data import load_digits_data
from art_weightpert.metrics import plot_robustness_curve, weight_robustness_curve
from art_weightpert.zoo import DIGITS_RECIPE, train_digits_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for the plots (default: a temporary folder)")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="art-weightpert-")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data()
    x_test, y_test = x_test[:200], y_test[:200]
    # The digits recipe (row_l1 ball, ε = 0.1 on every layer; λ = 1, interval bound), shortened to 10 epochs.
    recipe = replace(DIGITS_RECIPE, epochs=10, warmup=3)
    trained = train_digits_pair(recipe, x_train, y_train)  # same initialisation, standard and robust training
    standard, robust = trained["standard"].classifier, trained["robust"].classifier
    history = trained["robust"].history
    print(f"robust training: final loss {history['loss'][-1]:.3f}, robust term {history['robust'][-1]:.3f}")

    eps = [0.0, 0.05, 0.1, 0.15]
    print("model      " + "  ".join(f"ε={e:<5g}" for e in eps) + "  (certified by interval bounds / WeightPGD)")
    for name, classifier in (("standard", standard), ("robust", robust)):
        curve = weight_robustness_curve(
            classifier, x_test, y_test, eps, norm="row_l1", methods=("clean", "pgd", "certified"),
            pgd_params={"max_iter": 10},
        )  # fmt: skip
        cells = [f"{c:.2f}/{p:.2f}" for c, p in zip(curve["accuracies"]["certified"], curve["accuracies"]["pgd"])]
        print(f"{name:9}  " + "  ".join(f"{c:7}" for c in cells))
        path = plot_robustness_curve(curve, os.path.join(out, f"{name}_curve.png"), title=f"{name} MLP, row_l1 ball")
        print(f"  plot: {path}")


if __name__ == "__main__":
    main()
