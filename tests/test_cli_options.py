"""Options and report lines of the command line a new user asked for: ``--threads`` (applied before any work, split
across ``--nproc`` processes, recorded), ``--nproc`` in the report, what ``--quiet`` hides, plot legends that list
only methods with numbers, and the explanation of all-zero certified columns. In-process (``main([...])``), tiny
runs."""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from art_weightpert.cli import main
from art_weightpert.cli.launch import thread_settings
from art_weightpert.cli.parser import build_parser
from art_weightpert.cli.render import markdown_report, summary_text, zero_certificate_lines
from art_weightpert.cli.report import curve_of
from art_weightpert.metrics.plots import robustness_curves_figure

RESIDUAL = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inner, self.head = nn.Linear(64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.inner(x)) + x)


    def residual():
        return Residual()
    """
)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_mlp_classifier, digits):
    """The trained 64-16-10 MLP as a torch.export program, a residual model as ``module:callable`` and test data."""
    folder = tmp_path_factory.mktemp("cli_options")
    _, _, x_test, y_test = digits
    model = tiny_mlp_classifier.model.cpu().eval()
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "mlp.pt2")
    np.savez(folder / "data.npz", x=x_test[:60], y=y_test[:60])
    (folder / "cli_user_models.py").write_text(RESIDUAL)
    return folder


@pytest.fixture
def in_files(files, monkeypatch):
    """Run in the files' folder (``module:callable`` models are imported from the working directory)."""
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    return files


def evaluate(out: Path, *args: str) -> tuple[dict, str]:
    argv = ["evaluate", "--data", "data.npz", "--out", str(out), "--pgd-steps", "2", "--random-samples", "2", *args]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ --threads
def test_every_command_has_threads_and_quiet():
    parser = build_parser()
    for command in ("demo", "evaluate", "train"):
        options = {a.dest: a for a in parser._subparsers._group_actions[0].choices[command]._actions}
        assert "threads" in options and options["threads"].default is None
        assert "still printed" in options["quiet"].help


@pytest.mark.parametrize(
    ("threads", "nproc", "per_process"), [(None, 1, None), (6, 1, 6), (8, 2, 4), (6, 4, 1), (1, 3, 1)]
)
def test_threads_are_split_across_processes(threads, nproc, per_process):
    args = argparse.Namespace(threads=threads, nproc=nproc)
    thread_settings(args)
    expected_total = torch.get_num_threads() if threads is None else threads
    assert args.threads == expected_total
    assert args.threads_per_process == (max(1, expected_total // nproc) if per_process is None else per_process)
    demo = argparse.Namespace(threads=2)  # demo has no --nproc: one process
    thread_settings(demo)
    assert demo.nproc == 1 and demo.threads_per_process == 2


def test_threads_are_set_before_the_work_recorded_and_restored(in_files, tmp_path, monkeypatch, capsys):
    calls = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), original(n)))
    before = torch.get_num_threads()
    seen = []
    from art_weightpert.cli import commands

    evaluate_model = commands.run_evaluate
    monkeypatch.setitem(
        commands.RUNNERS, "evaluate", lambda args: (seen.append(torch.get_num_threads()), evaluate_model(args))[1]
    )
    report, markdown = evaluate(tmp_path, "--model", "mlp.pt2", "--eps", "0", "0.01", "--methods", "clean",
                                "--threads", "1")  # fmt: skip
    assert calls[0] == 1 and seen == [1]  # set before the command ran
    assert torch.get_num_threads() == before  # and restored for the caller
    settings = report["settings"]
    assert (settings["nproc"], settings["threads"], settings["threads_per_process"]) == (1, 1, 1)
    assert "* processes (--nproc): 1" in markdown and "* torch threads per process: 1" in markdown
    capsys.readouterr()


@pytest.mark.slow
def test_nproc_and_threads_are_recorded_by_a_distributed_run(in_files, tmp_path, capsys):
    report, markdown = evaluate(tmp_path, "--model", "mlp.pt2", "--eps", "0", "0.01", "--methods", "clean", "random",
                                "--nproc", "2", "--threads", "2", "--quiet")  # fmt: skip
    settings = report["settings"]
    assert (settings["nproc"], settings["threads"], settings["threads_per_process"]) == (2, 2, 1)
    assert "* processes (--nproc): 2" in markdown and "* torch threads in all (--threads): 2" in markdown
    assert "Model 'mlp'" in capsys.readouterr().out  # rank 0's tables, --quiet or not


