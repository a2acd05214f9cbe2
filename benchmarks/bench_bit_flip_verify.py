"""
Benchmark of :meth:`.BitFlipCertifier.verify` (docs/theory.md §11) on the digits CNN and MLP of ``art_weightpert.zoo``
(8-bit, per tensor, every layer flippable, the first test points):

* the shares of certified / falsified / unknown samples at ``max_flips`` k (default 2) and the mean seconds per sample
  (one thread), next to the certificate alone (:meth:`.BitFlipCertifier.certify`) and the attack bound: the share of
  points that BFA (:class:`.BitFlipAttack`), run on each point alone, leaves correct with k flips (an upper bound on
  the share robust to k flips);
* every counterexample checked: at most k flips, and the flipped quantized model misclassifies its sample.

Run: ``python benchmarks/bench_bit_flip_verify.py [--samples 200] [--flips 2] [--time-limit 2] [--dtype float32]`` (a
few minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_bit_flip import trained_models

from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.quantization import QuantizedWeights


def attack_share(classifier, x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of the points that BFA, run on each point alone (stopping once it is misclassified), leaves correct."""
    attack = BitFlipAttack(classifier, max_flips=k, stop_accuracy=0.0, verbose=False)
    quantized = QuantizedWeights.from_estimator(classifier)
    alive = []
    for i in range(len(x)):
        flips = attack.generate(x[i : i + 1], y[i : i + 1])
        alive.append(quantized.flip(flips).apply(classifier).predict(x[i : i + 1]).argmax(1)[0] == y[i])
    return float(np.mean(alive))


def checked(classifier, x: np.ndarray, y: np.ndarray, counterexamples: dict, k: int) -> bool:
    """Every counterexample is at most k flips that make the quantized model misclassify its sample."""
    quantized = QuantizedWeights.from_estimator(classifier)
    for i, flips in counterexamples.items():
        pred = quantized.flip(flips).apply(classifier).predict(x[i : i + 1]).argmax(1)[0]
        if len(flips) > k or pred == y[i]:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--flips", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=2.0)
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of the bounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.flips
    models = trained_models()
    print(
        "| model | k | certify: certified | verify: certified | falsified | unknown | s/sample (verify) | "
        "s/sample (certify) | BFA per sample (upper bound) | counterexamples checked |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        classifier, _, _, x_test, y_test = models[name]
        x, y = x_test[: args.samples], y_test[: args.samples]
        certifier = BitFlipCertifier(classifier, k, verbose=False, dtype=getattr(torch, args.dtype))
        start = time.perf_counter()
        certified = certifier.certify(x, y).mean()
        certify_seconds = (time.perf_counter() - start) / len(x)
        start = time.perf_counter()
        result = certifier.verify(x, y, time_limit=args.time_limit)
        verify_seconds = (time.perf_counter() - start) / len(x)
        shares = result.shares()
        bound = attack_share(classifier, x, y, k)
        ok = checked(classifier, x, y, result.counterexamples, k)
        print(
            f"| {name} | {k} | {certified:.3f} | {shares['certified']:.3f} | {shares['falsified']:.3f} | "
            f"{shares['unknown']:.3f} | {verify_seconds:.3f} | {certify_seconds:.3f} | {bound:.3f} | {ok} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
