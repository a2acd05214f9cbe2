"""Models from where users keep them (:mod:`art_weightpert.loading`): residual networks saved with ``torch.export``
(``.pt2``) and TorchScript (traced, scripted) are rebuilt as eager modules with the saved parameter names and the
same outputs, which the reader reads and the certificates certify exactly as the eager original; bad files give clear
errors; ``train``'s model files by extension."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import PerturbationBudget, UnsupportedModelError
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.cli.inputs import save_model
from art_weightpert.cli.parser import UsageError
from art_weightpert.loading import ModelSpecError, check_same_outputs, load_model, load_model_record
from art_weightpert.network import read_network
from art_weightpert.resnets import digits_resnet
from art_weightpert.zoo import make_classifier


class PreActBlock(nn.Module):
    """A pre-activation residual block (He et al. 2016b) with batch norm; a 1x1-conv shortcut when the shape
    changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Three pre-activation blocks of width 8 on 3x32x32 inputs, a spatial mean and a flattening view."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(
            PreActBlock(width, width), PreActBlock(width, 2 * width, 2), PreActBlock(2 * width, 2 * width)
        )
        self.bn = nn.BatchNorm2d(2 * width)
        self.act = nn.ReLU6()
        self.drop = nn.Dropout(0.1)
        self.linear = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(self.conv1(x))))
        out = out.mean((2, 3))
        return self.linear(self.drop(out.view(out.size(0), -1)))


def warmed(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """``model`` in eval mode with non-trivial batch-norm statistics."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand((16, *input_shape)) * 2 - 0.5)
    return model.eval()


MODELS = {
    "digits_resnet": (lambda: digits_resnet(), (1, 8, 8)),
    "preact_resnet": (lambda: PreActResNet(), (3, 32, 32)),
}


def save(model: nn.Module, input_shape: tuple[int, ...], fmt: str, folder) -> str:
    """``model`` saved as ``fmt``: ``"exported"`` (dynamic batch), ``"traced"`` or ``"scripted"`` TorchScript."""
    x = torch.rand((4, *input_shape))
    path = str(folder / f"{fmt}.{'pt2' if fmt == 'exported' else 'pt'}")
    if fmt == "exported":
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(model, x) if fmt == "traced" else torch.jit.script(model), path)
    return path


CASES = [
    ("digits_resnet", "exported"),
    ("digits_resnet", "traced"),
    ("preact_resnet", "exported"),
    ("preact_resnet", "traced"),
    ("preact_resnet", "scripted"),
]


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def saved(request, tmp_path_factory):
    """``(eager original, input shape, path of the saved model)``."""
    name, fmt = request.param
    build, input_shape = MODELS[name]
    model = warmed(build(), input_shape)
    return model, input_shape, save(model, input_shape, fmt, tmp_path_factory.mktemp(f"{name}-{fmt}"))


# ------------------------------------------------------------------------------------------------ residual rebuilds
def test_saved_residual_network_is_rebuilt_with_its_names_and_outputs(saved):
    model, input_shape, path = saved
    x = torch.rand((5, *input_shape), generator=torch.Generator().manual_seed(1))
    rebuilt = load_model(path, example=x)
    assert isinstance(rebuilt, torch.fx.GraphModule) and not rebuilt.training
    assert type(rebuilt).__name__ == type(model).__name__
    assert sorted(dict(rebuilt.named_parameters())) == sorted(dict(model.named_parameters()))  # layer1.0.conv1.weight
    for name, value in model.state_dict().items():
        if "num_batches_tracked" not in name:
            assert torch.equal(rebuilt.state_dict()[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-6, atol=1e-6)
    network = read_network(rebuilt, input_shape)
    assert not network.is_chain
    kinds = [[type(layer).__name__ for layer in net.layers] for net in (network, read_network(model, input_shape))]
    assert [k for k in kinds[0] if k != "Flatten"] == [k for k in kinds[1] if k != "Flatten"]  # mean + view: 2
    first_conv = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "." in name)
    assert PerturbationBudget(1e-4, "inf", layers=[first_conv]).layer_names(rebuilt) == [first_conv]


@pytest.mark.parametrize("method", ["interval", "linear"])
def test_rebuilt_residual_network_certifies_as_the_eager_original(saved, method):
    model, input_shape, path = saved
    rebuilt = load_model(path)
    x = np.random.default_rng(0).random((6, *input_shape), dtype=np.float32)
    for eps in (1e-4, 1e-7):  # none certified (random weights), all certified
        budget = PerturbationBudget(eps, norm="inf")
        results = []
        for module in (model, rebuilt):
            classifier = make_classifier(module, input_shape)
            certifier = WeightPerturbationCertifier(classifier, budget, method, verbose=False)
            results.append((certifier.certify(x), certifier.margin_lower_bounds(x)))
        (certified, bounds), (certified_rebuilt, bounds_rebuilt) = results
        np.testing.assert_array_equal(certified_rebuilt, certified)
        np.testing.assert_allclose(bounds_rebuilt, bounds, rtol=1e-9, atol=1e-12)
    assert certified.all()


def test_load_model_record_says_how_the_model_was_read(saved):
    _, _, path = saved
    loaded = load_model_record(path)
    assert loaded.eager and loaded.unsupported_reason is None and loaded.scripted is not None
    assert loaded.kind == ("exported" if path.endswith(".pt2") else "torchscript")
    assert "rebuilt" in loaded.note


def every_layer_kind() -> nn.Module:
    """A chain of every standard layer the rebuilds know, on 3x8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=1, padding=1, bias=False), nn.Hardtanh(-1.0, 2.0), nn.AvgPool2d(2), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Identity(), nn.Linear(8, 6),
        nn.Sigmoid(), nn.Linear(6, 3),
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["exported", "traced", "scripted"])
def test_every_standard_layer_is_rebuilt(fmt, tmp_path):
    model = warmed(every_layer_kind(), (3, 8, 8))
    x = torch.rand(5, 3, 8, 8)
    rebuilt = load_model(save(model, (3, 8, 8), fmt, tmp_path), example=x)
    assert sorted(dict(rebuilt.named_parameters())) == sorted(dict(model.named_parameters()))
    torch.testing.assert_close(rebuilt(x), model(x))
    kinds = [[type(layer).__name__ for layer in read_network(m, (3, 8, 8)).layers] for m in (rebuilt, model)]
    assert kinds[0] == kinds[1]


