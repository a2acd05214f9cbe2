"""
The argument parser of ``art-weightpert``: declarative tables of the three commands, argparse types built on the
library's validators (:mod:`art_weightpert.validation`), and the usage error of the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from art_weightpert import __version__
from art_weightpert.budget import NORMS
from art_weightpert.certification import METHODS as BOUND_METHODS
from art_weightpert.certification.precision import DEFAULT_DTYPE, dtype_name
from art_weightpert.defences.trainer.weight_robust_trainer import WARMUP_EPOCHS
from art_weightpert.validation import check_int, check_non_negative, check_non_negative_int, check_positive_int
from art_weightpert.zoo import DIGITS_RECIPE

PROG = "art-weightpert"
DEFAULT_OUT = "art-weightpert-report"
OPTIONAL_METHODS = ("alpha", "verified")
"""Methods a report runs only when asked (``--methods``): optimized bounds and the verifier cost seconds per sample."""
REPORT_METHODS = ("clean", "random", "pgd", *(m for m in BOUND_METHODS if m not in OPTIONAL_METHODS))
"""The default methods of a report: clean accuracy, random faults, WeightPGD and the certificates."""


class DeprecatedFlag(argparse.Action):
    """A flag renamed in CHANGELOG.md: it still works, with a warning naming the new flag (the one its ``dest``
    names)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option_string} is deprecated, use {new}.", file=sys.stderr)
        setattr(namespace, self.dest, values)


class UsageError(Exception):
    """A problem with what the user passed (exit code 2)."""


def one_line(err: BaseException | str) -> str:
    """An error (or a message) as one line; the exception's class name when it has no message."""
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def argument_type(convert: Callable[[str], Any], check: Callable[[Any, str], Any], what: str) -> Callable[[str], Any]:
    """
    An argparse type: ``convert`` the text, then ``check`` it with a validator of :mod:`art_weightpert.validation`.

    :param convert: ``int`` or ``float``.
    :param check: a validator ``check(value, name)``.
    :param what: the expected value, for the error (``"a positive integer"``).
    """

    def parse(text: str) -> Any:
        try:
            return check(convert(text), "value")
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = argument_type(int, check_positive_int, "a positive integer")
non_negative_int = argument_type(int, check_non_negative_int, "a non-negative integer")
non_negative = argument_type(float, check_non_negative, "a finite non-negative number")
bits_per_weight = argument_type(int, lambda v, n: check_int(v, n, minimum=2, maximum=16), "an integer from 2 to 16")

_OUT = ("--out", {"default": None, "help": f"report folder (default: ./{DEFAULT_OUT})"})
_SEED = ("--seed", {"type": non_negative_int, "default": 0, "help": "seed of training and attacks (default 0)"})
_QUIET = (
    "--quiet",
    {
        "action": "store_true",
        "help": "no progress bars and no progress messages; warnings, errors and the final summary (the tables "
        "and the report's path; train's final lines) are still printed",
    },
)
_THREADS = (
    "--threads",
    {
        "type": positive_int,
        "default": None,
        "metavar": "N",
        "help": "torch threads in all (torch.set_num_threads; with --nproc P, each process gets N/P, at least 1); "
        "default: what torch picks (its physical-core count, or $OMP_NUM_THREADS). On a machine shared with other "
        "processes, pass --threads 1",
    },
)
_NPROC = ("--nproc", {"type": positive_int, "default": 1, "help": "processes (torch.distributed; default 1)"})
_DEVICE = ("--device", {"choices": ("cpu", "gpu"), "default": "cpu", "help": "where torch runs (default: cpu)"})
_DTYPE = (
    "--dtype",
    {
        "choices": ("float32", "float64"),
        "default": None,
        "help": "precision of the certificates: float32 (with rounding-error terms, sound) or float64 (default: the "
        "certifiers' own)",
    },
)
COMMON = [
    _OUT,
    _SEED,
    ("--batch-size", {"type": positive_int, "default": 128, "help": "samples per forward pass"}),
    _DTYPE,
    _QUIET,
    _THREADS,
]

