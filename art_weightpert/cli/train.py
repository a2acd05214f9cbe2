"""
``art-weightpert train``: trains with :class:`.WeightRobustTrainer` (defaults: :data:`.zoo.DIGITS_RECIPE`) and saves
the model (a ``torch.export`` program; TorchScript or a pickled module when it cannot be exported) and its training
history (JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np

from art_weightpert import zoo
from art_weightpert.cli import inputs
from art_weightpert.cli.parser import UsageError
from art_weightpert.cli.report import jsonable, versions
from art_weightpert.data import load_digits_data
from art_weightpert.network import UnsupportedModelError

logger = logging.getLogger(__name__)


def run_train(args: argparse.Namespace) -> int:
    """``art-weightpert train``."""
    from art_weightpert import WeightRobustTrainer

    start = time.perf_counter()
    device = inputs.check_device(args.device)
    history_path = args.history or os.path.splitext(args.out)[0] + ".history.json"
    out_parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_parent):
        raise UsageError(f"--out {args.out}: folder {out_parent} does not exist")
    x_train, y_train, x_test, y_test, data_desc = _training_data(args)
    eps, norm, relative = _training_ball(args)
    input_shape = tuple(int(d) for d in x_train.shape[1:])
    inputs.seed_everything(args.seed)
    labels_seen = int(max(y_train.max(), -1 if y_test is None else y_test.max()) + 1)
    module = inputs.build_architecture(args, input_shape, labels_seen)
    nb_classes = int(inputs.check_forward(module, x_train[:8], args.model).shape[1])
    inputs.check_labels(nb_classes, y_train=y_train)
    budget = inputs.make_budget(module, eps, norm, args.layers, relative)
    classifier = zoo.make_classifier(module, input_shape, nb_classes, lr=args.lr, device_type=device, clip_values=None)
    params = {"lam": args.lam, "mu": args.mu, "kappa": args.kappa, "bound": args.bound, "warmup": args.warmup}
    try:
        trainer = WeightRobustTrainer(classifier, budget, verbose=not args.quiet, **params)
    except UnsupportedModelError as err:
        raise UsageError(f"--model {args.model} cannot be trained with weight bounds: {err}") from err
    validation = (x_test, y_test) if x_test is not None else None
    history = trainer.fit(
        x_train, y_train, validation_data=validation, batch_size=args.batch_size, nb_epochs=args.epochs
    )
    saved_as = inputs.save_model(classifier.model.cpu().eval(), args.out, x_train)
    final = {}
    if x_test is not None:
        final["test_accuracy"] = float(np.mean(classifier.predict(x_test).argmax(1) == y_test))
    document = {
        "model_file": os.path.abspath(args.out),
        "saved_as": saved_as,
        "architecture": args.model,
        "data": data_desc,
        "budget": budget.to_dict(),
        "trainer": params,
        **{"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        "final": final,
        "history": history,
        "versions": versions(),
        "seconds": time.perf_counter() - start,
    }
    with open(history_path, "w", encoding="utf-8") as handle:
        json.dump(jsonable(document), handle, indent=1)
    print(f"Model saved to {args.out} ({saved_as}); training history in {history_path}.")
    if final:
        print("Final: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
    return 0


def _training_data(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, str]:
    """``(x_train, y_train, x_test, y_test, description)`` of ``train --data`` (test arrays ``None`` when the .npz
    has no separate training split), or the digits split."""
    if args.data is None:
        return (*load_digits_data(seed=args.seed, flatten=args.model != "cnn"), "scikit-learn digits")
    arrays = inputs.load_data(args.data)
    if "x_train" in arrays:
        return arrays["x_train"], arrays["y_train"], arrays["x"], arrays["y"], args.data
    return arrays["x"], arrays["y"], None, None, args.data


RELATIVE_EPS = 0.02
"""``train --data`` without ``--eps``: the ball scales with the model, ε = 2 % of each row's ℓ1 norm (relative
row-ℓ1; on the digits MLP at initialization, mean row ℓ1 norm ≈ 4.5, this is the digits recipe's absolute ε = 0.1)."""


def _training_ball(args: argparse.Namespace) -> tuple[float, str, bool]:
    """``(eps, norm, relative)`` of ``train``: the flags; without ``--eps``, the digits recipe's ball on the digits
    data and a relative ball of :data:`RELATIVE_EPS` on the user's data (an absolute ε that suits a 64-input MLP is
    far too large for a wide convolutional network)."""
    recipe = zoo.DIGITS_RECIPE
    norm = args.norm or recipe.norm
    if args.eps is not None:
        return args.eps, norm, args.relative
    if args.data is None and norm == recipe.norm and not args.relative:
        return recipe.eps, norm, False
    unit = {"inf": "weight's magnitude", "row_l1": "row's ℓ1 norm", "l2": "layer's Frobenius norm"}[norm]
    logger.warning(
        "no --eps given: training in a relative %s ball of ε = %g (%g %% of each %s), scaled to the model",
        norm, RELATIVE_EPS, 100 * RELATIVE_EPS, unit,
    )  # fmt: skip
    return RELATIVE_EPS, norm, True
