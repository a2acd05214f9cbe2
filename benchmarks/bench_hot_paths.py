"""
Issue 17's table, before and after, on the same machine in the same run.

Each row is measured in a child process (``--row NAME``) that imports ``art_weightpert`` from the ``PYTHONPATH`` it
is given, so that one run compares a base checkout (``--base DIR``, e.g. a ``git worktree`` of the commit before the
change) with this checkout, alternating base / new for ``--rounds`` rounds. The children pin nothing themselves; run
the whole script under ``taskset -c 1`` with ``--threads 1`` on a shared machine. Reported per row and code version:
the ratio's minimum and median over the rounds (each ratio from process CPU times, minimum over ``--repeats``), with
the load average at the start and end.

Rows (ratios, as in the issue):

* ``pgd_<ball>``: one :class:`.WeightPGD` iteration / one plain forward+backward (``benchmarks/bench_attack.py``'s
  set-up: MLP 784-512-512-10, batch 1024; the median CPU-time ratio; targets inf, l2 ≤ 1.2, row_l1 ≤ 1.3);

* ``radius_linear_<ball>``: ``certified_radius(method="linear")`` on 100 points of the MLP 784-512-512-10 / one
  ``margin_lower_bounds`` call on the same points (target ≤ 5);
* ``linear_<model>``: one ``"linear"`` (``inf``, 1e-3) ``margin_lower_bounds`` call at batch ``--batch`` (the CNN:
  ``--cnn-batch``) / one float32 forward of the same batch (target ≤ 30);
* ``train_<bound>``: one epoch of :class:`.WeightRobustTrainer` / one epoch of ART's ``fit``
  (``benchmarks/bench_train.py``'s set-up; targets interval ≤ 1.5, paper ≤ 1.3).

Usage: ``taskset -c 1 python benchmarks/bench_hot_paths.py --base /tmp/base [--rounds 3] [--rows ...]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = (
    "pgd_inf",
    "pgd_l2",
    "pgd_row_l1",
    "radius_linear_inf",
    "radius_linear_row_l1",
    "linear_mlp",
    "linear_cnn",
    "train_interval",
    "train_paper",
)
TARGETS = {"pgd_inf": 1.2, "pgd_l2": 1.2, "pgd_row_l1": 1.3, "radius": 5.0, "linear": 30.0}
TARGETS |= {"train_interval": 1.5, "train_paper": 1.3}


def _best(fn, repeats: int) -> float:
    """The minimum process CPU time of ``fn()`` over ``repeats`` calls after a warm-up (one thread: its compute time,
    steadier than wall-clock time on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def _radius_row(ball: str, repeats: int) -> float:
    import numpy as np
    import torch
    from bench_certify import mlp

    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier

    torch.manual_seed(0)
    model = mlp().eval()
    clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), (784,), 10)
    x = np.random.default_rng(0).random((100, 784), dtype=np.float32)
    budget = PerturbationBudget(1e-3, "inf") if ball == "inf" else PerturbationBudget(1e-2, "row_l1")
    certifier = WeightPerturbationCertifier(clf, budget, method="linear", batch_size=100, verbose=False)
    one = _best(lambda: certifier.margin_lower_bounds(x), repeats)
    return _best(lambda: certifier.certified_radius(x), repeats) / one


def _linear_row(model_name: str, batch: int, repeats: int) -> float:
    import numpy as np
    import torch
    from bench_certify import cnn, mlp

    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier

    torch.manual_seed(0)
    model, shape = (mlp(), (784,)) if model_name == "mlp" else (cnn(), (1, 28, 28))
    model.eval()
    clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), shape, 10)
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    x_t = torch.as_tensor(x)
    with torch.no_grad():
        forward = _best(lambda: model(x_t), repeats * 3)
    certifier = WeightPerturbationCertifier(
        clf, PerturbationBudget(1e-3, "inf"), method="linear", batch_size=batch, verbose=False
    )
    return _best(lambda: certifier.margin_lower_bounds(x), repeats) / forward


