"""
``art-weightpert train|evaluate --nproc N``: the command in ``N`` processes on this machine, one ``torch.distributed``
process group (gloo on the CPU, NCCL with ``--device gpu``, one GPU per process), through
:func:`art_weightpert.distributed.launch`.

Every rank runs the same command on the same data (the library shards the work and keeps the ranks' models equal).
Rank 0 alone writes, and into staging folders beside the destinations: the files are moved into place, and rank 0's
output printed, only after every rank has finished. When a rank fails, its error is raised here (a usage error stays
one: exit code 2), the staging folders are removed and nothing is written. A ``train`` run that collapsed (decided alike
on every rank) keeps its history and exits with code 3, as in one process. Each process runs torch with
``--threads`` / ``--nproc`` threads (at least 1), so that the processes together use ``--threads`` cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable

from art_weightpert import distributed
from art_weightpert.cli.parser import UsageError, one_line
from art_weightpert.cli.train import TrainingCollapsed

TEXT_FILES = (".json", ".md", ".txt")
"""Written files that may name the staging folder (paths in the report or the history): rewritten when moved."""


def run_command(runner: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``runner(args)``, in ``args.nproc`` processes when the command has ``--nproc`` > 1, with torch's threads set
    first (:func:`thread_settings`; torch's thread count is restored afterwards, for callers in the same process)."""
    import torch

    previous = torch.get_num_threads()
    thread_settings(args)
    try:
        set_threads(args.threads_per_process)
        return _run(runner, args)
    finally:
        torch.set_num_threads(previous)


def thread_settings(args: argparse.Namespace) -> None:
    """Resolve ``--threads`` into ``args.threads`` (threads in all: the flag, or what torch picks — its physical-core
    count, or ``$OMP_NUM_THREADS``) and ``args.threads_per_process`` (``threads // nproc``, at least 1); ``args.nproc``
    is set to 1 for the commands without ``--nproc``."""
    import torch

    args.nproc = getattr(args, "nproc", 1)
    if getattr(args, "threads", None) is None:
        args.threads = torch.get_num_threads()
    args.threads_per_process = max(1, args.threads // args.nproc)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` and, while torch still allows it (before any inter-op parallel work in this
    process), ``torch.set_num_interop_threads(threads)``."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # "cannot set number of interop threads after parallel work has started"
        torch.set_num_interop_threads(threads)