_MEASURES = (
    "--measures",
    {
        "action": "store_true",
        "help": "add generalization measures: worst- and average-case adaptive sharpness, PAC-Bayes "
        "σ and bound (on x_train when the .npz has it, with the generalization gap)",
    },
)
BIT_FLIPS = [
    (
        "--bit-flips",
        {
            "type": non_negative_int,
            "default": None,
            "metavar": "N",
            "help": "add a 'Bit flips' section: accuracy of the quantized model after up to N bits flipped "
            "by the bit-flip attack and at random (default: off for evaluate)",
        },
    ),
    ("--n-bits", {"type": bits_per_weight, "default": 8, "help": "bits per quantized weight, 2 to 16 (default 8)"}),
    (
        "--granularity",
        {
            "choices": ("tensor", "channel"),
            "default": "tensor",
            "help": "quantization scale per weight tensor or per output channel (default: tensor)",
        },
    ),
    (
        "--backdoor-target",
        {
            "type": non_negative_int,
            "default": 0,
            "metavar": "K",
            "help": "target class of the 'Bit flips' section's backdoor row (default 0)",
        },
    ),
    (
        "--no-bit-flip-threats",
        {
            "action": "store_true",
            "help": "leave out the float-weight, backdoor and defence rows of the 'Bit flips' section",
        },
    ),
]
DEMO = [
    ("--quick", {"action": "store_true", "help": "smaller run (seconds on 2 CPU cores; what CI runs)"}),
    _MEASURES,
    (
        "--bit-flips",
        {
            "type": non_negative_int,
            "default": None,
            "metavar": "N",
            "help": "most flipped bits of the 'Bit flips' section (default 20, 10 with --quick; 0: off)",
        },
    ),
]

EVALUATE = [
    ("--model", {"required": True,
                 "help": "torch.export program (.pt2, preferred), TorchScript file, torch.save'd module (also a "
                         "torch.ao int8 model), .onnx (with onnx2torch) or package.module:callable"}),
    ("--data", {"required": True, "help": ".npz with x, y (optional x_train, y_train)"}),
    ("--norm", {"choices": NORMS, "default": "inf", "help": "weight ball (default: inf, entry-wise box)"}),
    ("--eps", {"type": non_negative, "nargs": "+", "default": None,
               "help": "ε grid (default: scaled to the model: 0, 0.2, 0.5, 1, 2, 5 and 10%% of its typical weight "
                       "size in the chosen norm — mean |W| entry, mean row ℓ1 norm or mean Frobenius norm; with "
                       "--relative, those fractions)"}),
    ("--layers", {"nargs": "+", "default": None, "help": "Linear/Conv layers to perturb (default: all)"}),
    ("--relative", {"action": "store_true", "help": "radii relative to the weights (ε·|W|)"}),
    ("--include-bias", {"action": "store_true", "help": "also perturb the biases"}),
    ("--methods", {"nargs": "+", "choices": REPORT_METHODS + OPTIONAL_METHODS, "default": list(REPORT_METHODS),
                   "help": "methods to run (default: all but the costly alpha and verified: the verifier's "
                           "certified, falsified and unknown shares)"}),
    _DEVICE,
    ("--max-samples", {"type": positive_int, "default": None, "help": "evaluate the first N test points"}),
    ("--pgd-steps", {"type": positive_int, "default": 20, "help": "WeightPGD iterations (default 20)"}),
    ("--random-samples", {"type": positive_int, "default": 10,
                          "help": "random draws per ε and per number of bit flips (default 10)"}),
    _MEASURES,
    *BIT_FLIPS,
    _NPROC,
]  # fmt: skip

_R = DIGITS_RECIPE
TRAIN = [
    ("--data", {"default": None, "help": ".npz with x, y (optional x_train, y_train); default: digits"}),
    ("--out", {"required": True,
               "help": "model file to write: .pt2 (torch.export program, preferred) or .pt/.pth (whole module, "
                       "torch.save)"}),
    ("--history", {"default": None, "help": "history JSON (default: <out>.history.json)"}),
    ("--model", {"default": "mlp",
                 "help": "'mlp' (bias-free ReLU MLP), 'cnn' (digits CNN) or package.module:callable"}),
    ("--hidden", {"type": positive_int, "nargs": "+", "default": list(_R.hidden),
                  "help": f"MLP hidden widths (default: {' '.join(map(str, _R.hidden))})"}),
    ("--norm", {"choices": NORMS, "default": None, "help": f"weight ball (default: the digits recipe's, {_R.norm})"}),
    ("--eps", {"type": non_negative, "default": None,
               "help": f"ε of the ball (default: scaled to the model's input width, {_R.eps}·sqrt(64/n_inputs) in "
                       f"the {_R.norm} ball — the recipe's {_R.eps} on the 64 digits features, 0.0144 on 3x32x32 "
                       "images; required with another --norm or --relative)"}),
    ("--relative", {"action": "store_true", "help": "radii relative to the weights (ε·|W|)"}),
    ("--layers", {"nargs": "+", "default": None, "help": "layers to perturb (default: all)"}),
    ("--lam", {"type": non_negative, "default": _R.lam, "help": f"weight λ of the robust term (default {_R.lam})"}),
    ("--mu", {"type": non_negative, "default": _R.mu, "help": f"weight μ of the operator-norm term (default {_R.mu})"}),
    ("--kappa", {"type": non_negative, "default": _R.kappa, "help": f"safety margin κ (default {_R.kappa})"}),
    ("--method", {"choices": tuple(BOUND_METHODS), "default": _R.method,
                  "help": f"bound method of the robust term η (default {_R.method})"}),
    ("--bound", {"choices": tuple(BOUND_METHODS), "dest": "method", "action": DeprecatedFlag,
                 "help": argparse.SUPPRESS}),
    ("--warmup", {"type": non_negative_int, "default": None,
                  "help": f"epochs over which λ and ε grow from 0 (default: the trainer's {WARMUP_EPOCHS} on your "
                          f"data, the recipe's {_R.warmup} on the digits data)"}),
    ("--epochs", {"type": positive_int, "default": _R.epochs, "help": f"training epochs (default {_R.epochs})"}),
    ("--lr", {"type": non_negative, "default": _R.lr, "help": f"Adam learning rate (default {_R.lr})"}),
    ("--batch-size", {"type": positive_int, "default": _R.batch_size,
                      "help": f"samples per step (default {_R.batch_size})"}),
    ("--keep-collapsed", {"action": "store_true",
                          "help": "save the model even when training collapsed to chance accuracy (by default it "
                                  "is not saved and the exit code is 3)"}),
    _SEED,
    _DEVICE,
    _NPROC,
    _QUIET,
    _THREADS,
]  # fmt: skip

