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

import atexit
import hashlib
import itertools
import multiprocessing.util
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from art_weightpert.torch_tools import batch_slices
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


def collective_device() -> torch.device:
    """Where tensors handed to a collective must live: the current CUDA device under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_backend(device: torch.device | str) -> None:
    """``ValueError`` when the process group cannot reduce tensors on ``device`` (NCCL and CPU tensors): the group
    must be initialized with the backend of the device the model lives on (gloo for the CPU, NCCL for CUDA)."""
    if not is_distributed():
        return
    backend = str(dist.get_backend()).lower()
    if torch.device(device).type == "cpu" and backend == "nccl":
        raise ValueError(
            "the process group's backend is 'nccl', which cannot reduce CPU tensors, but the model is on the CPU: "
            "initialize the group with 'gloo' (or 'cpu:gloo,cuda:nccl'), or move the model to the GPU."
        )


def my_batches(n: int, batch_size: int) -> Iterator[slice]:
    """This rank's batches of ``range(n)``: batch ``b`` (``[b·batch_size, (b+1)·batch_size)``) belongs to rank
    ``b mod world_size``."""
    return itertools.islice(batch_slices(n, batch_size), rank(), None, world_size())


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
    template = next((p for p in everyone if p is not None), None)
    if template is None:
        return np.zeros((0,))
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
    """:func:`all_reduce_sum_list` of the values, keyed as ``tensors``."""
    if not is_distributed() or not tensors:
        return tensors
    return dict(zip(tensors, all_reduce_sum_list(list(tensors.values()))))


def all_reduce_sum_list(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The sums over the ranks of ``tensors`` (new tensors, one flat collective per dtype and device); the inputs
    themselves outside a process group."""
    if not is_distributed():
        return list(tensors)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[Any] = [None] * len(tensors)
    for members in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i in members:
            out[i] = flat[offset : offset + tensors[i].numel()].view_as(tensors[i])
            offset += tensors[i].numel()
    return out


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as held by rank ``src``, on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _digest(*arrays: np.ndarray | None) -> str:
    digest = hashlib.sha1()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            digest.update(repr((a.shape, a.dtype.str)).encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def all_equal(value: Any) -> bool:
    """True when every rank holds an equal (picklable) ``value``; always True outside a process group."""
    if not is_distributed():
        return True
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, value)
    return all(v == everyone[0] for v in everyone)


def all_distinct_data(*arrays: np.ndarray | None) -> bool:
    """True when no two ranks hold the same arrays (the digest of :func:`check_same_data`)."""
    if not is_distributed():
        return True
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, _digest(*arrays))
    return len(set(everyone)) == len(everyone)


def check_same_data(*arrays: np.ndarray | None, name: str = "x") -> None:
    """
    ``ValueError`` unless every rank holds the same arrays (a cheap digest of their shapes and bytes): sharded work
    assumes every rank was given the whole data set, in the same order. Nothing to check (and nothing hashed)
    outside a process group.
    """
    if is_distributed() and not all_equal(_digest(*arrays)):
        raise ValueError(
            f"`{name}` differs across ranks ({world_size()} processes): every rank must pass the same data in the same "
            "order; the library shards it itself."
        )


def map_batches(function: Callable[[np.ndarray], np.ndarray], n: int, batch_size: int) -> np.ndarray:
    """``function`` of the indices of this rank's batches of ``range(n)`` (:func:`my_batches`; ``arange(n)`` in one
    process), called once, with its per-sample results gathered on every rank in single-process order
    (:func:`gather_batches`). One call per rank keeps the use of torch's global generator as in one process (every
    ``DataLoader`` pass, e.g. in ART's ``predict``, draws from it)."""
    batches = list(my_batches(n, batch_size))
    if not batches:
        return gather_batches([], n, batch_size)
    out = np.asarray(function(np.concatenate([np.arange(s.start, s.stop) for s in batches])))
    return gather_batches(np.split(out, np.cumsum([s.stop - s.start for s in batches])[:-1]), n, batch_size)


def shard_of_batch(size: int) -> slice:
    """This rank's contiguous slice of a global batch of ``size`` samples: sizes differ by at most one, the first
    ranks take the extra samples (as ``torch.tensor_split``); empty when ``size < world_size``."""
    base, extra = divmod(size, world_size())
    start = rank() * base + min(rank(), extra)
    return slice(start, start + base + (rank() < extra))


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place (as DDP does at start)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter]) -> None:
    """
    Sum the ``.grad`` of ``parameters`` over the ranks, in place, as one flat collective. A gradient that is None on
    every rank stays None (an optimizer skips it, as in one process); None on some ranks counts as zero there.
    """
    if not is_distributed() or not parameters:
        return
    ref = parameters[0]
    flags = torch.tensor([p.grad is not None for p in parameters], dtype=ref.dtype, device=ref.device)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads] + [flags])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    had_grad = (flat[-len(parameters) :] > 0).tolist()
    offset = 0
    for p, any_grad in zip(parameters, had_grad):
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone() if any_grad else None
        offset += p.numel()


