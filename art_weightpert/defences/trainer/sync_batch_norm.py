"""
Batch norm on the *global* batch while :class:`.WeightRobustTrainer` trains in a process group.

In train mode a batch-norm layer normalizes with the statistics of its batch; with the global batch split across
ranks, every rank must use the statistics of the whole global batch (and update its running statistics with them),
or the model differs from single-process training. On CUDA this is torch's own ``SyncBatchNorm`` kernel
(``torch.nn.modules._functions.SyncBatchNorm``, the function behind ``torch.nn.SyncBatchNorm``); that kernel refuses
CPU tensors ("SyncBatchNorm expected input tensor to be on GPU"), so on the CPU (gloo) the global mean and variance
come from two differentiable all-reduces (``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces
the gradient): the same normalization as ``F.batch_norm`` on the concatenated global batch, up to rounding.

The user's modules are not replaced: :func:`synchronized_batch_norm` overrides the ``forward`` of each batch-norm
module for the duration of a ``with`` block and restores it after, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from art_weightpert import distributed
from art_weightpert.torch_tools import replaced_method


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of every rank's input is the sum of the ranks' gradients of
    the (shared) output, since every rank's loss depends on it."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad.contiguous())


def differentiable_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, with gradients (:class:`_AllReduceSum`)."""
    return _AllReduceSum.apply(tensor)


@contextlib.contextmanager
def synchronized_batch_norm(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every batch-norm layer of ``model`` in train mode normalizes with the statistics of the global
    batch (all ranks together) and updates its running statistics with them; nothing changes outside a process
    group or in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not distributed.is_distributed() or not layers:
        yield
        return
    with replaced_method(layers, "forward", _synchronized_forward):
        yield


def _momentum(module: torch.nn.modules.batchnorm._BatchNorm) -> float:
    """The running-statistics factor of this step (``momentum``, or a cumulative average when it is None), counting
    the step, as ``_BatchNorm.forward`` does."""
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            return 1.0 / float(module.num_batches_tracked)
    return 0.0 if module.momentum is None else float(module.momentum)


def _synchronized_forward(self: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    self._check_input_dim(x)
    if not self.training and self.running_mean is not None:
        return type(self).forward(self, x)  # eval mode: the running statistics, nothing to synchronize
    momentum = _momentum(self) if self.training else 0.0
    running = self.training and self.track_running_stats
    running_mean, running_var = (self.running_mean, self.running_var) if running else (None, None)
    if x.is_cuda:
        from torch.nn.modules._functions import SyncBatchNorm

        world = distributed.world_size()
        return SyncBatchNorm.apply(
            x, self.weight, self.bias, running_mean, running_var, self.eps, momentum, dist.group.WORLD, world
        )
    return _global_batch_norm(x, self.weight, self.bias, running_mean, running_var, self.eps, momentum)


def _global_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    momentum: float,
) -> torch.Tensor:
    """``F.batch_norm(global batch, training=True)`` restricted to this rank's samples: the mean and the biased
    variance over all ranks' samples (two-pass, differentiable), the running statistics updated with the mean and the
    unbiased variance of the global batch."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
    sums = differentiable_all_reduce(torch.cat([x.sum(dims), count]))
    n = sums[-1].detach()
    if n < 2 and running_mean is not None:
        raise ValueError(f"Expected more than 1 value per channel when training, got a global batch of {int(n)}.")
    mean = sums[:-1] / n
    centered = x - mean.view(shape)
    var = differentiable_all_reduce((centered * centered).sum(dims)) / n
    out = centered * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.view(shape) + bias.view(shape)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * (n / (n - 1)), alpha=momentum)
    return out


__all__ = ["synchronized_batch_norm"]
