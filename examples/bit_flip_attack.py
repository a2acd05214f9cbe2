"""
Bit flips in the quantized weights of a digits classifier: quantize it to 8 bits, attack it with the bit-flip attack
(untargeted, then targeted to one class), and compare with random bit faults. Runs in a few seconds on a CPU.

    python examples/bit_flip_attack.py
"""

from __future__ import annotations

import numpy as np
import torch
from art.attacks.evasion import FastGradientMethod

from art_weightpert import zoo
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.data import load_digits_data
from art_weightpert.quantization import QuantizedWeights


def accuracy(classifier, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(classifier.predict(x).argmax(1) == y))


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data()
    classifier = zoo.make_classifier(zoo.digits_mlp(bias=False, seed=0), (64,))
    zoo.train_standard(classifier, x_train, y_train, nb_epochs=20)

    # The deployed model: 8-bit two's complement codes, one scale per weight tensor.
    quantized = QuantizedWeights.from_estimator(classifier, n_bits=8, granularity="tensor")
    deployed = quantized.apply(classifier)  # a new estimator; `classifier` keeps its float weights
    print(f"float accuracy {accuracy(classifier, x_test, y_test):.3f}, 8-bit {accuracy(deployed, x_test, y_test):.3f}")
    print(f"{quantized.nb_bits_total} bits could flip")

    # The attacker knows the model and holds 128 training images.
    idx = np.random.default_rng(0).choice(len(x_train), 128, replace=False)
    attack = BitFlipAttack(classifier, max_flips=20, verbose=False)
    flips = attack.generate(x_train[idx], y_train[idx])
    attacked = attack.quantized_.flip(flips).apply(classifier)
    print(f"BFA: {len(flips)} flipped bits -> test accuracy {accuracy(attacked, x_test, y_test):.3f}")
    for flip in flips[:3]:
        print(f"  {flip.param_name}{list(flip.index)} bit {flip.bit}")

    faults = RandomBitFlips(classifier, nb_flips=len(flips), nb_samples=20, seed=0, verbose=False)
    stats = faults.evaluate(x_test, y_test)
    print(f"{len(flips)} random flips: accuracy {stats['mean']:.3f} ± {stats['std']:.3f} over 20 draws")
    print("  per bit position: " + ", ".join(f"{b}: {v['mean']:.3f}" for b, v in stats["per_bit"].items()))

    # Targeted (T-BFA): every input to class 3.
    targeted = BitFlipAttack(classifier, max_flips=10, targeted=True, verbose=False)
    to_three = targeted.generate_estimator(x_train[idx], 3)
    print(f"T-BFA, 10 flips: {np.mean(to_three.predict(x_test).argmax(1) == 3):.3f} of the test set classified as 3")

    # Every ART tool works on the quantized (and on the attacked) estimator.
    x_adv = FastGradientMethod(deployed, eps=0.1).generate(x_test)
    print(f"ART FGSM (eps 0.1) on the 8-bit model: accuracy {accuracy(deployed, x_adv, y_test):.3f}")


if __name__ == "__main__":
    main()
