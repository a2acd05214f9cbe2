"""
The commands of ``art-weightpert``: thin clients of the library.

* ``demo`` trains the digits recipe's pair of models (:func:`.zoo.train_digits_pair`) and reports on both.
* ``evaluate`` reports on the user's model and data.
* ``train`` trains with :class:`.WeightRobustTrainer` (defaults: :data:`.zoo.DIGITS_RECIPE`) and saves the model
  (a ``torch.export`` program) and its training history (JSON).

Exit codes: 0 success, 2 usage error (bad arguments, missing or malformed files, model and data that do not fit),
1 failure during the run, 3 ``train``: training collapsed (the model is not saved unless ``--keep-collapsed``).
Errors are printed as one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from art_weightpert import zoo
from art_weightpert.budget import PerturbationBudget
from art_weightpert.certification.precision import check_dtype
from art_weightpert.cli import inputs
from art_weightpert.cli.launch import run_command
from art_weightpert.cli.parser import PROG, REPORT_METHODS, UsageError, build_parser, one_line, process_settings
from art_weightpert.cli.render import summary_text
from art_weightpert.cli.render_sections import unavailable_lines
from art_weightpert.cli.report import build_report, clean_only_entry, evaluate_model, write_report
from art_weightpert.cli.sections import (
    CERTIFY_POINTS,
    QUICK_CERTIFY_POINTS,
    BitFlipSettings,
    bit_flip_section,
    measures_section,
)
from art_weightpert.cli.train import TrainingCollapsed, run_train
from art_weightpert.data import load_digits_data
from art_weightpert.estimators import PyTorchWeightClassifier
from art_weightpert.estimators.quantized import is_quantized_model
from art_weightpert.loading import check_same_outputs
from art_weightpert.metrics.summaries import default_eps_grid, module_accuracy, multiples_grid
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """The demo: the digits recipe it trains, its ε grid (multiples of the recipe's ε), the attacks' strength, the
    number of test points (``None``: all) and the most flipped bits of its "Bit flips" section."""

    recipe: zoo.DigitsRecipe
    eps_multiples: tuple[float, ...]
    pgd_steps: int
    random_samples: int
    test_points: int | None
    bit_flips: int

    def report_settings(self, n_test: int, bit_flips: int) -> dict[str, Any]:
        """The settings as written into the report."""
        r = self.recipe
        return {
            "training_eps": f"ε = {r.eps:g}, {r.norm} ball, absolute radii, every weight",
            "hidden": list(r.hidden),
            **{k: getattr(r, k) for k in ("epochs", "batch_size", "lam", "mu", "kappa", "method", "warmup")},
            "pgd_steps": self.pgd_steps,
            "random_samples": self.random_samples,
            "test_points": n_test,
            "eps_multiples_of_training_eps": list(self.eps_multiples),
            "bit_flips": f"up to {bit_flips}, 8 bits per weight, per-tensor scales" if bit_flips else "off",
        }


DEMO = DemoSettings(zoo.DIGITS_RECIPE, (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0), 20, 10, None, 20)
DEMO_QUICK = DemoSettings(replace(zoo.DIGITS_RECIPE, epochs=10, warmup=3), (0.0, 0.5, 1.0, 2.0), 10, 5, 200, 10)
"""``demo --quick``: seconds on 2 CPU cores."""


def _finish(report: dict[str, Any], out: str) -> None:
    """Write the report and print its summary (also with ``--quiet``, which hides the progress only)."""
    for name, entry in report["models"].items():  # each reason once, as in the summary and the report
        for line in unavailable_lines(entry):
            logger.warning("model %r: %s", name, line)
    paths = write_report(report, out)
    print(summary_text(report))
    print()
    print(f"Report written to {paths['markdown']} (numbers in {os.path.basename(paths['json'])}, plots alongside).")


def _evaluate_all(classifiers, x, y, budget, eps_grid, methods, args, extras=None, **options) -> dict[str, dict]:
    """:func:`.evaluate_model` of each classifier under one progress bar, then the optional sections of
    ``extras`` (:class:`Extras`), with the library's per-method "unavailable" warnings replaced by one per reason."""
    entries = {}
    extras = extras or Extras()
    units = len(eps_grid) * len(methods) + (4 if extras.measures else 0) + (1 if extras.bit_flips else 0)
    with inputs.progress_bar(len(classifiers) * units, "Evaluating", args.quiet) as bar, inputs.grouped_warnings():
        for name, classifier in classifiers.items():
            tick = lambda what, n=name: (bar.set_postfix_str(f"{n}: {what}"), bar.update(1))  # noqa: E731
            entries[name] = evaluate_model(
                classifier, x, y, budget, eps_grid, methods, seed=args.seed, batch_size=args.batch_size,
                progress=tick, dtype=check_dtype(args.dtype) if args.dtype else None, **options,
            )  # fmt: skip
            entries[name].update(extras.compute(classifier, x, y, args, tick))
    return entries


@dataclass(frozen=True)
class Extras:
    """The optional sections of a report: bit flips (``None``: off) and generalization measures, with the data they
    use (``train``: the training split, or ``None``)."""

    bit_flips: BitFlipSettings | None = None
    measures: bool = False
    train: tuple[np.ndarray, np.ndarray] | None = None

    def compute(self, classifier, x, y, args: argparse.Namespace, tick) -> dict[str, Any]:
        """``{"bit_flips": ..., "measures": ...}`` for the sections that are on."""
        out: dict[str, Any] = {}
        if self.bit_flips is not None:
            attack_data = self.train if self.train is not None else (x, y)
            dtype = check_dtype(args.dtype) if args.dtype else None
            out["bit_flips"] = bit_flip_section(
                classifier, x, y, attack_data, self.bit_flips, args.seed, args.batch_size, dtype
            )
            tick("bit flips")
        if self.measures:
            data = self.train if self.train is not None else (x, y)
            out["measures"] = measures_section(
                classifier, data, (x, y), self.train is not None, seed=args.seed, batch_size=args.batch_size,
                progress=tick,
            )  # fmt: skip
        return out


# ------------------------------------------------------------------------------------------------ demo
def run_demo(args: argparse.Namespace) -> int:
    """``art-weightpert demo``."""
    start = time.perf_counter()
    out = inputs.out_dir(args)
    demo = DEMO_QUICK if args.quick else DEMO
    recipe = replace(demo.recipe, seed=args.seed)
    budget = recipe.budget()
    eps_grid = multiples_grid(budget.eps, demo.eps_multiples)
    x_train, y_train, x_test, y_test = load_digits_data()
    x_test, y_test = x_test[: demo.test_points], y_test[: demo.test_points]
    if not args.quiet:
        print(f"Training the standard and the robust model ({recipe.epochs} epochs each) ...", file=sys.stderr)
    trained = zoo.train_digits_pair(recipe, x_train, y_train, verbose=not args.quiet)
    classifiers = {name: t.classifier for name, t in trained.items()}
    methods = list(REPORT_METHODS)
    max_flips = demo.bit_flips if args.bit_flips is None else args.bit_flips
    certify_points = QUICK_CERTIFY_POINTS if args.quick else CERTIFY_POINTS
    flips = (
        BitFlipSettings(
            max_flips, nb_samples=demo.random_samples, certify_points=certify_points, threats=not args.quick
        )
        if max_flips
        else None
    )
    extras = Extras(flips, args.measures, (x_train, y_train))
    options = {"pgd_steps": demo.pgd_steps, "random_samples": demo.random_samples}
    entries = _evaluate_all(classifiers, x_test, y_test, budget, eps_grid, methods, args, extras, **options)
    hidden = "-".join(map(str, recipe.hidden))
    descriptions = {
        "standard": f"bias-free ReLU MLP 64-{hidden}-10, standard training (ART fit)",
        "robust": f"bias-free ReLU MLP 64-{hidden}-10, WeightRobustTrainer at ε = {recipe.eps:g} ({recipe.norm} "
        f"ball on every weight, the report's budget; λ = {recipe.lam}, μ = {recipe.mu}, κ = {recipe.kappa}, "
        f"{recipe.method} bound, λ warm-up {recipe.warmup} epochs)",
    }
    models = {
        name: {
            "description": descriptions[name],
            "model": inputs.model_summary(t.classifier.model),
            "training": {"epochs": recipe.epochs, "batch_size": recipe.batch_size, "seconds": t.seconds},
            "history": t.history,
            **entries[name],
        }
        for name, t in trained.items()
    }
    data = {
        "description": f"scikit-learn digits (8×8, 10 classes): {len(x_train)} training and {len(x_test)} test "
        "points, features scaled to [0, 1]",
        "source": "sklearn.datasets.load_digits",
        "n_train": len(x_train),
        "n_test": len(x_test),
        "input_shape": [64],
        "nb_classes": 10,
    }
    seeds = {"model_init_and_batch_order": args.seed, "attacks": args.seed, "data_split": 0}
    command = "demo " + " ".join(inputs.quote(a) for a in (args.argv or []))
    settings = {**demo.report_settings(len(x_test), max_flips), **process_settings(args)}
    report = build_report(command.strip(), models, budget, eps_grid, methods, data, settings, seeds, 0.0)
    report["seconds"] = time.perf_counter() - start
    _finish(report, out)
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    """``art-weightpert evaluate``."""
    start = time.perf_counter()
    out = inputs.out_dir(args)
    device = inputs.check_device(args.device)
    arrays = inputs.load_data(args.data)
    x, y = arrays["x"][: args.max_samples], arrays["y"][: args.max_samples]
    train_data = (arrays["x_train"], arrays["y_train"]) if "x_train" in arrays else None
    loaded, module, unsupported, nb_classes = _user_model(args, x, y, train_data)
    if args.bit_flips and not args.no_bit_flip_threats and args.backdoor_target >= nb_classes:
        raise UsageError(f"--backdoor-target {args.backdoor_target}: the model has {nb_classes} classes")
    input_shape = tuple(int(d) for d in x.shape[1:])
    methods = list(dict.fromkeys(args.methods))
    budget = PerturbationBudget(1.0, args.norm, args.layers, args.relative, args.include_bias)
    if unsupported is None:
        classifier = _classifier(module, input_shape, nb_classes, device)
        module = classifier.base_model  # a deployed int8 model's float-weight twin (its weights are the codes' values)
        budget = inputs.make_budget(module, 1.0, args.norm, args.layers, args.relative, args.include_bias)
        eps_grid = sorted(set(args.eps)) if args.eps else default_eps_grid(module, budget)
        inputs.seed_everything(args.seed)
        options = {"pgd_steps": args.pgd_steps, "random_samples": args.random_samples, "train_data": train_data}
        flips = (
            BitFlipSettings(
                args.bit_flips,
                args.n_bits,
                args.granularity,
                args.random_samples,
                threats=not args.no_bit_flip_threats,
                backdoor_target=args.backdoor_target,
            )  # fmt: skip
            if args.bit_flips
            else None
        )
        extras = Extras(flips, args.measures, train_data)
        entry = _evaluate_all({"model": classifier}, x, y, budget, eps_grid, methods, args, extras, **options)["model"]
    else:
        eps_grid = sorted(set(args.eps)) if args.eps else [0.0]
        entry = clean_only_entry(module_accuracy(module, x, y), methods, len(eps_grid), unsupported)
        sections = {"bit_flips": args.bit_flips, "measures": args.measures}
        entry.update({k: {"unavailable": unsupported} for k, on in sections.items() if on})
    entry["description"] = f"`{args.model}` ({loaded.kind}{'; ' + loaded.note if loaded.note else ''})"
    entry["model"] = inputs.model_summary(module)
    name = os.path.splitext(os.path.basename(args.model))[0] if loaded.kind != "callable" else args.model
    data, settings = _evaluate_metadata(args, x, train_data, nb_classes, device)
    command = "evaluate " + " ".join(inputs.quote(a) for a in (args.argv or []))
    report = build_report(command, {name: entry}, budget, eps_grid, methods, data, settings, {"seed": args.seed}, 0.0)
    report["seconds"] = time.perf_counter() - start
    _finish(report, out)
    return 0


def _evaluate_metadata(args: argparse.Namespace, x, train_data, nb_classes: int, device: str) -> tuple[dict, dict]:
    """The ``data`` and ``settings`` entries of an ``evaluate`` report."""
    input_shape = tuple(int(d) for d in x.shape[1:])
    n_train = None if train_data is None else len(train_data[0])
    data = {
        "description": f"`{args.data}`: {len(x)} test points of shape {input_shape}, {nb_classes} classes"
        + (f", {n_train} training points" if n_train is not None else ""),
        "path": os.path.abspath(args.data),
        "n_test": len(x),
        "n_train": n_train,
        "input_shape": list(input_shape),
        "nb_classes": nb_classes,
    }
    grid = "default, scaled to the model (0 to 10 % of the typical weight size in the chosen norm)"
    flips = f"up to {args.bit_flips}, {args.n_bits} bits per weight, per-{args.granularity} scales"
    measures = "on the training split" if train_data is not None else "on the test data"
    settings = {
        "device": device,
        "pgd_steps": args.pgd_steps,
        "random_samples": args.random_samples,
        "eval_batch_size": args.batch_size,
        "eps_grid_source": "given by --eps" if args.eps else grid,
        "bit_flips": flips if args.bit_flips else "off",
        "measures": measures if args.measures else "off",
        **process_settings(args),
    }
    return data, settings


def _classifier(module: nn.Module, input_shape: tuple[int, ...], nb_classes: int, device: str) -> Any:
    """The estimator of the user's model: a deployed int8 model (torch.ao or torchao) is read as deployed
    (:meth:`.PyTorchWeightClassifier.from_quantized`: the bit flips hit its codes), any other module as it is."""
    if is_quantized_model(module):
        return PyTorchWeightClassifier.from_quantized(module, input_shape, nb_classes, device_type=device)
    return PyTorchWeightClassifier(module, nn.CrossEntropyLoss(), input_shape, nb_classes, device_type=device)


def _user_model(args: argparse.Namespace, x, y, train_data) -> tuple[Any, nn.Module, str | None, int]:
    """The user's model checked against the data: ``(loaded model, module to evaluate, why its weights cannot be
    perturbed or None, number of classes)``."""
    loaded = inputs.load_user_model(args.model)
    module = loaded.module.eval()
    logits = inputs.check_forward(module, x[:64], args.model)
    if train_data is not None and tuple(train_data[0].shape[1:]) != tuple(x.shape[1:]):
        raise UsageError(f"x_train has samples of shape {train_data[0].shape[1:]} but x has {x.shape[1:]}")
    unsupported = loaded.unsupported_reason
    if loaded.eager and loaded.scripted is not None:
        try:
            n = getattr(loaded.scripted, "static_batch", None) or 256  # an exported program may fix its batch size
            check_same_outputs(module, loaded.scripted, torch.as_tensor(x[:n]))
        except UnsupportedModelError as err:
            unsupported, module = str(err), loaded.scripted
    nb_classes = int(logits.shape[1])
    inputs.check_labels(nb_classes, y=y, y_train=None if train_data is None else train_data[1])
    return loaded, module, unsupported, nb_classes


# ------------------------------------------------------------------------------------------------ main
RUNNERS = {"demo": run_demo, "evaluate": run_evaluate, "train": run_train}
"""The function of each command."""


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"{PROG}: warning: {one_line(str(message))}\n"


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
        return run_command(RUNNERS[args.command], args)  # --nproc N: N processes (cli/launch.py)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except TrainingCollapsed as err:
        print(f"{PROG} {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 3
    except Exception as err:  # noqa: BLE001 - every failure becomes one line and exit code 1
        if args.debug:
            raise
        print(f"{PROG} {args.command}: failed: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = format_warning
        for name, level in quiet_loggers.items():
            logging.getLogger(name).setLevel(level)
