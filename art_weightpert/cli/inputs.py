"""
What the commands read and write besides the report: the user's data and model (turned into :class:`.UsageError` with
one clear line when they do not fit), budgets, folders, seeds, progress bars, and the trained model's file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from art_weightpert.budget import PerturbationBudget
from art_weightpert.cli.parser import DEFAULT_OUT, UsageError
from art_weightpert.data import load_npz
from art_weightpert.loading import LoadedModel, ModelSpecError, load_model_record
from art_weightpert.metrics.summaries import parameter_count
from art_weightpert.torch_tools import eval_mode


def check_device(device: str) -> str:
    """``device`` (``"cpu"`` or ``"gpu"``), after checking that torch sees a GPU when one is asked for."""
    if device == "gpu" and not torch.cuda.is_available():
        raise UsageError("--device gpu: torch sees no CUDA device (use --device cpu)")
    return device


def load_data(path: str) -> dict[str, np.ndarray]:
    """The arrays of a user's ``.npz`` (``x``, ``y`` and optionally ``x_train``, ``y_train``), checked, with integer
    labels."""
    try:
        arrays = load_npz(path)
    except (FileNotFoundError, ValueError) as err:
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


def check_labels(nb_classes: int, **labels: np.ndarray | None) -> None:
    """Every label lies below the model's number of classes (``labels``: ``{argument name: labels or None}``)."""
    for name, values in labels.items():
        if values is not None and len(values) and values.max() >= nb_classes:
            raise UsageError(f"{name} has label {values.max()} but the model outputs {nb_classes} classes")


def make_budget(model: nn.Module, eps: float, norm: str, layers, relative: bool, include_bias: bool = False):
    """The budget of the command-line flags, with its layer names checked against ``model``."""
    try:
        budget = PerturbationBudget(eps, norm, layers=layers, relative=relative, include_bias=include_bias)
        budget.layer_names(model)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err).replace("in the budget", "in --layers")) from err
    return budget


class _DropUnavailable(logging.Filter):
    """Drops the library's per-method "... unavailable: reason" warnings (the command line logs each reason once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "unavailable" not in record.getMessage()


@contextlib.contextmanager
def grouped_warnings() -> Iterator[None]:
    """While evaluating: silence the robustness curve's per-method "unavailable" warnings, which the report groups
    by reason and logs once (:func:`.unavailable_lines`)."""
    target = logging.getLogger("art_weightpert.metrics.robustness")
    drop = _DropUnavailable()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def progress_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr (disabled by ``--quiet``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, leave=False, file=sys.stderr)


def out_dir(args: argparse.Namespace) -> str:
    """The report folder of ``--out`` (default ``./art-weightpert-report``)."""
    out = args.out or DEFAULT_OUT
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    return out


def seed_everything(seed: int) -> None:
    """Seed torch's and numpy's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def load_user_model(spec: str) -> LoadedModel:
    """:func:`art_weightpert.loading.load_model_record`, with its errors as usage errors."""
    try:
        return load_model_record(spec)
    except (FileNotFoundError, ModelSpecError) as err:
        raise UsageError(str(err)) from err


def forward(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """Run ``model`` (eval mode, on its parameters' device) on ``x`` and return the logits."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32, device=device))


def check_forward(module: nn.Module, x: np.ndarray, spec: str) -> torch.Tensor:
    """The logits of ``module`` on ``x``; a usage error when the model does not accept the data or returns no
    ``(N, classes)`` logits."""
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


def build_architecture(args: argparse.Namespace, input_shape: tuple[int, ...], nb_classes: int) -> nn.Module:
    """The untrained model of ``train --model``: the digits MLP or CNN of :mod:`art_weightpert.zoo`, or the user's."""
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
    loaded = load_user_model(args.model)
    if not loaded.eager:
        raise UsageError(f"--model {args.model}: {loaded.unsupported_reason}")
    return loaded.module


MODEL_FORMATS = {
    ".pt2": "torch.export program (torch.export.save; load with torch.export.load)",
    ".pt": "whole module (torch.save; load with torch.load(path, weights_only=False))",
    ".pth": "whole module (torch.save; load with torch.load(path, weights_only=False))",
}
"""The model files ``train --out`` writes, by extension."""

PICKLE_SAVE_WARNING = (
    "{path}: saving the whole module with torch.save; loading it runs pickled code (torch.load(weights_only=False)) "
    "and needs the model's class importable. Save as .pt2 (torch.export) for a file that loads without either."
)


def check_model_path(path: str) -> str:
    """The extension of a model file to write (a key of :data:`MODEL_FORMATS`); a usage error for any other."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in MODEL_FORMATS:
        raise UsageError(
            f"--out {path}: the model file must end in .pt2 (a torch.export program, the preferred format) or "
            ".pt/.pth (the whole module, saved with torch.save)"
        )
    return extension


def export_program(module: nn.Module, example: np.ndarray) -> Any:
    """``torch.export`` of ``module`` in eval mode with a dynamic batch dimension; a usage error naming the reason and
    the ``.pt`` alternative when it cannot be exported."""
    inputs = (torch.as_tensor(example[:2], dtype=torch.float32),)
    try:
        with eval_mode(module):
            return torch.export.export(module, inputs, dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as err:  # noqa: BLE001 - any export failure: the user picks another format
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"the model cannot be saved as .pt2 with torch.export ({first}); use --out NAME.pt") from err


def save_model(module: nn.Module, path: str, example: np.ndarray) -> str:
    """
    Save ``module`` in the format its file extension names (:data:`MODEL_FORMATS`):

    * ``.pt2``: a ``torch.export`` program with a dynamic batch dimension (the preferred format: ``torch.export.load``
      opens it without the model's code and without running pickled code; ``evaluate`` rebuilds it, residual
      networks included);
    * ``.pt``/``.pth``: the whole module with ``torch.save`` (``torch.load(path, weights_only=False)`` opens it; that
      runs pickled code and needs the model's class importable, hence a warning).

    :param example: inputs of the model (two are used to export it).
    :return: how the model was saved.
    """
    extension = check_model_path(path)
    if extension == ".pt2":
        program = export_program(module, example)
        with open(path, "wb") as handle:  # a file object: torch warns about names not ending in .pt2
            torch.export.save(program, handle)
    else:
        warnings.warn(PICKLE_SAVE_WARNING.format(path=path), UserWarning, stacklevel=2)
        torch.save(module, path)
    return MODEL_FORMATS[extension]


def quote(arg: str) -> str:
    """A command-line argument as the user would type it."""
    return arg if arg and all(c.isalnum() or c in "-_./:=," for c in arg) else repr(arg)


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Layer types and parameter count of a module, for the report."""
    return {
        "class": type(model).__name__,
        "parameters": parameter_count(model),
        "text": " ".join(str(model).split()) if len(str(model)) < 2000 else type(model).__name__,
    }
