"""
Batches of :class:`.WeightRobustTrainer`: drawn with the same random numbers as ``PyTorchClassifier.fit``'s shuffling
``DataLoader`` and preprocessed as it preprocesses them, so that plain training through the trainer reproduces ART's
``fit`` step by step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from art.attacks.attack import EvasionAttack
from art.data_generators import DataGenerator

from art_weightpert import distributed
from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier, eval_mode


def _draw_seed() -> int:
    """One int64 from torch's global random generator, drawn as ``DataLoader`` and ``RandomSampler`` draw theirs."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


class ShuffledIndexBatches:
    """
    Index batches ``(≤ batch_size,)`` over ``0..n-1``, reshuffled at every pass on torch's global random generator,
    with the same random numbers as ``PyTorchClassifier.fit``'s ``DataLoader(..., shuffle=True)`` (single process):
    its iterator draws a base seed for workers, then its ``RandomSampler`` draws the seed of its own generator and
    takes one ``randperm``. Drawing them directly skips the loader's per-batch machinery (a third of a millisecond
    per epoch of the digits MLP); ``tests/test_trainer.py`` checks the order against ``DataLoader``'s.
    """

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        _draw_seed()  # the loader's base seed (unused without workers)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_draw_seed()))
        return iter(order.split(self.batch_size))


class Shard(NamedTuple):
    """Where this rank's samples sit in the global batch: from position ``offset`` of ``global_size`` samples (offset
    0 and the whole batch in one process)."""

    offset: int
    global_size: int


# (preprocessed inputs, int64 labels, raw inputs or None, raw labels or None, shard): raw ones only when an attack
# needs them; in a process group the tensors hold this rank's part of the global batch only
Batch = tuple[torch.Tensor, torch.Tensor, np.ndarray | None, np.ndarray | None, Shard]


def epoch_order(loader: ShuffledIndexBatches) -> Iterator[torch.Tensor]:
    """One epoch's global index batches: the loader's own, or in a process group rank 0's, broadcast (every rank then
    sees the order a single process seeded like rank 0 draws, whatever the other ranks' random generators hold)."""
    if not distributed.is_distributed():
        return iter(loader)
    order = distributed.broadcast_object([index.numpy() for index in loader] if distributed.is_main_process() else None)
    return (torch.as_tensor(index) for index in order)


def array_batches(
    estimator: PyTorchWeightClassifier, x: np.ndarray, labels: np.ndarray, batch_size: int, keep_raw: bool
) -> tuple[Callable[[], Iterator[Batch]], int]:
    """The epochs of ``fit`` on arrays: a function that yields one epoch's shuffled batches (preprocessed once, on the
    estimator's device), and the number of batches per epoch."""
    x_pre, y_pre = preprocess_batch(estimator, x, labels)
    loader = ShuffledIndexBatches(len(x), batch_size)

    def batches() -> Iterator[Batch]:
        for global_index in epoch_order(loader):
            part = distributed.shard_of_batch(len(global_index))
            index, shard = global_index[part], Shard(part.start, len(global_index))
            on_device = index.to(x_pre.device)  # index_select: cheaper than x_pre[index]
            x_batch, y_batch = x_pre.index_select(0, on_device), y_pre.index_select(0, on_device)
            if keep_raw:
                idx = index.numpy()
                yield x_batch, y_batch, x[idx], labels[idx], shard
            else:
                yield x_batch, y_batch, None, None, shard

    return batches, len(loader)


