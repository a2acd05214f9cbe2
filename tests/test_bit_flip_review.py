"""False bit-flip certificates found by an independent review of the float32 bounds (issue 23), each now covered: a
convolution whose max pooling's rule skipped its flip terms (float32), weights below float32's normal range (refused),
an overflowing coefficient whose NaN dropped a flip from the selection, and several flips of one float weight, which
do not add (float32 and float64). Each exact worst margin is enumerated over every allowed flip set."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from art_weightpert import PyTorchWeightClassifier
from art_weightpert.certification.bit_flip import BitFlipCertifier
from art_weightpert.float_bits import FloatBitFlip
from art_weightpert.quantization import BitFlip

DTYPES = [torch.float64, torch.float32]


def _classifier(model: nn.Module, shape: tuple[int, ...]) -> PyTorchWeightClassifier:
    return PyTorchWeightClassifier(model.eval().requires_grad_(False), nn.CrossEntropyLoss(), shape, 2)


def _worst(model: nn.Module, weights, flip_sets, x: np.ndarray, y: int) -> float:
    """The smallest float64 margin ``f_y − f_other`` over ``flip_sets`` applied to ``weights`` (and no flip)."""
    model64, worst = copy.deepcopy(model).double(), np.inf
    for flips in [[], *flip_sets]:
        with torch.no_grad():
            for name, value in weights.flip(list(flips)).dequantize().items():
                model64.get_parameter(name).copy_(value)
            f = model64(torch.tensor(x, dtype=torch.float64))[0]
        worst = min(worst, float(f[y] - f[1 - y]))
    return worst


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_a_convolution_before_max_pooling_keeps_its_flip_terms(dtype):
    # float32's backward pass ran the max pooling, the ReLU and the convolution on the known input as one step, and
    # the convolution's flips were never added: a bound 0.0038 above the exact worst margin over two flips
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2))
    clf = _classifier(model, (1, 6, 6))
    x = np.random.default_rng(0).normal(size=(1, 1, 6, 6)).astype(np.float32)
    y = int(clf.predict(x).argmax())
    certifier = BitFlipCertifier(clf, 2, layers=["0"], bits=[0, 1], verbose=False, dtype=dtype)
    pairs = [BitFlip("0.weight", index, b) for index in itertools.product(range(2), [0], range(3), range(3))
             for b in (0, 1)]  # fmt: skip
    sets = [[p] for p in pairs] + [list(s) for s in itertools.combinations(pairs, 2)]
    exact = _worst(model, certifier.quantized_, sets, x, y)
    slack = 0.0 if dtype == torch.float32 else 1e-9  # float64 bounds are accepted above a tolerance of 1e-9
    assert certifier.margin_lower_bounds(x, np.array([y]))[0, 1 - y] <= exact + slack


def test_weights_below_float32_normal_range_are_refused_in_float32():
    layer = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-39], [0.0]]))
    clf = _classifier(nn.Sequential(layer), (1,))
    x = np.ones((1, 1), np.float32)
    with pytest.raises(ValueError, match="normal range"):
        BitFlipCertifier(clf, 1, encoding="float", verbose=False, dtype=torch.float32).certify(x, [0])
    BitFlipCertifier(clf, 1, encoding="float", verbose=False).certify(x, [0])  # float64 takes them


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_an_overflowing_coefficient_does_not_drop_its_flip(dtype):
    # λ_r ĥ_c = 1e30 · 1e10 overflows float32: its NaN (inf − inf, 0·inf) sorted last and the one flip that breaks the
    # margin (−4.0e9) was left out (bound +1e9, certified)
    l1, l2, l3 = nn.Linear(2, 2, bias=False), nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1e10, 0.0], [0.0, 1.0]])), l2.weight.copy_(torch.tensor([[1e-30, 0], [0, 0]]))
        l2.bias.zero_(), l3.weight.copy_(torch.tensor([[1e30, 0.0], [0.0, 0.0]])), l3.bias.copy_(torch.tensor([0, 9e9]))
    model = nn.Sequential(l1, l2, nn.Flatten(), l3)
    clf = _classifier(model, (2,))
    x = np.ones((1, 2), np.float32)
    for method in ("interval", "linear"):
        certifier = BitFlipCertifier(clf, 2, layers=["1"], bits=[6], method=method, verbose=False, dtype=dtype)
        pairs = [BitFlip("1.weight", (r, c), 6) for r in range(2) for c in range(2)]
        exact = _worst(model, certifier.quantized_, [[p] for p in pairs], x, 0)
        assert exact < 0
        assert certifier.margin_lower_bounds(x, np.array([0]))[0, 1] <= exact and not certifier.certify(x, [0])[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_several_flips_of_one_float_weight_are_covered(dtype):
    # the sign and bit 22 of w = 1.0 give −1.5, a change of −2.5, where the sum of the single changes is −2 + 0.5: the
    # bound said 0.25 and certified a margin of exact value −0.25
    layer = nn.Linear(1, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0], [0.0]])), layer.bias.copy_(torch.tensor([0.0, -1.25]))
    model = nn.Sequential(layer)
    clf = _classifier(model, (1,))
    x = np.ones((1, 1), np.float32)
    for method in ("interval", "linear"):
        certifier = BitFlipCertifier(clf, 2, method=method, encoding="float", bits=[22, 31], verbose=False,
                                     dtype=dtype)  # fmt: skip
        flips = [FloatBitFlip("0.weight", (r, 0), b) for r in range(2) for b in (22, 31)]
        sets = [[f] for f in flips] + [list(s) for s in itertools.combinations(flips, 2)]
        exact = _worst(model, certifier.weights_, sets, x, 0)
        assert exact == -0.25
        assert certifier.margin_lower_bounds(x, np.array([0]))[0, 1] <= exact and not certifier.certify(x, [0])[0]
        # one flip at a time still adds: k = 1 is as tight as before (the sign flip alone leaves 0.25)
        assert BitFlipCertifier(clf, 1, method=method, encoding="float", bits=[22, 31], verbose=False,
                                dtype=dtype).certified_flips(x, [0])[0] == 1  # fmt: skip


def test_a_grouped_first_convolution_is_bounded_not_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    clf = _classifier(model, (2, 4, 4))
    x = np.random.default_rng(0).normal(size=(3, 2, 4, 4)).astype(np.float32)
    for dtype in DTYPES:
        certifier = BitFlipCertifier(clf, 1, verbose=False, dtype=dtype)
        assert certifier.margin_lower_bounds(x).shape == (3, 2)
        assert len(certifier.verify(x, time_limit=0.2).status) == 3


def test_float_flip_pairs_of_a_small_mlp_never_beat_the_bound():
    bits = [22, 23, 31]  # a mantissa, an exponent and the sign bit: the combined changes' ranges
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    clf = _classifier(model, (2,))
    x = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    y = clf.predict(x).argmax(1)
    flips = [FloatBitFlip(name, index, b) for name, shape in (("0.weight", (3, 2)), ("2.weight", (2, 3)))
             for index in itertools.product(*map(range, shape)) for b in bits]  # fmt: skip
    sets = [[f] for f in flips] + [list(s) for s in itertools.combinations(flips, 2)]
    for dtype in DTYPES:
        certifier = BitFlipCertifier(clf, 2, encoding="float", bits=bits, verbose=False, dtype=dtype)
        bounds = certifier.margin_lower_bounds(x, y)
        for i in range(len(x)):
            exact = _worst(model, certifier.weights_, sets, x[i : i + 1], int(y[i]))
            assert bounds[i, 1 - y[i]] <= exact + 1e-9 * (1 + abs(exact)), (dtype, i)


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.float64], ids=["float16", "float64"])
def test_models_in_other_dtypes_are_certified(model_dtype):
    # the certifier's own forward (the prediction and the tolerance) ran float32 inputs through the model: a dtype error
    from art_weightpert.certification.bit_flip_enumeration import single_flip_robustness

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).to(model_dtype)
    clf = _classifier(model, (4,))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    for encoding in ("int", "float"):
        exact = single_flip_robustness(clf, x, encoding=encoding)
        for dtype in DTYPES:
            certified = BitFlipCertifier(clf, 1, encoding=encoding, verbose=False, dtype=dtype).certify(x)
            assert not np.any(certified & ~exact), (encoding, dtype)
