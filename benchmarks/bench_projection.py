"""
Time of the row-ℓ1 projection alone (:meth:`.RowL1Ball.project`) on a 512×784 weight, against the previous
sort-based implementation (Duchi et al. 2008, kept here verbatim), in the same process and alternately.

Two inputs: ``gaussian`` (entries ``N(0, 0.02²)``, radius 0.5 per row: most rows outside) and ``attack`` (what
``WeightPGD`` projects: a point of the ball's boundary plus a steepest-ascent step on the top 5% entries of each
row). Prints JSON with the median time per call and the speed-up, for float32 and float64.

Usage: ``python benchmarks/bench_projection.py [--repeats 30] [--threads N] [--device cpu|cuda]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from art_weightpert.balls import RowL1Ball

ROWS, COLS, RADIUS = 512, 784, 0.5


def previous_projection(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The sort-based implementation replaced in issue 17."""
    v = delta.reshape(delta.shape[0], -1)
    a = v.abs()
    inside = a.sum(dim=1) <= radius
    mu, _ = torch.sort(a, dim=1, descending=True)
    cums = mu.cumsum(dim=1) - radius.unsqueeze(1)
    idx = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = mu - cums / idx > 0
    rho = cond.to(v.dtype).mul(idx).argmax(dim=1, keepdim=True)
    theta = (cums.gather(1, rho) / (rho + 1).to(v.dtype)).clamp_min(0)
    out = v.sign() * (a - theta).clamp_min(0)
    out = torch.where(inside.unsqueeze(1), v, out)
    return out.reshape(delta.shape)


def inputs(dtype: torch.dtype, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ball = RowL1Ball()
    radius = torch.full((ROWS,), RADIUS, dtype=dtype)
    gaussian = 0.02 * torch.randn(ROWS, COLS, generator=gen, dtype=dtype)
    boundary = ball.sample(radius, torch.Size((ROWS, COLS)), "uniform", gen)
    boundary = boundary * (RADIUS / boundary.abs().sum(dim=1, keepdim=True))
    step = ball.steepest_step(torch.randn(ROWS, COLS, generator=gen, dtype=dtype), radius, 0.1)
    return {
        "gaussian": (gaussian.to(device), radius.to(device)),
        "attack": ((boundary + step).to(device), radius.to(device)),
    }


def timed(fn: Callable[..., torch.Tensor], args: tuple, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ball, results = RowL1Ball(), {}
    for dtype in (torch.float32, torch.float64):
        for name, (delta, radius) in inputs(dtype, args.device).items():
            err = float((ball.project(delta, radius) - previous_projection(delta, radius)).abs().max())  # + warm-up
            t_new, t_old = [], []
            for _ in range(args.repeats):
                t_new.append(timed(ball.project, (delta, radius), args.device))
                t_old.append(timed(previous_projection, (delta, radius), args.device))
            results[f"{name}_{str(dtype).removeprefix('torch.')}"] = {
                "sort_based_ms": 1e3 * statistics.median(t_old),
                "sort_free_ms": 1e3 * statistics.median(t_new),
                "speedup_ratio": statistics.median(t_old) / statistics.median(t_new),
                "max_abs_difference": err,
            }
    report = {
        "benchmark": "row-l1 projection, sort-free vs previous sort-based",
        "shape": [ROWS, COLS],
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
