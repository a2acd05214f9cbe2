"""
Comparison with auto_LiRPA (IBP, CROWN-IBP, CROWN, α-CROWN) on weight perturbations of the digits MLP.

Setting: the bias-free ReLU MLP 64-128-64-10 (``zoo.digits_mlp``) trained on ``load_digits_data()`` exactly as in
``benchmarks/bench_certify_digits.py`` (Adam lr 3e-3, 40 epochs, batch 64, cross entropy, seed 0); the first 200 test
points; an absolute box of radius δ (default 6e-3) on every weight of every layer, i.e. the project's
``PerturbationBudget(6e-3, norm="inf")`` = auto_LiRPA's ``PerturbationLpNorm(norm=np.inf, eps=6e-3)`` attached as a
``BoundedParameter`` to each Linear weight (centre = the trained weight, |Δw| ≤ δ entry-wise, inputs fixed). Both
tools bound every point separately (one perturbation per point). Specification: the margins ``f_y − f_j`` for every
``j ≠ y``; a point is certified when it is classified correctly and every margin lower bound is > 0. One CPU thread.

Two stages, because auto_LiRPA must not be installed in the project's environment:

1. ``python benchmarks/compare_auto_lirpa.py prepare --out /tmp/h7`` in the project's environment (needs
   ``art_weightpert``): trains the model, writes ``/tmp/h7/mlp_state_dict.pt`` and ``/tmp/h7/points.npz`` (the 200
   test points), and ``/tmp/h7/project.json`` (the project's ``WeightPerturbationCertifier`` "linear" and
   "interval" certified shares and seconds/sample on the same model and points).
2. ``/tmp/lirpa_venv/bin/python benchmarks/compare_auto_lirpa.py lirpa --data /tmp/h7`` in a scratch venv with
   auto_LiRPA: loads the state dict into an equivalent ``nn.Sequential`` and measures auto_LiRPA; prints the table
   (merged with ``project.json`` when present) and writes ``/tmp/h7/lirpa_<dtype><tag>.json`` and the margin bounds
   ``/tmp/h7/lirpa_bounds_<dtype><tag>.npz``. Skips with a message (exit 0) if auto_LiRPA is not importable.

Timings are CPU seconds per point (``time.process_time`` with one thread: the single-thread cost, meaningful on a
shared, loaded machine), medians over ``--repeats`` for the one-shot methods. α-CROWN on weight perturbations is
slow and memory-hungry in auto_LiRPA (≈ 5 CPU s per point at 20 iterations, ~0.3 GB per point of the batch; a batch
of 200 was killed for memory at 23 GB), so it runs in chunks of ``--alpha-batch`` points (fresh α per chunk) over
``--workers`` one-thread processes; settings with more than ``--alpha-full-max`` iterations run only on the
correct, not yet certified points whose best earlier min margin bound exceeds ``--alpha-candidates`` (the others
keep their best earlier bound; the row's note says so). The measured runs (α-CROWN on the 20 points whose CROWN
min margin bound lies in (−1.5, 0]; a full 20-iteration run over all 200 points cost ≈ 5.1 CPU s per point):

    lirpa --alpha-iters 20 --alpha-full-max 0 --alpha-candidates -1.5 --workers 2 --repeats 5 --tag _a20
    lirpa --alpha-iters 100 --alpha-full-max 0 --alpha-candidates -1.5 --workers 2 --repeats 1 --tag _a100

Scratch venv (never install auto_LiRPA into the project's environment; auto_LiRPA's setup.py pins torch<2.9, so
install it without dependencies and add its pure-Python ones by hand)::

    python -m venv /tmp/lirpa_venv
    /tmp/lirpa_venv/bin/pip install /path/to/torch-2.13.0+cpu-*.whl        # the CPU wheel, never a CUDA one
    /tmp/lirpa_venv/bin/pip install numpy scikit-learn packaging appdirs pyyaml tqdm graphviz
    git clone https://github.com/Verified-Intelligence/auto_LiRPA /tmp/auto_lirpa_src   # May 2026 release, a050a3d
    /tmp/lirpa_venv/bin/pip install --no-deps /tmp/auto_lirpa_src

Other options: ``--eps`` (default 6e-3), ``--points`` (200), ``--alpha-iters`` (default ``20,100``), ``--lr-alpha``
(0.5, auto_LiRPA's default), ``--dtype`` (``float32``, auto_LiRPA's default, or ``float64``), ``--tag``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

TOLERANCE = 0.0  # certified when every margin lower bound is > 0 (auto_LiRPA side)


def make_mlp() -> nn.Sequential:
    """The same module layout as ``art_weightpert.zoo.digits_mlp()`` (so state dicts load either way)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128, bias=False),
        nn.ReLU(),
        nn.Linear(128, 64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 10, bias=False),
    )


