"""
Reproduce, on scikit-learn's digits, the kind of evidence Tsai et al. (NeurIPS 2021) use to validate their analysis of
weight perturbations (docs/theory.md): bias-free ReLU MLPs 64-128-64-10 trained with the robust loss of §7 for several λ
(η from the paper's closed-form bound, formula B, and from our interval bound) and several μ (operator-norm
regularisation), next to ART's ``AdversarialTrainerAWPPyTorch`` (adversarial weight perturbation) on the same data.

For every model: clean train/test accuracy; test accuracy under ``RandomWeightPerturbation`` and universal
``WeightPGD`` over a grid of row-ℓ1 radii ε; certified accuracy (``paper`` and ``interval``) over the same grid; the
largest margin change a per-sample weight attack finds, as a share of the certified bound (it must stay ≤ 1: the
bounds are sound); and the generalization gap (train − test) with and without weight perturbation, next to the terms
of ``generalization_bound`` (docs/theory.md §6). Writes ``results.md``, ``results.json`` and PNG plots into ``--out``.

Run (full: 741 s measured on a busy 2-core machine; results in docs/results.md)::

    python examples/reproduce_paper.py --out reproduce-paper-results

``--quick`` (under 2 minutes): fewer epochs, a coarser ε grid, weaker attacks, one AWP setting.

| Paper link: https://arxiv.org/abs/2103.02200
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.defences.trainer import AdversarialTrainerAWPPyTorch

from art_weightpert import (
    PerturbationBudget,
    RandomWeightPerturbation,
    WeightPerturbationCertifier,
    WeightPGD,
    WeightRobustTrainer,
)
from art_weightpert.attacks.per_sample import PerSampleWeightPGD
from art_weightpert.data import load_digits_data
from art_weightpert.metrics import generalization_bound
from art_weightpert.zoo import DIGITS_RECIPE, digits_mlp, make_classifier

SETTINGS = {
    "full": {
        "epochs": 40,
        "warmup": 15,
        "eps_grid": [0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2],
        "pgd_iter": 20,
        "random_samples": 10,
        "margin_points": 100,
        "margin_iter": 50,
        "margin_restarts": 1,
        "awp_gammas": [0.01, 0.03, 0.1],
    },
    "quick": {
        "epochs": 20,
        "warmup": 8,
        "eps_grid": [0.01, 0.05, 0.1, 0.2],
        "pgd_iter": 5,
        "random_samples": 3,
        "margin_points": 25,
        "margin_iter": 20,
        "margin_restarts": 0,
        "awp_gammas": [0.03],
    },
}

# (name, bound, λ, μ): the paper's η (formula B) is orders of magnitude larger than the interval η, so its λ grid is
# shifted down (λ = 1 with formula B already costs most of the clean accuracy).
ROBUST_MODELS = [
    ("standard", "interval", 0.0, 0.0),
    *[(f"interval λ={lam:g}", "interval", lam, 0.0) for lam in (0.3, 1.0, 3.0)],
    *[(f"paper λ={lam:g}", "paper", lam, 0.0) for lam in (0.03, 0.1, 0.3, 1.0)],
    *[(f"norm μ={mu:g}", "interval", 0.0, mu) for mu in (0.001, 0.003, 0.01)],
]
GAMMA = 1.0  # margin γ of the generalization bound
SEED = 0
RECIPE = replace(DIGITS_RECIPE, seed=SEED)  # the digits recipe's model, optimizer, batch size and budget


class CleanInputs(EvasionAttack):
    """An ART ``EvasionAttack`` that returns its inputs unchanged: AWP then trains against weight perturbations only."""

    attack_params: list[str] = []
    _estimator_requirements = ()

    def generate(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> np.ndarray:
        return x.copy()


def accuracy(clf, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(clf.predict(x, batch_size=512).argmax(1) == y))


def train_robust(bound: str, lam: float, mu: float, data, budget, settings) -> tuple[Any, dict]:
    x_train, y_train, _, _ = data
    clf = RECIPE.classifier()
    trainer = WeightRobustTrainer(clf, budget, lam=lam, mu=mu, method=bound, warmup=settings["warmup"], verbose=False)
    torch.manual_seed(SEED)
    history = trainer.fit(x_train, y_train, batch_size=RECIPE.batch_size, nb_epochs=settings["epochs"])
    return clf, history


def train_awp(gamma: float, data, settings) -> Any:
    """ART's AWP (PGD mode, clean inputs), proxy SGD(lr 0.01), weight perturbation after a quarter of the epochs."""
    x_train, y_train, _, _ = data
    clf = RECIPE.classifier()
    proxy_model = digits_mlp(RECIPE.hidden, seed=SEED)
    proxy = make_classifier(proxy_model, (64,))
    proxy._optimizer = torch.optim.SGD(proxy_model.parameters(), lr=0.01)  # AWP's usual proxy optimizer
    trainer = AdversarialTrainerAWPPyTorch(
        clf, proxy, CleanInputs(estimator=clf), mode="PGD", gamma=gamma, beta=6.0, warmup=settings["epochs"] // 4
    )
    np.random.seed(SEED)  # AWP shuffles with numpy's global generator
    torch.manual_seed(SEED)
    with contextlib.redirect_stderr(io.StringIO()):  # ART's AWP shows a progress bar that cannot be turned off
        trainer.fit(x_train, y_train, batch_size=RECIPE.batch_size, nb_epochs=settings["epochs"])
    return clf


