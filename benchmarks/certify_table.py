"""
Certified accuracy on digits across an ε grid, for each ball and each certification method (the table of
``docs/certification.md``), plus the numbers of its worked example.

A ReLU MLP 64-32-10 (with biases) is trained on scikit-learn's digits (Adam, lr 1e-2, 20 epochs, batch 64, seed 0);
every weight of both layers is perturbed with an absolute radius ε; the 450 test points are certified. Prints a
markdown table and one JSON object.

Usage: ``python benchmarks/certify_table.py``
"""

from __future__ import annotations

import json
import tempfile
import time

import art.config
import numpy as np
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.certification import METHODS
from art_weightpert.data import load_digits_data
from art_weightpert.metrics import generalization_bound, weight_certified_accuracy

GRIDS = {
    "inf": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "row_l1": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    "l2": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
}


def trained_mlp() -> PyTorchWeightClassifier:
    x_train, y_train, _, _ = load_digits_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    clf = PyTorchWeightClassifier(
        model,
        nn.CrossEntropyLoss(),
        (64,),
        10,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        clip_values=(0.0, 1.0),
    )
    clf.fit(x_train, y_train, batch_size=64, nb_epochs=20, verbose=False)
    return clf


def main() -> None:
    art.config.set_data_path(tempfile.mkdtemp(prefix="art_data_"))
    clf = trained_mlp()
    x_train, y_train, x_test, y_test = load_digits_data()
    clean = float(np.mean(clf.predict(x_test).argmax(axis=1) == y_test))
    methods = list(METHODS)
    table: dict = {}
    for norm, grid in GRIDS.items():
        table[norm] = {}
        for method in methods:
            table[norm][method] = [
                weight_certified_accuracy(clf, x_test, y_test, PerturbationBudget(eps, norm), method=method)
                for eps in grid
            ]
    # Worked example of docs/certification.md.
    budget = PerturbationBudget(1e-3, "inf")
    example = {}
    for method in methods:
        certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False)
        start = time.perf_counter()
        certified = certifier.certify(x_test, y_test)
        seconds = time.perf_counter() - start
        example[method] = {
            "certified_accuracy": float(certified.mean()),
            "certify_seconds_450_points": seconds,
            "margin_lower_bounds_sample0": certifier.margin_lower_bounds(x_test[:1], y_test[:1])[0].round(4).tolist(),
            "certified_radius_first5": certifier.certified_radius(x_test[:5], y_test[:5]).tolist(),
        }
    bound = generalization_bound(clf, x_train, y_train, PerturbationBudget(1e-3, "row_l1"), margin=1.0)
    result = {
        "model": "ReLU MLP 64-32-10 with biases, Adam lr 1e-2, 20 epochs, batch 64, seed 0",
        "clean_test_accuracy": clean,
        "test_points": len(x_test),
        "budgets": "absolute radius eps on every weight of both layers (biases fixed)",
        "grids": GRIDS,
        "certified_accuracy": table,
        "worked_example_inf_1e-3": example,
        "generalization_bound_row_l1_1e-3_margin_1": {k: v for k, v in bound.items() if not isinstance(v, list)},
    }
    for norm, grid in GRIDS.items():
        print(f"\n| {norm} ε | " + " | ".join(f"{e:g}" for e in grid) + " |")
        print("|---|" + "---|" * len(grid))
        for method in methods:
            print(f"| {method} | " + " | ".join(f"{a:.3f}" for a in table[norm][method]) + " |")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
