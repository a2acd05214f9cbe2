"""
Certified training of the digits ResNet (docs/theory.md §13, docs/training.md): the zoo's recipe
(:func:`.zoo.train_digits_resnet`: batch norm frozen at the fresh modules' statistics, interval bound, λ = 1, warm-up
10, 40 epochs, Adam 3e-3, batch 64) at two absolute box radii (every weight) and two relative ones, against the plainly
trained model (30 epochs).

For every model and every radius of its table (absolute or relative box), on the first ``--points`` test points: clean
accuracy, certified accuracy by the ``"interval"`` and ``"linear"`` bounds (float64, sound), accuracy under universal
:class:`.WeightPGD` (one perturbation for all points) and under :class:`.PerSampleWeightPGD` (one perturbation per
point, the threat model of the certificates: certified ≤ per-sample ≤ universal). Training cost: seconds per epoch of
each training run (wall clock), and the ratio of one robust epoch to one plain epoch of the same network (ART's
``fit``, batch norm in train mode), process CPU time, the minimum over ``--repeats`` epochs that alternate between
plain, absolute and relative training (a busy machine slows them alike).
``--fine-tune``: the plain model fine-tuned robustly with frozen batch norm at its trained statistics, and with the
statistics folded into γ and β first (:func:`.fold_batch_norm_statistics`).

Targets (``meets_targets``): box 1e-3: clean ≥ 0.95 and linear-certified ≥ 0.80 at 1e-3; relative 0.01: clean ≥ 0.95
and linear-certified ≥ 0.70 at 0.01; a robust epoch ≤ 4× a plain one (both balls).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_resnet_training.py [--points 200] [--epochs 40] [--fine-tune]``;
prints one JSON object per line, then the markdown tables of docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import numpy as np
import torch

from art_weightpert import PerturbationBudget, WeightPerturbationCertifier
from art_weightpert.attacks import WeightPGD
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.data import load_digits_data
from art_weightpert.defences.trainer import TrainingCollapsedError, WeightRobustTrainer
from art_weightpert.defences.trainer.batch_norm import fold_batch_norm_statistics
from art_weightpert.zoo import (
    DIGITS_RESNET_EPOCHS,
    DIGITS_RESNET_ROBUST_EPOCHS,
    digits_resnet,
    make_classifier,
    train_digits_resnet,
)

ABSOLUTE = (1e-3, 3e-4)  # training radii, box on every weight
RELATIVE = (0.01, 0.005)  # training radii, relative box |Δw| ≤ ε|w|
EVAL_ABSOLUTE = (1e-4, 3e-4, 1e-3, 2e-3)
EVAL_RELATIVE = (0.002, 0.005, 0.01, 0.02)
TARGETS = {("abs", 1e-3): (0.95, 0.80), ("rel", 0.01): (0.95, 0.70)}
MAX_COST_RATIO = 4.0


def timed(train) -> tuple[object, float, float]:
    """``train()``'s result, its wall-clock and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = train()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def cost_ratios(x_train: np.ndarray, y_train: np.ndarray, repeats: int, bound: str) -> dict:
    """CPU seconds of one epoch of plain training and of robust training (box 1e-3, relative box 0.01, the recipe's
    trainer at the full ball), the minimum over ``repeats`` alternating epochs, and the ratios to plain."""
    plain = make_classifier(digits_resnet(seed=0), (1, 8, 8), lr=3e-3)
    budgets = {"abs": PerturbationBudget(1e-3, "inf"), "rel": PerturbationBudget(0.01, "inf", relative=True)}
    trainers = {
        name: WeightRobustTrainer(
            make_classifier(digits_resnet(seed=0), (1, 8, 8), lr=3e-3), budget, method=bound, warmup=0,
            stop_on_collapse=False, verbose=False,
        )
        for name, budget in budgets.items()
    }  # fmt: skip
    seconds: dict[str, list[float]] = {"plain": [], "abs": [], "rel": []}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (at the full ball from the first step these runs may not learn)
        for _ in range(repeats):
            _, _, cpu = timed(lambda: plain.fit(x_train, y_train, batch_size=64, nb_epochs=1, verbose=False))
            seconds["plain"].append(cpu)
            for name, trainer in trainers.items():
                _, _, cpu = timed(lambda trainer=trainer: trainer.fit(x_train, y_train, batch_size=64, nb_epochs=1))
                seconds[name].append(cpu)
    best = {name: min(values) for name, values in seconds.items()}
    return {"cpu_s_per_epoch": best, "ratio": {name: best[name] / best["plain"] for name in ("abs", "rel")}}


def evaluate(clf, x: np.ndarray, y: np.ndarray, budget: PerturbationBudget, attack_iter: int) -> dict:
    """Clean, certified (interval, linear), WeightPGD and PerSampleWeightPGD accuracy at ``budget``."""
    correct = clf.predict(x).argmax(axis=1) == y
    row = {"clean": float(correct.mean())}
    for method in ("interval", "linear"):
        row[method] = float(WeightPerturbationCertifier(clf, budget, method, verbose=False).certify(x, y).mean())
    delta = WeightPGD(clf, budget, max_iter=attack_iter, verbose=False).generate(x, y)
    row["weight_pgd"] = float((clf.with_weight_perturbation(delta).predict(x).argmax(axis=1) == y).mean())
    attack = PerSampleWeightPGD(clf, budget, max_iter=attack_iter, num_random_init=1, verbose=False)
    row["per_sample_pgd"] = float((correct & ~attack.generate(x, y)["flipped"]).mean())
    return row