def evaluate(clf, data, budget: PerturbationBudget, settings) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    out: dict[str, Any] = {
        "train_accuracy": accuracy(clf, x_train, y_train),
        "test_accuracy": accuracy(clf, x_test, y_test),
    }
    curves = {key: [] for key in ("pgd", "random", "certified_interval", "certified_paper")}
    for eps in settings["eps_grid"]:
        ball = budget.with_eps(eps)
        delta = WeightPGD(clf, ball, max_iter=settings["pgd_iter"], verbose=False).generate(x_test, y_test)
        curves["pgd"].append(accuracy(clf.with_weight_perturbation(delta), x_test, y_test))
        faults = RandomWeightPerturbation(clf, ball, nb_samples=settings["random_samples"], seed=SEED, verbose=False)
        curves["random"].append(faults.evaluate(x_test, y_test)["mean"])
        for method in ("interval", "paper"):
            certifier = WeightPerturbationCertifier(clf, ball, method=method, verbose=False)
            curves[f"certified_{method}"].append(float(np.mean(certifier.certify(x_test, y_test))))
    out["curves"] = curves
    out["margin_check"] = margin_check(clf, x_test[: settings["margin_points"]], y_test[: settings["margin_points"]],
                                       budget, settings)  # fmt: skip
    out["generalization"] = generalization(clf, data, budget, settings)
    return out


def margin_check(clf, x: np.ndarray, y: np.ndarray, budget: PerturbationBudget, settings) -> dict[str, float]:
    """Largest ``(m − m̂) / (m − bound)`` over samples and classes, ``m̂`` the lowest margin a per-sample weight attack
    finds in the ball: a sound bound keeps it ≤ 1 (docs/theory.md §3 |m̂ − m| ≤ η; §4 m̂ ≥ lower bound)."""
    attack = PerSampleWeightPGD(
        clf, budget, max_iter=settings["margin_iter"], num_random_init=settings["margin_restarts"], verbose=False
    )
    observed = attack.generate(x, y)["margins"]
    model64 = copy.deepcopy(clf.model).to(torch.float64).eval()
    with torch.no_grad():
        logits = model64(torch.as_tensor(x, dtype=torch.float64)).numpy()
    clean = logits[np.arange(len(y)), y][:, None] - logits
    out = {}
    off_label = np.ones_like(clean, dtype=bool)
    off_label[np.arange(len(y)), y] = False
    drop = (clean - observed)[off_label]
    for method in ("paper", "interval"):
        lower = WeightPerturbationCertifier(clf, budget, method=method, verbose=False).margin_lower_bounds(x, y)
        eta = (clean - lower)[off_label]
        ratio = np.where(eta > 0, drop / np.maximum(eta, 1e-300), 0.0)
        out[f"max_ratio_{method}"] = float(ratio.max())
        out[f"median_ratio_{method}"] = float(np.median(ratio))
    out["max_margin_drop"] = float(drop.max())
    return out


def generalization(clf, data, budget: PerturbationBudget, settings) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    out: dict[str, Any] = {}
    for split, (x, y) in {"train": (x_train, y_train), "test": (x_test, y_test)}.items():
        delta = WeightPGD(clf, budget, max_iter=settings["pgd_iter"], verbose=False).generate(x, y)
        out[f"pgd_{split}"] = accuracy(clf.with_weight_perturbation(delta), x, y)
        certifier = WeightPerturbationCertifier(clf, budget, method="interval", verbose=False)
        out[f"certified_{split}"] = float(np.mean(certifier.certify(x, y)))
    bound = generalization_bound(clf, x_train, y_train, budget, margin=GAMMA, method="interval")
    keep = ("empirical_margin_loss", "certified_margin_loss", "rademacher_term", "confidence_term", "total",
            "total_certified", "operator_norms")  # fmt: skip
    out["bound"] = {k: bound[k] for k in keep}
    return out


