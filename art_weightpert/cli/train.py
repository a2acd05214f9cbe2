"""
``art-weightpert train``: trains with :class:`.WeightRobustTrainer` (defaults: :data:`.zoo.DIGITS_RECIPE`) and saves
the model in the format ``--out`` names (``.pt2``: a ``torch.export`` program; ``.pt``/``.pth``: the whole module with
``torch.save``; :func:`.inputs.save_model`) and its training history (JSON). A run that collapses (the trainer's
``history["collapsed"]``: training accuracy near chance) is not saved and exits with code 3, unless
``--keep-collapsed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from typing import Any

from art_weightpert import zoo
from art_weightpert.budget import eps_for_inputs
from art_weightpert.cli import inputs
from art_weightpert.cli.parser import UsageError, process_settings
from art_weightpert.cli.report import jsonable, versions
from art_weightpert.data import load_digits_data
from art_weightpert.metrics.bit_flips import estimator_accuracy
from art_weightpert.metrics.summaries import classes_seen
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)


def run_train(args: argparse.Namespace) -> int:
    """``art-weightpert train``."""
    from art_weightpert import WeightRobustTrainer

    start = time.perf_counter()
    device = inputs.check_device(args.device)
    extension = inputs.check_model_path(args.out)
    history_path = args.history or os.path.splitext(args.out)[0] + ".history.json"
    out_parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_parent):
        raise UsageError(f"--out {args.out}: folder {out_parent} does not exist")
    x_train, y_train, x_test, y_test, data_desc = _training_data(args)
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    eps, norm, relative = _training_ball(args, input_shape)
    inputs.seed_everything(args.seed)
    labels_seen = classes_seen(y_train, y_test)
    module = inputs.build_architecture(args, input_shape, labels_seen)
    nb_classes = int(inputs.check_forward(module, x_train[:8], args.model).shape[1])
    if extension == ".pt2":
        inputs.export_program(module, x_train)  # a model torch.export cannot save fails now, not after training
    inputs.check_labels(nb_classes, y_train=y_train)
    budget = inputs.make_budget(module, eps, norm, args.layers, relative)
    classifier = zoo.make_classifier(module, input_shape, nb_classes, lr=args.lr, device_type=device, clip_values=None)
    warmup = args.warmup if args.warmup is not None else (zoo.DIGITS_RECIPE.warmup if args.data is None else None)
    params = {"lam": args.lam, "mu": args.mu, "kappa": args.kappa, "method": args.method}
    params.update({} if warmup is None else {"warmup": warmup})  # None: the trainer's default
    try:
        trainer = WeightRobustTrainer(classifier, budget, verbose=not args.quiet, **params)
    except UnsupportedModelError as err:
        raise UsageError(f"--model {args.model} cannot be trained with weight bounds: {err}") from err
    params["warmup"] = trainer.warmup
    validation = (x_test, y_test) if x_test is not None else None
    history = _fit(trainer, x_train, y_train, validation, args)
    _check_collapse(history, classifier, x_train, y_train)
    collapsed = bool(history.get("collapsed"))
    keep = not collapsed or args.keep_collapsed
    saved_as = inputs.save_model(classifier.model.cpu().eval(), args.out, x_train) if keep else None
    final = {}
    if x_test is not None:
        final["test_accuracy"] = estimator_accuracy(classifier, x_test, y_test)
    document = {
        "model_file": os.path.abspath(args.out) if keep else None,
        "saved_as": saved_as or "not saved: training collapsed (--keep-collapsed saves it)",
        **_history_document(args, data_desc, budget, params, final, history),
        "seconds": time.perf_counter() - start,
    }
    with open(history_path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(document), handle, indent=1)
    if final:
        print("Final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    if not keep:
        raise TrainingCollapsed(
            f"training collapsed (see the warning above); the model was NOT saved to {args.out}; the history is in "
            f"{history_path}. Pass --keep-collapsed to save it anyway."
        )
    note = " — training collapsed (see the warning above), kept by --keep-collapsed" if collapsed else ""
    print(f"Model saved to {args.out} ({saved_as}); training history in {history_path}{note}.")
    return 0


def _history_document(args, data_desc: str, budget, params, final, history) -> dict[str, Any]:
    """The content of the history JSON besides the model file and the time."""
    return {
        "collapsed": bool(history.get("collapsed")),
        "warnings": list(history.get("warnings", [])),
        "architecture": args.model,
        "data": data_desc,
        "budget": budget.to_dict(),
        "trainer": params,
        **{"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        **process_settings(args),
        "final": final,
        "history": history,
        "versions": versions(),
    }


def _check_collapse(history: dict[str, Any], classifier: Any, x_train, y_train) -> None:
    """Mark the history collapsed when :func:`.raise_if_collapsed` finds the trained model (in eval mode, as it is
    saved) at chance: a model with batch norm trained on batch statistics can learn in train mode and be at chance
    on its running statistics, which the trainer's own check does not see."""
    from art_weightpert.defences.trainer import TrainingCollapsedError, raise_if_collapsed

    if history.get("collapsed"):
        return
    try:
        raise_if_collapsed(history, y_train, classifier.predict(x_train).argmax(1))
    except TrainingCollapsedError as err:
        logger.warning("%s", err)
        history["collapsed"] = True
        history.setdefault("warnings", []).append(str(err))


