"""
Data-parallel scale-out on one machine's CPU cores: 1 process against ``--nproc`` gloo processes
(:func:`art_weightpert.distributed.launch`, docs/distributed.md), for

* one training epoch of :class:`.WeightRobustTrainer` (the digits recipe: bias-free ReLU MLP 64-128-64-10 or the
  widths of ``--hidden``, Adam,
  the global batch of 128, row_l1 ε = 0.1, λ = 1 without warm-up, interval bound; 1347 samples, 11 steps), and
* :class:`.WeightPerturbationCertifier` (``interval`` and ``linear``) on the 450 test samples, batches of 64.

Each process uses one intra-op thread (``torch.set_num_threads(1)``), so the single process and each rank get one
core; times are measured inside the processes between two barriers (process start-up, about 5-20 s per launch on a
loaded machine, is not counted), minimum over ``--repeats`` runs, as seconds per epoch / per certification. The
machine's load average before and after is reported: on a shared 2-core machine the speed-up depends on the other
jobs as much as on the code.

Run: ``python benchmarks/bench_distributed.py [--nproc 2] [--repeats 3] [--epochs 2] [--hidden 128 64]``; prints
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from art_weightpert import WeightPerturbationCertifier, distributed
from art_weightpert.data import load_digits_data
from art_weightpert.defences.trainer import WeightRobustTrainer
from art_weightpert.zoo import DIGITS_RECIPE


def _barrier() -> None:
    if distributed.is_distributed():
        torch.distributed.barrier()


def _timed(run) -> float:
    _barrier()
    start = time.perf_counter()
    run()
    _barrier()
    return time.perf_counter() - start


def measure(repeats: int, epochs: int, hidden: tuple[int, ...]) -> dict[str, float]:
    """Seconds per training epoch and per certification (minimum over the repeats), in this process group."""
    torch.set_num_threads(1)
    recipe = replace(DIGITS_RECIPE, hidden=hidden)
    x_train, y_train, x_test, y_test = load_digits_data()
    times: dict[str, list[float]] = {"train_epoch": [], "certify_interval": [], "certify_linear": []}
    for _ in range(repeats):
        torch.manual_seed(0)
        clf = recipe.classifier()
        trainer = WeightRobustTrainer(clf, recipe.budget(), lam=1.0, warmup=0, verbose=False)
        fit = lambda t=trainer: t.fit(x_train, y_train, batch_size=recipe.batch_size, nb_epochs=epochs)  # noqa: E731
        times["train_epoch"].append(_timed(fit) / epochs)
        for method in ("interval", "linear"):
            budget = recipe.budget()
            certifier = WeightPerturbationCertifier(clf, budget, method=method, batch_size=64, verbose=False)
            times[f"certify_{method}"].append(_timed(lambda c=certifier: c.certify(x_test, y_test)))
    return {key: min(values) for key, values in times.items()}


def _worker(path: str, repeats: int, epochs: int, hidden: tuple[int, ...]) -> None:
    result = measure(repeats, epochs, hidden)
    if distributed.is_main_process():
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=list(DIGITS_RECIPE.hidden), help="MLP widths")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results = {}
    for nproc in (1, args.nproc):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "times.json")
            distributed.launch(_worker, nproc, args=(path, args.repeats, args.epochs, tuple(args.hidden)))
            with open(path, encoding="utf-8") as handle:
                results[nproc] = json.load(handle)
    speedup = {key: results[1][key] / results[args.nproc][key] for key in results[1]}
    report = {
        "seconds": {f"{n} process(es)": {k: round(v, 4) for k, v in r.items()} for n, r in results.items()},
        f"speedup_{args.nproc}_vs_1": {k: round(v, 3) for k, v in speedup.items()},
        "hidden": args.hidden,
        "cpu_cores": os.cpu_count(),
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
