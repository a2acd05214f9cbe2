"""
Batch order of :class:`.WeightRobustTrainer`: the same random numbers as ``PyTorchClassifier.fit``'s shuffling
``DataLoader``, so that plain training through the trainer reproduces ART's ``fit`` step by step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler


class _Indices(Dataset):
    """The indices ``0..n-1``; indexing with a list of indices returns them as one tensor."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: Any) -> torch.Tensor:
        return torch.as_tensor(index, dtype=torch.long)


def shuffled_index_batches(n: int, batch_size: int) -> DataLoader:
    """A loader of index batches ``(≤ batch_size,)`` over ``0..n-1``, reshuffled at every pass on torch's global random
    generator: the index sampler of ``DataLoader(..., shuffle=True)`` drawing whole batches at once (the same random
    numbers as ``PyTorchClassifier.fit``'s loader, without its per-sample indexing)."""
    sampler = BatchSampler(RandomSampler(range(n)), batch_size, drop_last=False)
    return DataLoader(_Indices(n), batch_size=None, sampler=sampler)


__all__ = ["shuffled_index_batches"]
