"""
:class:`BitFlipCertifier`: which predictions of a quantized or float model no set of at most ``k`` flipped weight bits
can change (docs/theory.md §8).

With ``encoding="int"``, what is certified is the quantized model of :func:`.effective_quantized_weights` (the
estimator's effective weights ``W + Δ`` quantized, on the grid of its base weights when they lie on it; biases, batch
norm and unselected layers stay float; for a deployed int8 model of :meth:`.PyTorchWeightClassifier.from_quantized`,
its deployed codes, and only with weight-only quantization: a layer that quantizes its activations at run time is
refused with :class:`.UnsupportedModelError`); with ``encoding="float"``
the float model itself, its weights' IEEE bits flipping (:class:`.FloatWeights`; by default the sign and mantissa bits:
an exponent flip can move a weight to ``10^38``, and one that gives ``±inf`` or NaN leaves nothing certified). Exact
arithmetic with eval-mode semantics. The threat set is every set of at most ``k`` distinct allowed bits of the weights
of the selected layers. Bounds in float64 (docs/theory.md §5), from :mod:`.bit_flip_bounds`:

* ``"interval"``: boxes where every unit takes its own worst ``k`` flips, the last layer folded into the margins;
* ``"linear"``: the backward pass from the margins with one top-``k`` over the pair terms of all layers, for every case
  of :func:`.flip_cases` (where the flips land), the minimum over the cases; never looser than ``"interval"``.

| Paper link: https://arxiv.org/abs/1903.12269 (the bit-flip threat model)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.certification.bit_flip_bounds import flip_boxes, interval_margins
from art_weightpert.certification.bit_flip_cases import case_margins, flip_cases
from art_weightpert.certification.bit_flip_terms import check_flip_args, encode_weights, flip_tables
from art_weightpert.certification.certifier import CERTIFICATION_RTOL
from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.wrapping import as_weight_classifier, effective_estimator, weights_version
from art_weightpert.float_bits import FloatWeights
from art_weightpert.network import Network, UnsupportedModelError, read_network
from art_weightpert.quantization import QuantizedWeights, effective_quantized_weights
from art_weightpert.torch_tools import batch_slices, eval_mode, float64_copy
from art_weightpert.validation import check_bool, check_choice, check_non_negative_int, check_positive_int

logger = logging.getLogger(__name__)

BIT_FLIP_METHODS = ("interval", "linear")


def check_chain(network: Network) -> Network:
    """The bit-flip bounds propagate through a chain of layers (docs/theory.md §8); a network with branches is refused
    rather than read as a chain, which would be unsound."""
    if not network.is_chain:
        raise UnsupportedModelError(
            "the bit-flip certificate reads chains of layers only; this model has branches (residual additions). "
            "The weight-ball certificates (WeightPerturbationCertifier) cover it; the bit-flip attacks work on it."
        )
    return network


class BitFlipCertifier(Settings):
    """
    Certificates of a quantized (``encoding="int"``) or float (``encoding="float"``) classifier against at most
    ``max_flips`` flipped bits of its weights.

    A sample is certified when every pairwise margin lower bound of the certified model's label (or the given label,
    if that model predicts it) exceeds ``CERTIFICATION_RTOL · (1 + max_i |f_i(x)|)``.
    Settings: constructor arguments and :meth:`set_params` (assigning one goes through it); no cached encoding or
    bound outlives a change of settings or weights.
    """

    certifier_params = [
        "max_flips", "n_bits", "granularity", "layers", "method", "batch_size", "verbose", "encoding", "bits",
    ]  # fmt: skip
    params_attribute = "certifier_params"

    def __init__(
        self,
        estimator: PyTorchClassifier,
        max_flips: int = 1,
        n_bits: int = 8,
        granularity: str = "tensor",
        layers: list[str] | None = None,
        method: str = "linear",
        batch_size: int = 128,
        verbose: bool = True,
        encoding: str = "int",
        bits: list[int] | None = None,
    ) -> None:
        """
        Create a :class:`.BitFlipCertifier` instance.

        :param estimator: a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier`` (wrapped, not copied)
            whose model is a chain of Linear/Conv2d layers with fixed layers between them.
        :param max_flips: most flipped bits certified against (0: only the quantized prediction itself).
        :param n_bits: bits per quantized weight, 2 to 16 (``encoding="int"`` only).
        :param granularity: one quantization scale per ``"tensor"`` or per output ``"channel"`` (``"int"`` only).
        :param layers: names of the Linear/Conv layers whose weights may flip (``None``: all).
        :param method: ``"linear"`` (the default, the tightest) or ``"interval"`` (faster).
        :param batch_size: samples per bound computation (pair terms are further chunked to bound the memory).
        :param verbose: show a progress bar over batches.
        :param encoding: ``"int"`` (the quantized codes' bits) or ``"float"`` (the float weights' IEEE bits).
        :param bits: the bit positions that may flip: ``0`` to ``n_bits - 1`` for ``"int"`` (``None``: all); IEEE
            numbering of the weights' dtype for ``"float"`` (``None``: sign and mantissa, e.g. 0–22 and 31 for float32).
            Exponent bits are certified soundly, but one exponent flip can multiply a weight by ``2^128``.
        :raises UnsupportedModelError: when the model is not a chain of supported layers (names the module).
        """
        estimator = as_weight_classifier(estimator)
        check_chain(read_network(estimator.base_model, estimator.input_shape))  # before anything is copied
        self._estimator = estimator
        self.max_flips = max_flips
        self.n_bits = n_bits
        self.granularity = granularity
        self.layers = layers
        self.method = method
        self.batch_size = batch_size
        self.verbose = verbose
        self.encoding = encoding
        self.bits = bits
        self._check_params()
        self._key: tuple | None = None

    def _check_params(self) -> None:
        check_non_negative_int(self.max_flips, "max_flips")
        self._bits = check_flip_args(
            self.estimator, self.encoding, self.n_bits, self.granularity, self.layers, self._bits_given
        )
        check_choice(self.method, "method", BIT_FLIP_METHODS)
        check_positive_int(self.batch_size, "batch_size")
        check_bool(self.verbose, "verbose")
        if isinstance(self.layers, str):
            self.layers = [self.layers]
        elif self.layers is not None:
            self.layers = list(self.layers)
        self.max_flips, self.n_bits = int(self.max_flips), int(self.n_bits)
        self.batch_size, self.verbose = int(self.batch_size), bool(self.verbose)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def estimator(self):
        """The (wrapped) estimator."""
        return self._estimator

    @property
    def bits(self) -> tuple[int, ...] | None:
        """The bit positions that may flip (``None``: every bit of the integer codes); for float encodings by default
        the sign and mantissa bits. Set it with :meth:`set_params`."""
        return self._bits

    @property
    def quantized_(self) -> QuantizedWeights | FloatWeights:
        """The weights certified (of the estimator's current effective weights): quantized codes, or float weights."""
        self._refresh()
        return self._quantized

    @property
    def weights_(self) -> QuantizedWeights | FloatWeights:
        """Alias of :attr:`quantized_` (its name for float encodings)."""
        return self.quantized_

    # ------------------------------------------------------------------------------------------------ public API
    def certify(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Which predictions of the quantized model provably survive every set of at most ``max_flips`` flipped bits.

        :param x: inputs ``(N,) + input_shape`` (ART's preprocessing is applied).
        :param y: integer or one-hot labels: a sample the quantized model misclassifies is never certified. ``None``:
            certify the quantized model's predictions.
        :return: ``(N,)`` bool.
        """
        out = []
        for x64, labels, tol, correct in self._batches(x, y, "certify"):
            ok = self._certified(x64, labels, tol, self.max_flips)
            out.append((correct & ok).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)

    def certified_flips(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Per sample, the largest ``k ≤ max_flips`` for which the quantized prediction is certified against every set of
        at most ``k`` flipped bits (certifying ``k`` covers every smaller number); 0 where none is; −1 where the
        quantized model misclassifies the sample (with labels).

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels, or ``None`` for the quantized model's predictions.
        :return: ``(N,)`` int64.
        """
        out = []
        for x64, labels, tol, correct in self._batches(x, y, "certified flips"):
            flips = torch.zeros(len(x64), dtype=torch.int64, device=x64.device)
            todo = correct.clone()
            for k in range(self.max_flips, 0, -1):  # downwards: each sample is decided at its largest certified k
                rows = todo.nonzero().flatten()
                if len(rows) == 0:
                    break
                ok = self._certified(x64[rows], labels[rows], tol[rows], k)
                flips[rows[ok]] = k
                todo[rows[ok]] = False
            out.append(torch.where(correct, flips, -1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def margin_lower_bounds(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """
        Lower bounds of every pairwise margin ``f_y(x) − f_i(x)`` of the quantized model over every set of at most
        ``max_flips`` flipped bits.

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels ``y``; ``None``: the quantized model's predictions.
        :return: ``(N, nb_classes)`` float64, ``+inf`` in the label's own column.
        """
        out = [self._bounds(x64, labels, self.max_flips).cpu().numpy() for x64, labels, _, _ in self._batches(x, y)]
        return np.concatenate(out) if out else np.zeros((0, self.estimator.nb_classes))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_flips={self.max_flips}, n_bits={self.n_bits}, "
            f"granularity={self.granularity!r}, layers={self.layers!r}, method={self.method!r}, "
            f"batch_size={self.batch_size}, verbose={self.verbose}, encoding={self.encoding!r}, "
            f"bits={None if self.bits is None else list(self.bits)})"
        )

    # ------------------------------------------------------------------------------------------------ internals
    def _refresh(self) -> None:
        """Quantize (or read) the estimator's effective weights into a private float64 copy of the model, when they or
        the settings changed."""
        key = (self.settings_key(), weights_version(self.estimator))  # every setting, every weight, by value
        if key == self._key:
            return
        effective = effective_estimator(self.estimator)  # W + Δ: the weights the estimator predicts with
        if self.encoding == "int":
            quantized = effective_quantized_weights(
                self.estimator, self.n_bits, self.granularity, self.layers, effective
            )
        else:
            quantized = encode_weights(effective, self.encoding, self.n_bits, self.granularity, self.layers, self._bits)
        model64 = float64_copy(effective.base_model)
        with torch.no_grad():
            for name, value in quantized.dequantize().items():
                model64.get_parameter(name).copy_(value)
        self._network = read_network(model64, self.estimator.input_shape)
        self._params = self._network.params(dtype=torch.float64)
        device = next(iter(self._params.values())).device
        self._tables = flip_tables(quantized, self._network.affine_layers, device, self._bits)
        # A flip to ±inf or NaN moves a margin arbitrarily far: nothing is certified against it (k ≥ 1).
        self._unbounded = not all(bool(torch.isfinite(t.changes).all()) for t in self._tables.values())
        if self._unbounded:
            logger.warning("Some allowed flips give ±inf or NaN weights: no sample is certified against k >= 1 flips.")
        self._names = [layer.weight_name for layer in self._network.affine_layers if layer.weight_name in self._tables]
        self._effective = effective
        self._deltas = quantized.deltas(effective)
        self._quantized = quantized
        self._key = key

    def _batches(self, x: np.ndarray, y: np.ndarray | None, desc: str = "margin bounds"):
        """Float64 batches ``(x, labels, tolerance, quantized prediction correct)``."""
        self._refresh()
        x_t, y_t = self._effective.prepare_inputs(x, y)
        base = self._effective.base_model
        slices = batch_slices(len(x_t), self.batch_size)
        total = -(-len(x_t) // self.batch_size)
        for b in tqdm(slices, total=total, desc=f"Bit-flip certificates ({desc})", disable=not self.verbose):
            xb = x_t[b]
            with torch.no_grad(), eval_mode(base):
                logits = self._effective.logits(xb, self._deltas)
            pred = logits.argmax(dim=1)
            labels = pred if y_t is None else y_t[b]
            tol = CERTIFICATION_RTOL * (1.0 + logits.abs().amax(dim=1).to(torch.float64))
            yield xb.to(torch.float64), labels, tol, pred == labels

    def _certified(self, x64: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor, k: int) -> torch.Tensor:
        return self._bounds(x64, labels, k).amin(dim=1) > tol

    def _bounds(self, x64: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """Margin lower bounds ``(N, K)`` under at most ``k`` flips, ``+inf`` in the label's column."""
        net, params, tables, nb = self._network, self._params, self._tables, self.estimator.nb_classes
        if self._unbounded and k > 0:
            bound = torch.full((len(x64), nb), float("-inf"), dtype=torch.float64, device=x64.device)
            return bound.scatter(1, labels.unsqueeze(1), float("inf"))
        try:
            with torch.no_grad():
                case = dict.fromkeys(self._names, k)
                boxes = flip_boxes(net, params, tables, case, x64, x64)
                bound = interval_margins(net, params, tables, case, boxes, labels, nb)
                if self.method == "linear" and k > 0:
                    cases = flip_cases(self._names, k)
                    split = torch.stack([case_margins(net, params, tables, c, k, x64, labels, nb) for c in cases])
                    bound = torch.maximum(bound, split.amin(dim=0))
        finally:
            for table in tables.values():  # the memo of neuron boxes holds for this computation only
                table.memo.clear()
        return bound.scatter(1, labels.unsqueeze(1), float("inf"))
