"""
``torch.distributed`` helpers: which process am I, which samples are mine, and how the pieces come back together.

The library joins a process group that the user's script (or ``torchrun``) initialized; it never initializes one
itself, except in :func:`launch`, the launcher behind ``art-weightpert train|evaluate --nproc N``. Without an
initialized group of more than one process every helper is the identity, so single-process code pays nothing.

Sharding is by *whole batches*: rank ``r`` of ``R`` takes batches ``r, r + R, …``. Each batch is then computed
exactly as one process would compute it, so per-sample results (margin bounds, certified radii, accuracies) gathered
back in batch order equal the single-process ones bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from art_weightpert.validation import check_positive_int


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that logs, shows progress bars and writes files."""
    return rank() == 0


def backend_for(device_type: str) -> str:
    """The collective backend for a device type: NCCL for CUDA, gloo otherwise."""
    return "nccl" if device_type in ("cuda", "gpu") and torch.cuda.is_available() else "gloo"


def my_batches(n: int, batch_size: int) -> Iterator[slice]:
    """This rank's batches of ``range(n)``: batch ``b`` (``[b·batch_size, (b+1)·batch_size)``) belongs to rank
    ``b mod world_size``."""
    starts = range(rank() * batch_size, n, world_size() * batch_size)
    return (slice(s, min(s + batch_size, n)) for s in starts)


def gather_batches(pieces: Sequence[np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """
    Reassemble per-batch results computed on :func:`my_batches`: every rank passes its own pieces (one array per
    batch, first axis = the batch's samples) and receives the full ``(n, ...)`` array in single-process order.
    """
    mine = np.concatenate(pieces) if len(pieces) else None
    if not is_distributed():
        return mine if mine is not None else np.zeros((0,))
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    template = next(p for p in everyone if p is not None)
    out = np.empty((n, *template.shape[1:]), dtype=template.dtype)
    for r, part in enumerate(everyone):
        if part is None:
            continue
        offset = 0
        for s in range(r * batch_size, n, world_size() * batch_size):
            size = min(batch_size, n - s)
            out[s : s + size] = part[offset : offset + size]
            offset += size
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (and returned); the identity outside a process group."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sum_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`all_reduce_sum` of every value, as one flat collective."""
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for name, t in tensors.items():
        out[name] = flat[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as held by rank ``src``, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def check_same_data(*arrays: np.ndarray | None, name: str = "x") -> None:
    """
    ``ValueError`` unless every rank holds the same arrays (a cheap digest of their shapes and bytes): sharded work
    assumes every rank was given the whole data set, in the same order.
    """
    if not is_distributed():
        return
    digest = hashlib.sha1()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            digest.update(repr((a.shape, a.dtype.str)).encode())
            digest.update(a.tobytes())
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, digest.hexdigest())
    if len(set(everyone)) > 1:
        raise ValueError(
            f"`{name}` differs across ranks ({world_size()} processes): every rank must pass the same data in the same "
            "order; the library shards it itself."
        )


def free_port() -> int:
    """A free TCP port on the loopback interface (for a single-machine launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(function: Callable[..., Any], nproc: int, args: tuple = (), device_type: str = "cpu") -> None:
    """
    Run ``function(*args)`` in ``nproc`` processes on this machine, each in a process group (gloo on CPU, NCCL on
    CUDA, one GPU per process), as ``torchrun --standalone --nproc-per-node nproc`` would. When one process fails,
    the others are stopped and its error is raised here (no hang). ``nproc == 1`` runs ``function`` in this process.

    :param function: a picklable (module-level) function.
    """
    nproc = check_positive_int(nproc, "nproc")
    if nproc == 1:
        function(*args)
        return
    if device_type in ("cuda", "gpu") and torch.cuda.device_count() < nproc:
        raise ValueError(f"`nproc` is {nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    port = free_port()
    torch.multiprocessing.spawn(_worker, args=(nproc, port, device_type, function, args), nprocs=nproc, join=True)


def _worker(local_rank: int, nproc: int, port: int, device_type: str, function: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(nproc),
        LOCAL_RANK=str(local_rank),
    )  # fmt: skip
    backend = backend_for(device_type)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=local_rank, world_size=nproc)
    try:
        function(*args)
    finally:
        dist.destroy_process_group()
