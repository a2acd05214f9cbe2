"""
Benchmark of the complete verifier (:class:`.WeightPerturbationVerifier`, docs/theory.md §11) against the plain
``"linear"`` certificate (§4b) on digits, one CPU thread.

Targets (200 test points, box on every weight):

* digits ResNet (:func:`.zoo.train_digits_resnet`, plain training), box 1e-4: certified ≥ 0.50 and unknown ≤ 0.30
  (linear alone: 0.000); box 3e-5: certified ≥ 0.97 (linear ≈ 0.9);
* digits MLP 64-128-64-10 bias-free (40 epochs, Adam 3e-3, batch 64, seed 0), box 6e-3: certified ≥ 0.35, unknown
  ≤ 0.05 (linear ≈ 0.27; a per-sample attack leaves ≤ 0.415 correct).

For each case: the shares of the verdicts, the linear certificate's share, the mean wall-clock seconds per sample (the
target is ≤ 2), the mean CPU seconds per sample (the same on an idle machine; robust to other processes) and the
largest per-sample wall clock. Run: ``python benchmarks/bench_verifier.py [--points 200] [--time-limit S]
[--cases resnet-1e-4,resnet-3e-5,mlp-6e-3] [--dtype float64|float32]`` (the bounds' precision of the certificate and
the verifier; float32 with the rounding-error terms of docs/theory.md §5); prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from art_weightpert import (  # noqa: E402
    PerturbationBudget,
    PyTorchWeightClassifier,
    WeightPerturbationCertifier,
    zoo,  # noqa: E402
)
from art_weightpert.data import load_digits_data  # noqa: E402
from art_weightpert.verification import WeightPerturbationVerifier  # noqa: E402

CASES = {"resnet-1e-4": ("resnet", 1e-4, 1.0), "resnet-3e-5": ("resnet", 3e-5, 1.0), "mlp-6e-3": ("mlp", 6e-3, 2.0)}
"""Per case: the model, the box radius and the time limit per sample (the MLP's unknown samples are few and cheap to
keep branching; the ResNet's bound phases already take most of a second)."""


def train_mlp(x: np.ndarray, y: np.ndarray) -> PyTorchWeightClassifier:
    """The bias-free 64-128-64-10 MLP, Adam 3e-3, 40 epochs of shuffled batches of 64 (seed 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128, bias=False), nn.ReLU(), nn.Linear(128, 64, bias=False), nn.ReLU(),
        nn.Linear(64, 10, bias=False),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return PyTorchWeightClassifier(model.eval(), nn.CrossEntropyLoss(), (64,), 10)


def run(case: str, classifier, x: np.ndarray, y: np.ndarray, eps: float, time_limit: float, dtype: torch.dtype) -> dict:
    budget = PerturbationBudget(eps, "inf")
    start = time.perf_counter()
    linear = float(WeightPerturbationCertifier(classifier, budget, verbose=False, dtype=dtype).certify(x, y).mean())
    linear_seconds = time.perf_counter() - start
    verifier = WeightPerturbationVerifier(classifier, budget, time_limit=time_limit, verbose=False, dtype=dtype)
    start, cpu = time.perf_counter(), time.process_time()
    result = verifier.verify(x, y)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "case": case,
        "dtype": str(dtype).removeprefix("torch."),
        "points": len(x),
        "time_limit": time_limit,
        **{k: round(v, 4) for k, v in result.shares().items()},
        "linear_certified": round(linear, 4),
        "linear_seconds": round(linear_seconds, 3),
        "seconds_per_sample": round(wall / len(x), 3),
        "cpu_seconds_per_sample": round(cpu / len(x), 3),
        "max_seconds_sample": round(float(result.seconds.max()), 3),
        "counterexamples": len(result.counterexamples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per sample (default: the case's)")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="the bounds' precision")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    models = {}
    for case in args.cases.split(","):
        kind, eps, time_limit = CASES[case]
        if kind not in models:
            x_train, y_train, x_test, y_test = load_digits_data(flatten=kind == "mlp")
            classifier = train_mlp(x_train, y_train) if kind == "mlp" else zoo.train_digits_resnet(x_train, y_train)
            models[kind] = (classifier, x_test[: args.points], y_test[: args.points])
        classifier, x, y = models[kind]
        limit = time_limit if args.time_limit is None else args.time_limit
        print(json.dumps(run(case, classifier, x, y, eps, limit, dtype)), flush=True)


if __name__ == "__main__":
    main()