COMMANDS = {
    "demo": {
        "arguments": COMMON + DEMO,
        "help": "train a standard and a robust MLP on the digits data and report on both",
        "description": "Train a standard and a weight-robust bias-free MLP on scikit-learn's digits (the digits "
        "recipe, art_weightpert.zoo.DIGITS_RECIPE), evaluate both across an ε grid (clean, random faults, WeightPGD, "
        "certified by the paper's closed-form bound, by interval bounds and by linear bounds) and write report.md, "
        "report.json and PNG plots.",
    },
    "evaluate": {
        "arguments": COMMON + EVALUATE,
        "help": "report on your model and data",
        "description": "Evaluate a model under weight perturbations: accuracy across an ε grid by each method, "
        "certified radii, plots (and with --bit-flips, --measures: bit flips of the quantized model, generalization "
        "measures). MODEL is a torch.export program (.pt2 of torch.export.save; the preferred format), a TorchScript "
        "file, a file saved with torch.save(module) (loaded with weights_only=False after a warning: it runs pickled "
        "code), an .onnx file (through onnx2torch, when installed) or package.module:callable returning an nn.Module; "
        "residual networks are read from every format. A deployed int8 model (torch.ao or torchao) is analysed as "
        "deployed: --bit-flips flips its int8 codes. DATA is an .npz with x and y (and optionally "
        "x_train, y_train: the training split, for the generalization bound, the measures and the gap, and the "
        "bit-flip attack's batch). The default ε grid is scaled to the model (fractions of its typical weight size).",
    },
    "train": {
        "arguments": TRAIN,
        "help": "train a weight-robust model and save it",
        "description": "Train with WeightRobustTrainer (the robust loss of docs/training.md) on an .npz (x_train, "
        "y_train if present, else x, y) or on the digits data, then save the model in the format --out names "
        "(.pt2: a torch.export program with a dynamic batch size, checked before training; .pt/.pth: the whole module "
        "with torch.save) and its training history as JSON. The defaults are the digits recipe "
        "(art_weightpert.zoo.DIGITS_RECIPE), with ε scaled to the input width on your data. A run that collapses "
        "to chance accuracy is reported and not saved (exit code 3) unless --keep-collapsed.",
    },
}
"""Per command: its arguments ``(flag, argparse keywords)``, its one-line help and its description."""


def process_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The processes and torch threads of the run, as written into the report's settings (``args.threads``,
    ``args.threads_per_process`` as resolved by :func:`.launch.thread_settings`)."""
    settings = {"nproc": args.nproc, "threads": args.threads, "threads_per_process": args.threads_per_process}
    if "dtype" in args:  # the commands that certify
        settings["certificate_dtype"] = args.dtype or dtype_name(DEFAULT_DTYPE)
    return settings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``art-weightpert`` (the command's name is ``args.command``)."""
    parser = _Parser(
        prog=PROG,
        description="Attack, certify and harden PyTorch classifiers against weight perturbations (an ART plugin).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, spec in COMMANDS.items():
        command = sub.add_parser(name, help=spec["help"], description=spec["description"])
        for flag, keywords in spec["arguments"]:
            command.add_argument(flag, **keywords)
    return parser
