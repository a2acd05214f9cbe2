"""The float64 convolution path (:mod:`art_weightpert.conv_gemm`) equals torch's convolution and its adjoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from art_weightpert import conv_gemm
from art_weightpert.operators import Affine

# (batch, in channels, out channels, height, width, kernel, stride, padding, dilation, groups)
CASES = [
    (5, 3, 4, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 16, 32, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride 2 (digits ResNet, second stage)
    (6, 16, 32, 8, 8, (1, 1), (2, 2), (0, 0), (1, 1), 1),  # 1x1 shortcut
    (3, 4, 6, 9, 7, (3, 2), (2, 1), (1, 0), (1, 1), 2),  # groups, non-square everything
    (3, 4, 4, 10, 9, (3, 3), (1, 2), (2, 1), (2, 1), 4),  # dilation, depthwise
    (2, 3, 5, 7, 7, (5, 5), (3, 3), (2, 2), (1, 1), 1),  # stride 3: output padding 1 in the adjoint
    (2, 6, 4, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 1x1 map, padded 3x3 kernel (ResNet-18's last stage)
    (7, 1, 16, 28, 28, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 4, 5, 6, 6, (1, 1), (1, 1), (1, 1), (1, 1), 1),  # padding beyond the kernel: the adjoint crops
]


def _inputs(case, seed: int = 0):
    n, c, o, h, w, k, _, _, _, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, h, w), generator=gen, dtype=torch.float64)
    weight = torch.randn((o, c // groups) + k, generator=gen, dtype=torch.float64)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    return x, weight, bias


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_bytes", [conv_gemm.CHUNK_BYTES, 512])  # one chunk, one sample per chunk
def test_conv2d_and_adjoint_equal_torch(case, chunk_bytes, monkeypatch):
    monkeypatch.setattr(conv_gemm, "CHUNK_BYTES", chunk_bytes)
    x, weight, bias = _inputs(case)
    *_, stride, padding, dilation, groups = case
    expected = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out = conv_gemm.conv2d(x, weight, bias, stride, padding, dilation, groups)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)

    # The adjoint: this path with stride 1, torch's otherwise (through Affine.apply_transposed).
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    conv = nn.Conv2d(x.shape[1], weight.shape[0], weight.shape[2:], stride, padding, dilation, groups, bias=False)
    layer = Affine("conv", conv, "conv.weight", None)
    out_t = layer.apply_transposed(g, weight, x.shape[1:])
    assert out_t.shape == x.shape
    # The adjoint identity <conv(x), g> = <x, convᵀ(g)>.
    torch.testing.assert_close((out * g).sum() - (g * bias.reshape(1, -1, 1, 1)).sum(), (x * out_t).sum())
    if stride == (1, 1):
        direct = conv_gemm.conv_transpose2d(g, weight, padding, dilation, groups)
        expected_t = F.conv_transpose2d(g, weight, None, 1, padding, 0, groups, dilation)
        torch.testing.assert_close(direct, expected_t, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(out_t, expected_t, rtol=1e-13, atol=1e-13)


def test_vmap_over_weights():
    x, weight, bias = _inputs(CASES[0])
    weights = torch.stack([weight, 2 * weight, -weight])
    batched = torch.func.vmap(lambda w: conv_gemm.conv2d(x, w, bias, (1, 1), (1, 1), (1, 1), 1))(weights)
    for w, out in zip(weights, batched):
        torch.testing.assert_close(out, F.conv2d(x, w, bias, 1, 1), rtol=1e-13, atol=1e-13)


def test_non_contiguous_inputs_and_gradients():
    x, weight, bias = _inputs(CASES[1])
    x = x.transpose(2, 3).contiguous().transpose(2, 3)  # channels-last-like strides
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = conv_gemm.conv2d(x, weight, bias, (2, 2), (1, 1), (1, 1), 1)
    expected = F.conv2d(x, weight, bias, 2, 1)
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(expected)
    grads = torch.autograd.grad((out * g).sum(), (x, weight))
    expected_grads = torch.autograd.grad((expected * g).sum(), (x, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # A second convolution reads the first one's channels-first output.
    second = torch.randn((16, 32, 3, 3), dtype=torch.float64)
    torch.testing.assert_close(
        conv_gemm.conv2d(out, second, None, (1, 1), (1, 1), (1, 1), 1),
        F.conv2d(expected, second, None, 1, 1),
        rtol=1e-12,
        atol=1e-12,
    )


def test_affine_takes_the_path_for_float64_only():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    layer = Affine("conv", conv, "conv.weight", "conv.bias")
    x32 = torch.randn(2, 3, 8, 8)
    out32 = layer.apply(x32, conv.weight, conv.bias)
    assert torch.equal(out32, F.conv2d(x32, conv.weight, conv.bias, 2, 1))  # float32: torch's (oneDNN) kernel
    w64, b64, x64 = conv.weight.double(), conv.bias.double(), x32.double()
    out64 = layer.apply(x64, w64, b64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, F.conv2d(x64, w64, b64, 2, 1), rtol=1e-13, atol=1e-13)
    g = torch.randn(out64.shape, dtype=torch.float64)
    expected = F.conv_transpose2d(g, w64, None, 2, 1, output_padding=1)  # stride 2: torch's
    assert torch.equal(layer.apply_transposed(g, w64, x64.shape[1:]), expected)


def test_the_path_is_taken_for_float64_small_maps_with_enough_columns():
    x64 = torch.zeros((2, 3, 8, 8), dtype=torch.float64)
    assert conv_gemm.use_gemm(x64, (8, 8))
    assert not conv_gemm.use_gemm(x64.float(), (8, 8))  # float32: oneDNN
    assert not conv_gemm.use_gemm(x64, (1, 1))  # 2 columns: one thin product
    assert not conv_gemm.use_gemm(x64, (32, 32))  # large maps: torch's per-sample products are large enough
    assert conv_gemm.output_hw((8, 7), (3, 2), (2, 1), (1, 0), (1, 2)) == (4, 5)
