"""
The ``art-weightpert`` command line: ``demo``, ``evaluate`` and ``train``.

* ``art-weightpert demo [--out DIR] [--quick]`` trains a standard and a weight-robust bias-free MLP on the embedded
  digits data and writes the evaluation report of both.
* ``art-weightpert evaluate --model M --data D ...`` writes the same report for the user's model and data.
* ``art-weightpert train --data D --out model.pt ...`` trains with :class:`.WeightRobustTrainer` and saves the model
  (TorchScript) and its training history (JSON).

Exit codes: 0 success, 2 usage error (bad arguments, missing or malformed files, model and data that do not fit),
1 failure during the run. Errors are printed as one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from art_weightpert import __version__

logger = logging.getLogger(__name__)

PROG = "art-weightpert"
DEFAULT_OUT = "art-weightpert-report"
NORMS = ("inf", "row_l1", "l2")


class UsageError(Exception):
    """A problem with what the user passed (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text!r}")
    return value


def _eps_value(text: str) -> float:
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"ε must be a finite non-negative number, got {text!r}") from None


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ≥ ``minimum``, described as ``what`` in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``art-weightpert``."""
    from art_weightpert.report import METHODS

    parser = _Parser(
        prog=PROG,
        description="Attack, certify and harden PyTorch classifiers against weight perturbations (an ART plugin).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    common = _Parser(add_help=False)
    common.add_argument("--out", default=None, help=f"report folder (default: ./{DEFAULT_OUT})")
    common.add_argument("--seed", type=_non_negative_int, default=0, help="seed of training and attacks (default 0)")
    common.add_argument("--batch-size", type=_positive_int, default=128, help="samples per forward pass")
    common.add_argument("--quiet", action="store_true", help="no progress bars and no tables (only the report's path)")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train a standard and a robust MLP on the digits data and report on both",
        description="Train a standard and a weight-robust bias-free MLP on scikit-learn's digits, evaluate both "
        "across an ε grid (clean, random faults, WeightPGD, certified by the paper's closed-form bound, by interval "
        "bounds and by linear bounds) and write report.md, report.json and PNG plots.",
    )
    demo.add_argument("--quick", action="store_true", help="smaller run (under a minute on 2 CPU cores)")
    demo.set_defaults(func=run_demo)

    evaluate = sub.add_parser(
        "evaluate",
        parents=[common],
        help="report on your model and data",
        description="Evaluate a model under weight perturbations: accuracy across an ε grid by each method, certified "
        "radii, plots. MODEL is a TorchScript file, a file saved with torch.save(module) (loaded with "
        "weights_only=False after a warning: it runs pickled code) or package.module:callable returning an "
        "nn.Module. DATA is an .npz with x and y (and optionally x_train, y_train for the generalization bound).",
    )
    evaluate.add_argument("--model", required=True, help="TorchScript file, torch.save'd module or module:callable")
    evaluate.add_argument("--data", required=True, help=".npz with x, y (optional x_train, y_train)")
    evaluate.add_argument("--norm", choices=NORMS, default="inf", help="weight ball (default: inf, entry-wise box)")
    evaluate.add_argument(
        "--eps",
        type=_eps_value,
        nargs="+",
        default=None,
        help="ε grid (default: 0 to 5%% of the typical weight size in the chosen norm)",
    )
    evaluate.add_argument("--layers", nargs="+", default=None, help="Linear/Conv layers to perturb (default: all)")
    evaluate.add_argument("--relative", action="store_true", help="radii relative to the weights (ε·|W|)")
    evaluate.add_argument("--include-bias", action="store_true", help="also perturb the biases")
    evaluate.add_argument(
        "--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)"
    )
    evaluate.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where torch runs (default: cpu)")
    evaluate.add_argument("--max-samples", type=_positive_int, default=None, help="evaluate the first N test points")
    evaluate.add_argument("--pgd-steps", type=_positive_int, default=20, help="WeightPGD iterations (default 20)")
    evaluate.add_argument("--random-samples", type=_positive_int, default=10, help="random draws per ε (default 10)")
    evaluate.set_defaults(func=run_evaluate)

    train = sub.add_parser(
        "train",
        help="train a weight-robust model and save it",
        description="Train with WeightRobustTrainer (the robust loss of docs/training.md) on an .npz (x_train, "
        "y_train if present, else x, y) or on the digits data, then save the model as TorchScript (torch.jit.script; "
        "a torch.save'd whole module when the model cannot be scripted) and its training history as JSON.",
    )
    train.add_argument("--data", default=None, help=".npz with x, y (optional x_train, y_train); default: digits")
    train.add_argument("--out", required=True, help="model file to write (e.g. model.pt)")
    train.add_argument("--history", default=None, help="history JSON (default: <out>.history.json)")
    train.add_argument(
        "--model", default="mlp", help="'mlp' (bias-free ReLU MLP), 'cnn' (digits CNN) or package.module:callable"
    )
    train.add_argument("--hidden", type=_positive_int, nargs="+", default=[128, 64], help="MLP hidden widths")
    train.add_argument("--norm", choices=NORMS, default=None, help="weight ball (default: the digits recipe's)")
    train.add_argument("--eps", type=_eps_value, default=None, help="ε of the ball (default: the digits recipe's)")
    train.add_argument("--relative", action="store_true", help="radii relative to the weights")
    train.add_argument("--layers", nargs="+", default=None, help="layers to perturb (default: all)")
    train.add_argument("--lam", type=_non_negative, default=None, help="weight λ of the robust term")
    train.add_argument("--mu", type=_non_negative, default=None, help="weight μ of the operator-norm term")
    train.add_argument("--kappa", type=_non_negative, default=None, help="safety margin κ")
    train.add_argument("--bound", choices=("interval", "paper", "linear"), default=None, help="margin bound for η")
    train.add_argument("--warmup", type=_non_negative_int, default=None, help="epochs of λ warm-up")
    train.add_argument("--epochs", type=_positive_int, default=None, help="training epochs")
    train.add_argument("--lr", type=_non_negative, default=None, help="Adam learning rate")
    train.add_argument("--batch-size", type=_positive_int, default=None, help="samples per step")
    train.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default 0)")
    train.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where torch runs (default: cpu)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=run_train)
    return parser


# ------------------------------------------------------------------------------------------------ helpers
def _check_device(device: str) -> str:
    import torch

    if device == "gpu" and not torch.cuda.is_available():
        raise UsageError("--device gpu: torch sees no CUDA device (use --device cpu)")
    return device


def _load_data(path: str) -> dict[str, np.ndarray]:
    from art_weightpert.data import load_npz

    try:
        arrays = load_npz(path)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from err
    except ValueError as err:
        raise UsageError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - not an npz at all
        raise UsageError(f"cannot read data file {path} as .npz ({type(err).__name__}: {err})") from err
    for xs, ys in (("x", "y"), ("x_train", "y_train")):
        if xs not in arrays and ys not in arrays:
            continue
        if (xs in arrays) != (ys in arrays):
            raise UsageError(f"data file {path} has {xs if xs in arrays else ys} without {ys if xs in arrays else xs}")
        if arrays[xs].ndim < 2 or len(arrays[xs]) == 0:
            raise UsageError(f"data file {path}: {xs} must have shape (N, ...) with N > 0; got {arrays[xs].shape}")
        if not np.issubdtype(arrays[xs].dtype, np.number) or not np.all(np.isfinite(arrays[xs])):
            raise UsageError(f"data file {path}: {xs} must hold finite numbers")
        arrays[ys] = _labels(arrays[ys], len(arrays[xs]), f"{path}: {ys}")
    return arrays


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise UsageError(f"{what} must have shape ({n},) or ({n}, classes); got {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.mod(y, 1) == 0) or (len(y) and y.min() < 0):
        raise UsageError(f"{what} must hold non-negative integer class labels")
    return y.astype(np.int64)


def _make_budget(model, eps: float, norm: str, layers, relative: bool, include_bias: bool = False):
    from art_weightpert.budget import PerturbationBudget

    try:
        budget = PerturbationBudget(eps, norm, layers=layers, relative=relative, include_bias=include_bias)
        budget.layer_names(model)
    except (TypeError, ValueError) as err:
        message = str(err).replace("in the budget", "in --layers")
        raise UsageError(message) from err
    return budget


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, file=sys.stderr)


def _out_dir(args: argparse.Namespace) -> str:
    out = args.out or DEFAULT_OUT
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    return out


def _seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


def _finish(report: dict[str, Any], out: str, quiet: bool) -> None:
    from art_weightpert.report import summary_text, write_report

    paths = write_report(report, out)
    if not quiet:
        print(summary_text(report))
        print()
    print(f"Report written to {paths['markdown']} (numbers in {os.path.basename(paths['json'])}, plots alongside).")


# ------------------------------------------------------------------------------------------------ demo
def demo_settings(quick: bool) -> dict[str, Any]:
    """
    The demo's settings: the digits training recipe of :mod:`art_weightpert.zoo` (budget, epochs, λ, warm-up), the
    ε grid as multiples of the training ε, the attacks' strength and the number of test points.

    :param quick: the smaller run of ``demo --quick``.
    """
    settings = {
        "hidden": [128, 64],
        "epochs": 20,
        "batch_size": 128,
        "lam": 1.0,
        "mu": 0.0,
        "kappa": 0.0,
        "bound": "interval",
        "warmup": 5,
        "multiples": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
        "pgd_steps": 20,
        "random_samples": 10,
        "test_points": None,
    }
    if quick:
        settings.update(
            epochs=10, warmup=3, multiples=[0.0, 0.5, 1.0, 2.0], pgd_steps=10, random_samples=5, test_points=200
        )
    return settings


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from art_weightpert import zoo
    from art_weightpert.data import load_digits_data
    from art_weightpert.report import METHODS, build_report, evaluate_model, model_summary

    start = time.perf_counter()
    out = _out_dir(args)
    quiet = args.quiet
    s = demo_settings(args.quick)
    budget = zoo.default_digits_budget()
    eps_grid = [float(f"{m * budget.eps:.6g}") for m in s["multiples"]]
    x_train, y_train, x_test, y_test = load_digits_data()
    if s["test_points"] is not None:
        x_test, y_test = x_test[: s["test_points"]], y_test[: s["test_points"]]

    hidden = "-".join(map(str, s["hidden"]))
    models: dict[str, Any] = {
        "standard": {"description": f"bias-free ReLU MLP 64-{hidden}-10, standard training (ART fit)"},
        "robust": {
            "description": f"bias-free ReLU MLP 64-{hidden}-10, WeightRobustTrainer (λ = {s['lam']}, μ = {s['mu']}, "
            f"κ = {s['kappa']}, {s['bound']} bound, λ warm-up {s['warmup']} epochs) at the report's budget"
        },
    }
    trained = {}
    for name in models:
        module = zoo.digits_mlp(tuple(s["hidden"]), bias=False, seed=args.seed)
        classifier = zoo.make_classifier(module, (64,))
        if not quiet:
            print(f"Training the {name} model ({s['epochs']} epochs) ...", file=sys.stderr)
        t0 = time.perf_counter()
        history = None
        if name == "standard":  # zoo.train_standard, with ART's progress bar
            torch.manual_seed(args.seed)
            classifier.fit(x_train, y_train, batch_size=s["batch_size"], nb_epochs=s["epochs"], verbose=not quiet)
        else:
            history = zoo.train_robust(
                classifier,
                x_train,
                y_train,
                budget,
                nb_epochs=s["epochs"],
                batch_size=s["batch_size"],
                lam=s["lam"],
                mu=s["mu"],
                kappa=s["kappa"],
                bound=s["bound"],
                warmup=s["warmup"],
                seed=args.seed,
                verbose=not quiet,
            )
        trained[name] = classifier
        models[name].update(
            model=model_summary(module),
            training={"epochs": s["epochs"], "batch_size": s["batch_size"], "seconds": time.perf_counter() - t0},
            history=history,
        )
    methods = list(METHODS)
    steps_per_model = len(eps_grid) * (len(methods) - 1)
    with _progress(steps_per_model * len(trained), "Evaluating", quiet) as bar:
        for name, classifier in trained.items():
            result = evaluate_model(
                classifier,
                x_test,
                y_test,
                budget,
                eps_grid,
                methods,
                pgd_steps=s["pgd_steps"],
                random_samples=s["random_samples"],
                seed=args.seed,
                batch_size=args.batch_size,
                progress=lambda what, n=name: (bar.set_postfix_str(f"{n}: {what}"), bar.update(1)),
            )
            models[name].update(result)
    report = build_report(
        "demo" + (" --quick" if args.quick else ""),
        models,
        budget,
        eps_grid,
        methods,
        data={
            "description": f"scikit-learn digits (8×8, 10 classes): {len(x_train)} training and {len(x_test)} test "
            "points, features scaled to [0, 1]",
            "source": "sklearn.datasets.load_digits",
            "n_train": len(x_train),
            "n_test": len(x_test),
            "input_shape": [64],
            "nb_classes": 10,
        },
        settings={k: v for k, v in s.items() if k != "multiples"} | {"eps_multiples_of_training_eps": s["multiples"]},
        seeds={"model_init_and_batch_order": args.seed, "attacks": args.seed, "data_split": 0},
        seconds=time.perf_counter() - start,
    )
    report["seconds"] = time.perf_counter() - start
    _finish(report, out, quiet)
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from art_weightpert.estimators import PyTorchWeightClassifier
    from art_weightpert.model_loading import check_same_outputs
    from art_weightpert.network import UnsupportedModelError
    from art_weightpert.report import build_report, default_eps_grid, evaluate_model, forward_check, model_summary

    start = time.perf_counter()
    out = _out_dir(args)
    device = _check_device(args.device)
    arrays = _load_data(args.data)
    x, y = arrays["x"], arrays["y"]
    if args.max_samples is not None:
        x, y = x[: args.max_samples], y[: args.max_samples]
    train_data = (arrays["x_train"], arrays["y_train"]) if "x_train" in arrays else None
    loaded = _load_user_model(args.model)
    module = loaded.module
    module.eval()
    logits = _forward_or_usage_error(forward_check, module, x[:64], args.model)
    if train_data is not None and tuple(train_data[0].shape[1:]) != tuple(x.shape[1:]):
        raise UsageError(f"x_train has samples of shape {train_data[0].shape[1:]} but x has {x.shape[1:]}")
    unsupported = loaded.unsupported_reason
    if loaded.eager and loaded.scripted is not None:
        try:
            check_same_outputs(module, loaded.scripted, torch.as_tensor(x[:256]))
        except UnsupportedModelError as err:
            unsupported, module = str(err), loaded.scripted
    nb_classes = int(logits.shape[1])
    for name, labels in (("y", y), ("y_train", None if train_data is None else train_data[1])):
        if labels is not None and len(labels) and labels.max() >= nb_classes:
            raise UsageError(f"{name} has label {labels.max()} but the model outputs {nb_classes} classes")
    input_shape = tuple(int(d) for d in x.shape[1:])

    classifier = None
    clean = None
    if unsupported is None:
        budget = _make_budget(module, 1.0, args.norm, args.layers, args.relative, args.include_bias)
        classifier = PyTorchWeightClassifier(module, nn.CrossEntropyLoss(), input_shape, nb_classes, device_type=device)
    else:
        from art_weightpert.budget import PerturbationBudget

        budget = PerturbationBudget(1.0, args.norm, args.layers, args.relative, args.include_bias)
        preds = np.concatenate(
            [forward_check(module, x[i : i + 256]).argmax(1).cpu().numpy() for i in range(0, len(x), 256)]
        )
        clean = float(np.mean(preds == y))
    eps_grid = sorted(set(args.eps)) if args.eps else (default_eps_grid(module, budget) if classifier else [0.0])
    methods = list(dict.fromkeys(args.methods))
    _seed_everything(args.seed)
    with _progress(len(eps_grid) * len([m for m in methods if m != "clean"]), "Evaluating", args.quiet) as bar:
        result = evaluate_model(
            classifier,
            x,
            y,
            budget,
            eps_grid,
            methods,
            pgd_steps=args.pgd_steps,
            random_samples=args.random_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            unsupported_reason=unsupported,
            clean_accuracy=clean,
            train_data=train_data,
            progress=lambda what: (bar.set_postfix_str(what), bar.update(1)),
        )
    result["description"] = f"`{args.model}` ({loaded.kind}{'; ' + loaded.note if loaded.note else ''})"
    result["model"] = model_summary(module)
    name = os.path.splitext(os.path.basename(args.model))[0] if loaded.kind != "callable" else args.model
    report = build_report(
        "evaluate " + " ".join(_quote(a) for a in (args.argv or [])),
        {name: result},
        budget,
        eps_grid,
        methods,
        data={
            "description": f"`{args.data}`: {len(x)} test points of shape {input_shape}, {nb_classes} classes"
            + (f", {len(train_data[0])} training points" if train_data is not None else ""),
            "path": os.path.abspath(args.data),
            "n_test": len(x),
            "n_train": None if train_data is None else len(train_data[0]),
            "input_shape": list(input_shape),
            "nb_classes": nb_classes,
        },
        settings={
            "device": device,
            "pgd_steps": args.pgd_steps,
            "random_samples": args.random_samples,
            "batch_size": args.batch_size,
            "eps_grid_source": "--eps" if args.eps else "default (fractions of the typical weight size)",
        },
        seeds={"seed": args.seed},
        seconds=time.perf_counter() - start,
    )
    report["seconds"] = time.perf_counter() - start
    _finish(report, out, args.quiet)
    return 0


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_./:=," for c in arg) else repr(arg)


def _load_user_model(spec: str):
    from art_weightpert.model_loading import ModelSpecError, load_model

    try:
        return load_model(spec)
    except (FileNotFoundError, ModelSpecError) as err:
        raise UsageError(str(err)) from err


def _forward_or_usage_error(forward, module, x: np.ndarray, spec: str):
    try:
        logits = forward(module, x)
    except Exception as err:  # noqa: BLE001 - any failure here means model and data do not fit
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"model {spec} does not accept the data's inputs of shape {tuple(x.shape[1:])}: {first}"
        ) from err
    if not hasattr(logits, "dim") or logits.dim() != 2:
        shape = tuple(getattr(logits, "shape", ()))
        raise UsageError(f"model {spec} must return logits of shape (N, classes); got {shape}")
    return logits


# ------------------------------------------------------------------------------------------------ train
def run_train(args: argparse.Namespace) -> int:
    import torch

    from art_weightpert import WeightRobustTrainer, zoo
    from art_weightpert.data import load_digits_data
    from art_weightpert.network import UnsupportedModelError
    from art_weightpert.report import _jsonable, versions

    start = time.perf_counter()
    device = _check_device(args.device)
    history_path = args.history or os.path.splitext(args.out)[0] + ".history.json"
    out_parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_parent):
        raise UsageError(f"--out {args.out}: folder {out_parent} does not exist")
    s = demo_settings(quick=False)
    s["lr"] = 3e-3  # zoo.make_classifier's default
    recipe_budget = zoo.default_digits_budget()
    if args.data is None:
        x_train, y_train, x_test, y_test = load_digits_data(seed=args.seed, flatten=args.model != "cnn")
        data_desc = "scikit-learn digits"
    else:
        arrays = _load_data(args.data)
        if "x_train" in arrays:
            x_train, y_train, x_test, y_test = arrays["x_train"], arrays["y_train"], arrays["x"], arrays["y"]
        else:
            x_train, y_train, x_test, y_test = arrays["x"], arrays["y"], None, None
        data_desc = args.data
    norm = args.norm or recipe_budget.norm
    if args.eps is not None:
        eps, relative = args.eps, args.relative
    elif norm == recipe_budget.norm and args.relative == recipe_budget.relative:
        eps, relative = recipe_budget.eps, recipe_budget.relative
        if args.data is not None:
            logger.warning("no --eps given: using the digits recipe's ε = %s (%s ball)", eps, norm)
    else:
        raise UsageError(f"--eps is required with --norm {norm}{' --relative' if args.relative else ''}")
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    _seed_everything(args.seed)
    module = _build_architecture(args, input_shape, int(max(y_train.max(), -1 if y_test is None else y_test.max()) + 1))
    logits = _forward_or_usage_error(
        lambda m, xs: m(torch.as_tensor(xs, dtype=torch.float32)), module.eval(), x_train[:8], args.model
    )
    nb_classes = int(logits.shape[1])
    if y_train.max() >= nb_classes:
        raise UsageError(f"y_train has label {y_train.max()} but the model outputs {nb_classes} classes")
    budget = _make_budget(module, eps, norm, args.layers, relative)
    lr = args.lr if args.lr is not None else s["lr"]
    classifier = zoo.make_classifier(module, input_shape, nb_classes, lr=lr, device_type=device, clip_values=None)
    params = {
        "lam": args.lam if args.lam is not None else s["lam"],
        "mu": args.mu if args.mu is not None else s["mu"],
        "kappa": args.kappa if args.kappa is not None else s["kappa"],
        "bound": args.bound or s["bound"],
        "warmup": args.warmup if args.warmup is not None else s["warmup"],
    }
    epochs = args.epochs or s["epochs"]
    batch_size = args.batch_size or s["batch_size"]
    try:
        trainer = WeightRobustTrainer(classifier, budget, verbose=not args.quiet, **params)
    except UnsupportedModelError as err:
        raise UsageError(f"--model {args.model} cannot be trained with weight bounds: {err}") from err
    validation = (x_test, y_test) if x_test is not None else None
    history = trainer.fit(x_train, y_train, validation_data=validation, batch_size=batch_size, nb_epochs=epochs)
    module = classifier.model.cpu().eval()
    saved_as = _save_model(module, args.out)
    final: dict[str, Any] = {}
    if x_test is not None:
        final["test_accuracy"] = float(np.mean(classifier.predict(x_test).argmax(1) == y_test))
    document = {
        "model_file": os.path.abspath(args.out),
        "saved_as": saved_as,
        "architecture": args.model,
        "data": data_desc,
        "budget": budget.to_dict(),
        "trainer": params,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": args.seed,
        "final": final,
        "history": history,
        "versions": versions(),
        "seconds": time.perf_counter() - start,
    }
    with open(history_path, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(document), handle, indent=1)
    print(f"Model saved to {args.out} ({saved_as}); training history in {history_path}.")
    if final:
        print("Final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return 0


def _build_architecture(args: argparse.Namespace, input_shape: tuple[int, ...], nb_classes: int):
    from torch import nn

    from art_weightpert import zoo

    if args.model == "mlp":
        features = int(np.prod(input_shape))
        mlp = zoo.digits_mlp(
            tuple(args.hidden), bias=False, seed=args.seed, in_features=features, nb_classes=nb_classes
        )
        return mlp if len(input_shape) == 1 else nn.Sequential(nn.Flatten(), *mlp)
    if args.model == "cnn":
        if input_shape != (1, 8, 8):
            raise UsageError(
                f"--model cnn is the digits CNN for inputs of shape (1, 8, 8), the data has {input_shape}; "
                "pass package.module:callable for other shapes"
            )
        return zoo.digits_cnn(seed=args.seed, nb_classes=nb_classes)
    loaded = _load_user_model(args.model)
    if not loaded.eager:
        raise UsageError(f"--model {args.model}: {loaded.unsupported_reason}")
    return loaded.module


def _save_model(module, path: str) -> str:
    """Save as TorchScript when possible (loads without the training code and without running pickled code)."""
    import torch

    try:
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; it still loads without the code
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.script(module), path)
        return "TorchScript (torch.jit.script)"
    except Exception as err:  # noqa: BLE001 - not scriptable: fall back to pickling the module
        logger.warning("the model cannot be scripted (%s); saving it with torch.save", str(err).splitlines()[0])
        torch.save(module, path)
        return "torch.save of the whole module"


# ------------------------------------------------------------------------------------------------ main
def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"{PROG}: warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 2 usage error, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else []
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    quiet_loggers = {name: logging.getLogger(name).level for name in ("art", "matplotlib")}
    format_warning = warnings.formatwarning
    warnings.formatwarning = _format_warning
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - every failure becomes one line and exit code 1
        if args.debug:
            raise
        print(f"{PROG} {args.command}: failed: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning
        for name, level in quiet_loggers.items():
            logging.getLogger(name).setLevel(level)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
