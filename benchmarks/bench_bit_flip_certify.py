"""
Benchmark of :class:`.BitFlipCertifier` on the digits MLP and CNN of ``art_weightpert.zoo`` (8-bit, per tensor, the
first 200 test points):

* certified accuracy at k = 1, 2, 4, 8, 16 flipped bits for ``"interval"`` and ``"linear"``, per layer selection (all
  layers, the first only, the last only);
* the exact k = 1 share from enumeration (:func:`.single_flip_robustness`) and the attack bound: the share of points
  that BFA (:class:`.BitFlipAttack`), run on each point alone, does not misclassify with k flips;
* seconds for the 200 points and per sample as a ratio to a float32 forward pass;
* with ``--dtypes float64 float32``, every certificate in both precisions (float32 with the rounding-error terms of
  docs/theory.md §5), in one run;
* optionally (``--robust``) the same for the MLP trained with :class:`.WeightRobustTrainer` (interval bound, relative
  box of one quantization step, 1/127).

Run: ``python benchmarks/bench_bit_flip_certify.py [--robust] [--dtypes float64 float32]`` (a few minutes on one CPU
core).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_bit_flip import trained_models

from art_weightpert import zoo
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness
from art_weightpert.estimators.weight_classifier import eval_mode
from art_weightpert.quantization import QuantizedWeights

FLIPS = (1, 2, 4, 8, 16)


def forward_seconds(classifier, x: np.ndarray, repeats: int = 50) -> float:
    """Median time of one float32 forward pass of the quantized model on ``x``."""
    deltas = QuantizedWeights.from_estimator(classifier).deltas(classifier)
    x_t, _ = classifier.prepare_inputs(x)
    times = []
    with torch.no_grad(), eval_mode(classifier.base_model):
        for _ in range(repeats):
            start = time.perf_counter()
            classifier.logits(x_t, deltas)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def attack_bound(classifier, x, y, layers) -> list[float]:
    """Per-sample attack bound: the share of points BFA, run on each point alone (stopping once it is misclassified),
    does not break with k flips, for every k of :data:`FLIPS` (an upper bound on the share robust to k flips)."""
    attack = BitFlipAttack(classifier, max_flips=max(FLIPS), layers=layers, stop_accuracy=0.0, verbose=False)
    needed = []
    for i in range(len(x)):
        attack.generate(x[i : i + 1], y[i : i + 1])
        history = [h["accuracy"] for h in attack.history_]
        broken = [j + 1 for j, acc in enumerate(history) if acc == 0]
        needed.append(broken[0] if broken else np.inf)
    pred = QuantizedWeights.from_estimator(classifier).apply(classifier).predict(x).argmax(1)
    needed = np.where(pred == y, np.asarray(needed, dtype=float), 0)
    return [float(np.mean(needed > k)) for k in FLIPS]


def _method_label(method: str, dtype: torch.dtype, dtypes: list) -> str:
    return method if len(dtypes) == 1 else f"{method} ({str(dtype).removeprefix('torch.')})"


def selection_rows(name: str, classifier, x, y, layers, label: str, dtypes: list) -> list[str]:
    """Table rows of one model and layer selection."""
    exact = single_flip_robustness(classifier, x, y, layers=layers).mean()
    bfa = attack_bound(classifier, x, y, layers)
    rows = []
    for method in ("interval", "linear"):
        for dtype in dtypes:
            shares, seconds = [], []
            for k in FLIPS:
                certifier = BitFlipCertifier(classifier, k, layers=layers, method=method, verbose=False, dtype=dtype)
                start = time.perf_counter()
                shares.append(certifier.certify(x, y).mean())
                seconds.append(time.perf_counter() - start)
            cells = " | ".join(f"{s:.3f}" for s in shares)
            times = " / ".join(f"{t:.2f}" for t in seconds)
            shown = _method_label(method, dtype, dtypes)
            rows.append(f"| {name} | {label} | {shown} | {cells} | {exact:.3f} | {times} |")
    cells = " | ".join(f"{a:.3f}" for a in bfa)
    rows.append(f"| {name} | {label} | BFA per sample (upper bound) | {cells} | | |")
    return rows


def timing_rows(name: str, classifier, x, y, dtypes: list) -> list[str]:
    forward = forward_seconds(classifier, x)
    rows = []
    for method in ("interval", "linear"):
        for dtype in dtypes:
            certifier = BitFlipCertifier(classifier, 16, method=method, verbose=False, dtype=dtype)
            certifier.certify(x[:8], y[:8])  # warm-up
            start = time.perf_counter()
            certifier.certify(x, y)
            seconds = time.perf_counter() - start
            label = _method_label(method, dtype, dtypes)
            rows.append(f"| {name} | {label} | {seconds:.2f} | {forward * 1e3:.3f} | {seconds / forward:.0f} |")
    return rows


def robust_rows(x_train, y_train, x, y) -> list[str]:
    """The MLP trained with the interval bound at a relative box of one quantization step."""
    rows = []
    for label, robust in (("standard", False), ("weight-robust", True)):
        classifier = zoo.make_classifier(zoo.digits_mlp(bias=False, seed=0), (64,))
        if robust:
            zoo.train_robust(classifier, x_train, y_train, PerturbationBudget(1 / 127, norm="inf", relative=True))
        else:
            zoo.train_standard(classifier, x_train, y_train, nb_epochs=20)
        accuracy = float(np.mean(classifier.predict(x).argmax(1) == y))
        exact = single_flip_robustness(classifier, x, y).mean()
        flips = BitFlipCertifier(classifier, 4, method="linear", verbose=False).certified_flips(x, y)
        shares = " | ".join(f"{np.mean(flips >= k):.3f}" for k in (1, 2, 4))
        rows.append(f"| {label} | {accuracy:.3f} | {exact:.3f} | {shares} | {np.mean(np.maximum(flips, 0)):.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--robust", action="store_true", help="also compare weight-robust training")
    parser.add_argument("--dtypes", nargs="+", choices=("float64", "float32"), default=["float64"],
                        help="precisions of the certificates (default: float64)")  # fmt: skip
    parser.add_argument("--timing-only", action="store_true", help="only the k = 16 timing table")
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    torch.set_num_threads(1)
    models = trained_models()
    print("| model | flippable layers | method | " + " | ".join(f"k={k}" for k in FLIPS) + " | exact k=1 | seconds |")
    print("|---|---|---|" + "---|" * len(FLIPS) + "---|---|")
    for name, (classifier, _, _, x_test, y_test) in models.items() if not args.timing_only else ():
        x, y = x_test[: args.samples], y_test[: args.samples]
        names = list(QuantizedWeights.from_estimator(classifier).param_names)
        layers = [n.rsplit(".", 1)[0] for n in names]
        for label, selection in (("all", None), ("first", [layers[0]]), ("last", [layers[-1]])):
            for row in selection_rows(name, classifier, x, y, selection, label, dtypes):
                print(row, flush=True)
    print("\n| model | method | seconds (k=16, all layers) | float32 forward (ms) | ratio |")
    print("|---|---|---|---|---|")
    for name, (classifier, _, _, x_test, y_test) in models.items():
        for row in timing_rows(name, classifier, x_test[: args.samples], y_test[: args.samples], dtypes):
            print(row, flush=True)
    if args.robust:
        x_train, y_train, x_test, y_test = models["mlp"][1:]
        print("\n| MLP | test acc | exact k=1 | certified k>=1 | k>=2 | k>=4 | mean certified flips |")
        print("|---|---|---|---|---|---|---|")
        for row in robust_rows(x_train, y_train, x_test[: args.samples], y_test[: args.samples]):
            print(row, flush=True)


if __name__ == "__main__":
    main()
