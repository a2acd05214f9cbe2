"""
The torch helpers every layer shares, each written once: a module's training flags kept (:func:`kept_training_flags`)
or set to eval for a block (:func:`eval_mode`), the private float64 copy a certificate computes on
(:func:`float64_copy`), a module run with given parameters in place of its own (:func:`run_with_parameters`) and the
slices of samples in batches (:func:`batch_slices`), a method of some modules replaced for a block
(:func:`replaced_method`), and freed memory kept for reuse by the C allocator (:func:`keep_freed_memory`).

Nothing here reads the package: the layers above (``network``, ``estimators``, ``certification``, ``attacks``,
``defences``, ``metrics``) call these instead of repeating them.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


@contextlib.contextmanager
def kept_training_flags(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module`` may change modes (``train()``, ``eval()``); on exit, also after an exception, each
    of its submodules gets back its own training flag (``module.train(flag)`` would set them all alike)."""
    flags = {m: m.training for m in module.modules()}
    try:
        yield module
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block, then each submodule's training flag restored
    (:func:`kept_training_flags`)."""
    with kept_training_flags(module):
        module.eval()
        yield module


def float64_copy(module: nn.Module) -> nn.Module:
    """A private float64 copy of ``module`` (parameters and buffers) whose parameters need no gradient: what the
    certificates compute on, so that the user's module is never written to."""
    return copy.deepcopy(module).to(torch.float64).requires_grad_(False)


def run_with_parameters(module: nn.Module, parameters: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)`` with the tensors of ``parameters`` (keyed as ``module.named_parameters()``, a
    subset allowed) in place of its own, through ``torch.func.functional_call``: gradients flow to the given
    tensors, and ``module`` is not modified."""
    return functional_call(module, dict(parameters), args, kwargs, strict=False)


def batch_slices(n: int, batch_size: int) -> Iterator[slice]:
    """The slices ``[0, batch_size), [batch_size, 2·batch_size), …`` of ``range(n)``, the last one shorter."""
    return (slice(start, min(start + batch_size, n)) for start in range(0, n, batch_size))


@contextlib.contextmanager
def replaced_method(modules: Iterable[nn.Module], name: str, function: Callable[..., Any]) -> Iterator[None]:
    """Within the block, method ``name`` of each of ``modules`` is ``function`` bound to it (an instance attribute);
    on exit, also after an exception, each module's own attribute is restored or the replacement removed."""
    modules = list(modules)
    saved = {m: m.__dict__.get(name) for m in modules}
    try:
        for m in modules:
            setattr(m, name, types.MethodType(function, m))
        yield
    finally:
        for m, own in saved.items():
            if own is None:
                delattr(m, name)
            else:
                setattr(m, name, own)


__all__ = [
    "batch_slices",
    "eval_mode",
    "float64_copy",
    "keep_freed_memory",
    "kept_training_flags",
    "replaced_method",
    "run_with_parameters",
    "vector_times_rows",
]


HEAP_BLOCK_BYTES = 31 * 2**20
"""Size of the block :func:`keep_freed_memory` allocates and frees: just below glibc's 32 MiB ceiling on the adaptive
threshold, above the bounds' chunk tensors (``CHUNK_BYTES``) and the activations of a forward pass of a few hundred
small images (a 16-channel 28x28 map of 256 samples: 12.8 MB; with 16 MiB that CNN's forward pass still took 29-35 ms
on one core, with 31 MiB 19-20 ms)."""

_freed_memory_kept = False


def keep_freed_memory() -> None:
    """
    Let glibc's ``malloc`` keep the memory that torch's CPU tensors free, once per process. glibc serves a block above
    its mmap threshold (128 KiB at first) by ``mmap``, and returns the free memory at the top of its heap to the system
    beyond its trim threshold (128 KiB at first); freeing a mapped block of at most 32 MiB (16 MiB on 32-bit systems)
    raises the mmap threshold to the block's size and the trim threshold to twice that. Until some large block has
    been freed, the chunk-sized temporaries of the linear bounds (and a forward pass's activations) are mapped or
    trimmed at every step and their pages faulted in afresh: on one core a third of the linear bound of an MLP
    784-512-512-10 at batch 1024 (docs/results.md). Allocating and freeing one untouched CPU block of
    :data:`HEAP_BLOCK_BYTES` (a storage: never filled, also under deterministic algorithms) raises both thresholds as
    any program that frees such a block does; the process then keeps up to twice that size of free memory at the top
    of its heap. Elsewhere (another C library or allocator, or thresholds fixed by ``mallopt`` or ``MALLOC_*``
    variables) it only costs the block.
    """
    global _freed_memory_kept  # pylint: disable=global-statement
    if not _freed_memory_kept:
        torch.UntypedStorage(HEAP_BLOCK_BYTES, device="cpu")  # never touched: mapped, then unmapped at once
        _freed_memory_kept = True


def vector_times_rows(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``rows[n] @ v[n]`` for ``rows`` ``(N, K, F)`` and ``v`` ``(N, ...)`` of ``F`` entries: ``(N, K)``, one
    element-wise product and sum per row (``linalg.vecdot``). ``bmm(rows, v[..., None])``, a matrix-vector product per
    sample, runs 3.5-7x slower on the CPU (MKL, one core: 794 against 118 µs on 113 × 9 × 1024 in float32, 400 against
    131 µs on 9 × 9 × 6272 in float64; measured 2026-12-08); ``bmm(v[:, None], rowsᵀ)`` is faster still, but the sum
    of a row depends on how many rows come with it, and the bounds keep it independent of the other rows (a
    specification row dropped gives the same bits). Every rounding term bounds a sum in any order (docs/theory.md §5).

    :raises ValueError: ``v`` and ``rows`` of different lengths or entries (no broadcasting)."""
    if len(v) != len(rows) or v.numel() != len(v) * rows.shape[2]:
        raise ValueError(f"vector_times_rows: v {tuple(v.shape)} against rows {tuple(rows.shape)}")
    return torch.linalg.vecdot(rows, v.reshape(len(v), 1, -1))
