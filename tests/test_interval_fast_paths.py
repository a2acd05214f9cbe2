"""The faster float64 arithmetic of the bounds gives the values of the arithmetic it replaced: batch norm's box rule
(ends to ends instead of centre and radius) and the float64 convolutions of :mod:`art_weightpert.conv_gemm` (against
torch's own convolution) on random residual and convolutional models, for "interval" and "linear"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from art_weightpert import PerturbationBudget, conv_gemm
from art_weightpert.certification import METHODS
from art_weightpert.certification.interval import INTERVAL_RULES
from art_weightpert.network import BatchNorm, read_network
from art_weightpert.zoo import digits_resnet
from tests.test_residual import warmed


def test_batch_norm_box_equals_centre_and_radius_and_contains_the_values():
    gen = torch.Generator().manual_seed(0)
    scale = torch.randn(6, generator=gen, dtype=torch.float64)
    scale[0] = 0.0  # a zero scale and both signs
    layer = BatchNorm("bn", scale, torch.randn(6, generator=gen, dtype=torch.float64))
    lo = torch.randn((4, 6, 3, 3), generator=gen, dtype=torch.float64)
    hi = lo + torch.rand((4, 6, 3, 3), generator=gen, dtype=torch.float64)
    new_lo, new_hi = INTERVAL_RULES[BatchNorm](layer, lo, hi)
    c, r = (hi + lo) / 2, (hi - lo) / 2  # the rule this one replaced
    centre, radius = layer.apply(c), r * layer.shaped(scale, r).abs()
    torch.testing.assert_close(new_lo, centre - radius, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(new_hi, centre + radius, rtol=1e-14, atol=1e-14)
    for t in torch.rand((20, 1, 1, 1, 1), generator=gen, dtype=torch.float64):
        value = layer.apply(lo + t * (hi - lo))
        assert bool((new_lo <= value + 1e-12).all() and (value <= new_hi + 1e-12).all())


class GroupedCNN(nn.Module):
    """Strides, padding, dilation, groups and a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(2, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 5 * 5, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h))
        return self.fc(torch.relu(self.c3(h)).flatten(1))


@pytest.mark.parametrize(
    "factory, shape",
    [(lambda: warmed(digits_resnet(), (1, 8, 8)), (1, 8, 8)), (lambda: GroupedCNN().eval(), (2, 10, 10))],
)
@pytest.mark.parametrize("relative", [False, True])
def test_bounds_with_the_float64_convolutions_equal_torchs(factory, shape, relative, monkeypatch):
    model = factory().double().requires_grad_(False)
    network = read_network(model, shape)
    balls = PerturbationBudget(1e-3 if relative else 1e-4, "inf", relative=relative).parameter_balls(model)
    x = torch.rand((12, *shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = model(x).argmax(dim=1)
    for method in ("interval", "linear"):
        fast = METHODS[method].bounds(network, balls, x, labels)
        with monkeypatch.context() as patch:
            patch.setattr(conv_gemm, "use_gemm", lambda *args: False)
            slow = METHODS[method].bounds(network, balls, x, labels)
        finite = torch.isfinite(slow)
        assert torch.equal(finite, torch.isfinite(fast))
        assert bool(finite.any())
        torch.testing.assert_close(fast[finite], slow[finite], rtol=1e-10, atol=1e-12)
