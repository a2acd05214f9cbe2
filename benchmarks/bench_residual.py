"""
Benchmark of the certificates on residual networks (issue 11, docs/theory.md §9).

1. Cost: for the digits ResNet (:func:`.digits_resnet`, 1x8x8) and ResNet-18 (:func:`.resnet18_cifar`, torchvision's
   structure, 3x32x32), the time per sample of ``"interval"`` and ``"linear"`` (float64 bound functions, an absolute
   box of radius 1e-5 on every weight) as a ratio to one float32 forward pass of the same batch, both measured the
   same way: process CPU time, one torch thread by default, minimum over ``--repeats`` calls after a warm-up (run it
   pinned, ``taskset -c 1``, on a shared machine); and the top entries of torch's profiler for each bound (where the
   time goes). Targets on the digits ResNet: interval ≤ 10× a forward, linear ≤ 100×.
2. Tightness: the digits ResNet trained by :func:`.train_digits_resnet` (30 epochs, seed 0); on the first ``--points``
   test points, at a few absolute box radii on every weight: clean accuracy, certified accuracy of both methods, the
   accuracy under the per-sample weight attack (:class:`.PerSampleWeightPGD`: an upper bound of every per-sample
   certificate) and under the universal :class:`.WeightPGD` (one perturbation for all points); ``violations`` counts
   attack margins below the linear lower bound (must be 0).

Run: ``taskset -c 1 python benchmarks/bench_residual.py [--points 200] [--threads 1] [--repeats 5]
[--digits-samples 200] [--resnet18-samples 2] [--skip-resnet18] [--skip-tightness]
[--dtype float64|float32|float32-rounding] [--device cpu|cuda]`` (the cost table's arithmetic; float32-rounding:
sound float32, docs/theory.md §5; cuda: the cost table on the GPU, wall-clock times after ``torch.cuda.synchronize``
and the profiler's GPU time, the tightness table still on the CPU); prints one JSON line per row (with the load
average), then markdown tables. ResNet-18's linear bound takes seconds per sample: it is timed once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from bench_certify import synchronize, wall_times
from bench_hot_paths import _best
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier, WeightPGD
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.certification import METHODS
from art_weightpert.certification.common import BoundCache
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import linear_margin_bounds
from art_weightpert.data import load_digits_data
from art_weightpert.network import read_network
from art_weightpert.torch_tools import keep_freed_memory
from art_weightpert.zoo import digits_resnet, resnet18_cifar, train_digits_resnet

RADII = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)


def top_entries(fn, k: int = 6, device: str = "cpu") -> list[str]:
    """The ``k`` torch operators with the largest self time in one call of ``fn`` (CPU time, or GPU time on
    ``"cuda"``), with their share of the profiled time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.key_averages()
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attribute) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:k]
    return [f"{e.key} {100 * getattr(e, attribute) / total:.0f}%" for e in top]


def _timed(fn, repeats: int, device: str) -> float:
    """:func:`_best` (process CPU time) on the CPU; on CUDA the minimum wall-clock time after synchronizing (the
    CPU time of a GPU call measures its launches only)."""
    return _best(fn, repeats) if device != "cuda" else min(wall_times(fn, repeats, device))


DTYPES = ("float64", "float32", "float32-rounding")
"""``--dtype`` choices: the bounds in float64 (the certificates' default, through the registry), in plain float32 (the
trainer's arithmetic, not sound for the exact network) or in float32 with the rounding terms of docs/theory.md §5."""

BOUNDS = {"interval": interval_margin_bounds, "linear": linear_margin_bounds}


