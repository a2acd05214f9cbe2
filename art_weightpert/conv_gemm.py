"""
2-D convolution and its adjoint as matrix products over the whole batch, for the dtypes that have no fast library
kernel: float64 on CPU (the certificates' arithmetic, docs/theory.md §5). There torch's own convolution
(``_slow_conv2d_forward``, ``slow_conv_transpose2d``) loops over the samples with one small product each, which is
slow on small feature maps; here the samples share one product ``W (O, C·kh·kw) × patches (C·kh·kw, N·H'·W')``.

The batch is laid out channels first, ``(C, N, H, W)``: the patch matrix is then one strided copy of the padded
input, and the product's output ``(O, N·H'·W')`` is copied once into torch's usual ``(N, O, H', W')`` layout. Samples
are processed in chunks of at most :data:`CHUNK_BYTES` of patches (memory and cache). The adjoint with stride 1 is
the same product with the kernel flipped (strided adjoints stay with torch). Everything is out of place (``vmap``
batches it) and equals ``F.conv2d`` / ``F.conv_transpose2d`` up to the rounding of a different summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 2 << 20
"""Largest patch matrix built at once (bytes; 1–2 MiB measured fastest on the shapes of the digits ResNet, the
1x28x28 CNN and ResNet-18)."""

Pair = tuple[int, int]


MAX_POSITIONS = 256
"""Largest output map (``H'·W'``) taken by this path: torch's per-sample products are large enough beyond it (a
1x28x28 or 3x32x32 stem ties or wins)."""

MIN_COLUMNS = 8
"""Fewest product columns (``N·H'·W'``): below, one thin product loses to torch's per-sample ones (ResNet-18's last
stage on a couple of samples)."""


def output_hw(input_hw: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """The spatial size of a convolution's output."""
    return tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(input_hw, kernel, stride, padding, dilation)
    )


def use_gemm(t: torch.Tensor, out_hw: Pair) -> bool:
    """Whether a convolution with input ``t`` (or its adjoint, with coefficients ``t``) and output maps ``out_hw``
    should take this path: float64 on CPU (float32 keeps oneDNN), small maps, enough columns (measured on the digits
    ResNet, the 1x28x28 CNN and ResNet-18)."""
    positions = out_hw[0] * out_hw[1]
    return (
        t.dtype == torch.float64
        and t.device.type == "cpu"
        and positions <= MAX_POSITIONS
        and len(t) * positions >= MIN_COLUMNS
    )


def _chunk(nb_samples: int, rows: int, positions: int, itemsize: int, budget: int) -> int:
    """Samples per chunk so that a ``(rows, samples·positions)`` matrix of ``itemsize``-byte entries stays under
    ``budget`` bytes."""
    return max(1, min(nb_samples, budget // max(1, rows * positions * itemsize)))


def _patches(padded: torch.Tensor, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair) -> torch.Tensor:
    """The patch matrix ``(C·kh·kw, N·H'·W')`` of a padded channels-first input ``(C, N, Hp, Wp)``."""
    sc, sn, sh, sw = padded.stride()
    c, n = padded.shape[:2]
    view = padded.as_strided(
        (c, kernel[0], kernel[1], n) + out_hw,
        (sc, dilation[0] * sh, dilation[1] * sw, sn, stride[0] * sh, stride[1] * sw),
        padded.storage_offset(),
    )
    return view.reshape(c * kernel[0] * kernel[1], -1)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` (integer pairs) as batched products."""
    n, _, h, w = x.shape
    out_ch, kernel = weight.shape[0], tuple(weight.shape[2:])
    out_hw = output_hw((h, w), kernel, stride, padding, dilation)
    padded = F.pad(x.transpose(0, 1), (padding[1], padding[1], padding[0], padding[0]))
    kernels = weight.reshape(groups, out_ch // groups, -1)  # (g, O/g, C/g·kh·kw)
    step = _chunk(n, groups * kernels.shape[2], out_hw[0] * out_hw[1], x.element_size(), CHUNK_BYTES)
    parts = []
    for start in range(0, n, step):
        cols = _patches(padded[:, start : start + step], kernel, stride, dilation, out_hw)
        cols = cols.reshape(groups, kernels.shape[2], -1)
        if bias is None:
            part = torch.matmul(kernels, cols)
        else:  # the bias joins the product
            part = torch.baddbmm(bias.reshape(groups, -1, 1), kernels, cols)
        parts.append(part.reshape(out_ch, -1, *out_hw).transpose(0, 1))
    # One copy into torch's (N, O, H', W') layout; out of place, so that torch.func.vmap can batch it.
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def conv_transpose2d(g: torch.Tensor, weight: torch.Tensor, padding: Pair, dilation: Pair, groups: int) -> torch.Tensor:
    """The adjoint of :func:`conv2d` with stride 1 and without bias, ``F.conv_transpose2d(g, weight, None, 1,
    padding, 0, groups, dilation)``: the convolution of ``g`` with the kernel flipped and its channels swapped (per
    group), with padding ``d·(k − 1) − p`` (negative: a crop)."""
    out_ch, in_per_group, kh, kw = weight.shape
    swapped = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
    flipped = swapped.reshape(groups * in_per_group, out_ch // groups, kh, kw).flip(2, 3)
    pad = tuple(d * (k - 1) - p for d, k, p in zip(dilation, (kh, kw), padding))
    return conv2d(g, flipped, None, (1, 1), pad, dilation, groups)
