"""
The user-model path of ``art-weightpert evaluate``: a model saved as TorchScript and data in an ``.npz``.

Trains a small MLP (with biases) on the digits, saves it with ``torch.jit.save(torch.jit.script(model))`` and the
test data with ``np.savez(x=..., y=..., x_train=..., y_train=...)``, then runs the command line on them, exactly as
a user would type it::

    art-weightpert evaluate --model model.pt --data data.npz --norm inf --relative --eps 0 0.005 0.01 0.02

A TorchScript ``nn.Sequential`` of standard layers is rebuilt as the same eager module (its outputs are checked on
the data), so attacks and certificates run on it; the report is written to ``DIR/report`` (``report.md``,
``report.json``, PNG plots).

Run: ``python examples/evaluate_torchscript_model.py [--out DIR]`` (about 20 s on a CPU core; default: a temporary
folder).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from art_weightpert.cli import main as art_weightpert_cli
from art_weightpert.data import load_digits_data
from art_weightpert.zoo import make_classifier, train_standard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="working folder (default: a temporary folder)")
    folder = parser.parse_args().out or tempfile.mkdtemp(prefix="art-weightpert-")
    os.makedirs(folder, exist_ok=True)
    torch.set_num_threads(1)

    # 1. A user's model and data, saved to files.
    x_train, y_train, x_test, y_test = load_digits_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    train_standard(make_classifier(model, input_shape=(64,)), x_train, y_train, nb_epochs=20)
    model_path, data_path = os.path.join(folder, "model.pt"), os.path.join(folder, "data.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks TorchScript as deprecated
        torch.jit.save(torch.jit.script(model.eval()), model_path)
    np.savez(data_path, x=x_test[:200], y=y_test[:200], x_train=x_train, y_train=y_train)

    # 2. The command line on them (the same as typing `art-weightpert evaluate ...` in a shell).
    out = os.path.join(folder, "report")
    argv = ["evaluate", "--model", model_path, "--data", data_path, "--norm", "inf", "--relative",
            "--eps", "0", "0.005", "0.01", "0.02", "--pgd-steps", "10", "--out", out, "--quiet"]  # fmt: skip
    code = art_weightpert_cli(argv)
    if code != 0:
        raise SystemExit(code)

    # 3. Every number of the report is in report.json.
    with open(os.path.join(out, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    (entry,) = report["models"].values()
    print("ε (relative):         ", report["eps_grid"])
    print("certified (interval): ", [round(v, 3) for v in entry["curves"]["interval"]])
    print("WeightPGD:            ", [round(v, 3) for v in entry["curves"]["pgd"]])
    bound = entry["generalization_bound"]
    print(f"generalization bound at ε = {bound['budget_eps']}: {bound['total_certified']:.3g} (standard constants)")
    print("files:", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