def generator_batches(
    estimator: PyTorchWeightClassifier, generator: DataGenerator
) -> tuple[Callable[[], Iterator[Batch]], int]:
    """The epochs of ``fit_generator``: ``ceil(size / batch_size)`` batches of the ART ``DataGenerator`` per epoch (as
    ART's trainers do), checked and preprocessed. In a process group each rank's generator yields its own part of
    every global batch (the global batch is the parts in rank order): every rank must count the same number of
    batches per epoch, and the first batches must differ between ranks (a generator that yields the same batches
    everywhere would train on copies)."""
    if not isinstance(generator, DataGenerator):
        raise TypeError(f"`generator` must be an ART DataGenerator, got {type(generator).__name__}.")
    if generator.size is None:
        raise ValueError("`generator` must know its size to define an epoch.")
    nb_batches = int(math.ceil(generator.size / generator.batch_size))
    if not distributed.all_equal(nb_batches):
        raise ValueError(
            "`generator`: every rank's generator must yield the same number of batches per epoch "
            "(ceil(size / batch_size)); in a process group each rank's generator yields its own shard."
        )
    first = [True]

    def batches() -> Iterator[Batch]:
        for _ in range(nb_batches):
            x_batch, y_batch = generator.get_batch()
            x_batch = estimator.check_inputs(np.asarray(x_batch))
            labels = estimator.check_labels(y_batch, len(x_batch), required=True)
            if first[0] and not distributed.all_distinct_data(x_batch, labels):
                raise ValueError(
                    "`generator` yields the same batch on several ranks: in a process group each rank's generator "
                    "must yield its own shard of every global batch (docs/distributed.md)."
                )
            first[0] = False
            x_pre, y_pre = preprocess_batch(estimator, x_batch, labels)
            yield x_pre, y_pre, x_batch, labels, generator_shard(len(x_batch))

    return batches, nb_batches


def generator_shard(local_size: int) -> Shard:
    """This rank's :class:`Shard` of a global batch made of every rank's generator batch, in rank order (one small
    all-reduce of the sizes in a process group)."""
    if not distributed.is_distributed():
        return Shard(0, local_size)
    sizes = torch.zeros(distributed.world_size(), dtype=torch.float64)
    sizes[distributed.rank()] = local_size
    sizes = distributed.all_reduce_sum(sizes.to(distributed.collective_device())).cpu()
    return Shard(int(sizes[: distributed.rank()].sum()), int(sizes.sum()))


def preprocess_batch(
    estimator: PyTorchWeightClassifier, x: np.ndarray, labels: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """ART's preprocessing as in ``PyTorchClassifier.fit`` (``fit=True``, one-hot labels), as tensors on the
    estimator's device (labels as int64 class indices)."""
    one_hot = np.eye(estimator.nb_classes, dtype=np.float32)[labels]
    x_pre, y_pre = estimator._apply_preprocessing(x, one_hot, fit=True)  # pylint: disable=protected-access
    y_pre = np.asarray(y_pre)
    y_idx = np.argmax(y_pre, axis=1) if y_pre.ndim == 2 else y_pre
    x_t = torch.as_tensor(np.asarray(x_pre, dtype=np.float32), device=estimator.device)
    return x_t, torch.as_tensor(y_idx.astype(np.int64), device=estimator.device)


def with_adversarial_inputs(
    attack: EvasionAttack | None,
    ratio: float,
    estimator: PyTorchWeightClassifier,
    x_pre: torch.Tensor,
    x_raw: np.ndarray | None,
    labels: np.ndarray | None,
    shard: Shard,
) -> torch.Tensor:
    """The batch with the first ``round(ratio · n)`` inputs of the global batch of ``n`` replaced by ``attack``'s
    adversarial inputs (generated on the current model, in eval mode, from the raw inputs, then preprocessed); of
    these, this rank replaces the ones in its shard."""
    if attack is None or x_raw is None or labels is None:
        return x_pre
    nb_adv = min(max(int(round(ratio * shard.global_size)) - shard.offset, 0), len(x_raw))
    if nb_adv == 0:
        return x_pre
    one_hot = np.eye(estimator.nb_classes, dtype=np.float32)[labels[:nb_adv]]
    with eval_mode(estimator.base_model):
        x_adv = attack.generate(x_raw[:nb_adv], y=one_hot)
    x_adv_pre, _ = preprocess_batch(estimator, np.asarray(x_adv, dtype=np.float32), labels[:nb_adv])
    return torch.cat([x_adv_pre, x_pre[nb_adv:]])


__all__ = [
    "Batch",
    "Shard",
    "ShuffledIndexBatches",
    "array_batches",
    "epoch_order",
    "generator_batches",
    "generator_shard",
    "preprocess_batch",
    "with_adversarial_inputs",
]
