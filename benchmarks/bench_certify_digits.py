"""
Benchmark of the ``"linear"`` certificate (docs/theory.md §4b) against ``"interval"`` (§4) on digits, with an upper
bound on the true robust accuracy from a per-sample weight attack.

Models: the bias-free ReLU MLP 64-128-64-10 and a small bias-free CNN (conv 8 → strided conv 16 → linear), each
trained with Adam (lr 3e-3, 40 epochs, batch 64, seed 0) on ``load_digits_data()``. Points: the first 200 test points.
Budgets on all weights: absolute box δ ∈ {1e-3, 3e-3, 5e-3}, row_l1 and relative box. For each: the clean accuracy,
the certified accuracy of both methods, the median time of each (over ``--repeats`` runs, on the machine's CPU
threads) and the upper bound on robust accuracy from the per-sample weight attack (:class:`.PerSampleWeightPGD`: a
point counts as robust unless the attack finds a perturbation in the ball that misclassifies it). ``violations``
counts margins the attack observed below the linear lower bound (a soundness check: must be 0).

Run: ``python benchmarks/bench_certify_digits.py [--points 200] [--repeats 7] [--steps 50] [--restarts 1]
[--threads 2] [--models mlp,cnn]``; prints one JSON line per budget, then the whole table as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch import nn

from art_weightpert import PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification.interval import interval_margin_bounds, interval_preactivation_bounds
from art_weightpert.certification.linear import linear_margin_bounds
from art_weightpert.data import load_digits_data
from art_weightpert.network import read_network

TOLERANCE = 1e-9  # certify only when the margin lower bound exceeds it (docs/theory.md §5)

BUDGETS = {
    "mlp": [
        ("inf", False, [1e-3, 3e-3, 5e-3]),
        ("row_l1", False, [0.01, 0.03, 0.05]),
        ("inf", True, [0.01, 0.03, 0.05]),
    ],
    "cnn": [
        ("inf", False, [1e-3, 3e-3, 5e-3]),
        ("row_l1", False, [0.01, 0.03, 0.05]),
        ("inf", True, [0.01, 0.03, 0.05]),
    ],
}


def make_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128, bias=False),
            nn.ReLU(),
            nn.Linear(128, 64, bias=False),
            nn.ReLU(),
            nn.Linear(64, 10, bias=False),
        )
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10, bias=False),
    )


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 40, batch: int = 64) -> nn.Module:
    """Adam lr 3e-3, ``epochs`` epochs of shuffled mini-batches (seed 0)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


# ------------------------------------------------------------------------------------------------------- timing
def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def certified(bounds: torch.Tensor, correct: torch.Tensor) -> float:
    return float((correct & (bounds.min(dim=1).values > TOLERANCE)).double().mean())


def run(kind: str, points: int, repeats: int, steps: int, restarts: int) -> dict:
    flatten = kind == "mlp"
    x_train, y_train, x_test, y_test = load_digits_data(flatten=flatten)
    model = train(make_model(kind), x_train, y_train)
    input_shape = tuple(x_test.shape[1:])
    network = read_network(model, input_shape)
    classifier = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), input_shape, 10)
    x = torch.as_tensor(x_test[:points])
    y = torch.as_tensor(y_test[:points])
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    correct = pred == y
    test_acc = float((model(torch.as_tensor(x_test)).argmax(1) == torch.as_tensor(y_test)).double().mean())
    rows = []
    for norm, relative, eps_list in BUDGETS[kind]:
        for eps in eps_list:
            budget = PerturbationBudget(eps, norm, relative=relative)

            def interval(budget=budget):
                param_balls = budget.parameter_balls(model, torch.float64)
                xd = x.double()
                boxes = interval_preactivation_bounds(network, param_balls, xd, network.params(dtype=torch.float64))
                return interval_margin_bounds(network, param_balls, xd, y, boxes=boxes)

            def linear(budget=budget):
                return linear_margin_bounds(network, budget.parameter_balls(model, torch.float64), x.double(), y)

            with torch.no_grad():
                t_int, b_int = median_time(interval, repeats)
                t_lin, b_lin = median_time(linear, repeats)
            certifier = WeightPerturbationCertifier(classifier, budget, method="linear", verbose=False)
            via_certifier = float(certifier.certify(x.numpy(), y.numpy()).mean())
            upper, t_att, violations = float("nan"), 0.0, 0
            if steps:
                start = time.perf_counter()
                attack = PerSampleWeightPGD(
                    classifier, budget, max_iter=steps, num_random_init=restarts, batch_size=100, verbose=False
                )
                found = attack.generate(x.numpy(), y.numpy())
                t_att = time.perf_counter() - start
                upper = float((correct & ~torch.as_tensor(found["flipped"])).double().mean())
                observed = torch.as_tensor(found["margins"])  # lowest margins the attack saw: never below a bound
                violations = int((observed < b_lin - 1e-9 * (1 + b_lin.abs().clamp_max(1e6))).sum())
            rows.append(
                {
                    "norm": norm,
                    "relative": relative,
                    "eps": eps,
                    "interval": certified(b_int, correct),
                    "linear": certified(b_lin, correct),
                    "linear_via_certifier": via_certifier,
                    "attack_upper_bound": upper,
                    "interval_ms": round(1e3 * t_int, 2),
                    "linear_ms": round(1e3 * t_lin, 2),
                    "attack_s": round(t_att, 1),
                    "violations": violations,
                }
            )
            print(json.dumps({"model": kind, **rows[-1]}), flush=True)
    return {"model": kind, "test_accuracy": test_acc, "clean_accuracy": float(correct.double().mean()), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="attack iterations per restart (0: no attack)")
    parser.add_argument("--restarts", type=int, default=1, help="attack restarts from random points (besides 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "points": args.points,
        "results": [run(kind, args.points, args.repeats, args.steps, args.restarts) for kind in args.models.split(",")],
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