# ---------------------------------------------------------------------------------------------------- reporting
def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1e4 or (0 < abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def write_markdown(path: str, results: dict, settings: dict, budget: PerturbationBudget, command: str) -> None:
    eps = budget.eps
    grid = settings["eps_grid"]
    i_eps = grid.index(eps)
    i_2eps = grid.index(2 * eps) if 2 * eps in grid else None
    models = results["models"]
    lines = [
        "# Weight-perturbation robustness on digits: reproduction run",
        "",
        f"Command: `{command}` ({results['mode']} settings; {results['seconds']:.0f} s on "
        f"{results['threads']} CPU thread(s)).",
        "",
        "Budget: row-ℓ1 (the paper's norm) of absolute radius ε on every weight of every layer; "
        f"reference ε = {eps:g}. "
        f"Models: bias-free ReLU MLP 64-128-64-10, Adam lr 3e-3, batch 128, {settings['epochs']} epochs "
        f"(λ warm-up {settings['warmup']} epochs), seed {SEED}. Test set: {results['n_test']} points.",
        "",
        f"## Summary at ε = {eps:g}",
        "",
        "| model | train acc | test acc | certified (interval) | certified (paper) | WeightPGD ε | "
        + ("WeightPGD 2ε | " if i_2eps is not None else "")
        + "random ε | Σ‖W‖_op∞ |",
        "|---|---|---|---|---|---|" + ("---|" if i_2eps is not None else "") + "---|---|",
    ]
    for name, r in models.items():
        c = r["curves"]
        row = [name, fmt(r["train_accuracy"]), fmt(r["test_accuracy"]), fmt(c["certified_interval"][i_eps]),
               fmt(c["certified_paper"][i_eps]), fmt(c["pgd"][i_eps])]  # fmt: skip
        if i_2eps is not None:
            row.append(fmt(c["pgd"][i_2eps]))
        row += [fmt(c["random"][i_eps]), fmt(sum(r["generalization"]["bound"]["operator_norms"]), 1)]
        lines.append("| " + " | ".join(row) + " |")
    for key, title in (
        ("certified_interval", "Certified accuracy (interval, THEORY §4)"),
        ("certified_paper", "Certified accuracy (paper, formula B, THEORY §3)"),
        ("pgd", "Accuracy under universal WeightPGD"),
        ("random", "Mean accuracy under random perturbations (uniform in the ball)"),
    ):
        lines += ["", f"## {title} over ε", "", "| model | " + " | ".join(f"{e:g}" for e in grid) + " |",
                  "|---|" + "---|" * len(grid)]  # fmt: skip
        for name, r in models.items():
            lines.append("| " + name + " | " + " | ".join(fmt(v) for v in r["curves"][key]) + " |")
    lines += [
        "",
        f"## Soundness: largest observed margin drop / certified bound at ε = {eps:g}",
        "",
        "Per-sample weight PGD (each sample its own Δ in the ball) on the first "
        f"{settings['margin_points']} test points; ratio = (m − m̂) / (m − lower bound) over every sample and class. "
        "A sound bound keeps every ratio ≤ 1.",
        "",
        "| model | max ratio (paper) | max ratio (interval) | median ratio (interval) | largest drop |",
        "|---|---|---|---|---|",
    ]
    for name, r in models.items():
        m = r["margin_check"]
        lines.append(f"| {name} | {fmt(m['max_ratio_paper'])} | {fmt(m['max_ratio_interval'])} | "
                     f"{fmt(m['median_ratio_interval'])} | {fmt(m['max_margin_drop'])} |")  # fmt: skip
    lines += [
        "",
        f"## Generalization at ε = {eps:g} (margin γ = {GAMMA:g}, δ = 0.05)",
        "",
        "Gaps are train − test accuracy: clean, under universal WeightPGD (generated on each split), and certified "
        "(interval). The bound's terms (THEORY §6) are for the error of every network in the ball: certified-margin "
        "loss on the training set + (4K/γ)·R + confidence.",
        "",
        "| model | clean gap | PGD gap | certified gap | certified margin loss | (4K/γ)·R | confidence | bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in models.items():
        g = r["generalization"]
        b = g["bound"]
        lines.append(
            f"| {name} | {fmt(r['train_accuracy'] - r['test_accuracy'])} | {fmt(g['pgd_train'] - g['pgd_test'])} | "
            f"{fmt(g['certified_train'] - g['certified_test'])} | {fmt(b['certified_margin_loss'])} | "
            f"{fmt(b['rademacher_term'])} | {fmt(b['confidence_term'])} | {fmt(b['total_certified'])} |"
        )
    lines += ["", "Plots: `robustness_curves.png`, `tradeoff.png`, `training.png`.", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plots(out: str, results: dict, settings: dict, budget: PerturbationBudget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = settings["eps_grid"]
    models = results["models"]
    colors = dict(zip(models, plt.cm.tab20(np.linspace(0, 1, len(models)))))
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    for ax, (key, title) in zip(
        axes.flat,
        (
            ("certified_interval", "certified accuracy (interval)"),
            ("certified_paper", "certified accuracy (paper, formula B)"),
            ("pgd", "accuracy under universal WeightPGD"),
            ("random", "accuracy under random perturbations"),
        ),
    ):
        for name, r in models.items():
            style = "--" if name.startswith(("paper", "AWP")) else (":" if name.startswith("norm") else "-")
            ax.plot(grid, r["curves"][key], style, color=colors[name], marker="o", markersize=3, label=name)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.axvline(budget.eps, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("row-ℓ1 radius ε")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robustness_curves.png"), dpi=110)
    plt.close(fig)

    i_eps = grid.index(budget.eps)
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, r in models.items():
        ax.scatter(r["test_accuracy"], r["curves"]["certified_interval"][i_eps], color=colors[name])
        ax.annotate(name, (r["test_accuracy"], r["curves"]["certified_interval"][i_eps]), fontsize=7)
    ax.set_xlabel("clean test accuracy")
    ax.set_ylabel(f"certified accuracy (interval) at ε = {budget.eps:g}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, r in models.items():
        h = r.get("history")
        if not h:
            continue
        for ax, key in zip(axes, ("ce", "robust", "norm")):
            ax.plot(h["epoch"], h[key], color=colors[name], label=name)
    for ax, title in zip(axes, ("cross-entropy", "robust term (mean hinge)", "Σ_k ‖W^k‖_op∞")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training.png"), dpi=110)
    plt.close(fig)


def report(start: float, name: str, result: dict, i_eps: int) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {name}: test accuracy {result['test_accuracy']:.3f}, certified "
          f"(interval) {result['curves']['certified_interval'][i_eps]:.3f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--out", default="reproduce-paper-results", help="output folder")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    settings = SETTINGS[mode]
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and it leaves the other cores free
    logging.getLogger("art").setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    data = load_digits_data(seed=SEED)
    budget = RECIPE.budget()
    results: dict[str, Any] = {"mode": mode, "settings": settings, "budget": budget.to_dict(), "models": {}}
    for name, bound, lam, mu in ROBUST_MODELS:
        clf, history = train_robust(bound, lam, mu, data, budget, settings)
        results["models"][name] = {"bound": bound, "lam": lam, "mu": mu, **evaluate(clf, data, budget, settings)}
        results["models"][name]["history"] = history
        report(start, name, results["models"][name], settings["eps_grid"].index(budget.eps))
    for gamma in settings["awp_gammas"]:
        name = f"AWP γ={gamma:g}"
        clf = train_awp(gamma, data, settings)
        results["models"][name] = {"gamma": gamma, **evaluate(clf, data, budget, settings)}
        report(start, name, results["models"][name], settings["eps_grid"].index(budget.eps))
    results["seconds"] = time.perf_counter() - start
    results["threads"] = torch.get_num_threads()
    results["n_test"] = int(len(data[2]))
    command = "python examples/reproduce_paper.py" + (" --quick" if args.quick else "") + f" --out {args.out}"
    write_markdown(os.path.join(args.out, "results.md"), results, settings, budget, command)
    write_plots(args.out, results, settings, budget)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    worst = max(max(r["margin_check"]["max_ratio_paper"], r["margin_check"]["max_ratio_interval"])
                for r in results["models"].values())  # fmt: skip
    verdict = "sound" if worst <= 1 else "BOUND VIOLATED"
    print(f"wrote {args.out}/results.md, results.json and 3 plots in {results['seconds']:.0f} s; "
          f"largest margin-drop / bound ratio: {worst:.3f} ({verdict})")  # fmt: skip
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
