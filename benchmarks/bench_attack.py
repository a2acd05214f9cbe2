"""
Cost of one :class:`.WeightPGD` iteration relative to one plain torch forward+backward pass.

Model 784-512-512-10 (ReLU), batch 1024, all weights perturbed, whole batch in one pass (``batch_size=1024``).
The per-iteration time of the attack is ``(T(max_iter=K) - T(max_iter=0)) / K``, which removes the fixed cost of
``generate`` (input checks, the evaluation of the start, the final exact projection). The baseline is
``loss.backward()`` on the same model and batch (gradients of every parameter, as in training). Baseline and attack
are measured alternately, so that a change of machine load hits both; the script prints JSON with the median ratio
per ball. On the CPU the ratio is also given in process CPU time (``ratio_cpu_time_median``), which other processes
on a shared machine do not inflate; on a GPU only wall-clock time is meaningful.

Usage: ``python benchmarks/bench_attack.py [--repeats 5] [--iters 10] [--threads N] [--device cpu|cuda] [--quick]``
(``--quick``: 2 repeats of 3 iterations, a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time

import art.config
import numpy as np
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPGD

BATCH = 1024
EPS = {"inf": 0.01, "row_l1": 0.5, "l2": 1.0}
TARGET_RATIO = {"inf": 1.2, "row_l1": 1.3, "l2": 1.2}  # issue 17's targets (iteration / forward+backward)


def make_model(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clocks() -> np.ndarray:
    """(wall-clock time, process CPU time)."""
    return np.array([time.perf_counter(), time.process_time()])


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, reps: int) -> np.ndarray:
    """Median (wall, CPU) time of one forward+backward pass (cross-entropy, gradients of all parameters)."""
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        sync(device)
        start = clocks()
        nn.functional.cross_entropy(model(x), y).backward()
        sync(device)
        times.append(clocks() - start)
    model.zero_grad(set_to_none=True)
    return np.median(np.array(times), axis=0)


def attack_time(attack: WeightPGD, x: np.ndarray, y: np.ndarray, device: str) -> np.ndarray:
    sync(device)
    start = clocks()
    attack.generate(x, y)
    sync(device)
    return clocks() - start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 3 iterations (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.iters = 2, 3
    return args


def measure_ball(clf, model, x, y, norm: str, eps: float, args: argparse.Namespace) -> dict:
    """Median times of the plain step and of one attack iteration, alternating, for one ball."""
    device = args.device
    x_t, y_t = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    budget = PerturbationBudget(eps, norm)
    long = WeightPGD(clf, budget, max_iter=args.iters, batch_size=BATCH, verbose=False)
    short = WeightPGD(clf, budget, max_iter=0, batch_size=BATCH, verbose=False)
    attack_time(long, x, y, device)  # warm-up
    plain, per_iter = [], []
    for _ in range(args.repeats):
        plain.append(plain_step(model, x_t, y_t, device, args.iters))
        per_iter.append((attack_time(long, x, y, device) - attack_time(short, x, y, device)) / args.iters)
    ratios = [float(a[0] / b[0]) for a, b in zip(per_iter, plain)]
    result = {
        "plain_forward_backward_ms": 1e3 * statistics.median(float(b[0]) for b in plain),
        "weight_pgd_iteration_ms": 1e3 * statistics.median(float(a[0]) for a in per_iter),
        "ratio_median": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
    }
    if device == "cpu":
        result["ratio_cpu_time_median"] = statistics.median(float(a[1] / b[1]) for a, b in zip(per_iter, plain))
    return result


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    art.config.set_data_path(tempfile.mkdtemp(prefix="art_bench_"))

    device = args.device
    model = make_model(device)
    model.eval()
    gen = np.random.default_rng(0)
    x = gen.random((BATCH, 784), dtype=np.float32)
    y = gen.integers(0, 10, BATCH)
    clf = PyTorchWeightClassifier(
        model,
        nn.CrossEntropyLoss(),
        (784,),
        10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device == "cuda" else "cpu",
    )
    x_t, y_t = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    plain_step(model, x_t, y_t, device, 3)  # warm-up
    results = {norm: measure_ball(clf, model, x, y, norm, eps, args) for norm, eps in EPS.items()}
    report = {
        "benchmark": "WeightPGD iteration / plain forward+backward",
        "model": "784-512-512-10 MLP",
        "batch": BATCH,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "target_ratio": TARGET_RATIO,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
