"""
Cost of the weight certificates relative to a forward pass (issue 3).

For a 784-512-512-10 MLP and a small CNN (random weights, batch 1024), times ``margin_lower_bounds`` of every
registered method (``paper``, ``interval``, ``linear``) for each ball, as a ratio to one
float32 forward pass of the same batch measured in the same process (median of repeats), with the float64 forward
ratio beside them. Prints one JSON object.

Usage: ``python benchmarks/bench_certify.py [--repeats 5] [--batch 1024] [--threads 2] [--methods paper interval]
[--balls inf row_l1] [--models mlp cnn] [--dtype float64|float32|float32-rounding] [--device cpu|cuda]`` (float32:
the bound functions called directly, plain or with the rounding terms of docs/theory.md §5; float64: through the
certifier; cuda: the model, the data and the bounds on the GPU, wall-clock times after ``torch.cuda.synchronize``);
progress on stderr, the JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import art.config
import numpy as np
import torch
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
from art_weightpert.certification import METHODS
from art_weightpert.certification.common import BoundCache
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import linear_margin_bounds
from art_weightpert.certification.paper import paper_margin_bounds
from art_weightpert.network import read_network
from art_weightpert.torch_tools import keep_freed_memory


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (a CUDA timing without it measures the launch only)."""
    if device == "cuda":
        torch.cuda.synchronize()


def wall_times(fn, repeats: int, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after a warm-up call, each until the GPU's queue is done."""
    fn()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_time(fn, repeats: int, device: str = "cpu") -> float:
    return statistics.median(wall_times(fn, repeats, device))


def budgets() -> dict[str, PerturbationBudget]:
    return {
        "inf": PerturbationBudget(1e-3, "inf"),
        "inf_relative": PerturbationBudget(1e-2, "inf", relative=True),
        "row_l1": PerturbationBudget(1e-2, "row_l1"),
        "l2": PerturbationBudget(1e-2, "l2"),
    }


def bench_model(
    name: str,
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    repeats: int,
    methods: list[str],
    balls: list[str],
    dtype: str = "float64",
    device: str = "cpu",
) -> dict:
    model.eval().to(device)
    clf = PyTorchWeightClassifier(
        model, nn.CrossEntropyLoss(), input_shape, 10, device_type="gpu" if device == "cuda" else "cpu"
    )
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    x_t = torch.as_tensor(x, device=device)
    model64 = _double(model)
    x64 = x_t.double()
    with torch.no_grad():
        y = model(x_t).argmax(dim=1).cpu().numpy()
        forward32 = median_time(lambda: model(x_t), repeats, device)
        forward64 = median_time(lambda: model64(x64), repeats, device)
    out = {
        "dtype": dtype,
        "device": device,
        "forward_float32_s": forward32,
        "forward_float64_ratio": forward64 / forward32,
        "margin_lower_bounds_ratio": {},
        "margin_lower_bounds_s": {},
    }
    network = read_network(model, input_shape)
    for method in methods:
        for ball, budget in budgets().items():
            if ball not in balls:
                continue
            if dtype == "float64":  # the certifier's own path
                certifier = WeightPerturbationCertifier(clf, budget, method=method, batch_size=batch, verbose=False)
                fn = lambda c=certifier: c.margin_lower_bounds(x, y)  # noqa: E731
            else:  # the bound function in float32, plain or with the rounding terms of docs/theory.md §5
                fn = _float32_bound(network, model, budget, method, x_t, torch.as_tensor(y, device=device), dtype)
            seconds = median_time(fn, repeats, device)
            out["margin_lower_bounds_s"][f"{method}/{ball}"] = seconds
            out["margin_lower_bounds_ratio"][f"{method}/{ball}"] = seconds / forward32
            print(f"{name} {method}/{ball}: {seconds:.4f} s = {seconds / forward32:.2f} x", file=sys.stderr, flush=True)
    return out


DTYPES = ("float64", "float32", "float32-rounding")
BOUNDS = {"paper": paper_margin_bounds, "interval": interval_margin_bounds, "linear": linear_margin_bounds}


def _float32_bound(network, model: nn.Module, budget: PerturbationBudget, method: str, x, y, dtype: str):
    """A call of ``method``'s bound function in float32 (``dtype`` ``"float32-rounding"``: with ``rounding=True``)
    on the whole batch, with a cache of the per-layer constants as the certifier keeps one."""
    balls = budget.parameter_balls(model, torch.float32)
    cache = BoundCache()
    rounding = dtype == "float32-rounding"

    def bound():
        with torch.no_grad():
            return BOUNDS[method](network, balls, x, y, torch.float32, None, cache, rounding=rounding)

    return bound


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="*", default=None, help="methods to time (default: every registered one)")
    parser.add_argument("--balls", nargs="*", default=list(budgets()), help=f"balls to time, among {list(budgets())}")
    parser.add_argument("--models", nargs="*", default=["mlp", "cnn"], help="models to time: mlp, cnn")
    parser.add_argument("--dtype", choices=DTYPES, default="float64", help="arithmetic of the timed bounds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the bounds run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    methods = list(METHODS) if args.methods is None else args.methods
    if args.threads:
        torch.set_num_threads(args.threads)
    art.config.set_data_path(tempfile.mkdtemp(prefix="art_data_"))
    keep_freed_memory()  # forward passes and bounds timed in the allocator state the bounds set (torch_tools)
    torch.manual_seed(0)
    result = {
        "batch": args.batch,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "targets": {"paper": 4.0, "interval": 8.0},
        "models": {},
    }
    specs = {"mlp": ("mlp_784_512_512_10", mlp, (784,)), "cnn": ("cnn_1x28x28", cnn, (1, 28, 28))}
    for key in args.models:
        label, factory, shape = specs[key]
        model = factory()
        result["models"][label] = bench_model(
            key, model, shape, args.batch, args.repeats, methods, args.balls, args.dtype, args.device
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
