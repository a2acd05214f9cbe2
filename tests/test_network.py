"""The model reader: supported chains read faithfully, everything else rejected with the module named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import UnsupportedModelError
from art_weightpert.network import (
    Activation,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    MaxPool,
    perturbable_modules,
    read_network,
)


def warmed(model: nn.Module, input_shape) -> nn.Module:
    """Give batch norms non-trivial running statistics and affine parameters, then switch to eval mode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(2 * torch.randn(16, *input_shape) + 0.5)
    return model.eval()


def assert_same_forward(model: nn.Module, input_shape, network=None):
    network = network or read_network(model, input_shape)
    x = torch.randn(5, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(network.forward(x), model(x), rtol=1e-5, atol=1e-6)
        # float64 through the network (the certificates' precision) agrees too
        torch.testing.assert_close(network.forward(x.double()).float(), model(x), rtol=1e-4, atol=1e-5)
    return network


def test_sequential_mlp_with_every_supported_layer():
    model = nn.Sequential(
        nn.Linear(12, 20),
        nn.BatchNorm1d(20),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(20, 16, bias=False),
        nn.LeakyReLU(0.2),
        nn.Linear(16, 16),
        nn.Sigmoid(),
        nn.Linear(16, 8),
        nn.Tanh(),
        nn.Identity(),
        nn.Linear(8, 3),
    )
    network = assert_same_forward(warmed(model, (12,)), (12,))
    kinds = [type(layer).__name__ for layer in network.layers]
    assert kinds == [
        "Affine", "BatchNorm", "Activation", "Affine", "Activation", "Affine", "Activation", "Affine", "Activation",
        "Affine",
    ]  # fmt: skip
    assert [a.kind for a in network.layers if isinstance(a, Activation)] == ["relu", "leaky_relu", "sigmoid", "tanh"]
    assert network.layers[4].negative_slope == 0.2
    assert [(a.weight_name, a.bias_name) for a in network.affine_layers] == [
        ("0.weight", "0.bias"),
        ("4.weight", None),
        ("6.weight", "6.bias"),
        ("8.weight", "8.bias"),
        ("11.weight", "11.bias"),
    ]


def test_sequential_cnn_with_every_supported_layer():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=False),
        nn.Dropout2d(0.1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 10),
    )
    network = assert_same_forward(warmed(model, (1, 8, 8)), (1, 8, 8))
    assert [type(layer) for layer in network.layers] == [
        Affine, BatchNorm, Activation, MaxPool, Affine, Activation, AvgPool, Flatten, Affine,
    ]  # fmt: skip
    assert network.affine_layers[0].is_conv and not network.affine_layers[-1].is_conv


def test_nested_sequential():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Sequential(nn.MaxPool2d(2))))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(27, 8), nn.ReLU()), nn.Linear(8, 4)))
    network = assert_same_forward(model.eval(), (1, 8, 8))
    assert [a.name for a in network.affine_layers] == ["features.0", "head.1.0", "head.2"]
    assert [a.weight_name for a in network.affine_layers] == ["features.0.weight", "head.1.0.weight", "head.2.weight"]
    assert list(perturbable_modules(model)) == ["features.0", "head.1.0", "head.2"]