class TrainingCollapsed(Exception):
    """Robust training ended near chance accuracy (exit code 3 unless ``--keep-collapsed``)."""


def _fit(trainer: Any, x_train, y_train, validation, args: argparse.Namespace) -> dict[str, Any]:
    """``trainer.fit``; the trainer's collapse message is shown once (its log line), not again as a UserWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = trainer.fit(
            x_train, y_train, validation_data=validation, batch_size=args.batch_size, nb_epochs=args.epochs
        )
    for warning in caught:
        if str(warning.message) not in history.get("warnings", []):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return history


def _training_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """``(x_train, y_train, x_test, y_test, description)`` of ``train --data`` (test arrays ``None`` when the .npz
    has no separate training split), or the digits split."""
    if args.data is None:
        return (*load_digits_data(seed=args.seed, flatten=args.model != "cnn"), "scikit-learn digits")
    arrays = inputs.load_data(args.data)
    if "x_train" in arrays:
        return arrays["x_train"], arrays["y_train"], arrays["x"], arrays["y"], args.data
    return arrays["x"], arrays["y"], None, None, args.data


REFERENCE_INPUTS = 64
"""Input features of the digits data, for which the recipe's ε was chosen."""


def default_eps(input_shape: tuple[int, ...]) -> float:
    """``train``'s ε when none is given: the digits recipe's ε scaled to the input width (:func:`.eps_for_inputs`)."""
    return eps_for_inputs(zoo.DIGITS_RECIPE.eps, input_shape, REFERENCE_INPUTS)


def _training_ball(args: argparse.Namespace, input_shape: tuple[int, ...]) -> tuple[float, str, bool]:
    """``(eps, norm, relative)`` of ``train``: the flags, or the digits recipe's ball scaled to the input width
    (:func:`default_eps`) when no ``--eps`` is given."""
    recipe = zoo.DIGITS_RECIPE
    norm = args.norm or recipe.norm
    if args.eps is not None:
        return args.eps, norm, args.relative
    if norm != recipe.norm or args.relative:
        raise UsageError(f"--eps is required with --norm {norm}{' --relative' if args.relative else ''}")
    eps = default_eps(input_shape)
    if eps != recipe.eps:
        logger.warning(
            "no --eps given: training at ε = %g (%s ball), the digits recipe's ε = %g scaled to inputs of shape %s",
            eps, norm, recipe.eps, "x".join(map(str, input_shape)),
        )  # fmt: skip
    return eps, norm, False