def launch(function: Callable[..., Any], nproc: int, args: tuple = (), device_type: str = "cpu") -> None:
    """
    Run ``function(*args)`` in ``nproc`` processes on this machine, each in a process group (gloo on CPU, NCCL on
    CUDA, one GPU per process), as ``torchrun --standalone --nproc-per-node nproc`` would. When one process fails,
    the others are stopped and the error of the process that failed *first* is raised here (the others typically
    fail next, on the broken connection), naming its rank: no hang. ``nproc == 1`` runs ``function`` in this process.

    :param function: a picklable (module-level) function. A process whose function returned ends after its
        ``atexit`` handlers without the interpreter's finalization (:func:`_exit_after_success`): close the files it
        writes before returning.
    """
    nproc = check_positive_int(nproc, "nproc")
    if nproc == 1:
        function(*args)
        return
    if device_type in ("cuda", "gpu") and torch.cuda.device_count() < nproc:
        raise ValueError(f"`nproc` is {nproc} but only {torch.cuda.device_count()} CUDA device(s) are visible.")
    staging = tempfile.mkdtemp(prefix="art-weightpert-launch-")  # the rendezvous file and the ranks' errors
    try:
        torch.multiprocessing.spawn(
            _worker, args=(nproc, staging, device_type, function, args), nprocs=nproc, join=True
        )
    except Exception as err:
        first = _first_error(staging)
        if first is None:
            raise
        raise RuntimeError(first) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _first_error(staging: str) -> str | None:
    """The error recorded first by a process of :func:`launch` (its rank and traceback), or None."""
    recorded = []
    for name in os.listdir(staging):
        if not name.endswith(".error"):
            continue
        with open(os.path.join(staging, name), encoding="utf-8") as handle:
            stamp, text = handle.read().split("\n", 1)
        recorded.append((float(stamp), text))
    return min(recorded)[1] if recorded else None


def _worker(local_rank: int, nproc: int, staging: str, device_type: str, function: Callable, args: tuple) -> None:
    """
    One process of :func:`launch`. The rendezvous is a file in the launch's private folder, not a TCP port: a port
    found free by the parent can be taken before rank 0 binds it (by a launch running beside this one), and a rank
    that joins another launch's group sends it collectives of other sizes, on which gloo aborts the process.
    Every rank that succeeded waits for the others (a barrier) before it closes the group: a rank that tears down
    while a peer's last collective is still reading from it aborts that peer (gloo's "connection closed by peer").
    A rank that succeeded then ends without the interpreter's finalization (:func:`_exit_after_success`).
    """
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(local_rank))
    backend = backend_for(device_type)
    try:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        rendezvous = "file://" + os.path.join(staging, "rendezvous")
        dist.init_process_group(backend, init_method=rendezvous, rank=local_rank, world_size=nproc)
        function(*args)
        dist.barrier()
    except BaseException as err:
        with open(os.path.join(staging, f"rank{local_rank}.error"), "w", encoding="utf-8") as handle:
            handle.write(f"{time.time()!r}\nprocess {local_rank} of {nproc} failed: {type(err).__name__}: {err}\n")
            handle.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _exit_after_success()


def _exit_after_success() -> None:
    """
    End a process of :func:`launch` whose function succeeded: its ``atexit`` handlers run and the standard streams
    are flushed, then the process exits with status 0 *without* the interpreter's finalization.

    Gloo's worker threads outlive :func:`torch.distributed.destroy_process_group`, and one may still be releasing the
    last collective's work after the collective returned. When those tensors' Python objects have died, that release
    takes the GIL; a thread that asks for the GIL while the interpreter finalizes is unwound through a ``noexcept``
    destructor, and C++ terminates the process (SIGABRT, "terminate called without an active exception": a
    successful launch reported as failed). Caught under gdb on this library's training test, about one launch in
    ten on one loaded core (``pt_gloo_runloop`` in ``~AsyncAllreduceWork`` while the main thread is in
    ``Py_FinalizeEx``); PyTorch's pull request #179291 describes the same race. Files the function left open in
    module globals are not flushed by this exit: close them (a ``with`` block) before returning.
    """
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    multiprocessing.util._exit_function()  # what the process's bootstrap runs after its target: finalizers, children
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(0)