def test_in_place_calls_read_their_result(tmp_path):
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            h.relu_()  # the result is not rebound: later reads of h see it
            return self.fc2(h + x)

    model = InPlace().eval()
    x = torch.randn(4, 6)
    for fmt in ("exported", "traced", "scripted"):
        rebuilt = load_model(save(model, (6,), fmt, tmp_path), example=x)
        torch.testing.assert_close(rebuilt(x), model(x))


def test_a_rebuild_that_differs_from_the_saved_model_is_refused(tmp_path):
    model = warmed(digits_resnet(), (1, 8, 8))
    path = save(model, (1, 8, 8), "exported", tmp_path)
    rebuilt = load_model(path)
    with torch.no_grad():
        rebuilt.fc.bias += 1.0
    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        check_same_outputs(rebuilt, model, torch.rand(3, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ other formats
def test_pickled_module_and_callable(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(4, 3))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.warns(UserWarning, match="runs the pickled code"):
        loaded = load_model(tmp_path / "whole.pt")
    assert isinstance(loaded, nn.Sequential) and torch.equal(loaded[0].weight, model[0].weight)
    (tmp_path / "my_models.py").write_text("from torch import nn\n\ndef small():\n    return nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    assert isinstance(load_model("my_models:small"), nn.Linear)


@pytest.mark.parametrize(
    "content, error, words",
    [
        (None, FileNotFoundError, ["not found", "nowhere"]),
        (b"not a model", ModelSpecError, ["cannot load model file"]),
        ("state_dict", ModelSpecError, ["state_dict"]),
        ("fake.pt2", ModelSpecError, ["not a torch.export archive"]),
        ("callable", ModelSpecError, ["no attribute"]),
        ("scaled", UnsupportedModelError, ["aten::mul", "supported:"]),
    ],
    ids=["missing", "garbage", "state-dict", "fake-pt2", "missing-callable", "unsupported-op"],
)
def test_bad_models_give_clear_errors(tmp_path, content, error, words):
    path = str(tmp_path / "nowhere.pt")
    if isinstance(content, bytes):
        (tmp_path / "garbage.pt").write_bytes(content)
        path = str(tmp_path / "garbage.pt")
    elif content == "state_dict":
        path = str(tmp_path / "weights.pt")
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif content == "fake.pt2":
        path = str(tmp_path / "fake.pt2")
        torch.save({"a": torch.zeros(1)}, path)
    elif content == "callable":
        path = "art_weightpert.zoo:no_such_model"
    elif content == "scaled":

        class Scaled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = nn.Linear(4, 2)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.linear(x) * 2.0

        path = str(tmp_path / "scaled.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(Scaled()), path)
        record = load_model_record(path)
        assert not record.eager and "aten::mul" in record.unsupported_reason  # still evaluated clean by the CLI
    with pytest.raises(error) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_model(path)
    for word in words:
        assert word in str(caught.value)


def test_onnx_without_onnx2torch_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # importing it fails, as when the extra is not installed
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(ModelSpecError, match=r"onnx2torch.*torchvision.*\.pt2"):
        load_model(tmp_path / "model.onnx")


def test_onnx_chain_reads_as_the_exported_model(tmp_path):
    """Runs where onnx2torch (and the torchvision it imports) is installed; skipped otherwise."""
    pytest.importorskip("onnx2torch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    x = torch.rand(4, 64)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13, dynamic_axes={"x": {0: "batch"}},
                      input_names=["x"])  # fmt: skip
    loaded = load_model(path)
    torch.testing.assert_close(loaded(x), model(x))
    assert [type(layer).__name__ for layer in read_network(loaded, (64,)).layers] == ["Affine", "Activation", "Affine"]


# ------------------------------------------------------------------------------------------------ saving (train)
def test_save_model_writes_what_the_extension_says(tmp_path):
    model = warmed(digits_resnet(widths=(4, 8)), (1, 8, 8))
    example = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    x = torch.as_tensor(example)
    assert save_model(model, str(tmp_path / "m.pt2"), example).startswith("torch.export")
    program = torch.export.load(tmp_path / "m.pt2")
    torch.testing.assert_close(program.module()(x), model(x))  # a dynamic batch dimension: 3, not 2
    torch.testing.assert_close(load_model(tmp_path / "m.pt2")(x), model(x))
    for extension in (".pt", ".pth"):
        with pytest.warns(UserWarning, match="runs pickled code"):
            assert "torch.save" in save_model(model, str(tmp_path / f"m{extension}"), example)
        reloaded = torch.load(tmp_path / f"m{extension}", weights_only=False)
        torch.testing.assert_close(reloaded(x), model(x))
    with pytest.raises(UsageError, match=r"\.pt2"):
        save_model(model, str(tmp_path / "m.bin"), example)
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize("activation", [nn.ELU(0.5), nn.Softplus(2.0, 5.0), nn.SiLU(), nn.GELU()], ids=repr)
def test_smooth_activations_are_read_from_every_format(activation, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), activation, nn.Linear(6, 3)).eval()
    x = torch.randn(5, 8)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "model.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation
        torch.jit.save(torch.jit.trace(model, x), tmp_path / "traced.pt")
        torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    for name in ("model.pt2", "traced.pt", "scripted.pt"):
        loaded = load_model(tmp_path / name)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        layer = read_network(loaded, (8,)).layers[1]
        assert layer.kind == type(activation).__name__.lower(), name
