"""
Benchmark of the bit-flip attack on the digits MLP and CNN of ``art_weightpert.zoo`` (8-bit, per tensor, attack batch
of 128 training points):

* seconds per flip of :class:`.BitFlipAttack` as a ratio to one forward+backward pass on the attack batch;
* test accuracy after 1, 2, 5, 10, 20 flips, next to the same number of random flips (mean over 20 draws), for the
  default attack and for the paper's setting (``top_k=10``, one candidate per layer);
* the number of flips needed to bring the test accuracy to 15% and to 11%.

Run: ``python benchmarks/bench_bit_flip.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from art_weightpert import zoo
from art_weightpert.attacks.base import accuracy_with_deltas
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.data import load_digits_data
from art_weightpert.estimators.weight_classifier import eval_mode

COUNTS = (1, 2, 5, 10, 20)
MAX_FLIPS = 60


def trained_models() -> dict[str, tuple]:
    """The zoo's digits MLP (128-64, bias-free) and CNN, trained 20 epochs with :func:`zoo.train_standard`."""
    x_train, y_train, x_test, y_test = load_digits_data()
    images_train, _, images_test, _ = load_digits_data(flatten=False)
    mlp = zoo.make_classifier(zoo.digits_mlp(bias=False, seed=0), (64,))
    zoo.train_standard(mlp, x_train, y_train, nb_epochs=20)
    cnn = zoo.make_classifier(zoo.digits_cnn(seed=0), (1, 8, 8))
    zoo.train_standard(cnn, images_train, y_train, nb_epochs=20)
    return {"mlp": (mlp, x_train, y_train, x_test, y_test), "cnn": (cnn, images_train, y_train, images_test, y_test)}


def forward_backward_seconds(classifier, x: np.ndarray, y: np.ndarray, repeats: int = 50) -> float:
    """Median time of one forward+backward pass on ``(x, y)`` with respect to the weights."""
    x_t, y_t = classifier.prepare_inputs(x, y)
    model = classifier.base_model
    names = [n for n in classifier.perturbable_parameters if n.endswith("weight")]
    times = []
    with eval_mode(model):
        for _ in range(repeats):
            probes = {n: torch.zeros_like(model.get_parameter(n), requires_grad=True) for n in names}
            start = time.perf_counter()
            loss = F.cross_entropy(classifier.logits(x_t, probes), y_t)
            torch.autograd.grad(loss, list(probes.values()))
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def accuracy_curve(classifier, attack: BitFlipAttack, flips: list, x: np.ndarray, y: np.ndarray) -> list[float]:
    """Test accuracy after the first k flips, k = 0 .. len(flips)."""
    x_t, y_t = classifier.prepare_inputs(x, y)
    state, out = attack.quantized_, []
    out.append(accuracy_with_deltas(classifier, x_t, y_t, state.deltas(classifier), 512))
    for flip in flips:
        state = state.flip([flip])
        out.append(accuracy_with_deltas(classifier, x_t, y_t, state.deltas(classifier), 512))
    return out


def first_below(curve: list[float], level: float) -> str:
    k = next((k for k, a in enumerate(curve) if a <= level), None)
    return f">{len(curve) - 1}" if k is None else str(k)


def main() -> None:
    torch.set_num_threads(1)
    for name, (clf, x_train, y_train, x_test, y_test) in trained_models().items():
        idx = np.random.default_rng(0).choice(len(x_train), 128, replace=False)
        x_attack, y_attack = x_train[idx], y_train[idx]
        fb = forward_backward_seconds(clf, x_attack, y_attack)
        random = [
            RandomBitFlips(clf, nb_flips=k, nb_samples=20, seed=0, verbose=False).evaluate(
                x_test, y_test, per_bit=False
            )
            for k in COUNTS
        ]
        print(f"\n{name}: float test accuracy {random[0]['clean']:.3f}, 8-bit {random[0]['quantized']:.3f}")
        print("  random flips (mean of 20): " + "  ".join(f"{k}:{r['mean']:.3f}" for k, r in zip(COUNTS, random)))
        for label, params in (
            ("default (top_k=100, nb_candidates=10)", {}),
            ("paper (top_k=10, 1 candidate)", {"top_k": 10, "nb_candidates": 1}),
        ):
            attack = BitFlipAttack(clf, max_flips=MAX_FLIPS, verbose=False, **params)
            start = time.perf_counter()
            flips = attack.generate(x_attack, y_attack)
            per_flip = (time.perf_counter() - start) / max(1, len(flips))
            curve = accuracy_curve(clf, attack, flips, x_test, y_test)
            table = "  ".join(f"{k}:{curve[min(k, len(flips))]:.3f}" for k in COUNTS)
            print(f"  BFA {label}: {table}")
            print(
                f"    flips to 15%: {first_below(curve, 0.15)}, to 11%: {first_below(curve, 0.11)}; "
                f"{per_flip * 1e3:.1f} ms per flip = {per_flip / fb:.1f} x one forward+backward ({fb * 1e3:.2f} ms)"
            )


if __name__ == "__main__":
    main()
