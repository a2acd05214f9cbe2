"""
Cost of the robust loss (docs/theory.md §7): time of one training epoch of :class:`.WeightRobustTrainer` with
every registered ``bound`` (``"paper"``, ``"interval"``, ``"linear"``), as a ratio to one epoch of ART's plain
``PyTorchClassifier.fit`` on the same data and model.

Model: the digits recipe (:data:`.zoo.DIGITS_RECIPE`: bias-free ReLU MLP 64-128-64-10, Adam lr 3e-3, batch 128, its
budget row_l1 with ε = 0.1) on the digits training split (1347 samples, 11 steps per epoch), λ = 1 with no warm-up
(the bound is computed at every step), one CPU thread. Each measurement is a ``fit`` of ``--epochs`` epochs
divided by the number of epochs; the minimum over ``--repeats`` runs is reported (the runs alternate between the
methods, so a busy machine slows them alike), as wall-clock time and as the process's CPU time (steadier on a shared
machine). Targets: paper ≤ 2×, interval ≤ 4×; ``meets_targets`` judges the wall-clock ratios.

``--model wide``: the same measurement where the matrix products dominate instead of per-operation overheads, a ReLU
MLP 784-1024-1024-10 (with biases, Adam lr 1e-3) on 4096 random inputs, batch 256, row_l1 ε = 1e-3, λ = 1 (no targets:
the interval bound's products alone, centre and radius for every layer after the first, forward and backward, are
about 1.3× the cross-entropy step's, so its epoch costs about 2.3× the plain one there).

Run: ``python benchmarks/bench_train.py [--model digits|wide] [--epochs 10] [--repeats 7] [--threads 1]``; prints
JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from art_weightpert.data import load_digits_data
from art_weightpert.defences.trainer import WeightRobustTrainer

TARGETS = {"paper": 2.0, "interval": 4.0}


def _recipe():
    """(classifier, budget, λ, batch size) of the digits recipe. A checkout from before ``DIGITS_RECIPE`` (the base
    of ``bench_hot_paths.py``'s before/after comparison) gets the same set-up from the functions it had."""
    try:
        from art_weightpert.zoo import DIGITS_RECIPE
    except ImportError:
        from art_weightpert.zoo import default_digits_budget, digits_mlp, make_classifier

        return make_classifier(digits_mlp(seed=0), (64,), lr=3e-3), default_digits_budget(), 1.0, 128
    return DIGITS_RECIPE.classifier(), DIGITS_RECIPE.budget(), DIGITS_RECIPE.lam, DIGITS_RECIPE.batch_size


def _wide_recipe():
    """(classifier, budget, λ, batch size) of ``--model wide``."""
    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), (784,), 10, optimizer=optimizer)
    return clf, PerturbationBudget(1e-3, "row_l1"), 1.0, 256


def wide_data():
    """The 4096 random inputs and labels of ``--model wide``."""
    rng = np.random.default_rng(0)
    return rng.random((4096, 784), dtype=np.float32), rng.integers(0, 10, 4096)


def epoch_time(method: str, x, y, epochs: int, wide: bool = False, **trainer_params) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of one ``fit`` call of ``epochs`` epochs (``method="art"``: ART's plain fit);
    ``wide``: the ``--model wide`` set-up; ``trainer_params``: further :class:`.WeightRobustTrainer` arguments."""
    clf, budget, lam, batch_size = _wide_recipe() if wide else _recipe()
    torch.manual_seed(0)
    if method == "art":
        run = lambda: clf.fit(x, y, batch_size=batch_size, nb_epochs=epochs)  # noqa: E731
    else:
        trainer = WeightRobustTrainer(clf, budget, lam=lam, warmup=0, method=method, verbose=False, **trainer_params)
        run = lambda: trainer.fit(x, y, batch_size=batch_size, nb_epochs=epochs)  # noqa: E731
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return (time.perf_counter() - wall) / epochs, (time.process_time() - cpu) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("digits", "wide"), default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    wide = args.model == "wide"
    x, y = wide_data() if wide else load_digits_data()[:2]
    from art_weightpert.certification import METHODS

    methods = ["art", "paper", "interval"] if wide else ["art", *METHODS]  # "linear" on the wide MLP: minutes
    for method in methods:  # warm-up: imports, first-call allocations
        epoch_time(method, x, y, 1, wide)
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            times[method].append(epoch_time(method, x, y, args.epochs, wide))
    wall = {m: min(t[0] for t in ts) for m, ts in times.items()}
    cpu = {m: min(t[1] for t in ts) for m, ts in times.items()}
    _, budget, _, batch_size = _wide_recipe() if wide else _recipe()
    result = {
        "benchmark": "train_epoch",
        "model": "MLP 784-1024-1024-10, random data" if wide else "digits MLP 64-128-64-10 (bias-free)",
        "samples": int(len(x)),
        "batch_size": batch_size,
        "budget": budget.to_dict(),
        "threads": args.threads,
        "epochs_per_measurement": args.epochs,
        "repeats": args.repeats,
        "seconds_per_epoch": {m: round(t, 5) for m, t in wall.items()},
        "ratio_to_art_fit": {m: round(wall[m] / wall["art"], 3) for m in methods if m != "art"},
        "cpu_seconds_per_epoch": {m: round(t, 5) for m, t in cpu.items()},
        "cpu_ratio_to_art_fit": {m: round(cpu[m] / cpu["art"], 3) for m in methods if m != "art"},
        "targets": {} if wide else TARGETS,
    }
    result["meets_targets"] = all(result["ratio_to_art_fit"][m] <= t for m, t in result["targets"].items())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
