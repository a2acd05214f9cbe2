"""The report of ``art-weightpert evaluate`` as a person reads it: the optional sections (bit flips, generalization
measures and gap), the generalization bound term by term, each unavailability reason once, readable settings, and
``torch.export`` models (``.pt2``). In-process (``main([...])``) with tiny budgets."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget
from art_weightpert.cli import main
from art_weightpert.cli.render import setting_lines
from art_weightpert.cli.render_sections import (
    bit_flip_comparison,
    bit_flip_lines,
    bound_lines,
    unavailable_by_reason,
    unavailable_lines,
    verdict,
)
from art_weightpert.cli.sections import BitFlipSettings, bit_flip_section, flips_to_halve
from art_weightpert.metrics import bit_flip_curve, weight_certified_accuracy
from art_weightpert.zoo import make_classifier


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mlp_classifier, digits):
    """The trained 64-16-10 MLP as a torch.export program (dynamic batch) and an .npz with a training split."""
    folder = tmp_path_factory.mktemp("report")
    x_train, y_train, x_test, y_test = digits
    model = tiny_mlp_classifier.model.cpu().eval()
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "mlp.pt2")
    np.savez(folder / "data.npz", x=x_test[:100], y=y_test[:100], x_train=x_train[:200], y_train=y_train[:200])
    np.savez(folder / "test_only.npz", x=x_test[:100], y=y_test[:100])
    return folder


def evaluate(folder: Path, out: Path, *args: str) -> tuple[dict, str]:
    assert main(["evaluate", "--data", str(folder / "data.npz"), "--out", str(out), "--quiet", *args]) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_exported_program_is_evaluated_like_the_eager_model(files, tiny_mlp_classifier, tmp_path):
    report, markdown = evaluate(files, tmp_path, "--model", str(files / "mlp.pt2"), "--eps", "0", "0.01",
                                "--methods", "clean", "interval", "--norm", "row_l1")  # fmt: skip
    entry = report["models"]["mlp"]
    assert "exported" in entry["description"] and not entry["unavailable"]
    x, y = np.load(files / "data.npz")["x"], np.load(files / "data.npz")["y"]
    classifier = make_classifier(tiny_mlp_classifier.model.cpu(), (64,))
    expected = [weight_certified_accuracy(classifier, x, y, PerturbationBudget(e, "row_l1")) for e in (0.0, 0.01)]
    assert entry["curves"]["interval"] == pytest.approx(expected, abs=1e-12)
    assert "### Generalization bound" in markdown and "| 2 (`2`) |" in markdown  # layers named as in the model
    assert report["models"]["mlp"]["generalization_bound"]["layers"] == ["0", "2"]


def test_exported_graph_that_cannot_be_rebuilt_gets_clean_accuracy_and_one_reason(files, tmp_path, caplog, capsys):
    class Gated(nn.Module):  # a product of two branches: no layer of the certificates computes it
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.inner(x)) * x)

    program = torch.export.export(Gated(), (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "res.pt2")
    out = tmp_path / "out"
    argv = ["evaluate", "--model", str(tmp_path / "res.pt2"), "--data", str(files / "data.npz"), "--out", str(out),
            "--eps", "0", "0.01", "--bit-flips", "2", "--measures"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    stdout = capsys.readouterr().out
    markdown = (out / "report.md").read_text()
    (entry,) = json.loads((out / "report.json").read_text())["models"].values()
    assert list(entry["curves"]) == ["clean"]
    reason = next(iter(entry["unavailable"].values()))
    assert "mul" in reason
    # each reason once, with everything it affects, the same text in the log, on stdout and in the report
    (line,) = unavailable_lines(entry)
    assert line.startswith("random faults (mean), WeightPGD, certified (paper), certified (interval), certified")
    assert "bit flips, generalization measures unavailable: " in line
    assert markdown.count(reason) == 1 and stdout.count(reason) == 1
    logged = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1 and line in logged[0]


def test_bit_flips_and_measures_sections(files, tmp_path):
    model = str(files / "mlp.pt2")
    report, markdown = evaluate(files, tmp_path, "--model", model, "--eps", "0", "--methods", "clean",
                                "--bit-flips", "3", "--random-samples", "2", "--measures")  # fmt: skip
    entry = report["models"]["mlp"]
    flips = entry["bit_flips"]
    assert flips["flips"] == [1, 2, 3] and len(flips["bfa_flips"]) == 3 and flips["attack_points"] == 128
    assert flips["bfa_accuracy"][-1] < flips["quantized_accuracy"]
    assert report["plots"]["accuracy vs flipped bits"] == "bit_flips.png" and (tmp_path / "bit_flips.png").is_file()
    # the certified curve: 100 test points (at most CERTIFY_POINTS), each in one bin of the certified flips
    assert flips["certify_method"] == "linear" and flips["certified_points"] == 100
    assert list(flips["certified_flips_histogram"]) == ["-1", "0", "1", "2", "3"]
    assert sum(flips["certified_flips_histogram"].values()) == 100
    assert all(c <= b for c, b in zip(flips["certified_accuracy"], flips["bfa_accuracy"]))
    assert "| flips | BFA | random (mean ± std) | certified (100 points) |" in markdown
    assert "| certified flips | misclassified | 0 |" in markdown and "not flips of biases" in markdown
    # the threat and defence rows, each from the library's metrics
    assert flips["float"]["dtype"] == "float32" and flips["float"]["flips"] == [1, 2, 5]
    assert flips["float"]["attack_accuracy"][0] <= flips["float"]["random_mean"][0]
    backdoor = flips["backdoor"]
    assert backdoor["target"] == 0 and 0 < backdoor["nb_flips"] <= 20
    assert backdoor["attack_success_rate"] > backdoor["attack_success_rate_before"]
    assert flips["integrity"]["detection_rate"] >= 0.9 and not flips["integrity"]["false_alarm"]
    assert flips["clipping"]["nb_flips"] == [1, 5, 20] and set(flips["clipping"]) >= {"float", "quantized"}
    for text in ("**Float weights.**", "**Backdoor by flips**", "**What the weight-integrity detector buys**",
                 "**What activation clipping buys**"):  # fmt: skip
        assert text in markdown, text
    measures = entry["measures"]
    assert measures["on"] == "training" and measures["n_samples"] == 200
    assert measures["sharpness_worst"]["loss_increase"] > measures["sharpness_average"]["loss_increase"] > 0
    assert 0 < measures["pac_bayes"]["sigma"] and 0 < measures["pac_bayes_magnitude_aware"]["sigma"]
    gap = measures["gap"]
    assert gap["error_gap"] == pytest.approx(gap["test_error"] - gap["train_error"])
    assert gap["test_error"] == pytest.approx(1 - entry["clean_accuracy"])
    for text in ("### Bit flips", "### Generalization measures", "Generalization gap (test − training)",
                 "nats", "Per-bit sensitivity", "bit 0 is the least significant"):  # fmt: skip
        assert text in markdown, text
    # without a training split the measures use the test data and there is no gap
    out = tmp_path / "test_only"
    argv = ["evaluate", "--model", model, "--data", str(files / "test_only.npz"), "--out", str(out), "--quiet",
            "--eps", "0", "--methods", "clean", "--measures"]  # fmt: skip
    assert main(argv) == 0
    measures = json.loads((out / "report.json").read_text())["models"]["mlp"]["measures"]
    assert measures["on"] == "test" and measures["gap"] is None
    assert "test data (the .npz has no x_train)" in (out / "report.md").read_text()


def test_bit_flip_section_is_bit_flip_curve(tiny_mlp_classifier, digits):
    x_train, y_train, x_test, y_test = digits
    settings = BitFlipSettings(4, n_bits=6, granularity="channel", nb_samples=2)
    assert settings.counts() == [1, 2, 4] and BitFlipSettings(20).counts() == [1, 2, 5, 10, 20]
    section = bit_flip_section(tiny_mlp_classifier, x_test[:80], y_test[:80], (x_train, y_train), settings, seed=3)
    direct = bit_flip_curve(tiny_mlp_classifier, x_test[:80], y_test[:80], flips=[1, 2, 4], x_attack=x_train[:128],
                            y_attack=y_train[:128], n_bits=6, granularity="channel", nb_samples=2, seed=3)  # fmt: skip
    assert {k: section[k] for k in direct} == direct
    assert section["certified_points"] == 80 and sum(section["certified_flips_histogram"].values()) == 80
    plain = bit_flip_section(tiny_mlp_classifier, x_test[:80], y_test[:80], (x_train, y_train),
                             replace(settings, certify_method=None, threats=False), seed=3)  # fmt: skip
    assert {k: section[k] for k in plain} == plain and "certified_accuracy" not in plain
    assert {"float", "backdoor", "integrity", "clipping"} <= set(section) and "backdoor" not in plain
    assert flips_to_halve([0.9, 0.6, 0.4], 0.9) == 3 and flips_to_halve([0.9, 0.8], 0.9) is None


def test_bit_flip_lines_without_or_with_an_unavailable_certificate():
    flips = {"n_bits": 8, "granularity": "tensor", "clean_accuracy": 0.9, "quantized_accuracy": 0.9, "flips": [1, 2],
             "attack_points": 128, "bfa_accuracy": [0.8, 0.7], "random_mean": [0.9, 0.9], "random_std": [0.0, 0.0],
             "flips_to_halve": None, "bfa_flips": [], "bit_sensitivity": {0: 0.9}}  # fmt: skip
    text = "\n".join(bit_flip_lines(flips))
    assert "| flips | BFA | random (mean ± std) |\n" in text and "Certified" not in text
    text = "\n".join(bit_flip_lines({**flips, "certified_unavailable": "R: residual"}))
    assert "No certificate against bit flips for this model: R: residual." in text
    certified = {"certify_method": "linear", "certified_points": 10, "certified_accuracy": [0.7, 0.0],
                 "certified_flips_histogram": {-1: 1, 0: 2, 1: 7, 2: 0}}  # fmt: skip
    text = "\n".join(bit_flip_lines({**flips, **certified}))
    assert "| 1 | 0.800 | 0.900 ± 0.000 | 0.700 |" in text and "none for more than 1" in text
    assert "| points | 1 | 2 | 7 |" in text
    models = {"a": {"bit_flips": {**flips, **certified}}, "b": {"bit_flips": flips}}
    text = "\n".join(bit_flip_comparison(models))
    assert "| certified, 1 flip (10 points) |" in text and "| 0.700 |" in text and "| – |" in text


def test_generalization_bound_names_its_terms_and_says_vacuous():
    bound = {
        "total": 37410.2, "total_certified": 37410.9, "delta": 0.05, "n_samples": 300, "budget_eps": 0.00583,
        "operator_norms": [0.15741000000000002, 0.41976, 23.879680000000004], "eps": [0.01, 0.02, 0.03],
        "margin": 1.0, "empirical_margin_loss": 0.1, "certified_margin_loss": 0.2, "method": "paper",
        "margin_factor": 40.0, "nb_classes": 10, "rademacher_complexity": 935.2, "depth": 3, "input_bound": 1.0,
        "input_dim": 64, "rademacher_term": 37408.0, "confidence_term": 0.0707,
    }  # fmt: skip
    text = "\n".join(bound_lines(bound))
    assert "| 1 | 0.1574 | 0.01 |" in text and "| 3 | 23.88 | 0.03 |" in text  # per layer, rounded
    named = "\n".join(bound_lines({**bound, "layers": ["fc1", "fc2", "out"]}))
    assert "| 1 (`fc1`) | 0.1574 | 0.01 |" in named and "| 3 (`out`) | 23.88 | 0.03 |" in named
    assert "0.15741000000000002" not in text and "3.74e+04 — vacuous (> 1)" in text
    assert "ℓ∞ operator norm" in text and "row-ℓ1 radius" in text and "shares of points" in text
    assert verdict(0.42) == "0.420" and verdict(None) == "n/a"
    assert bound_lines({"unavailable": "a GELU"}) == []


def test_settings_have_readable_labels_and_reasons_are_grouped():
    lines = setting_lines({"mu": 0.0, "test_points": None, "hidden": [128, 64], "pgd_steps": 10})
    assert lines == ["* μ, weight of the operator-norm term: 0", "* test points evaluated: none",
                     "* hidden layer widths: 128, 64", "* WeightPGD steps: 10"]  # fmt: skip
    entry = {
        "unavailable": {"paper": "R", "interval": "R", "linear": "S"},
        "bit_flips": {"unavailable": "R"},
        "measures": {"pac_bayes": {"unavailable": "T"}, "sharpness_worst": {"loss_increase": 0.1}},
    }
    assert unavailable_by_reason(entry) == {
        "R": ["certified (paper)", "certified (interval)", "bit flips"],
        "S": ["certified (linear)"],
        "T": ["PAC-Bayes σ and bound"],
    }


def learnable_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` learnable 3x32x32 images in [0, 1]: a coarse random pattern per class plus pixel noise."""
    coarse = np.random.default_rng(1234).uniform(-1, 1, size=(10, 3, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, 8, 8)))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = 0.5 + 0.15 * patterns[y] + rng.normal(0.0, 0.3, size=(n, 3, 32, 32))
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "images.npz"
    (x_train, y_train), (x, y) = learnable_images(300, 0), learnable_images(200, 1)
    np.savez(path, x_train=x_train, y_train=y_train, x=x, y=y)
    return path


