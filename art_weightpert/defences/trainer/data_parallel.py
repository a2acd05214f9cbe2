"""
:class:`.WeightRobustTrainer` in a ``torch.distributed`` process group (docs/distributed.md).

Every rank holds the same model and optimizer and computes its part of each global batch (:mod:`.batches`). The loss
of the global batch is the mean over its samples of per-sample terms plus the parameter-only term ``μ · Σ‖W‖``; its
gradient is ``Σ_r (n_r / n) · ∇L_r``, where ``L_r`` is the same loss on rank ``r``'s ``n_r`` samples. So each rank
scales its loss by ``n_r / n`` before ``backward`` and the gradients are *summed* over the ranks in one flat
all-reduce (:func:`.all_reduce_gradients`): the exact single-process gradient, also for a last batch that does not
split evenly (DDP divides by the number of ranks instead) and for the robust term, whose bound reads the parameters
outside the module's forward (where DDP's bucketing expects every gradient to come from the wrapped forward). The
classifier keeps the user's module: no wrapper to unwrap after ``fit``. Batch norm in train mode uses the global
batch's statistics (:mod:`.sync_batch_norm`). The identical gradients give identical optimizer steps on every rank;
parameters and buffers are broadcast from rank 0 when training starts and when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from art_weightpert import distributed
from art_weightpert.defences.trainer.batches import Shard
from art_weightpert.defences.trainer.sync_batch_norm import synchronized_batch_norm
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier


def check_loss_reduction(estimator: PyTorchWeightClassifier) -> None:
    """In a process group the classifier's loss must average over the batch (ART's default ``CrossEntropyLoss()``):
    the ranks' losses are weighted by their share of the global batch; and the group's backend must reduce tensors on
    the estimator's device."""
    distributed.check_backend(estimator.device)
    reduction = getattr(estimator._loss, "reduction", "mean")  # pylint: disable=protected-access
    if distributed.is_distributed() and reduction != "mean":
        raise ValueError(
            f"the classifier's loss has reduction={reduction!r}; distributed training needs reduction='mean' (the "
            "ranks' losses are weighted by their share of the global batch)."
        )


@contextlib.contextmanager
def data_parallel(model: torch.nn.Module) -> Iterator[None]:
    """Training in a process group: rank 0's parameters and buffers on every rank at the start and at the end,
    batch norm on the global batch in between; nothing outside a process group."""
    distributed.broadcast_module(model)
    with synchronized_batch_norm(model):
        yield
    distributed.broadcast_module(model)


def share(shard: Shard, local_size: int) -> float:
    """The weight ``n_r / n`` of this rank's loss in the global batch's (1 in one process)."""
    return local_size / shard.global_size if shard.global_size else 0.0


def empty_shard_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero loss through this rank's (empty) forward: its backward still takes part in the collectives of
    synchronized batch norm, which every rank must enter."""
    return logits.sum() * 0.0


def reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the weighted gradients of the trainable ``parameters`` over the ranks (the global batch's gradient)."""
    distributed.all_reduce_gradients(parameters)


def reduce_epoch_sums(sums: dict[str, float], label_counts: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """The epoch's sums of the terms (weighted by samples) and its label counts over all ranks, identical on every
    rank (the history, the learning-rate scheduler and the collapse detector see the single-process values)."""
    if not distributed.is_distributed():
        return sums, label_counts
    flat = torch.tensor([*sums.values(), *label_counts.tolist()], dtype=torch.float64)
    flat = distributed.all_reduce_sum(flat.to(distributed.collective_device())).cpu()
    reduced = dict(zip(sums, flat[: len(sums)].tolist()))
    return reduced, flat[len(sums) :].numpy().round().astype(np.int64)


__all__ = [
    "check_loss_reduction",
    "data_parallel",
    "empty_shard_loss",
    "reduce_epoch_sums",
    "reduce_gradients",
    "share",
]
