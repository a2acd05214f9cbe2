"""The operators (issue 22): one class per layer type holding its rules, and the activations added through them —
ELU, Softplus, SiLU and GELU, as modules and as functional calls. Their boxes and linear relaxations enclose the
function torch computes; on an MLP and a small CNN with each, a per-sample weight attack and extreme points of the ball
never beat a certified margin (as tests/test_certification_soundness.py for ReLU); an operator without a complete
rule set is refused by the reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import PerturbationBudget, PyTorchWeightClassifier
from art_weightpert.certification import METHODS
from art_weightpert.network import Activation, UnsupportedModelError, read_network
from art_weightpert.operators import READERS, ActivationFunction
from tests.test_certification_soundness import _violations, certify_and_attack

NEW = {
    "elu": lambda: nn.ELU(),
    "elu_half": lambda: nn.ELU(0.5),
    "softplus": lambda: nn.Softplus(),
    "softplus_low_threshold": lambda: nn.Softplus(2.0, 1.0),  # torch's switch to z lies 0.16 below the function
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
}


def _activation(module: nn.Module) -> Activation:
    return read_network(nn.Sequential(nn.Linear(3, 3), module, nn.Linear(3, 2)).double(), (3,)).layers[1]


def _boxes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of every kind: points, tiny, narrow and wide, around centres on both sides of the curvature changes."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    widths = torch.tensor([0.0, 1e-9, 0.1, 1.0, 5.0], dtype=torch.float64)
    width = widths[torch.randint(0, len(widths), (n,), generator=gen)] * torch.rand(
        n, generator=gen, dtype=torch.float64
    )
    return centre - width, centre + width


@pytest.mark.parametrize("name", list(NEW))
def test_boxes_and_relaxations_enclose_the_function(name):
    module = NEW[name]().double()
    act = _activation(module)
    lo, hi = _boxes(3000, 0)
    (l_slope, l_icpt), (u_slope, u_icpt) = act.relaxation(lo, hi)
    box_lo, box_hi = act.interval(lo, hi)
    lowest, highest = torch.full_like(lo, np.inf), torch.full_like(lo, -np.inf)
    for t in torch.linspace(0, 1, 201, dtype=torch.float64):
        z = torch.minimum(torch.maximum(lo + t * (hi - lo), lo), hi)
        f = module(z)
        assert bool((l_slope * z + l_icpt <= f + 1e-12).all()), name
        assert bool((f <= u_slope * z + u_icpt + 1e-12).all()), name
        assert bool(((box_lo <= f + 1e-12) & (f <= box_hi + 1e-12)).all()), name
        lowest, highest = torch.minimum(lowest, f), torch.maximum(highest, f)
    # tight: the box is the range up to the sampling (and, across softplus's switch to z, torch's jump there); on a
    # point box both lines meet the function
    jump = act.function.gap if name.startswith("softplus") else 0.0
    assert float((lowest - box_lo).max()) <= jump + 0.05 and float((box_hi - highest).max()) <= jump + 1e-12
    point = lo == hi
    for slope, icpt in ((l_slope, l_icpt), (u_slope, u_icpt)):
        torch.testing.assert_close((slope * lo + icpt)[point], module(lo)[point], rtol=0, atol=1e-12)


class Functional(nn.Module):
    """Linear layers joined by the functional forms of the new activations."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = F.elu(self.fc[0](x), alpha=0.7)
        x = F.softplus(self.fc[1](x), 1.5, 10.0)
        x = F.silu(self.fc[2](x))
        return self.out(F.gelu(self.fc[3](x)))


def test_modules_and_functional_forms_read_as_their_operators():
    model = Functional().double().eval()
    network = read_network(model, (6,))
    acts = [layer for layer in network.layers if isinstance(layer, Activation)]
    assert [a.kind for a in acts] == ["elu", "softplus", "silu", "gelu"]
    assert (acts[0].alpha, acts[1].beta, acts[1].threshold, acts[3].approximate) == (0.7, 1.5, 10.0, "none")
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(network.forward(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "module, pattern",
    [
        (nn.ELU(2.0), r"'1': ELU with alpha=2.0"),
        (nn.GELU(approximate="tanh"), r"'1': GELU with approximate='tanh'"),
        (nn.Softplus(-1.0), r"'1': Softplus with beta=-1.0"),
    ],
)
def test_parameters_outside_the_rules_are_refused(module, pattern):
    with pytest.raises(UnsupportedModelError, match=pattern):
        _activation(module)


class Mish(ActivationFunction):
    """An activation with a forward and no relaxation or formula-B step."""

    kind = "mish"
    modules = (nn.Mish,)

    def apply(self, h):
        return F.mish(h)


def test_an_operator_without_a_complete_rule_set_is_refused(monkeypatch):
    monkeypatch.setattr("art_weightpert.graph.READERS", (*READERS, Mish))
    missing = r"module '1' \(Activation mish\) has no interval, relaxation or paper rule"
    with pytest.raises(UnsupportedModelError, match=missing):
        _activation(nn.Mish())


def _mlp(act, bias: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8, bias=bias), act(), nn.Linear(8, 7, bias=bias), act(), nn.Linear(7, 4, bias=bias)
    )


