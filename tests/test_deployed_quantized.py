"""Deployed int8 models (torch.ao eager mode, torchao) through PyTorchWeightClassifier.from_quantized: the forward,
the deployed codes, the bit-flip attacks' accuracies against the quantized model itself with the flipped codes written
into it, the certificates' soundness on weight-only models and their refusal of activation-quantized ones."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, UnsupportedModelError
from art_weightpert.attacks.bit_flip import BitFlipAttack
from art_weightpert.attacks.random_bit_flips import RandomBitFlips
from art_weightpert.certification import WeightPerturbationCertifier
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.estimators import quantized as quantized_module
from art_weightpert.estimators.quantized import is_quantized_model
from art_weightpert.quantization import QuantizedWeights

TORCH_AO = ("dynamic", "static_tensor", "static_channel")
TORCHAO = ("torchao_weight", "torchao_dynamic")
N_ATTACK = 150  # one batch: dynamic activation scales depend on the batch, so the attacks and the checks share it


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for start in range(0, len(xt), 128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[start : start + 128]), yt[start : start + 128]).backward()
            optimizer.step()
    return model.eval()


class _StaticCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc(self.flatten(self.pool(self.relu(self.conv(self.quant(x)))))))


@pytest.fixture(scope="module")
def float_mlp(digits):
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    return _train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x_train, y_train, 20)


@pytest.fixture(scope="module")
def float_cnn(digits_images):
    x_train, y_train, _, _ = digits_images
    torch.manual_seed(0)
    return _train(_StaticCNN(), x_train, y_train, 15)


def _static(model: nn.Module, x: np.ndarray, weight_observer) -> nn.Module:
    model = copy.deepcopy(model)
    model.qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(dtype=torch.quint8), weight=weight_observer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = tq.prepare(model)
        prepared(torch.as_tensor(x[:300], dtype=torch.float32))
        return tq.convert(prepared)


def _torchao(model: nn.Module, config_name: str) -> nn.Module:
    torchao_quantization = pytest.importorskip("torchao.quantization")
    model = copy.deepcopy(model)
    torchao_quantization.quantize_(model, getattr(torchao_quantization, config_name)())
    return model


@pytest.fixture(scope="module")
def deployed(request, float_mlp, float_cnn, digits, digits_images):
    """``(qmodel, input_shape, x, y)`` of one deployment kind (``x``, ``y``: test points)."""
    kind = request.param
    _, _, x_flat, y = digits
    x_images = digits_images[2]
    if kind == "dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = tq.quantize_dynamic(copy.deepcopy(float_mlp), {nn.Linear}, dtype=torch.qint8)
    elif kind == "static_tensor":
        qmodel = _static(float_cnn, digits_images[0], tq.default_weight_observer)
    elif kind == "static_channel":
        affine = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_affine)
        qmodel = _static(float_cnn, digits_images[0], affine)
    elif kind == "torchao_weight":
        qmodel = _torchao(float_mlp, "Int8WeightOnlyConfig")
    else:
        qmodel = _torchao(float_mlp, "Int8DynamicActivationInt8WeightConfig")
    x = x_images if kind.startswith("static") else x_flat
    return qmodel, tuple(x.shape[1:]), x[:N_ATTACK], y[:N_ATTACK]


# ------------------------------------------------------------------------------------------------ the deployed model
def _quantized_layers(qmodel: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in qmodel.named_modules() if _codes(m) is not None}


def _codes(module: nn.Module) -> torch.Tensor | None:
    """The deployed int8 codes of a torch.ao quantized layer or a torchao Linear (``None`` for other modules)."""
    if isinstance(module, (nnq.Linear, nnq.Conv2d)):
        return module.weight().int_repr()
    weight = getattr(module, "weight", None)
    return weight.qdata if hasattr(weight, "qdata") else None


def _fingerprint(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Everything a flip or a conversion could change: codes, scales, zero points, biases, float parameters."""
    out = {name: p.detach().clone() for name, p in qmodel.named_parameters() if type(p) in (torch.Tensor, nn.Parameter)}
    for name, module in _quantized_layers(qmodel).items():
        out[f"{name}.codes"] = _codes(module).clone()
        if isinstance(module, (nnq.Linear, nnq.Conv2d)):
            weight = module.weight()
            per_tensor = weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric)
            out[f"{name}.scale"] = torch.tensor(weight.q_scale()) if per_tensor else weight.q_per_channel_scales()
            if module.bias() is not None:
                out[f"{name}.bias"] = module.bias().detach().clone()
        else:
            out[f"{name}.scale"] = module.weight.scale.clone()
    return out