def _pgd_row(norm: str, repeats: int) -> float:
    import art.config
    import numpy as np
    import torch
    from bench_attack import BATCH, EPS, make_model, measure_ball, plain_step

    from art_weightpert import PyTorchWeightClassifier

    art.config.set_data_path(tempfile.mkdtemp(prefix="art_bench_"))
    model = make_model("cpu").eval()
    gen = np.random.default_rng(0)
    x, y = gen.random((BATCH, 784), dtype=np.float32), gen.integers(0, 10, BATCH)
    clf = PyTorchWeightClassifier(model, torch.nn.CrossEntropyLoss(), (784,), 10, clip_values=(0.0, 1.0))
    plain_step(model, torch.as_tensor(x), torch.as_tensor(y), "cpu", 3)  # warm-up
    args = argparse.Namespace(device="cpu", iters=10, repeats=max(3, repeats))
    return measure_ball(clf, model, x, y, norm, EPS[norm], args)["ratio_cpu_time_median"]


def _train_row(bound: str, repeats: int) -> float:
    from bench_train import epoch_time

    from art_weightpert.data import load_digits_data

    x, y, _, _ = load_digits_data()
    art = min(epoch_time("art", x, y, 3)[1] for _ in range(repeats))
    ours = min(epoch_time(bound, x, y, 3)[1] for _ in range(repeats))
    return ours / art  # CPU-time ratio (steadier on a shared machine)


def child(row: str, args: argparse.Namespace) -> float:
    import torch

    torch.set_num_threads(args.threads)
    try:  # forward passes and bounds timed in the allocator state the bounds set (a base checkout may predate it)
        from art_weightpert.torch_tools import keep_freed_memory
    except ImportError:
        keep_freed_memory = None
    if keep_freed_memory is not None:
        keep_freed_memory()
    sys.path.insert(0, str(HERE))
    if row.startswith("pgd_"):
        return _pgd_row(row[len("pgd_") :], args.repeats)
    if row.startswith("radius_linear_"):
        return _radius_row(row[len("radius_linear_") :], args.repeats)
    if row.startswith("linear_"):
        name = row[len("linear_") :]
        return _linear_row(name, args.batch if name == "mlp" else args.cnn_batch, args.repeats)
    return _train_row(row[len("train_") :], args.repeats)


def run_child(row: str, root: Path, args: argparse.Namespace) -> float:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(args.threads), MPLBACKEND="Agg")
    cmd = [sys.executable, str(HERE / "bench_hot_paths.py"), "--row", row, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--batch", str(args.batch), "--cnn-batch", str(args.cnn_batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{row} under {root} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def target(row: str) -> float:
    return TARGETS[row] if row in TARGETS else TARGETS[row.split("_")[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, help="checkout of the code before the change (its root)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--cnn-batch", type=int, default=256, help="the CNN's batch (1024 takes minutes per call)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.row:
        print(child(args.row, args))
        return
    versions = {"new": HERE.parent} | ({"base": args.base.resolve()} if args.base else {})
    load_start = os.getloadavg()
    ratios: dict[str, dict[str, list[float]]] = {row: {v: [] for v in versions} for row in args.rows}
    for _ in range(args.rounds):
        for row in args.rows:
            for version, root in sorted(versions.items()):  # base, then new: alternating
                ratios[row][version].append(run_child(row, root, args))
                print(f"{row} {version}: {ratios[row][version][-1]:.2f}", file=sys.stderr, flush=True)
    table = {
        row: {
            version: {"ratio_min": min(v), "ratio_median": statistics.median(v), "ratios": v}
            for version, v in per.items()
        }
        | {"target": target(row), "meets_target": min(per["new"]) <= target(row)}
        for row, per in ratios.items()
    }
    out = {"threads": args.threads, "rounds": args.rounds, "load_average": [load_start, os.getloadavg()]}
    print(json.dumps(out | {"rows": table}, indent=2))


if __name__ == "__main__":
    main()
