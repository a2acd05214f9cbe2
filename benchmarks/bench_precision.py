"""
float32 against float64 certificates (issue 23, docs/theory.md §5): the certified accuracy of both precisions on the
models and budgets of the tables of docs/results.md and docs/certification.md, and the time of each.

float32 certificates carry the rounding-error terms of §5 (sound for the exact network); the target is a certified
accuracy within 0.005 of float64's on every table. Models:

* the MLP 64-32-10 of ``benchmarks/certify_table.py`` (every norm, method and ε of its grid; 450 test points);
* the standard and the robust (interval λ = 1) bias-free MLPs of the digits recipe at the relative budgets of the
  summary table (``default_digits_budget``);
* the digits CNN of the zoo (20 epochs) under absolute boxes;
* the digits ResNet of :func:`.train_digits_resnet` (plain, 30 epochs), the first 200 test points, the radii of the
  residual table.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_precision.py [--skip-resnet] [--threads 1]``; prints one JSON line per
row, then a markdown table and the largest gap.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import art.config
import torch
from certify_table import GRIDS, trained_mlp

from art_weightpert import PerturbationBudget, WeightPerturbationCertifier
from art_weightpert.certification import METHODS
from art_weightpert.data import load_digits_data
from art_weightpert.zoo import (
    default_digits_budget,
    digits_cnn,
    make_classifier,
    train_digits_pair,
    train_digits_resnet,
    train_standard,
)

DTYPES = (torch.float64, torch.float32)


def compare(name: str, clf, x, y, budget: PerturbationBudget, methods) -> list[dict]:
    """Certified accuracy and seconds of each method in both precisions."""
    rows = []
    for method in methods:
        row = {"model": name, "budget": repr(budget), "method": method}
        try:
            for dtype in DTYPES:
                certifier = WeightPerturbationCertifier(clf, budget, method=method, verbose=False, dtype=dtype)
                start = time.perf_counter()
                certified = certifier.certify(x, y)
                key = str(dtype).removeprefix("torch.")
                row[key] = float(certified.mean())
                row[f"{key}_s"] = round(time.perf_counter() - start, 3)
        except ValueError as err:  # a method that does not apply (paper on residual networks)
            row["skipped"] = str(err)[:80]
            continue
        row["gap"] = round(row["float64"] - row["float32"], 6)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    art.config.set_data_path(tempfile.mkdtemp(prefix="art_data_"))
    x_train, y_train, x_test, y_test = load_digits_data()
    rows: list[dict] = []

    mlp = trained_mlp()
    for norm, grid in GRIDS.items():
        for eps in grid:
            rows += compare("MLP 64-32-10", mlp, x_test, y_test, PerturbationBudget(eps, norm), tuple(METHODS))

    pair = train_digits_pair(x_train=x_train, y_train=y_train)
    for name, trained in pair.items():
        clf = trained.classifier
        for eps in (0.05, 0.1, 0.2):
            rows += compare(f"digits recipe {name}", clf, x_test, y_test, default_digits_budget(eps), tuple(METHODS))

    torch.manual_seed(0)
    cnn = make_classifier(digits_cnn(), (1, 8, 8))
    train_standard(cnn, x_train.reshape(-1, 1, 8, 8), y_train, nb_epochs=20)
    for eps in (1e-4, 3e-4, 1e-3, 3e-3):
        rows += compare(
            "digits CNN", cnn, x_test.reshape(-1, 1, 8, 8), y_test, PerturbationBudget(eps), ("interval", "linear")
        )

    if not args.skip_resnet:
        images = x_train.reshape(-1, 1, 8, 8)
        resnet = train_digits_resnet(images, y_train)
        xr, yr = x_test[:200].reshape(-1, 1, 8, 8), y_test[:200]
        for eps in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4):
            rows += compare("digits ResNet", resnet, xr, yr, PerturbationBudget(eps), ("interval", "linear"))

    print("\n| model | budget | method | float64 | float32 | gap | float64 s | float32 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['budget']} | {r['method']} | {r['float64']:.3f} | {r['float32']:.3f} | "
            f"{r['gap']:+.3f} | {r['float64_s']:.2f} | {r['float32_s']:.2f} |"
        )
    worst = max(rows, key=lambda r: abs(r["gap"]))
    print(f"\nlargest gap: {worst['gap']:+.4f} ({worst['model']}, {worst['budget']}, {worst['method']})")


if __name__ == "__main__":
    main()