# ------------------------------------------------------------------------------------------------ --quiet
def test_quiet_hides_the_progress_but_prints_warnings_and_the_tables(in_files, tmp_path, capsys, caplog):
    args = ("--model", "cli_user_models:residual", "--eps", "0", "0.001", "--methods", "clean", "paper", "interval")
    evaluate(tmp_path / "loud", *args)
    assert "Evaluating" in capsys.readouterr().err  # the progress bar
    with caplog.at_level(logging.WARNING):
        evaluate(tmp_path / "quiet", *args, "--quiet")
    quiet = capsys.readouterr()
    assert any("certified (paper) unavailable" in r.getMessage() for r in caplog.records)  # warnings stay
    assert "Evaluating" not in quiet.err
    for text in ("Model 'cli_user_models:residual': clean accuracy", "certified (interval)",
                 "certified (paper) unavailable", "Report written to"):  # fmt: skip
        assert text in quiet.out


# ------------------------------------------------------------------------------------------------ plots
def test_the_plot_of_a_residual_network_lists_only_methods_with_numbers(in_files, tmp_path, capsys):
    report, _ = evaluate(tmp_path, "--model", "cli_user_models:residual", "--eps", "0", "0.001", "--quiet")
    (name,) = report["models"]
    assert "paper" in report["models"][name]["unavailable"]
    fig = robustness_curves_figure({name: curve_of(report, name)})
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "certified (paper)" not in labels and "certified (interval)" in labels and "certified (linear)" in labels
    capsys.readouterr()


def test_a_curve_without_any_number_is_not_in_the_legend():
    curve = {
        "eps": [0.0, 0.1],
        "budgets": [{"relative": False}],
        "accuracies": {"clean": [0.9, 0.9], "paper": [None, None], "interval": [0.9, 0.4]},
        "unavailable": {},
    }
    fig = robustness_curves_figure({"m": curve})
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == ["clean", "certified (interval)"]
    assert any("unavailable: certified (paper)" in t.get_text() for t in fig.axes[0].texts)


# ------------------------------------------------------------------------------------------------ all-zero certificates
def test_all_zero_certified_columns_are_explained(in_files, tmp_path, capsys):
    report, markdown = evaluate(tmp_path, "--model", "mlp.pt2", "--eps", "0", "5", "10", "--methods", "clean", "pgd",
                                "interval", "linear")  # fmt: skip
    out = capsys.readouterr().out
    entry = report["models"]["mlp"]
    assert entry["perturbed_layers"] == ["0", "2"]
    assert all(v == 0 for m in ("interval", "linear") for v in entry["curves"][m][1:])
    for text in (markdown, out):
        assert "Every certified column (certified (interval), certified (linear)) is 0 at every ε > 0" in text
        assert "2 perturbed layers (0, 2)" in text and "`--layers NAME ...`" in text and "`--relative`" in text


def test_no_explanation_when_something_is_certified():
    report = {
        "eps_grid": [0.0, 0.1],
        "budget": {"norm": "inf", "layers": None, "relative": True, "include_bias": False},
        "models": {"m": {"clean_accuracy": 0.9, "curves": {"clean": [0.9, 0.9], "interval": [0.9, 0.2],
                                                             "linear": [0.9, 0.0]}}},
    }  # fmt: skip
    assert zero_certificate_lines(report, "m") == []
    report["models"]["m"]["curves"]["interval"] = [0.9, 0.0]
    (line,) = zero_certificate_lines(report, "m")
    assert "`--relative`" not in line  # already relative: not suggested
    report["models"]["m"]["curves"] = {"clean": [0.9, 0.9], "pgd": [0.9, 0.1]}  # no certificate computed
    assert zero_certificate_lines(report, "m") == []


def test_the_summary_and_markdown_share_the_explanation(in_files, tmp_path, capsys):
    report, _ = evaluate(tmp_path, "--model", "mlp.pt2", "--eps", "0", "10", "--methods", "clean", "interval",
                         "--quiet")  # fmt: skip
    capsys.readouterr()
    (line,) = zero_certificate_lines(report, "mlp")
    assert line in summary_text(report) and line in markdown_report(report)


@pytest.mark.parametrize("given, expected", [("float32", torch.float32), (None, None)])
def test_dtype_reaches_the_bit_flip_certificate(monkeypatch, given, expected):
    """``--dtype`` sets the precision of the bit-flip section's certificate too (``None``: the certifier's default)."""
    from art_weightpert.cli import sections
    from art_weightpert.cli.commands import Extras
    from art_weightpert.cli.sections import BitFlipSettings

    seen = {}

    def curve(classifier, x, y, **kwargs):
        seen.update(kwargs)
        return {"bfa_attack_accuracy": [1.0], "quantized_accuracy": 1.0}

    monkeypatch.setattr(sections, "bit_flip_curve", curve)
    args = argparse.Namespace(dtype=given, seed=0, batch_size=8)
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    Extras(BitFlipSettings(1, threats=False)).compute(None, x, y, args, lambda *a: None)
    assert seen["dtype"] is expected and seen["method"] == "linear"