def _cnn(act, seed: int) -> nn.Sequential:
    """Conv, batch norm (random eval statistics), ``act``, average pooling, conv, ``act``, max pooling, Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), act(), nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 2), act(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 4),
    )  # fmt: skip
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


SOUNDNESS = {
    "elu": lambda: nn.ELU(),
    "softplus": lambda: nn.Softplus(2.0, 1.0),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
}
NORMS = ("inf", "row_l1", "l2")


def assert_sound(model: nn.Module, shape: tuple[int, ...], budget: PerturbationBudget, seed: int) -> None:
    """Every method at 0.99 × each sample's certified radius: no certified prediction flips under the per-sample attack
    or the extreme points, no margin they observe falls below its lower bound, and at least half the samples are
    certified (formula B's norm products certify little on these models: not asked of "paper")."""
    nb_classes = model(torch.zeros((1, *shape))).shape[1]
    clf = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), shape, nb_classes)
    x = np.random.default_rng(seed).normal(size=(8, *shape)).astype(np.float32)
    out = certify_and_attack(clf, budget, x, clf.predict(x).argmax(axis=1))
    assert set(out) == set(METHODS)
    for method, result in out.items():
        certified = result["certified"]
        assert method == "paper" or certified.mean() >= 0.5, method
        assert not np.any((result["attack_flipped"] | result["extreme_flipped"]) & certified), method
        assert _violations(result["attack_margins"], result["bounds"], result["tol"]) == 0, method
        assert _violations(result["extreme_margins"], result["bounds"], result["tol"]) == 0, method


@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(SOUNDNESS))
def test_certificates_of_the_new_activations_survive_the_attack_and_extreme_points(name, architecture):
    """:func:`assert_sound` on an MLP with biases and on a CNN with each activation, every layer perturbed, a norm per
    case."""
    index = list(SOUNDNESS).index(name)
    if architecture == "mlp":
        model, shape = _mlp(SOUNDNESS[name], bias=True, seed=index), (6,)
    else:
        model, shape = _cnn(SOUNDNESS[name], seed=index), (1, 6, 6)
    norm = NORMS[(index + (architecture == "cnn")) % 3]
    assert_sound(model, shape, PerturbationBudget(1.0, norm, relative=True, include_bias=architecture == "mlp"), index)


def test_certificates_through_the_functional_forms_survive_the_attack_and_extreme_points():
    """:func:`assert_sound` on :class:`Functional` (``F.elu``, ``F.softplus``, ``F.silu``, ``F.gelu``)."""
    torch.manual_seed(7)
    assert_sound(Functional().eval(), (6,), PerturbationBudget(1.0, "inf", relative=True, include_bias=True), 7)


@pytest.mark.parametrize("beta, threshold", [(5.0, 1.0), (1.0, 5.0), (2.0, 1.0)])
def test_softplus_lower_line_keeps_the_threshold_gap_in_float64(beta, threshold):
    """Across torch's switch to ``z`` the lower line drops by ``gap`` computed in float64: a gap rounded to float32
    (down for β = 5, threshold 1) left the line 2.9e-9 above torch's value on a tiny box, a false certificate."""
    from art_weightpert.operators.softplus import Softplus

    switch = threshold / beta
    lo = torch.tensor([switch - 5e-16], dtype=torch.float64)
    hi = torch.tensor([switch + 5e-16], dtype=torch.float64)
    (slope, intercept), _ = Softplus("s", beta, threshold).relaxation(lo, hi)
    z = torch.linspace(float(lo), float(hi), 2001, dtype=torch.float64)
    assert (slope * z + intercept <= F.softplus(z, beta, threshold) + 1e-15).all()


