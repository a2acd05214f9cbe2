"""`art-weightpert evaluate` on deployed int8 models: a pickled torch.ao dynamic model and a torchao weight-only model
are read as deployed (their codes are what the bit flips hit), and the report's accuracies are the models' own."""

from __future__ import annotations

import copy
import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from art_weightpert.cli import main


def _quantized_mlp(tiny_mlp_classifier, kind: str) -> nn.Module:
    model = copy.deepcopy(tiny_mlp_classifier.model).eval()
    if kind == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    torchao_quantization = pytest.importorskip("torchao.quantization")
    torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
    return model


def _saved(qmodel: nn.Module, tiny_mlp_classifier, kind: str, folder) -> str:
    """The --model argument: torch.ao models pickle whole; torchao's tensor subclasses do not, so its users pass a
    ``module:callable`` that quantizes their float model."""
    if kind == "torch.ao":
        torch.save(qmodel, folder / "int8.pt")
        return str(folder / "int8.pt")
    torch.save(tiny_mlp_classifier.model.state_dict(), folder / "weights.pt")
    (folder / "int8_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            def mlp():
                model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
                model.load_state_dict(torch.load("weights.pt", weights_only=True))
                quantize_(model, Int8WeightOnlyConfig())
                return model.eval()
            """
        )
    )
    return "int8_models:mlp"


@pytest.mark.parametrize("kind", ["torch.ao", "torchao"])
def test_evaluate_reads_a_deployed_int8_model(kind, tiny_mlp_classifier, digits, tmp_path, monkeypatch):
    _, _, x, y = digits
    x, y = x[:100], y[:100]
    qmodel = _quantized_mlp(tiny_mlp_classifier, kind)
    monkeypatch.chdir(tmp_path)
    spec = _saved(qmodel, tiny_mlp_classifier, kind, tmp_path)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    argv = ["evaluate", "--model", spec, "--data", str(tmp_path / "data.npz"), "--out",
            str(tmp_path / "out"), "--eps", "0", "--bit-flips", "2", "--random-samples", "2",
            "--no-bit-flip-threats", "--threads", "1"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the pickle warning
        assert main(argv) == 0
    (entry,) = json.loads((tmp_path / "out" / "report.json").read_text())["models"].values()
    with torch.no_grad():
        own = float((qmodel(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean())
    flips = entry["bit_flips"]
    assert flips["quantized_accuracy"] == pytest.approx(own, abs=1e-12)  # the deployed model, not a re-quantization
    assert flips["bfa_accuracy"][-1] < own
    codes = {r["param"] for r in flips["bfa_flips"]}
    assert codes <= {"0.weight", "2.weight"}
    if kind == "torch.ao":  # activations quantized at run time: the bounds refuse it, with the reason in the report
        assert any("quantizes its activations" in reason for reason in entry["unavailable"].values())