def _run(runner: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    nproc = args.nproc
    if nproc == 1 or distributed.is_distributed():
        return runner(args)
    if args.device == "gpu":
        import torch

        if torch.cuda.device_count() < nproc:
            raise UsageError(f"--nproc {nproc}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    staging = _staging_folders(args)
    try:
        rank0 = copy.copy(args)
        for name, (final, stage) in staging.items():
            setattr(rank0, name, os.path.join(stage, os.path.basename(final)) if final else None)
        errors = tempfile.mkdtemp(prefix="art-weightpert-errors-")
        log = os.path.join(staging["out"][1], ".rank0-output.txt")
        device_type = "cuda" if args.device == "gpu" else "cpu"
        try:
            distributed.launch(_rank_main, nproc, args=(args.command, rank0, log, errors), device_type=device_type)
            collapsed = _recorded(errors, "collapsed")
        except Exception as err:
            usage = _recorded(errors, "usage")  # a usage error stays one (exit code 2)
            if usage is not None:
                raise UsageError(usage) from err
            raise RuntimeError(str(err).strip().splitlines()[0]) from err  # "process r of n failed: ...", one line
        finally:
            shutil.rmtree(errors, ignore_errors=True)
        replacements = {stage: os.path.dirname(final) for final, stage in staging.values() if final}
        with open(log, encoding="utf-8") as handle:
            output = _rewrite(handle.read(), replacements)
        os.remove(log)
        _move_into_place(staging, replacements)
        sys.stdout.write(output)
        if collapsed is not None:  # train: the history is written, the model is not (exit code 3)
            raise TrainingCollapsed(_rewrite(collapsed, replacements))
        return 0
    finally:
        for _, stage in staging.values():
            shutil.rmtree(stage, ignore_errors=True)


def _staging_folders(args: argparse.Namespace) -> dict[str, tuple[str | None, str]]:
    """``{argument: (final path or None, staging folder)}`` for the paths the command writes: ``--out`` (the report
    folder of ``evaluate``, the model file of ``train``) and ``train``'s ``--history``."""
    from art_weightpert.cli import inputs

    if args.command == "evaluate":
        finals = {"out": os.path.join(os.path.abspath(inputs.out_dir(args)), "")}
    else:
        out = os.path.abspath(args.out)
        if not os.path.isdir(os.path.dirname(out)):
            raise UsageError(f"--out {args.out}: folder {os.path.dirname(out)} does not exist")
        finals = {"out": out, "history": os.path.abspath(args.history or os.path.splitext(out)[0] + ".history.json")}
    staging = {}
    for name, final in finals.items():
        parent = os.path.dirname(final.rstrip(os.sep)) or "."
        os.makedirs(parent, exist_ok=True)
        staging[name] = (final, tempfile.mkdtemp(prefix=".art-weightpert-partial-", dir=parent))
    return staging


def _rank_main(command: str, args: argparse.Namespace, log: str, errors: str) -> None:
    """One rank: rank 0 runs the command with its output captured in ``log``; the others quietly, writing into a
    folder that is thrown away. A usage error is recorded in ``errors`` for the parent, then raised (any other error
    reaches the parent through :func:`.distributed.launch`)."""
    from art_weightpert.cli.commands import RUNNERS

    rank = distributed.rank()
    scratch = None
    set_threads(args.threads_per_process)
    try:
        if rank != 0:
            scratch = tempfile.mkdtemp(prefix="art-weightpert-rank-")
            args = copy.copy(args)
            args.quiet = True
            for name in ("out", "history"):
                if getattr(args, name, None):
                    setattr(args, name, os.path.join(scratch, os.path.basename(os.path.normpath(getattr(args, name)))))
            warnings.simplefilter("ignore")
        target = open(log if rank == 0 else os.devnull, "w", encoding="utf-8")  # noqa: SIM115
        with target, contextlib.redirect_stdout(target):
            try:
                code = RUNNERS[command](args)
            except TrainingCollapsed as err:  # decided alike on every rank, at the end: rank 0's files are kept
                _record(errors, rank, "collapsed", err)
                code = 0
        if code != 0:
            raise RuntimeError(f"the command exited with code {code}")
    except UsageError as err:
        _record(errors, rank, "usage", err)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _record(errors: str, rank: int, kind: str, err: BaseException) -> None:
    with open(os.path.join(errors, f"{kind}{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"rank": rank, "kind": kind, "message": one_line(err)}, handle)


def _recorded(errors: str, kind: str) -> str | None:
    """The message of the first rank's recorded ``kind`` of outcome (``"usage"``, ``"collapsed"``), if any."""
    for name in sorted(os.listdir(errors)):
        if name.startswith(kind):
            with open(os.path.join(errors, name), encoding="utf-8") as handle:
                return json.load(handle)["message"]
    return None


def _rewrite(text: str, replacements: dict[str, str]) -> str:
    for stage, final in replacements.items():
        text = text.replace(stage.rstrip(os.sep), final.rstrip(os.sep))
    return text


def _move_into_place(staging: dict[str, tuple[str | None, str]], replacements: dict[str, str]) -> None:
    """Every staged file into its destination folder (text files with the staging paths rewritten)."""
    for final, stage in staging.values():
        destination = final if final.endswith(os.sep) else os.path.dirname(final)
        os.makedirs(destination, exist_ok=True)
        for name in sorted(os.listdir(stage)):
            path = os.path.join(stage, name)
            if name.endswith(TEXT_FILES):
                with open(path, encoding="utf-8") as handle:
                    text = _rewrite(handle.read(), replacements)
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(text)
            os.replace(path, os.path.join(destination, name))


__all__ = ["run_command"]
