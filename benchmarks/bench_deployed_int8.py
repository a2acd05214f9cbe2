"""
Bit flips on deployed int8 models (docs/models.md, "Deployed int8 models"; one CPU thread): for each deployment path
(``torch.ao`` dynamic, static per-tensor, static per-channel affine; torchao weight-only and dynamic-activation) of a
digits MLP 64-32-10 or a small CNN:

* the quantized model's clean accuracy, BFA's (``BitFlipAttack`` on :meth:`.PyTorchWeightClassifier.from_quantized`)
  accuracy after 1, 2, 4, 8 flips, and random flips (8 flips, 20 draws: mean and minimum);
* ``matches_deployed``: whether each of BFA's accuracies equals the user's quantized model run with the flipped codes
  written into its int8 data (a deep copy);
* ``simulated``: the same BFA on the float model with the attack's own simulated 8-bit quantization (the only option
  before ``from_quantized``): its clean accuracy and its accuracy after 8 flips, for comparison;
* on the weight-only model, the k-flip certificate (``"linear"``) at k = 1 and 2.

Run: ``python benchmarks/bench_deployed_int8.py`` (about a minute). Prints a Markdown table, then one JSON object.
"""

from __future__ import annotations

import copy
import json
import time
import warnings

import numpy as np
import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
from torch import nn

from art_weightpert import zoo
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.data import load_digits_data
from art_weightpert.estimators import PyTorchWeightClassifier

FLIPS = (1, 2, 4, 8)
N_POINTS = 150  # one batch: dynamic activation scales depend on the batch


class StaticCNN(nn.Module):
    """A small CNN with the stubs of eager-mode static quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.flatten, self.fc = nn.Flatten(), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.flatten(self.pool(self.relu(self.conv(self.quant(x)))))))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for start in range(0, len(xt), 128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[start : start + 128]), yt[start : start + 128]).backward()
            optimizer.step()
    return model.eval()


def deployments(mlp: nn.Module, cnn: nn.Module, x_calibration: np.ndarray) -> dict[str, nn.Module]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch.ao dynamic (MLP)"] = tq.quantize_dynamic(copy.deepcopy(mlp), {nn.Linear}, dtype=torch.qint8)
        affine = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_affine)
        for name, observer in (("per-tensor", tq.default_weight_observer), ("per-channel affine", affine)):
            model = copy.deepcopy(cnn)
            model.qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(dtype=torch.quint8), weight=observer)
            prepared = tq.prepare(model)
            prepared(torch.as_tensor(x_calibration, dtype=torch.float32))
            out[f"torch.ao static {name} (CNN)"] = tq.convert(prepared)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    for name, config in (
        ("weight-only", Int8WeightOnlyConfig),
        ("dynamic activations", Int8DynamicActivationInt8WeightConfig),
    ):
        model = copy.deepcopy(mlp)
        quantize_(model, config())
        out[f"torchao {name} (MLP)"] = model
    return out


def with_flips(qmodel: nn.Module, flips) -> nn.Module:
    """A deep copy of ``qmodel`` with the flipped bits written into its int8 data."""
    qmodel = copy.deepcopy(qmodel)
    for flip in flips:
        module = qmodel.get_submodule(flip.param_name.rpartition(".")[0])
        quantized = isinstance(module, (nnq.Linear, nnq.Conv2d))
        codes = (module.weight().int_repr() if quantized else module.weight.qdata).clone()
        pattern = (int(codes[flip.index]) & 0xFF) ^ (1 << flip.bit)
        codes[flip.index] = pattern - 256 if pattern >= 128 else pattern
        if not quantized:
            module.weight.qdata.copy_(codes)
            continue
        weight = module.weight()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            new = torch._make_per_tensor_quantized_tensor(codes, weight.q_scale(), weight.q_zero_point())
        else:
            new = torch._make_per_channel_quantized_tensor(
                codes, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), 0
            )
        module.set_weight_bias(new, module.bias())
    return qmodel


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean())


def measure(name: str, qmodel: nn.Module, float_model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    shape = tuple(x.shape[1:])
    estimator = PyTorchWeightClassifier.from_quantized(qmodel, shape, 10, clip_values=(0.0, 1.0))
    start = time.perf_counter()
    attack = BitFlipAttack(estimator, max_flips=max(FLIPS), batch_size=len(x), verbose=False)
    flips = attack.generate(x, y)
    seconds = time.perf_counter() - start
    history = [h["accuracy"] for h in attack.history_]
    deployed = [accuracy(with_flips(qmodel, flips[:k]), x, y) for k in range(1, len(flips) + 1)]
    draws = RandomBitFlips(estimator, nb_flips=max(FLIPS), nb_samples=20, seed=0, batch_size=len(x), verbose=False)
    random = np.asarray(draws.evaluate(x, y, per_bit=False)["accuracies"])
    simulated_estimator = zoo.make_classifier(copy.deepcopy(float_model), shape)
    simulated = BitFlipAttack(simulated_estimator, max_flips=max(FLIPS), batch_size=len(x), verbose=False)
    simulated.generate(x, y)
    row = {
        "deployment": name,
        "clean": accuracy(qmodel, x, y),
        "bfa": {k: history[k - 1] for k in FLIPS},
        "matches_deployed": history == deployed,
        "bfa_seconds": seconds,
        "random_mean": float(random.mean()),
        "random_min": float(random.min()),
        "simulated_clean": accuracy(simulated.quantized_.apply(simulated_estimator).model, x, y),
        "simulated_bfa_8": simulated.history_[-1]["accuracy"],
    }
    if "weight-only" in name:
        for k in (1, 2):
            certifier = BitFlipCertifier(estimator, max_flips=k, method="linear", verbose=False)
            row[f"certified_k{k}"] = float(np.mean(certifier.certify(x, y)))
    return row


def main() -> None:
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_data()
    images = load_digits_data(flatten=False)
    torch.manual_seed(0)
    mlp = train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x_train, y_train, 20)
    cnn = train(StaticCNN(), images[0], images[1], 15)
    rows = []
    for name, qmodel in deployments(mlp, cnn, images[0][:300]).items():
        is_cnn = "CNN" in name
        x, y = (images[2] if is_cnn else x_test)[:N_POINTS], y_test[:N_POINTS]
        rows.append(measure(name, qmodel, cnn if is_cnn else mlp, x, y))
    print("| deployment | clean | BFA " + " / ".join(map(str, FLIPS)) + " flips | random 8 (mean / min) | equal to the "
          "deployed model | BFA s |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for row in rows:
        bfa = " / ".join(f"{row['bfa'][k]:.3f}" for k in FLIPS)
        random = f"{row['random_mean']:.3f} / {row['random_min']:.3f}"
        print(f"| {row['deployment']} | {row['clean']:.3f} | {bfa} | {random} | {row['matches_deployed']} "
              f"| {row['bfa_seconds']:.1f} |")  # fmt: skip
    print(json.dumps({"rows": rows, "all_match": all(r["matches_deployed"] for r in rows)}, indent=1))


if __name__ == "__main__":
    main()
