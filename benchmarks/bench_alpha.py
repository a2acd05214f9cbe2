"""
Benchmark of the ``"alpha"`` bound (optimized linear bounds, docs/theory.md §11) against ``"linear"`` (§4b) on digits.

Models: the bias-free ReLU MLP 64-128-64-10 of ``bench_certify_digits.py`` (Adam 3e-3, 40 epochs, batches of 64, seed
0, ``load_digits_data()``) with an absolute box of 6e-3 on every weight, and the digits ResNet of
:func:`art_weightpert.zoo.train_digits_resnet` (plain training) with boxes of 3e-5 and 1e-4 on every weight. Points:
the first ``--points`` test points. For each budget: the clean accuracy, the share certified by ``"linear"`` and by
``"alpha"`` (correct and every margin lower bound above 1e-9), the seconds per sample of each (one run, on the
machine's CPU threads: set ``OMP_NUM_THREADS=1`` for one core), the mean gain of the worst margin's bound, and with
``--attack-steps`` the upper bound from a per-sample weight attack (:class:`.PerSampleWeightPGD`) with the count of
margins it found below an alpha lower bound (a soundness check: must be 0).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_alpha.py [--points 200] [--steps 20] [--lr 0.25]
[--intermediate-budget N] [--intermediate-steps 0] [--models mlp,resnet] [--attack-steps 100]``; prints one
JSON line per budget.

Measured 2026-12-07 (one run each, ``OMP_NUM_THREADS=1`` on a shared 2-core machine with a load of about 8, so the
seconds are inflated for both methods alike; defaults: 20 steps, lr 0.25, intermediate budget 3e7, 200 points):

* MLP, box 6e-3: linear 0.290, alpha 0.295 (per-sample attack, 100 steps: ≤ 0.390; 0 violations); 0.4 ms vs 31 ms per
  sample. The slopes raise the worst margin's bound by 0.26 on average, rarely across 0.
* ResNet, box 3e-5: linear 0.920, alpha 0.985 (= the clean accuracy); 0.04 s vs 4.0 s per sample.
* ResNet, box 1e-4: linear 0.010, alpha 0.965 (PerSampleWeightPGD: 0.985); 0.01 s vs 2.9 s per sample. Almost all of
  the gain comes from the intermediate boxes by backward passes (``--steps 0`` on 20 points: 0.95).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.certification.alpha import (
    ALPHA_LR,
    ALPHA_STEPS,
    INTERMEDIATE_BUDGET,
    INTERMEDIATE_STEPS,
    alpha_margin_bounds,
)
from art_weightpert.certification.linear import linear_margin_bounds
from art_weightpert.data import load_digits_data
from art_weightpert.network import read_network
from art_weightpert.zoo import digits_resnet, train_digits_resnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_certify_digits import make_model, train  # noqa: E402  (the same MLP recipe as the linear benchmark)

TOLERANCE = 1e-9
BUDGETS = {"mlp": [6e-3], "resnet": [3e-5, 1e-4]}


def certified(bounds: torch.Tensor, correct: torch.Tensor) -> float:
    return float((correct & (bounds.min(dim=1).values > TOLERANCE)).double().mean())


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def model_and_data(kind: str, points: int, weights: str | None = None):
    """The trained model (its state loaded from ``weights`` when that file exists, else trained and saved there) and
    the first ``points`` test points."""
    x_train, y_train, x_test, y_test = load_digits_data(flatten=kind == "mlp")
    if kind == "mlp":
        model = make_model("mlp")
        if weights is None or not Path(weights).exists():
            model = train(model, x_train, y_train)
    else:
        model = digits_resnet(seed=0)
        if weights is None or not Path(weights).exists():
            model = train_digits_resnet().base_model
    if weights is not None:
        if Path(weights).exists():
            model.load_state_dict(torch.load(weights))
        else:
            torch.save(model.state_dict(), weights)
    return model.eval(), torch.as_tensor(x_test[:points]), torch.as_tensor(y_test[:points])


def run(kind: str, args: argparse.Namespace) -> list[dict]:
    model, x, y = model_and_data(kind, args.points, getattr(args, f"{kind}_weights"))
    input_shape = tuple(x.shape[1:])
    network = read_network(model, input_shape)
    with torch.no_grad():
        correct = model(x).argmax(dim=1) == y
    rows = []
    for eps in BUDGETS[kind]:
        budget = PerturbationBudget(eps, "inf")
        balls = budget.parameter_balls(model, torch.float64)
        xd = x.double()
        options = dict(
            steps=args.steps,
            lr=args.lr,
            intermediate_budget=args.intermediate_budget,
            intermediate_steps=args.intermediate_steps,
        )
        with torch.no_grad():
            t_lin, b_lin = timed(lambda: linear_margin_bounds(network, balls, xd, y))  # noqa: B023
            t_alpha, b_alpha = timed(lambda: alpha_margin_bounds(network, balls, xd, y, **options))  # noqa: B023
        worst_lin, worst_alpha = b_lin.min(dim=1).values, b_alpha.min(dim=1).values
        row = {
            "model": kind,
            "eps": eps,
            "points": len(x),
            "clean": float(correct.double().mean()),
            "linear": certified(b_lin, correct),
            "alpha": certified(b_alpha, correct),
            "linear_s_per_sample": t_lin / len(x),
            "alpha_s_per_sample": t_alpha / len(x),
            "mean_worst_gain": float((worst_alpha - worst_lin).mean()),
            "never_looser": bool((b_alpha >= b_lin).all()),
            **options,
        }
        if args.attack_steps:
            classifier = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), input_shape, 10)
            attack = PerSampleWeightPGD(classifier, budget, max_iter=args.attack_steps, batch_size=100, verbose=False)
            found = attack.generate(x.numpy(), y.numpy())
            margins = found["margins"]
            bounds = b_alpha.numpy()
            finite = np.isfinite(bounds)
            slack = 1e-9 * (1 + np.abs(margins[finite]))
            row["attack_upper_bound"] = float((correct.numpy() & ~found["flipped"]).mean())
            row["violations"] = int((margins[finite] < bounds[finite] - slack).sum())
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--steps", type=int, default=ALPHA_STEPS)
    parser.add_argument("--lr", type=float, default=ALPHA_LR)
    parser.add_argument("--intermediate-budget", type=int, default=INTERMEDIATE_BUDGET)
    parser.add_argument("--intermediate-steps", type=int, default=INTERMEDIATE_STEPS)
    parser.add_argument("--models", default="mlp,resnet")
    parser.add_argument("--attack-steps", type=int, default=0)
    parser.add_argument("--mlp-weights", default=None, help="state dict file: loaded if it exists, else saved there")
    parser.add_argument("--resnet-weights", default=None, help="state dict file: loaded if it exists, else saved there")
    args = parser.parse_args()
    rows = []
    for kind in args.models.split(","):
        rows += run(kind, args)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