def cost(
    name: str,
    model: nn.Module,
    shape: tuple[int, ...],
    n: int,
    repeats: int,
    bound_repeats: int,
    dtype: str = "float64",
    device: str = "cpu",
) -> dict:
    """Time per sample of each bound method (``dtype``, absolute box 1e-5 on every weight) as a ratio to a float32
    forward pass of the same batch (and of a float64 forward); process CPU times (wall-clock on CUDA), minimum over
    the repeats."""
    model = (copy.deepcopy(model) if device != "cpu" else model).eval().to(device)  # the tightness table's stays
    x = torch.rand((n, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        forward = _timed(lambda: model(x), max(repeats, 20), device) / n
        labels = model(x).argmax(dim=1)
    model64 = _float64_copy(model)
    x64 = x.double()
    with torch.no_grad():
        forward64 = _timed(lambda: model64(x64), max(repeats, 20), device) / n
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    bound_model = model64 if dtype == "float64" else copy.deepcopy(model).float().requires_grad_(False)
    network = read_network(bound_model, shape)
    balls = PerturbationBudget(1e-5, "inf").parameter_balls(bound_model, torch_dtype)
    xb = x.to(torch_dtype)
    row = {
        "model": name,
        "dtype": dtype,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "samples": n,
        "forward_ms": 1e3 * forward,
        "forward64_ratio": forward64 / forward,
    }
    for method in ("interval", "linear"):
        cache = BoundCache()

        def bound(method=method, cache=cache):
            with torch.no_grad():
                if dtype == "float64":
                    return METHODS[method].bounds(network, balls, xb, labels, cache=cache)
                rounding = dtype == "float32-rounding"
                return BOUNDS[method](network, balls, xb, labels, torch_dtype, None, cache, rounding=rounding)

        per_sample = _timed(bound, repeats if method == "interval" else bound_repeats, device) / n
        row[f"{method}_ms"] = 1e3 * per_sample
        row[f"{method}_ratio"] = per_sample / forward
        row[f"{method}_top"] = top_entries(bound, device=device)
    row["load_average"] = os.getloadavg()
    return row


def _warmed_state(model: nn.Module, x: np.ndarray) -> dict:
    """Untrained weights with batch-norm statistics of the data (for the cost table alone)."""
    model.train()
    with torch.no_grad():
        model(torch.as_tensor(x))
    return model.state_dict()


def _float64_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().requires_grad_(False)


def tightness(clf: PyTorchWeightClassifier, x: np.ndarray, y: np.ndarray, eps: float) -> dict:
    budget = PerturbationBudget(eps, "inf")
    correct = clf.predict(x).argmax(axis=1) == y
    row = {"eps": eps, "clean": float(correct.mean())}
    bounds = {}
    for method in ("interval", "linear"):
        certifier = WeightPerturbationCertifier(clf, budget, method, batch_size=100, verbose=False)
        row[method] = float(certifier.certify(x, y).mean())
        bounds[method] = certifier.margin_lower_bounds(x, y)
    attack = PerSampleWeightPGD(clf, budget, max_iter=100, num_random_init=2, verbose=False).generate(x, y)
    row["per_sample_pgd"] = float((correct & ~attack["flipped"]).mean())
    finite = np.isfinite(bounds["linear"])
    row["violations"] = int((attack["margins"][finite] < bounds["linear"][finite] - 1e-9).sum())
    delta = WeightPGD(clf, budget, max_iter=50, verbose=False).generate(x, y)
    row["weight_pgd"] = float((clf.with_weight_perturbation(delta).predict(x).argmax(axis=1) == y).mean())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--digits-samples", type=int, default=200)
    parser.add_argument("--resnet18-samples", type=int, default=2)
    parser.add_argument("--skip-resnet18", action="store_true")
    parser.add_argument("--skip-tightness", action="store_true", help="only the cost table (trains nothing)")
    parser.add_argument("--dtype", choices=DTYPES, default="float64", help="arithmetic of the timed bounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the cost table's bounds run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # forward passes and bounds timed in the allocator state the bounds set (torch_tools)
    x_train, y_train, x_test, y_test = load_digits_data(flatten=False)
    if args.skip_tightness:
        digits_model = digits_resnet()
        digits_model.load_state_dict(_warmed_state(digits_model, x_train))
    else:
        start = time.perf_counter()
        clf = train_digits_resnet(x_train, y_train)
        print(json.dumps({"digits_resnet_training_s": time.perf_counter() - start}), flush=True)
        digits_model = clf.base_model
    digits = ("digits ResNet (1x8x8)", digits_model, (1, 8, 8), args.digits_samples, args.repeats, args.repeats)
    costs = [cost(*digits, dtype=args.dtype, device=args.device)]
    if not args.skip_resnet18:
        resnet18 = resnet18_cifar()
        costs.append(
            cost(
                "ResNet-18 (3x32x32)",
                resnet18,
                (3, 32, 32),
                args.resnet18_samples,
                args.repeats,
                1,
                args.dtype,
                args.device,
            )
        )
    for row in costs:
        print(json.dumps(row), flush=True)
    rows = []
    if not args.skip_tightness:
        rows = [tightness(clf, x_test[: args.points], y_test[: args.points], eps) for eps in RADII]
    for row in rows:
        print(json.dumps(row), flush=True)
    print(
        "\n| model | bounds in | forward (ms/sample) | float64 forward | interval (ms/sample, × fwd) "
        "| linear (ms/sample, × fwd) |"
    )
    print("|---|---|---|---|---|---|")
    for r in costs:
        print(
            f"| {r['model']} | {r['dtype']} | {r['forward_ms']:.4f} | {r['forward64_ratio']:.1f}× "
            f"| {r['interval_ms']:.3f} ({r['interval_ratio']:.1f}×) "
            f"| {r['linear_ms']:.2f} ({r['linear_ratio']:.0f}×) |"
        )
    print("\n| model | bound | where the time goes (torch profiler, self CPU) |")
    print("|---|---|---|")
    for r in costs:
        for method in ("interval", "linear"):
            print(f"| {r['model']} | {method} | {', '.join(r[f'{method}_top'])} |")
    print("\n| box radius δ (every weight) | clean | interval | linear | PerSampleWeightPGD | WeightPGD |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['eps']:g} | {r['clean']:.3f} | {r['interval']:.3f} | {r['linear']:.3f} | "
            f"{r['per_sample_pgd']:.3f} | {r['weight_pgd']:.3f} |"
        )


if __name__ == "__main__":
    main()
