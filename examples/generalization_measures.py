"""
Which weight-perturbation measure predicts the generalization gap? A grid of digits MLPs that differ in one
hyperparameter at a time (width, depth, learning rate, batch size, weight decay, training-set size, weight-robust
training λ), each trained to the same training cross-entropy; for each model the gap (test − train error and loss)
and the measures, computed from the training set only: the paper's Rademacher bound (docs/theory.md §6) and its terms,
the sum and product of the layers' ℓ∞ operator norms, PAC-Bayes σ and bound (Jiang et al. 2020), worst- and average-case
adaptive sharpness (Andriushchenko et al. 2023), certified accuracy and radius, and WeightPGD accuracy under a fixed
row-ℓ1 budget. Kendall's τ of each measure with the gap, over all models and granulated per hyperparameter (Jiang et
al.'s τ within groups of models that differ only in that hyperparameter, averaged over the groups).

Run: ``python examples/generalization_measures.py --out docs/images --json docs/images/generalization_measures.json``
regenerates the full grid of docs/results.md (45 models: 15 configurations × 3 seeds; about 5 minutes on one CPU
core); ``--quick`` runs 8 models with fewer draws and steps (under a minute), ``--smoke`` 2 models (for the tests).
Prints markdown tables; writes the plot to ``--out`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPGD, WeightRobustTrainer
from art_weightpert.data import load_digits_data
from art_weightpert.metrics import (
    certified_weight_radius,
    generalization_bound,
    pac_bayes_bound,
    weight_certified_accuracy,
    weight_sharpness,
)
from art_weightpert.zoo import DIGITS_EPS, digits_mlp


@dataclass(frozen=True)
class Config:
    width: int = 64
    depth: int = 2
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    n_train: int = 1347
    lam: float = 0.0


BASE = Config()
FULL_GRID = {
    "width": [16, 256],
    "depth": [1, 4],
    "lr": [1e-3, 1e-2],
    "batch_size": [16, 256],
    "weight_decay": [1e-4, 5e-4],
    "n_train": [337, 674],
    "lam": [0.1, 1.0],
}
CRITERION = 0.01  # training cross-entropy at which training stops (Jiang et al.'s criterion)
BUDGET = PerturbationBudget(DIGITS_EPS, norm="row_l1")  # certification / WeightPGD / paper bound budget
RHO_WORST, RHO_AVERAGE = 0.05, 0.2  # adaptive ℓ∞ sharpness radius; adaptive Gaussian noise level

# measure name -> expected sign of its correlation with the gap (+1: larger measure, larger gap)
MEASURES = {
    "paper_bound": +1,
    "paper_bound_certified": +1,
    "rademacher_term": +1,
    "margin_loss": +1,
    "certified_margin_loss": +1,
    "sum_op_norms": +1,
    "prod_op_norms": +1,
    "pac_bayes_sigma": -1,
    "pac_bayes_mag_sigma": -1,
    "pac_bayes_bound": +1,
    "pac_bayes_mag_bound": +1,
    "sharpness_worst": +1,
    "sharpness_average": +1,
    "certified_accuracy": -1,
    "certified_radius": -1,
    "pgd_accuracy": -1,
}


def train(config: Config, seed: int, x: np.ndarray, y: np.ndarray, max_epochs: int):
    """Adam (with L2 weight decay) until the training cross-entropy reaches CRITERION (or max_epochs); robust training
    with WeightRobustTrainer when λ > 0 (λ warmed up over 5 epochs). Returns the classifier, the initial weights and
    the number of epochs."""
    model = digits_mlp((config.width,) * config.depth, bias=False, seed=seed)
    init = {name: p.detach().clone().numpy() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10, optimizer=optimizer, clip_values=(0, 1))
    x_t, y_t = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(seed)
    trainer, epochs = None, 0
    if config.lam > 0:
        trainer = WeightRobustTrainer(clf, BUDGET, lam=config.lam, warmup=5, verbose=False)
        trainer.fit(x, y, batch_size=config.batch_size, nb_epochs=5)
        trainer.set_params(warmup=0)
        epochs = 5
    while epochs < max_epochs:
        with torch.no_grad():
            model.eval()
            if nn.functional.cross_entropy(model(x_t), y_t).item() <= CRITERION:
                break
        if trainer is not None:
            trainer.fit(x, y, batch_size=config.batch_size, nb_epochs=1)
        else:
            model.train()
            for idx in torch.randperm(len(x_t)).split(config.batch_size):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_t[idx]), y_t[idx]).backward()
                optimizer.step()
        epochs += 1
    model.eval()
    return clf, init, epochs


def error_and_loss(clf: PyTorchWeightClassifier, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        out = clf.base_model(torch.as_tensor(x))
        labels = torch.as_tensor(y)
        return float((out.argmax(1) != labels).double().mean()), float(nn.functional.cross_entropy(out, labels))


def measure(clf, init, x_train, y_train, fast: bool) -> dict[str, float]:
    """Every measure of one model, from its training set only."""
    n_sub = 150 if fast else 300
    x_sub, y_sub = x_train[:n_sub], y_train[:n_sub]
    bound = generalization_bound(clf, x_train, y_train, BUDGET, margin=1.0)
    draws = 4 if fast else 10
    pb = pac_bayes_bound(clf, x_train, y_train, initial_weights=init, nb_samples=draws)
    pb_mag = pac_bayes_bound(clf, x_train, y_train, magnitude_aware=True, initial_weights=init, nb_samples=draws)
    worst = weight_sharpness(clf, x_train, y_train, RHO_WORST, kind="worst", max_iter=5 if fast else 10)
    average = weight_sharpness(clf, x_train, y_train, RHO_AVERAGE, kind="average", nb_samples=draws)
    pgd = WeightPGD(clf, BUDGET, max_iter=5 if fast else 20, verbose=False)
    pgd_clf = pgd.generate_estimator(x_sub, y_sub)
    return {
        "paper_bound": bound["total"],
        "paper_bound_certified": bound["total_certified"],
        "rademacher_term": bound["rademacher_term"],
        "margin_loss": bound["empirical_margin_loss"],
        "certified_margin_loss": bound["certified_margin_loss"],
        "sum_op_norms": float(np.sum(bound["operator_norms"])),
        "prod_op_norms": float(np.prod(bound["operator_norms"])),
        "pac_bayes_sigma": pb["sigma"],
        "pac_bayes_mag_sigma": pb_mag["sigma"],
        "pac_bayes_bound": pb["bound"],
        "pac_bayes_mag_bound": pb_mag["bound"],
        "sharpness_worst": worst["loss_increase"],
        "sharpness_average": average["loss_increase"],
        "certified_accuracy": weight_certified_accuracy(clf, x_sub, y_sub, BUDGET),
        "certified_radius": float(np.mean(certified_weight_radius(clf, x_sub, y_sub, BUDGET))),
        "pgd_accuracy": float(np.mean(pgd_clf.predict(x_sub).argmax(1) == y_sub)),
    }


def kendall(a, b) -> float:
    tau = kendalltau(a, b).statistic
    return float(tau) if np.isfinite(tau) else 0.0


def analyse(rows: list[dict], varied: list[str]) -> dict[str, dict[str, float]]:
    """Kendall's τ of each measure with the error gap (and the loss gap): overall and granulated per hyperparameter
    (τ within each group of models equal in every other hyperparameter and seed, averaged over the groups)."""
    out = {}
    for name in MEASURES:
        values = [r[name] for r in rows]
        result = {"error_gap": kendall(values, [r["gap_error"] for r in rows])}
        result["loss_gap"] = kendall(values, [r["gap_loss"] for r in rows])
        same_n = [r for r in rows if r["n_train"] == BASE.n_train]  # without the training-set size's own effect
        result["error_gap_fixed_n"] = kendall([r[name] for r in same_n], [r["gap_error"] for r in same_n])
        for hp in varied:
            taus = []
            for seed in sorted({r["seed"] for r in rows}):
                group = [r for r in rows if r["seed"] == seed and r["varied"] in (hp, "base")]
                if len(group) > 1:
                    taus.append(kendall([r[name] for r in group], [r["gap_error"] for r in group]))
            result[hp] = float(np.mean(taus)) if taus else float("nan")
        result["granulated_mean"] = float(np.nanmean([result[hp] for hp in varied]))
        out[name] = result
    return out


def table(taus: dict, varied: list[str]) -> str:
    head = ["measure", "sign", "τ error gap", "τ loss gap", "τ error gap, n fixed", *varied, "Ψ (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in sorted(taus.items(), key=lambda kv: -MEASURES[kv[0]] * kv[1]["error_gap"]):
        cells = [res["error_gap"], res["loss_gap"], res["error_gap_fixed_n"], *(res[hp] for hp in varied)]
        cells.append(res["granulated_mean"])
        lines.append(
            f"| {name} | {'+' if MEASURES[name] > 0 else '−'} | " + " | ".join(f"{c:+.2f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], taus: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    best = sorted(MEASURES, key=lambda n: -MEASURES[n] * taus[n]["error_gap"])[:4]
    best = best[:3] + (["paper_bound"] if "paper_bound" not in best[:3] else best[3:4])
    fig, axes = plt.subplots(1, len(best), figsize=(4.2 * len(best), 3.6))
    groups = sorted({r["varied"] for r in rows})
    colors = dict(zip(groups, plt.cm.tab10.colors))
    for ax, name in zip(axes, best):
        for g in groups:
            sel = [r for r in rows if r["varied"] == g]
            ax.scatter([r[name] for r in sel], [r["gap_error"] for r in sel], color=colors[g], label=g, s=22)
        ax.set_xlabel(name)
        ax.set_title(f"τ = {taus[name]['error_gap']:+.2f}")
        values = np.array([r[name] for r in rows])
        if values.min() > 0 and values.max() > 30 * values.min():
            ax.set_xscale("log")
    axes[0].set_ylabel("test − train error")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 models, fewer draws and steps (under 2 minutes)")
    parser.add_argument("--smoke", action="store_true", help="2 models, minimal settings (for the tests)")
    parser.add_argument("--out", default=None, help="folder of the plot (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write every model's measures and the τ tables to this file")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="art-weightpert-")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_data()
    if args.smoke:
        grid, seeds, max_epochs = {"n_train": [168]}, [0], 30
    elif args.quick:
        grid, seeds, max_epochs = {k: v[-1:] for k, v in FULL_GRID.items()}, [0], 150
    else:
        grid, seeds, max_epochs = FULL_GRID, [0, 1, 2], 400
    fast = args.quick or args.smoke
    base = replace(BASE, n_train=337) if args.smoke else BASE
    runs = [("base", base)] + [(hp, replace(base, **{hp: v})) for hp, values in grid.items() for v in values]
    rows = []
    for seed in seeds:
        for varied, config in runs:
            t0 = time.perf_counter()
            xs, ys = x_train[: config.n_train], y_train[: config.n_train]
            clf, init, epochs = train(config, seed, xs, ys, max_epochs)
            train_err, train_loss = error_and_loss(clf, xs, ys)
            test_err, test_loss = error_and_loss(clf, x_test, y_test)
            row = {"varied": varied, "seed": seed, **asdict(config), "epochs": epochs, "train_loss": train_loss}
            row.update(train_error=train_err, test_error=test_err, gap_error=test_err - train_err)
            row.update(gap_loss=test_loss - train_loss, **measure(clf, init, xs, ys, fast))
            rows.append(row)
            elapsed = time.perf_counter() - t0
            print(f"seed {seed} {varied:12} epochs {epochs:3d} train CE {train_loss:.4f} gap {row['gap_error']:+.3f}"
                  f" ({elapsed:.1f}s)", flush=True)  # fmt: skip
    varied = list(grid)
    taus = analyse(rows, varied)
    print("\n## Models\n")
    cols = ["varied", "seed", "epochs", "train_loss", "gap_error", "gap_loss", *MEASURES]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    print(f"\n## Kendall's τ with the gap ({len(rows)} models)\n")
    print(table(taus, varied))
    name = "generalization_measures" + ("_quick" if fast else "") + ".png"
    plot(rows, taus, os.path.join(out, name))
    print(f"\nplot: {os.path.join(out, name)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": rows, "kendall_tau": taus, "criterion": CRITERION}, f, indent=1)
    print(f"total time: {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