def _assert_unchanged(qmodel: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _fingerprint(qmodel)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def _with_flips(qmodel: nn.Module, flips) -> nn.Module:
    """A deep copy of ``qmodel`` with the flipped bits written into its int8 codes."""
    qmodel = copy.deepcopy(qmodel)
    layers = _quantized_layers(qmodel)
    for flip in flips:
        module = layers[flip.param_name.rpartition(".")[0]]
        codes = _codes(module).clone()
        pattern = (int(codes[flip.index]) & 0xFF) ^ (1 << flip.bit)
        codes[flip.index] = pattern - 256 if pattern >= 128 else pattern
        if isinstance(module, (nnq.Linear, nnq.Conv2d)):
            weight = module.weight()
            if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                new = torch._make_per_tensor_quantized_tensor(codes, weight.q_scale(), weight.q_zero_point())
            else:
                scales, zero_points = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
                new = torch._make_per_channel_quantized_tensor(codes, scales, zero_points, 0)
            module.set_weight_bias(new, module.bias())
        else:
            module.weight.qdata.copy_(codes)
    return qmodel


def _accuracy(qmodel: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((qmodel(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).mean())


def _estimator(qmodel: nn.Module, input_shape: tuple[int, ...]) -> PyTorchWeightClassifier:
    return PyTorchWeightClassifier.from_quantized(qmodel, input_shape, 10, clip_values=(0.0, 1.0))


ALL = pytest.mark.parametrize("deployed", TORCH_AO + TORCHAO, indirect=True)


# ------------------------------------------------------------------------------------------------ tests
@ALL
def test_forward_codes_and_gradients(deployed):
    qmodel, shape, x, y = deployed
    before = _fingerprint(qmodel)
    estimator = _estimator(qmodel, shape)
    assert is_quantized_model(qmodel) and not is_quantized_model(estimator.model)
    with torch.no_grad():
        expected = qmodel(torch.as_tensor(x)).numpy()
    np.testing.assert_array_equal(estimator.predict(x, batch_size=len(x)), expected)

    weights = QuantizedWeights.from_estimator(estimator)
    layers = _quantized_layers(qmodel)
    assert weights.n_bits == 8 and sorted(weights.param_names) == sorted(f"{n}.weight" for n in layers)
    for name, module in layers.items():
        assert torch.equal(weights.codes[f"{name}.weight"], _codes(module).to(torch.int64))
    dequantized = weights.dequantize()
    for name, value in estimator.base_model.state_dict().items():
        if name in dequantized:
            torch.testing.assert_close(dequantized[name], value.to(torch.float64), rtol=1e-6, atol=0.0)

    grads = estimator.loss_gradient_weights(x[:32], y[:32])  # straight-through: the float layers' gradients
    assert all(np.isfinite(g).all() for g in grads.values()) and any(np.abs(g).sum() > 0 for g in grads.values())
    _assert_unchanged(qmodel, before)


@pytest.mark.parametrize("deployed", ["static_channel"], indirect=True)
def test_per_channel_zero_points(deployed):
    qmodel, shape, _, _ = deployed
    weights = QuantizedWeights.from_estimator(_estimator(qmodel, shape))
    assert weights.granularity == "channel"
    zero_points = weights.zero_points
    assert torch.equal(zero_points["fc.weight"], qmodel.fc.weight().q_per_channel_zero_points())
    assert any(bool((z != 0).any()) for z in zero_points.values())
    codes = weights.codes["fc.weight"]
    expected = qmodel.fc.weight().dequantize().to(torch.float64)
    torch.testing.assert_close(weights.dequantize()["fc.weight"], expected, rtol=1e-6, atol=0.0)
    assert int(codes.min()) >= -128 and int(codes.max()) <= 127


@ALL
def test_attacks_report_the_deployed_accuracy(deployed):
    qmodel, shape, x, y = deployed
    before = _fingerprint(qmodel)
    estimator = _estimator(qmodel, shape)
    attack = BitFlipAttack(estimator, max_flips=4, batch_size=len(x), verbose=False)
    flips = attack.generate(x, y)
    assert len(flips) == 4
    bfa = [_accuracy(_with_flips(qmodel, flips[: k + 1]), x, y) for k in range(len(flips))]
    assert [h["accuracy"] for h in attack.history_] == bfa

    random = []
    for seed in range(3):
        draws = RandomBitFlips(estimator, nb_flips=4, nb_samples=1, seed=seed, batch_size=len(x), verbose=False)
        accuracy = draws.evaluate(x, y, per_bit=False)["accuracies"][0]
        assert accuracy == _accuracy(_with_flips(qmodel, draws.generate()), x, y)
        random.append(accuracy)
    assert bfa[-1] < min(random)
    _assert_unchanged(qmodel, before)


@pytest.mark.parametrize("deployed", ["static_channel", "torchao_weight"], indirect=True)
def test_qmodel_unchanged_when_interrupted(deployed, monkeypatch):
    qmodel, shape, x, y = deployed
    before = _fingerprint(qmodel)
    estimator = _estimator(qmodel, shape)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BitFlipAttack, "_evaluate", interrupt)
    with pytest.raises(KeyboardInterrupt):
        BitFlipAttack(estimator, max_flips=2, verbose=False).generate(x, y)
    monkeypatch.setattr(quantized_module, "TorchAOLinear", interrupt)
    monkeypatch.setattr(quantized_module, "StaticQuantizedLinear", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _estimator(qmodel, shape)
    _assert_unchanged(qmodel, before)


def _robust_to_every_flip(qmodel: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which samples a torchao ``qmodel`` classifies correctly under every single flipped bit of its int8 codes, each
    written into (a copy of) the model and run: the exact k = 1 answer."""
    qmodel = copy.deepcopy(qmodel)
    x_t = torch.as_tensor(x, dtype=torch.float32)
    robust = np.ones(len(x), dtype=bool)
    with torch.no_grad():
        for module in _quantized_layers(qmodel).values():
            flat = module.weight.qdata.view(-1)
            for i in range(flat.numel()):
                code = int(flat[i])
                for bit in range(8):
                    pattern = (code & 0xFF) ^ (1 << bit)
                    flat[i] = pattern - 256 if pattern >= 128 else pattern
                    robust &= qmodel(x_t).argmax(1).numpy() == y
                flat[i] = code
    return robust


@pytest.mark.parametrize("deployed", ["torchao_weight"], indirect=True)
def test_certifier_sound_on_weight_only(deployed, digits):
    qmodel, shape, _, _ = deployed
    x, y = digits[2][:100], digits[3][:100]
    before = _fingerprint(qmodel)
    estimator = _estimator(qmodel, shape)
    certified = BitFlipCertifier(estimator, max_flips=1, method="linear", verbose=False).certify(x, y)
    assert 0.5 < certified.mean() < 1
    robust = _robust_to_every_flip(qmodel, x, y)
    assert robust[certified].all()

    two = BitFlipCertifier(estimator, max_flips=2, method="linear", verbose=False).certify(x, y)
    assert not two[~certified].any()
    flip_sets = [BitFlipAttack(estimator, max_flips=2, batch_size=len(x), verbose=False).generate(x, y)]
    flip_sets += [RandomBitFlips(estimator, nb_flips=2, seed=s, verbose=False).generate() for s in range(5)]
    for flips in flip_sets:
        with torch.no_grad():
            correct = _with_flips(qmodel, flips)(torch.as_tensor(x)).argmax(1).numpy() == y
        assert correct[two].all()
    _assert_unchanged(qmodel, before)


@pytest.mark.parametrize("deployed", ["dynamic", "static_tensor", "torchao_dynamic"], indirect=True)
def test_certifiers_refuse_activation_quantization(deployed):
    qmodel, shape, _, _ = deployed
    estimator = _estimator(qmodel, shape)
    with pytest.raises(UnsupportedModelError, match="quantizes its activations"):
        BitFlipCertifier(estimator, verbose=False)
    with pytest.raises(UnsupportedModelError, match="quantizes its activations"):
        WeightPerturbationCertifier(estimator, PerturbationBudget(1e-3, "inf"), "interval", verbose=False)


@pytest.mark.parametrize("deployed", ["static_tensor"], indirect=True)
def test_encoding_arguments(deployed, float_mlp):
    qmodel, shape, _, _ = deployed
    estimator = _estimator(qmodel, shape)
    with pytest.raises(ValueError, match="n_bits=4"):
        BitFlipAttack(estimator, n_bits=4)
    with pytest.raises(ValueError, match="granularity='channel'"):
        QuantizedWeights.from_estimator(estimator, granularity="channel")
    assert QuantizedWeights.from_estimator(estimator).granularity == "tensor"
    assert not is_quantized_model(float_mlp) and not is_quantized_model("model")
    with pytest.raises(ValueError, match="no quantized layer"):
        PyTorchWeightClassifier.from_quantized(float_mlp, (64,), 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = tq.quantize_dynamic(copy.deepcopy(float_mlp), {nn.Linear}, dtype=torch.float16)
    with pytest.raises(UnsupportedModelError, match="module '0'.*float16"):
        PyTorchWeightClassifier.from_quantized(half, (64,), 10)


def test_torchao_per_group_refused(float_mlp):
    torchao_quantization = pytest.importorskip("torchao.quantization")
    qmodel = copy.deepcopy(float_mlp)
    config = torchao_quantization.Int8WeightOnlyConfig(granularity=torchao_quantization.PerGroup(32))
    torchao_quantization.quantize_(qmodel, config)
    assert is_quantized_model(qmodel)
    with pytest.raises(UnsupportedModelError, match="module '0'.*per tensor or per row"):
        PyTorchWeightClassifier.from_quantized(qmodel, (64,), 10)


@pytest.mark.parametrize("deployed", ["static_channel"], indirect=True)
def test_detector_and_flip_table_read_zero_points(deployed):
    """Per-channel affine codes (w = s·(c − z)): the integrity detector reads the deployed codes back exactly (nothing
    flagged on the clean model), flags BFA's flips and corrects them to the deployed model; the flip table reports the
    deployed values s·(c − z)."""
    from art_weightpert.defences.detector import WeightIntegrityDetector
    from art_weightpert.metrics.bit_flips import _describe

    qmodel, shape, x, y = deployed
    estimator = _estimator(qmodel, shape)
    detector = WeightIntegrityDetector(estimator, group_size=16)
    assert not detector.detect(estimator)["tampered"]
    attack = BitFlipAttack(estimator, max_flips=3, batch_size=len(x), verbose=False)
    flips = attack.generate(x, y)
    attacked = attack.quantized_.flip(flips).apply(estimator)
    assert detector.detect(attacked)["tampered"]
    recovered = detector.recover(attacked)
    assert _accuracy(qmodel, x, y) == float(np.mean(recovered.predict(x).argmax(1) == y))

    rows = _describe(attack.quantized_, flips)
    for row, flip in zip(rows, flips):
        scales = qmodel.get_submodule(row["layer"]).weight().q_per_channel_scales().double()
        zeros = qmodel.get_submodule(row["layer"]).weight().q_per_channel_zero_points()
        channel = flip.index[0]
        expected = float(scales[channel] * (row["old_code"] - zeros[channel]))
        assert row["old_value"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("deployed", ["torchao_weight"], indirect=True)
def test_float_bit_flips_refuse_deployed_codes(deployed):
    from art_weightpert.float_bits import FloatWeights

    qmodel, shape, _, _ = deployed
    with pytest.raises(ValueError, match="deployed int8 model.*BitFlipAttack"):
        FloatWeights.from_estimator(_estimator(qmodel, shape))
