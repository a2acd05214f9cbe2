"""The ``art-weightpert`` command line, driven as a subprocess: the demo's report, the user-model path of ``evaluate``
(TorchScript file, pickled module, ``module:callable``), ``train``, and one-line errors with their exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from art_weightpert import PerturbationBudget
from art_weightpert.cli import main
from art_weightpert.cli.parser import REPORT_METHODS as METHODS
from art_weightpert.cli.report import evaluate_model
from art_weightpert.metrics import certified_weight_radius, weight_certified_accuracy, weight_robustness_curve
from art_weightpert.zoo import make_classifier

REPORT_KEYS = {"schema", "command", "versions", "seeds", "settings", "data", "budget", "eps_grid", "methods", "models"}
MODEL_KEYS = {"clean_accuracy", "curves", "unavailable", "certified_radius", "seconds"}


def run_cli(*args: str, cwd: str | os.PathLike | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``art-weightpert ARGS`` in a fresh interpreter (the package's ``cli`` module, as the console script does)."""
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    command = [sys.executable, "-m", "art_weightpert.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single line of stderr (asserts there is exactly one)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def read_report(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert (folder / "report.md").read_text().startswith("# art-weightpert report")
    return report


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    result = run_cli("demo", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, tiny_mlp_classifier, digits):
    """A trained 64-16-10 MLP saved three ways (TorchScript, whole-module pickle, state_dict for a module:callable)
    and an .npz of 120 test points with the training split."""
    folder = tmp_path_factory.mktemp("user")
    x_train, y_train, x_test, y_test = digits
    model = tiny_mlp_classifier.model
    torch.jit.save(torch.jit.script(model), folder / "model_ts.pt")
    torch.save(model.state_dict(), folder / "weights.pt")
    np.savez(folder / "data.npz", x=x_test[:120], y=y_test[:120], x_train=x_train[:300], y_train=y_train[:300])
    np.savez(folder / "test_only.npz", x=x_test[:120], y=y_test[:120])
    (folder / "user_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def mlp():
                model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
                model.load_state_dict(torch.load("weights.pt", weights_only=True))
                return model

            class Residual(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = nn.Linear(64, 64)
                    self.head = nn.Linear(64, 10)

                def forward(self, x):
                    return self.head(torch.relu(self.inner(x)) + x)

            def residual():
                torch.manual_seed(0)
                return Residual()

            class Gated(Residual):
                def forward(self, x):
                    return self.head(torch.relu(self.inner(x)) * x)

            def gated():
                torch.manual_seed(0)
                return Gated()

            def broken():
                raise RuntimeError("the model factory crashed")
            """
        )
    )
    return folder


# ---------------------------------------------------------------------------------------------------- demo
def test_demo_quick_writes_report_json_markdown_and_png_plots(demo_report):
    import matplotlib.image

    out, result = demo_report
    report = read_report(out)
    assert report["command"].startswith("demo --quick")
    assert set(report["models"]) == {"standard", "robust"}
    assert report["budget"]["norm"] == "row_l1" and report["eps_grid"][0] == 0.0
    assert {"art_weightpert", "torch", "adversarial_robustness_toolbox", "numpy", "python"} <= set(report["versions"])
    assert report["seeds"] and report["methods"] == list(METHODS)
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    for name in report["plots"].values():
        assert (out / name).is_file() and f"]({name})" in (out / "report.md").read_text()
    assert "Model 'robust'" in result.stdout and "report.md" in result.stdout
    assert "bit_flips.png" in report["plots"].values()


def test_demo_report_reads_well(demo_report):
    """Settings with readable labels, the training ε stated, every section explained, bit flips of both models."""
    out, result = demo_report
    markdown = (out / "report.md").read_text()
    for raw in ("mu: 0.0", "test_points: None", "lam:", "eps_multiples_of_training_eps"):
        assert raw not in markdown, raw
    assert "WeightRobustTrainer at ε = 0.1 (row_l1 ball" in markdown
    assert "training budget (robust model): ε = 0.1, row_l1 ball" in markdown
    assert "test points evaluated: 200" in markdown
    assert "accuracies are shares of the test points" in markdown and "in the units of the ε grid" in markdown
    assert markdown.count("### Bit flips") == 2 and "## Bit flips across models" in markdown
    assert "Bit flips (8-bit" in result.stdout


def test_demo_bit_flips_show_whether_robust_training_changes_the_flips_needed(demo_report):
    report = read_report(demo_report[0])
    for name, entry in report["models"].items():
        flips = entry["bit_flips"]
        assert flips["flips"] == [1, 2, 5, 10] and len(flips["bfa_flips"]) == 10, name
        assert flips["n_bits"] == 8 and flips["quantized_accuracy"] == pytest.approx(entry["clean_accuracy"], abs=0.02)
        # the attack is stronger than random flips of the same number of bits
        assert flips["bfa_accuracy"][-1] < flips["random_mean"][-1] - 0.05, name
        assert set(flips["bit_sensitivity"]) == {str(b) for b in range(8)}
        assert {"layer", "index", "bit", "old_value", "new_value"} <= set(flips["bfa_flips"][0])
    standard, robust = (report["models"][m]["bit_flips"] for m in ("standard", "robust"))
    assert robust["bfa_accuracy"][-1] > standard["bfa_accuracy"][-1]  # measured: 0.825 against 0.525 after 10 flips


def test_demo_numbers_are_consistent(demo_report):
    report = read_report(demo_report[0])
    n_eps = len(report["eps_grid"])
    for name, entry in report["models"].items():
        assert MODEL_KEYS <= set(entry)
        assert set(entry["curves"]) == set(METHODS), entry["unavailable"]
        assert all(len(curve) == n_eps for curve in entry["curves"].values())
        clean = entry["clean_accuracy"]
        assert clean > 0.85, name
        for i in range(n_eps):
            pgd = entry["curves"]["pgd"][i]
            for method in ("paper", "interval", "linear"):
                # a certified point survives every perturbation of the ball, WeightPGD's one included
                assert entry["curves"][method][i] <= pgd + 1e-12, (name, method, i)
            assert pgd <= clean + 1e-12
        assert entry["curves"]["interval"][0] == pytest.approx(clean)
        radii = entry["certified_radius"]["interval"]["values"]
        assert len(radii) == report["data"]["n_test"]
    at_budget = report["eps_grid"].index(report["budget"]["eps"])
    robust, standard = report["models"]["robust"], report["models"]["standard"]
    assert robust["curves"]["interval"][at_budget] > standard["curves"]["interval"][at_budget] + 0.2
    assert robust["history"] and len(robust["history"]["loss"]) == report["settings"]["epochs"]
    for entry in report["models"].values():  # the histogram's misclassified bar
        assert sum(not c for c in entry["correct"]) == round((1 - entry["clean_accuracy"]) * len(entry["correct"]))


# ---------------------------------------------------------------------------------------------------- evaluate
def test_report_entry_is_the_public_robustness_curve(tiny_mlp_classifier, digits):
    """Every number of a report's model entry is what the public metrics give for the same settings."""
    _, _, x_test, y_test = digits
    x, y = x_test[:60], y_test[:60]
    budget = PerturbationBudget(0.02, "inf")
    grid = [0.0, 0.01, 0.03]
    entry = evaluate_model(tiny_mlp_classifier, x, y, budget, grid, METHODS, pgd_steps=3, random_samples=3, seed=4)
    curve = weight_robustness_curve(
        tiny_mlp_classifier, x, y, [budget.with_eps(e) for e in grid], methods=METHODS,
        pgd_params={"max_iter": 3}, random_params={"nb_samples": 3, "seed": 4}, seed=4,
    )  # fmt: skip
    assert entry["curves"] == curve["accuracies"] and not entry["unavailable"]
    assert entry["random_min"] == curve["random_min"] and entry["random_std"] == curve["random_std"]
    for method in ("paper", "interval"):
        radii = certified_weight_radius(tiny_mlp_classifier, x, y, budget, method=method)
        values = [np.inf if v is None else v for v in entry["certified_radius"][method]["values"]]
        np.testing.assert_array_equal(values, radii)
    assert set(entry["seconds"]) == set(METHODS) - {"clean"}


def certified_accuracies(model_module, folder: Path, report: dict, method: str) -> list[float]:
    """``weight_certified_accuracy`` called directly at every ε of the report's grid."""
    with np.load(folder / "data.npz") as data:
        x, y = data["x"], data["y"]
    classifier = make_classifier(model_module, (64,))
    out = []
    for eps in report["eps_grid"]:
        budget = PerturbationBudget(eps, report["budget"]["norm"], relative=report["budget"]["relative"])
        out.append(weight_certified_accuracy(classifier, x, y, budget, method=method))
    return out


def test_evaluate_torchscript_model_matches_weight_certified_accuracy(user_files, tiny_mlp_classifier, tmp_path):
    out = tmp_path / "report"
    args = ["--data", str(user_files / "data.npz"), "--eps", "0", "0.002", "0.005", "--out", str(out)]
    result = run_cli("evaluate", "--model", str(user_files / "model_ts.pt"), *args, "--pgd-steps", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    report = read_report(out)
    (entry,) = report["models"].values()
    assert report["eps_grid"] == [0.0, 0.002, 0.005]
    assert report["data"]["input_shape"] == [64] and report["data"]["nb_classes"] == 10
    assert "torchscript" in entry["description"].lower()
    for method in ("paper", "interval"):
        expected = certified_accuracies(tiny_mlp_classifier.model, user_files, report, method)
        assert entry["curves"][method] == pytest.approx(expected, abs=1e-12)
    assert entry["curves"]["interval"][-1] < entry["clean_accuracy"]  # the grid reaches where certificates fail
    bound = entry["generalization_bound"]
    assert bound["n_samples"] == 300 and bound["total"] > bound["empirical_margin_loss"]
    assert len(list(out.glob("*.png"))) >= 2


def test_evaluate_module_callable_matches_weight_certified_accuracy(user_files, tiny_mlp_classifier, tmp_path):
    out = tmp_path / "report"
    result = run_cli(
        "evaluate", "--model", "user_models:mlp", "--data", "test_only.npz", "--norm", "row_l1", "--eps", "0.01",
        "0.05", "--methods", "clean", "interval", "linear", "--out", str(out), "--quiet", cwd=user_files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = read_report(out)
    entry = report["models"]["user_models:mlp"]
    assert set(entry["curves"]) == {"clean", "interval", "linear"}
    assert entry["generalization_bound"] is None
    for method in ("interval", "linear"):
        expected = certified_accuracies(tiny_mlp_classifier.model, user_files, report, method)
        assert entry["curves"][method] == pytest.approx(expected, abs=1e-12)


def test_evaluate_unsupported_model_still_reports_attacks(user_files, tmp_path):
    out = tmp_path / "report"
    result = run_cli(
        "evaluate", "--model", "user_models:gated", "--data", "test_only.npz", "--eps", "0.01", "--pgd-steps", "3",
        "--random-samples", "2", "--methods", "clean", "random", "pgd", "interval", "--out", str(out), "--quiet",
        cwd=user_files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (entry,) = read_report(out)["models"].values()
    assert set(entry["curves"]) == {"clean", "random", "pgd"}
    assert "combines branches" in entry["unavailable"]["interval"]
    assert "unavailable" in (out / "report.md").read_text().lower()
    assert "interval" in result.stderr  # the user is told on the console too


def test_evaluate_residual_model_reports_certificates_and_paper_unavailable(user_files, tmp_path):
    out = tmp_path / "report"
    result = run_cli(
        "evaluate", "--model", "user_models:residual", "--data", "test_only.npz", "--eps", "0", "0.001",
        "--methods", "clean", "paper", "interval", "linear", "--out", str(out), "--quiet", cwd=user_files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (entry,) = read_report(out)["models"].values()
    assert set(entry["curves"]) == {"clean", "interval", "linear"}
    assert "chains" in entry["unavailable"]["paper"]


def test_evaluate_pickled_module_warns_before_loading(user_files, tmp_path, monkeypatch, capsys):
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 10)), tmp_path / "whole.pt")
    out = tmp_path / "report"
    monkeypatch.chdir(user_files)
    argv = ["evaluate", "--model", str(tmp_path / "whole.pt"), "--data", "test_only.npz", "--eps", "0", "0.01",
            "--methods", "clean", "interval", "--out", str(out), "--quiet"]  # fmt: skip
    with pytest.warns(UserWarning, match="runs the pickled code"):
        assert main(argv) == 0, capsys.readouterr().err
    (entry,) = read_report(out)["models"].values()
    assert "pickle" in entry["description"] and set(entry["curves"]) == {"clean", "interval"}


def test_evaluate_torchscript_with_an_unsupported_call_reports_clean_accuracy_only(user_files, tmp_path, capsys):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x) * 2.0

    torch.jit.save(torch.jit.script(Scaled()), tmp_path / "scaled.pt")
    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(tmp_path / "scaled.pt"), "--data", str(user_files / "test_only.npz"),
            "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (entry,) = read_report(out)["models"].values()
    assert list(entry["curves"]) == ["clean"]
    assert "aten::mul" in entry["unavailable"]["interval"]


# ---------------------------------------------------------------------------------------------------- train
def test_train_saves_exported_program_and_history(user_files, tmp_path, capsys):
    model_path = tmp_path / "robust.pt2"
    result = run_cli(
        "train", "--data", str(user_files / "data.npz"), "--out", str(model_path), "--hidden", "16", "--epochs", "3",
        "--warmup", "1", "--eps", "0.05", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "robust.history.json" in result.stdout
    program = torch.export.load(model_path)  # the preferred format, with a dynamic batch size
    assert program.module()(torch.zeros(5, 64)).shape == (5, 10)
    history = json.loads((tmp_path / "robust.history.json").read_text())
    assert history["saved_as"].startswith("torch.export")
    assert history["budget"]["eps"] == 0.05 and history["budget"]["norm"] == "row_l1"
    assert history["trainer"]["warmup"] == 1 and history["epochs"] == 3
    assert len(history["history"]["loss"]) == 3 and 0 <= history["final"]["test_accuracy"] <= 1
    # the saved model is the trained one: evaluate reads it back with the same accuracy
    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(model_path), "--data", str(user_files / "data.npz"), "--norm", "row_l1",
            "--eps", "0.05", "--methods", "clean", "interval", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (entry,) = read_report(out)["models"].values()
    assert entry["clean_accuracy"] == pytest.approx(history["final"]["test_accuracy"])


def test_train_residual_model_as_pt2_then_evaluate_certifies_it(user_files, tmp_path, capsys):
    model_path = tmp_path / "residual.pt2"
    result = run_cli(
        "train", "--model", "user_models:residual", "--data", "data.npz", "--out", str(model_path), "--epochs", "1",
        "--warmup", "0", "--eps", "0.01", "--batch-size", "100", "--quiet", cwd=user_files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(model_path), "--data", str(user_files / "test_only.npz"), "--eps", "0", "0.001",
            "--methods", "clean", "interval", "linear", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    (entry,) = read_report(out)["models"].values()
    assert set(entry["curves"]) == {"clean", "interval", "linear"} and not entry["unavailable"]
    assert "exported" in entry["description"] and "rebuilt" in entry["description"]
    assert entry["curves"]["interval"][0] == pytest.approx(entry["clean_accuracy"])


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, code, words",
    [
        (["--model", "missing.pt", "--data", "test_only.npz"], 2, ["not found", "missing.pt"]),
        (["--model", "model_ts.pt", "--data", "missing.npz"], 2, ["not found", "missing.npz"]),
        (["--model", "model_ts.pt", "--data", "no_xy.npz"], 2, ["no_xy.npz", "'x'", "'y'"]),
        (["--model", "model_ts.pt", "--data", "images.npz"], 2, ["shape (1, 8, 8)"]),
        (["--model", "model_ts.pt", "--data", "test_only.npz", "--eps", "-0.1"], 2, ["--eps", "non-negative"]),
        (["--model", "user_models:broken", "--data", "test_only.npz"], 1, ["RuntimeError", "factory crashed"]),
    ],
    ids=["missing-model", "missing-data", "npz-without-x-y", "shape-mismatch", "negative-eps", "failure"],
)
def test_errors_give_exit_code_and_one_line(user_files, args, code, words):
    x = np.load(user_files / "test_only.npz")["x"]
    np.savez(user_files / "no_xy.npz", inputs=x)
    np.savez(user_files / "images.npz", x=x.reshape(-1, 1, 8, 8), y=np.zeros(len(x), dtype=np.int64))
    result = run_cli("evaluate", *args, "--out", "unused", cwd=user_files, timeout=120)
    assert result.returncode == code
    line = error_line(result)
    assert line.startswith("art-weightpert evaluate: ")
    for word in words:
        assert word in line
    assert not (user_files / "unused").exists()


BAD_TARGET = ["--backdoor-target", "10"]


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (["evaluate", "--data", "x.npz"], 2, ["--model"]),
        (["evaluate", "--model", "m.pt", "--data", "d.npz", "--eps", "nan"], 2, ["--eps"]),
        (["evaluate", "--model", "m.pt", "--data", "d.npz", "--norm", "l7"], 2, ["--norm", "l7"]),
        (["evaluate", "--model", "model_ts.pt", "--data", "test_only.npz", "--layers", "9"], 2, ["'9'", "'0'", "'2'"]),
        (["evaluate", "--model", "weights.pt", "--data", "test_only.npz"], 2, ["state_dict"]),
        (["evaluate", "--model", "user_models:nothing", "--data", "test_only.npz"], 2, ["nothing"]),
        (["evaluate", "--model", "model_ts.pt", "--data", "labels.npz"], 2, ["label 12", "10 classes"]),
        (["train", "--out", "m.pt", "--epochs", "0"], 2, ["--epochs"]),
        (["train", "--out", "no/such/folder/m.pt"], 2, ["does not exist"]),
        (["train", "--out", "m.bin"], 2, ["--out m.bin", ".pt2"]),
        (["train", "--out", "m.pt", "--norm", "l2"], 2, ["--eps is required"]),
        (["evaluate", "--model", "m.pt", "--data", "d.npz", "--n-bits", "1"], 2, ["--n-bits", "2 to 16"]),
        (["evaluate", "--model", "m.pt", "--data", "d.npz", "--granularity", "row"], 2, ["--granularity", "row"]),
        (
            ["evaluate", "--model", "model_ts.pt", "--data", "test_only.npz", "--bit-flips", "2"] + BAD_TARGET,
            2,
            ["--backdoor-target 10", "10 classes"],
        ),
        (["demo", "--out", "user_models.py"], 2, ["not a folder"]),
        (["launch"], 2, ["invalid choice"]),
    ],
)
def test_more_usage_errors_in_process(user_files, monkeypatch, capsys, argv, code, words):
    x = np.load(user_files / "test_only.npz")["x"]
    np.savez(user_files / "labels.npz", x=x[:5], y=np.array([0, 1, 2, 12, 3]))
    monkeypatch.chdir(user_files)
    try:
        returned = main(argv)
    except SystemExit as exit_:  # argparse errors
        returned = exit_.code
    assert returned == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0]


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