def test_softplus_tiny_box_is_not_certified_falsely():
    """The end-to-end case of the float32 gap: a margin that is negative inside the ball must not be certified."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.Softplus(beta=5.0, threshold=1.0), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight[:] = 0.2
        model[0].bias[:] = 0.0
        model[2].weight[:] = torch.tensor([[1e4], [0.0]])
        model[2].bias[:] = torch.tensor([-2000.0, 1e-5])
    classifier = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (1,), 2)
    from art_weightpert import WeightPerturbationCertifier

    certifier = WeightPerturbationCertifier(classifier, PerturbationBudget(3e-9, "inf", layers=["0"]), verbose=False)
    x, y = np.ones((1, 1), np.float32), np.array([0])
    assert float(certifier.margin_lower_bounds(x, y)[0, 1]) < 0 and not certifier.certify(x, y)[0]


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation", [(1, 1, 1, 1), (3, 2, 1, 1), (2, 1, 3, 2), (3, 1, "same", 1)]
)
def test_patch_max_is_the_maximum_over_each_receptive_field(kernel, stride, padding, dilation):
    # the row_l1 ball's ‖ĥ‖_∞ per output position; a padding above half the kernel (1×1 with padding 1) used to make
    # max_pool2d raise
    from art_weightpert.network import read_network

    conv = torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
    m = torch.rand((2, 3, 7, 7), generator=torch.Generator().manual_seed(0))
    head = torch.nn.Linear(conv(m)[0].numel(), 2)
    layer = read_network(torch.nn.Sequential(conv, torch.nn.Flatten(), head), (3, 7, 7)).layers[0]
    ph, pw = layer.padding
    patches = torch.nn.functional.unfold(m, kernel, dilation, (ph, pw), stride)  # zeros where padded
    expected = patches.amax(dim=1).reshape(2, 1, *conv(m).shape[2:])
    assert torch.equal(layer.patch_max(m), expected)


@pytest.mark.parametrize("signs", ["positive", "negative", "mixed"])
def test_batch_norm_box_maps_ends_to_ends_for_scales_of_either_sign(signs):
    # scales of one sign take one pass per end (their sign read at every call); mixed signs the sum of both ends'
    # products: the box's ends are s h + t at the input box's ends (every point of it lies between)
    from art_weightpert.operators.batch_norm import BatchNorm

    gen = torch.Generator().manual_seed(0)
    scale = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    scale = {"positive": scale, "negative": -scale, "mixed": scale * torch.tensor([1.0, -1.0, 0.0, 1.0])}[signs]
    layer = BatchNorm("bn", scale, torch.randn(4, generator=gen, dtype=torch.float64))
    for shape in ((3, 4, 2, 2), (3, 4)):  # a 2-d and a 1-d batch norm's values
        lo = torch.randn(shape, generator=gen, dtype=torch.float64)
        hi = lo + torch.rand(shape, generator=gen, dtype=torch.float64)
        for _ in range(2):
            out_lo, out_hi = layer.interval(lo, hi)
            ends = torch.stack([layer.apply(lo), layer.apply(hi)])
            torch.testing.assert_close(out_lo, ends.amin(dim=0), rtol=1e-15, atol=1e-15)
            torch.testing.assert_close(out_hi, ends.amax(dim=0), rtol=1e-15, atol=1e-15)
    assert layer.scale_sign() == {"positive": 1, "negative": -1, "mixed": 0}[signs]
    layer.scale.neg_()  # changed in place: its sign is read again
    assert layer.scale_sign() == {"positive": -1, "negative": 1, "mixed": 0}[signs]
    layer.scale.data.neg_()  # also behind the version counter's back (a review found a kept sign stale there)
    assert layer.scale_sign() == {"positive": 1, "negative": -1, "mixed": 0}[signs]
    out_lo, out_hi = layer.interval(lo, hi)
    ends = torch.stack([layer.apply(lo), layer.apply(hi)])
    torch.testing.assert_close(out_lo, ends.amin(dim=0), rtol=1e-15, atol=1e-15)
    layer.scale = layer.scale.abs().requires_grad_(True)  # a trainer's scale: the general rule, no synchronization
    assert layer.scale_sign() == 0


def test_per_channel_affine_is_the_broadcast_product_and_sum():
    from art_weightpert.operators.batch_norm import per_channel_affine

    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        h = torch.randn((5, 3, 4, 4), generator=gen).to(dtype)
        scale, shift = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen)
        expected = torch.addcmul(shift.to(dtype).reshape(1, -1, 1, 1), h, scale.to(dtype).reshape(1, -1, 1, 1))
        tight = {"rtol": 2 * torch.finfo(dtype).eps, "atol": torch.finfo(dtype).tiny}  # a fused product may round once
        torch.testing.assert_close(per_channel_affine(h, scale, shift), expected, **tight)
        torch.testing.assert_close(per_channel_affine(h, scale), h * scale.to(dtype).reshape(1, -1, 1, 1), **tight)