def timed(fn, repeats: int):
    """Median CPU seconds (``time.process_time``: one thread, so the single-thread cost even on a loaded machine) of
    ``repeats`` calls (after one warm-up call when repeats > 1) and the last output."""
    out = fn() if repeats > 1 else None
    times = []
    for _ in range(max(repeats, 1)):
        start = time.process_time()
        out = fn()
        times.append(time.process_time() - start)
    return statistics.median(times), out


# ------------------------------------------------------------------------------------------- stage 1: project env
def prepare(args: argparse.Namespace) -> None:
    from bench_certify_digits import train  # the project's environment only (it imports art_weightpert)

    from art_weightpert import PerturbationBudget, PyTorchWeightClassifier, WeightPerturbationCertifier
    from art_weightpert.data import load_digits_data
    from art_weightpert.zoo import digits_mlp

    os.makedirs(args.out, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_data()
    model = train(digits_mlp(), x_train, y_train)
    x, y = x_test[: args.points], y_test[: args.points]
    torch.save(model.state_dict(), os.path.join(args.out, "mlp_state_dict.pt"))
    np.savez(os.path.join(args.out, "points.npz"), x=x, y=y)
    with torch.no_grad():
        clean = float((model(torch.as_tensor(x)).argmax(1) == torch.as_tensor(y)).double().mean())
    classifier = PyTorchWeightClassifier(model, nn.CrossEntropyLoss(), (64,), 10)
    budget = PerturbationBudget(args.eps, norm="inf")
    # versions with a ``dtype`` argument certify in float32 (with rounding terms) or float64; older ones in float64
    has_dtype = "dtype" in inspect.signature(WeightPerturbationCertifier.__init__).parameters
    dtypes = (torch.float32, torch.float64) if has_dtype else (None,)
    rows = []
    for method in ("interval", "linear"):
        for dtype in dtypes:
            kwargs = {"dtype": dtype} if has_dtype else {}
            certifier = WeightPerturbationCertifier(
                classifier, budget, method=method, batch_size=args.points, verbose=False, **kwargs
            )
            seconds, cert = timed(lambda c=certifier: c.certify(x, y), args.repeats)
            precision = "float64" if dtype is None else str(dtype).split(".")[-1]
            rows.append(
                {
                    "tool": "art_weightpert",
                    "method": f'WeightPerturbationCertifier(method="{method}"), {precision}',
                    "certified": float(np.mean(cert)),
                    "s_per_sample": seconds / len(x),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    out = {
        "eps": args.eps,
        "points": len(x),
        "clean_accuracy": clean,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(os.path.join(args.out, "project.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))


# ---------------------------------------------------------------------------------------- stage 2: scratch venv
def bounded_model(model: nn.Sequential, eps: float, dtype: torch.dtype):
    """auto_LiRPA's BoundedModule of ``model`` with an absolute ℓ∞ box of radius ``eps`` on every Linear weight."""
    from auto_LiRPA import BoundedModule, BoundedParameter
    from auto_LiRPA.perturbations import PerturbationLpNorm

    # Zero, unperturbed biases: a bias-free nn.Linear is traced to Transpose + MatMul, on which auto_LiRPA's
    # backward modes (CROWN-IBP, CROWN, α-CROWN) fail with a weight BoundedParameter ("permute(sparse_coo):
    # number of dimensions ... input.dim() = 4 is not equal to len(dims) = 3"); with a bias the layer is traced
    # to Gemm → BoundLinear, which supports weight perturbation. The network computes the same function.
    net = nn.Sequential(
        *[nn.Linear(m.in_features, m.out_features, bias=True) if isinstance(m, nn.Linear) else m for m in model]
    ).to(dtype)
    for layer, trained in zip(net, model):
        if isinstance(layer, nn.Linear):
            layer.bias.data.zero_()
            ptb = PerturbationLpNorm(norm=np.inf, eps=eps)  # absolute box around the trained weight
            layer.weight = BoundedParameter(trained.weight.data.clone(), ptb)
    net.eval()
    # the bound options of auto_LiRPA's own weight-perturbation test (tests/test_weight_perturbation.py)
    opts = {
        "sparse_intermediate_bounds": False,
        "sparse_conv_intermediate_bounds": False,
        "sparse_intermediate_bounds_with_ibp": False,
    }
    return BoundedModule(net, (torch.zeros(1, 64, dtype=dtype),), bound_opts=opts, device="cpu")


_ALPHA: dict = {}  # what the α-CROWN workers need (set before the pool forks)


def _alpha_chunk(rows: list[int]) -> tuple[list[int], np.ndarray, float]:
    """α-CROWN margin lower bounds of the points ``rows`` (a fresh BoundedModule, fresh α): (rows, bounds, seconds)."""
    torch.set_num_threads(1)
    st = _ALPHA
    bm = bounded_model(st["model"], st["eps"], st["dtype"])
    bm.set_bound_opts({"optimize_bound_args": {"iteration": st["iters"], "lr_alpha": st["lr_alpha"]}, "verbosity": 0})
    x, c = st["x"][rows], st["c"][rows]
    start = time.process_time()
    lb, _ = bm.compute_bounds(x=(x,), C=c, method="CROWN-Optimized", bound_upper=False)
    return rows, lb.detach().numpy(), time.process_time() - start


def alpha_crown(model, eps, dtype, x, c, rows, iters, lr_alpha, batch, workers) -> tuple[torch.Tensor, float]:
    """α-CROWN bounds of the points ``rows`` in chunks of ``batch`` (auto_LiRPA's memory and time grow faster than
    linearly with the batch on weight perturbations), over ``workers`` one-thread processes; returns the bounds of
    those rows and the summed single-process seconds (the one-thread cost, whatever ``workers``)."""
    import concurrent.futures
    import multiprocessing

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # one-time import of torch._dynamo, outside the timing
    _ALPHA.update(model=model, eps=eps, dtype=dtype, x=x, c=c, iters=iters, lr_alpha=lr_alpha)
    chunks = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    if not chunks:
        return torch.zeros((0, c.shape[1]), dtype=dtype), 0.0
    out = torch.full((len(x), c.shape[1]), float("nan"), dtype=dtype)
    seconds = 0.0
    if workers <= 1:
        results = map(_alpha_chunk, chunks)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_alpha_chunk, chunks)
    for k, (done, lb, sec) in enumerate(results):
        out[done] = torch.as_tensor(lb, dtype=dtype)
        seconds += sec
        print(f"  alpha-CROWN {iters} iterations: chunk {k + 1}/{len(chunks)}, {sec:.1f} CPU s", flush=True)
    if workers > 1:
        pool.shutdown()
    return out[rows], seconds


def margin_spec(y: torch.Tensor, nb_classes: int = 10) -> torch.Tensor:
    """``C`` of shape (N, nb_classes − 1, nb_classes): rows e_y − e_j for every j ≠ y."""
    eye = torch.eye(nb_classes)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # (N, K, K): row j is e_y − e_j
    keep = torch.arange(nb_classes).unsqueeze(0) != y.unsqueeze(1)  # (N, K)
    return c[keep].view(len(y), nb_classes - 1, nb_classes)


def lirpa(args: argparse.Namespace) -> None:
    try:
        import auto_LiRPA
        from auto_LiRPA import BoundedModule, BoundedParameter  # noqa: F401
    except ImportError as exc:
        print(f"SKIPPED: auto_LiRPA is not importable ({exc}); set up the scratch venv of this file's header.")
        return
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    data = np.load(os.path.join(args.data, "points.npz"))
    x = torch.as_tensor(data["x"][: args.points]).to(dtype)
    y = torch.as_tensor(data["y"][: args.points]).long()
    model = make_mlp()
    model.load_state_dict(torch.load(os.path.join(args.data, "mlp_state_dict.pt")))
    model = model.to(dtype).eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    clean = float(correct.double().mean())
    c = margin_spec(y).to(dtype)

    rows = []

    rows_lb: dict[str, torch.Tensor] = {}

    def record(name: str, seconds: float, lb: torch.Tensor, note: str = "") -> None:
        lb = lb.detach()
        rows_lb[name] = lb
        cert = correct & (lb.min(dim=1).values > TOLERANCE)
        rows.append(
            {
                "tool": f"auto_LiRPA {auto_LiRPA.__version__}",
                "method": name,
                "certified": float(cert.double().mean()),
                "s_per_sample": seconds / len(x),
                "mean_min_margin_lb": float(lb.min(dim=1).values.mean()),
                **({"note": note} if note else {}),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    bm = bounded_model(model, args.eps, dtype)
    with torch.no_grad():
        assert torch.allclose(bm(x), model(x), atol=1e-5), "bounded model differs from the trained model"
    for name, method in (("IBP", "IBP"), ("CROWN-IBP", "CROWN-IBP"), ("CROWN", "backward")):

        def run(method=method):
            with torch.no_grad():
                lb, _ = bm.compute_bounds(x=(x,), C=c, method=method, bound_upper=False)
            return lb

        seconds, lb = timed(run, args.repeats)
        record(name, seconds, lb)
    crown_lb = rows_lb["CROWN"]
    best_lb = crown_lb.clone()
    for iters in [int(v) for v in args.alpha_iters.split(",") if v]:
        everything = iters <= args.alpha_full_max
        if everything:
            pts = list(range(len(x)))
        else:
            # too slow for every point: only the correct, not yet certified points whose best bound so far is
            # above --alpha-candidates; the others keep their best earlier bound (caveat printed with the row)
            best_min = best_lb.min(dim=1).values
            pts = [i for i in range(len(x)) if correct[i] and best_min[i] <= 0 and best_min[i] > args.alpha_candidates]
        lb_pts, seconds = alpha_crown(
            model, args.eps, dtype, x, c, pts, iters, args.lr_alpha, args.alpha_batch, args.workers
        )
        lb = best_lb.clone()
        if everything:
            lb = lb_pts
            worse = int((lb.min(1).values < crown_lb.min(1).values - 1e-6).sum())
            note = f"all points; {worse} points with a lower min bound than CROWN's"
        else:
            lb[pts] = torch.maximum(lb[pts], lb_pts)
            note = (
                f"run on {len(pts)} candidate points (correct, uncertified, best earlier min bound > "
                f"{args.alpha_candidates}); other points keep their best earlier bound; s/sample over those {len(pts)}"
            )
        name = f"alpha-CROWN ({iters} iterations, lr_alpha {args.lr_alpha})"
        record(name, seconds * len(x) / max(len(pts), 1), lb, note)
        best_lb = torch.maximum(best_lb, lb)
    out = {
        "eps": args.eps,
        "points": len(x),
        "clean_accuracy": clean,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "auto_LiRPA": auto_LiRPA.__version__,
        "rows": rows,
    }
    np.savez(
        os.path.join(args.data, f"lirpa_bounds_{args.dtype}{args.tag}.npz"),
        correct=correct.numpy(),
        **{name: lb.numpy() for name, lb in rows_lb.items()},
    )
    with open(os.path.join(args.data, f"lirpa_{args.dtype}{args.tag}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    project_file = os.path.join(args.data, "project.json")
    all_rows = list(rows)
    if os.path.isfile(project_file):
        with open(project_file) as fh:
            project = json.load(fh)
        all_rows = project["rows"] + rows
    print(f"\nδ = {args.eps} (absolute box, every weight), {len(x)} points, clean accuracy {clean:.3f}, one thread\n")
    print("| tool | method | certified | s/sample |")
    print("|---|---|---|---|")
    for row in all_rows:
        print(f"| {row['tool']} | {row['method']} | {row['certified']:.3f} | {row['s_per_sample']:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["prepare", "lirpa"], nargs="?", default="lirpa")
    parser.add_argument("--out", default="/tmp/h7", help="prepare: where to write the model and points")
    parser.add_argument("--data", default="/tmp/h7", help="lirpa: where prepare wrote them")
    parser.add_argument("--eps", type=float, default=6e-3)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alpha-iters", default="20,100")
    parser.add_argument("--lr-alpha", type=float, default=0.5)
    parser.add_argument("--alpha-batch", type=int, default=5, help="points per α-CROWN call")
    parser.add_argument("--workers", type=int, default=1, help="one-thread processes for α-CROWN")
    parser.add_argument(
        "--alpha-full-max", type=int, default=1000, help="α-CROWN settings with more iterations run on candidates only"
    )
    parser.add_argument(
        "--alpha-candidates", type=float, default=-1.0, help="min margin bound above which a point is a candidate"
    )
    parser.add_argument("--tag", default="", help="suffix of the output files (for several runs side by side)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args()
    if args.stage == "prepare":
        prepare(args)
    else:
        lirpa(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