def fine_tune(plain, x_train, y_train, budget, epochs: int, fold: bool) -> tuple[object, dict]:
    """A copy of ``plain`` fine-tuned at ``budget`` with frozen batch norm (statistics folded first with ``fold``)."""
    model = copy.deepcopy(plain.base_model)
    if fold:
        fold_batch_norm_statistics(model)
    clf = make_classifier(model, (1, 8, 8), lr=1e-3)
    trainer = WeightRobustTrainer(clf, budget, warmup=epochs // 4, batch_norm="frozen", verbose=False)
    torch.manual_seed(0)
    history = trainer.fit(x_train, y_train, batch_size=64, nb_epochs=epochs)
    return clf, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=None, help="robust epochs (default: the recipe's, 40)")
    parser.add_argument("--plain-epochs", type=int, default=DIGITS_RESNET_EPOCHS)
    parser.add_argument("--attack-iter", type=int, default=50)
    parser.add_argument("--bound", default="interval", help="the robust loss's bound (interval or linear)")
    parser.add_argument("--fine-tune", type=int, default=0, help="epochs of the fine-tuning runs (0: none)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating epochs of the cost measurement")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_digits_data(flatten=False)
    x, y = x_test[: args.points], y_test[: args.points]
    costs = cost_ratios(x_train, y_train, args.repeats, args.bound)
    print(json.dumps(costs), flush=True)

    torch.manual_seed(0)
    plain, wall, _ = timed(lambda: train_digits_resnet(x_train, y_train, nb_epochs=args.plain_epochs))
    models = {("standard", None): (plain, wall / args.plain_epochs)}
    print(json.dumps({"model": "standard", "s_per_epoch": wall / args.plain_epochs}), flush=True)
    for kind, radii in (("abs", ABSOLUTE), ("rel", RELATIVE)):
        for eps in radii:
            budget = PerturbationBudget(eps, norm="inf", relative=kind == "rel")
            epochs = args.epochs

            def train(budget=budget, epochs=epochs):
                return train_digits_resnet(x_train, y_train, nb_epochs=epochs, budget=budget, method=args.bound)

            try:
                clf, wall, _ = timed(train)
            except TrainingCollapsedError as error:  # the recipe refuses a chance model: no row for it
                print(json.dumps({"model": f"{kind} {eps:g}", "collapsed": str(error)}), flush=True)
                continue
            models[(kind, eps)] = (clf, wall / (epochs or DIGITS_RESNET_ROBUST_EPOCHS))
            print(json.dumps({"model": f"{kind} {eps:g}", "s_per_epoch": models[kind, eps][1]}), flush=True)

    rows = []
    for (kind, eps), (clf, wall) in models.items():
        tables = ("abs", "rel") if kind == "standard" else (kind,)
        for table in tables:
            for radius in EVAL_ABSOLUTE if table == "abs" else EVAL_RELATIVE:
                budget = PerturbationBudget(radius, norm="inf", relative=table == "rel")
                row = {"table": table, "model": kind if eps is None else f"{kind} {eps:g}", "radius": radius}
                row["s_per_epoch"] = wall
                row.update(evaluate(clf, x, y, budget, args.attack_iter))
                rows.append(row)
                print(json.dumps(row), flush=True)

    fine = []
    if args.fine_tune:
        budget = PerturbationBudget(1e-3, norm="inf")
        for fold in (False, True):
            clf, history = fine_tune(plain, x_train, y_train, budget, args.fine_tune, fold)
            row = {"fine_tune": "folded statistics" if fold else "trained statistics", "epochs": args.fine_tune}
            row.update(collapsed=history["collapsed"], **evaluate(clf, x, y, budget, args.attack_iter))
            fine.append(row)
            print(json.dumps(row), flush=True)

    checks = {}
    for (kind, eps), (clean_min, linear_min) in TARGETS.items():
        row = next((r for r in rows if r["model"] == f"{kind} {eps:g}" and r["radius"] == eps), None)
        checks[f"{kind} {eps:g}"] = row is not None and row["clean"] >= clean_min and row["linear"] >= linear_min
        checks[f"{kind} cost"] = costs["ratio"][kind] <= MAX_COST_RATIO
    print(json.dumps({"checks": checks, "meets_targets": all(checks.values())}), flush=True)

    for table, title in (("abs", "box radius δ (every weight)"), ("rel", "relative box ε (|Δw| ≤ ε|w|)")):
        print(f"\n| model | {title} | clean | interval | linear | PerSampleWeightPGD | WeightPGD | s/epoch |")
        print("|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["table"] == table):
            cost = f"{r['s_per_epoch']:.2f}"
            print(
                f"| {r['model']} | {r['radius']:g} | {r['clean']:.3f} | {r['interval']:.3f} | {r['linear']:.3f} | "
                f"{r['per_sample_pgd']:.3f} | {r['weight_pgd']:.3f} | {cost} |"
            )
    cpu = costs["cpu_s_per_epoch"]
    print("\n| training (one epoch, CPU s) | plain | box 1e-3 | relative 0.01 |")
    print("|---|---|---|---|")
    print(f"| seconds (× plain) | {cpu['plain']:.3f} | {cpu['abs']:.3f} ({costs['ratio']['abs']:.1f}×) | "
          f"{cpu['rel']:.3f} ({costs['ratio']['rel']:.1f}×) |")  # fmt: skip
    if fine:
        print("\n| fine-tuning at box 1e-3 (frozen batch norm) | clean | interval | linear | PerSampleWeightPGD |")
        print("|---|---|---|---|---|")
        for r in fine:
            numbers = " | ".join(f"{r[key]:.3f}" for key in ("clean", "interval", "linear", "per_sample_pgd"))
            print(f"| {r['fine_tune']} | {numbers} |")


if __name__ == "__main__":
    main()