@pytest.mark.parametrize("eps", [["--eps", "0.05"], []], ids=["readme-eps", "default-eps"])
def test_readme_train_command_on_3x32x32_images_ends_well_above_chance(images, tmp_path, eps, capsys):
    """The README's `train --eps 0.05 --norm row_l1 --epochs 20` (and the default ε scaled to the 3,072 inputs)."""
    out = tmp_path / "robust.pt2"
    argv = ["train", "--data", str(images), "--out", str(out), "--norm", "row_l1", "--epochs", "20", "--quiet", *eps]
    assert main(argv) == 0, capsys.readouterr().err
    history = json.loads((tmp_path / "robust.history.json").read_text())
    assert history["final"]["test_accuracy"] > 0.6 and not history["collapsed"]  # chance: about 0.1
    assert history["budget"]["eps"] == (0.05 if eps else 0.0144) and history["trainer"]["warmup"] == 10
    program = torch.export.load(out)
    assert program.module()(torch.zeros(3, 3, 32, 32)).shape == (3, 10)


def test_impossible_eps_is_reported_and_not_saved(images, tmp_path, capsys, caplog):
    out = tmp_path / "collapsed.pt"
    argv = ["train", "--data", str(images), "--out", str(out), "--eps", "50", "--epochs", "6", "--warmup", "1"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--quiet"]) == 3
    err = capsys.readouterr().err
    assert not out.exists() and "NOT saved" in err and "--keep-collapsed" in err
    history = json.loads((tmp_path / "collapsed.history.json").read_text())
    (warning,) = history["warnings"]
    assert history["collapsed"] and history["model_file"] is None and "ε = 50" in warning
    assert sum(warning in r.getMessage() for r in caplog.records) == 1  # logged once, not again as a UserWarning
    assert main([*argv, "--quiet", "--keep-collapsed"]) == 0 and out.exists()
    assert "training collapsed" in capsys.readouterr().out