class ChainNet(nn.Module):
    """A plain module whose forward is a chain written with functional calls and views."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc1 = nn.Linear(2 * 8 * 8, 16)
        self.fc2 = nn.Linear(16, 5)
        self.flatten = flatten

    def forward(self, x):
        x = F.relu(self.conv(x))
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.flatten(start_dim=1)
        x = torch.sigmoid(self.fc1(x))
        x = F.leaky_relu(x, 0.1).tanh().relu()
        return self.fc2(x)


@pytest.mark.parametrize("flatten", ["view", "torch.flatten", "reshape", "method"])
def test_custom_module_with_a_chain_forward(flatten):
    model = ChainNet(flatten).eval()
    network = assert_same_forward(model, (1, 8, 8))
    assert [a.name for a in network.affine_layers] == ["conv", "fc1", "fc2"]
    assert sum(isinstance(layer, Flatten) for layer in network.layers) == 1
    assert [a.kind for a in network.layers if isinstance(a, Activation)] == [
        "relu", "sigmoid", "leaky_relu", "tanh", "relu",
    ]  # fmt: skip
    assert next(a for a in network.layers if getattr(a, "kind", "") == "leaky_relu").negative_slope == 0.1


def test_a_bare_linear_classifier():
    model = nn.Linear(6, 3)
    network = assert_same_forward(model, (6,))
    assert [(a.name, a.weight_name, a.bias_name) for a in network.layers] == [("", "weight", "bias")]
    assert list(perturbable_modules(model)) == [""]


def test_network_forward_with_substituted_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    network = read_network(model)
    x = torch.randn(6, 4)
    w = torch.randn(2, 3)
    expected = F.linear(torch.relu(model[0](x)), w, model[2].bias)
    torch.testing.assert_close(network.forward(x, {"2.weight": w}), expected)
    assert network.params(dtype=torch.float64)["0.weight"].dtype == torch.float64


def test_reading_leaves_the_training_flags_alone():
    model = ChainNet("view")
    model.train()
    model.conv.eval()
    read_network(model, (1, 8, 8))
    assert model.training and not model.conv.training and model.fc1.training


# ------------------------------------------------------------------------------------------------ unsupported
class Product(nn.Module):  # a residual sum is read (tests/test_residual.py); a product of branches is not
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(x * torch.relu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.fc(out)


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class BadReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).view(-1, 4))  # mixes samples: not a flatten


class Transposing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(128, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(h.view(h.size(0), 2, 64).transpose(1, 2).reshape(h.size(0), -1))


class PartialFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1, 2))  # (N, 16, 8): not a per-sample flatten


@pytest.mark.parametrize(
    ("model", "input_shape", "pattern"),
    [
        (Product(), (8,), r"mul \(node 'mul'\) combines branches"),
        (Attention(), (5, 8), r"module 'attn' \(MultiheadAttention\) is an attention layer"),
        (Recurrent(), (5, 8), r"module 'lstm' \(LSTM\) is a recurrent layer"),
        (BadReshape(), (8,), r"view \(node 'view'\) is not a flatten"),
        (Transposing(), (1, 8, 8), r"transpose"),
        (PartialFlatten(), (1, 8, 8), r"flatten \(node 'flatten'\) is not a supported layer"),
        (nn.Sequential(nn.Linear(8, 3), nn.ReLU()), (8,), r"end with a Linear.*'1'"),
        (nn.Sequential(nn.Linear(8, 3), nn.Softmax(dim=1)), (8,), r"module '1' \(Softmax\)"),
        (nn.Sequential(nn.Conv2d(1, 3, 8)), (1, 8, 8), r"end with a Linear.*'0'"),
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 3)), (1, 8), r"module '0' \(Conv1d\)"),
        (nn.Sequential(nn.Flatten(0), nn.Linear(8, 3)), (8,), r"module '0': Flatten"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")), (1, 4, 4), r"module '0'.*circular"),
    ],
    ids=["product", "attention", "lstm", "bad-view", "transpose", "partial-flatten", "no-final-linear", "softmax",
         "final-conv", "conv1d", "flatten0", "circular"],
)  # fmt: skip
def test_unsupported_models_name_the_module(model, input_shape, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        read_network(model.eval(), input_shape)


def test_unsupported_model_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)
    with pytest.raises(TypeError, match="model"):
        read_network("not a model")


def test_reshape_needs_the_input_shape():
    with pytest.raises(UnsupportedModelError, match="input shape"):
        read_network(ChainNet("view"))


def test_untraceable_model():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(UnsupportedModelError, match="DataDependent cannot be traced"):
        read_network(DataDependent())
