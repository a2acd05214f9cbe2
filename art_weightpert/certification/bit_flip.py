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
of the selected layers. Bounds in float64, or in float32 with the rounding-error terms of docs/theory.md §5 (sound for
the exact network), from :mod:`.bit_flip_bounds`:

* ``"interval"``: boxes where every unit takes its own worst ``k`` flips, the last layer folded into the margins;
* ``"linear"``: the backward pass from the margins with one top-``k`` over the pair terms of all layers, for every case
  of :func:`.flip_cases` (where the flips land), the minimum over the cases; never looser than ``"interval"``.

| Paper link: https://arxiv.org/abs/1903.12269 (the bit-flip threat model)
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from tqdm.auto import tqdm

from art_weightpert.certification.bit_flip_bounds import flip_boxes, interval_margins
from art_weightpert.certification.bit_flip_cases import (
    MAX_REFINED_FLIPS,
    case_margins,
    enumerated_split_margins,
    first_flipped,
    flip_cases,
)
from art_weightpert.certification.bit_flip_enumeration import enumerable_layer, greedy_flip_search
from art_weightpert.certification.bit_flip_first_layer import applicable as first_layer_applicable
from art_weightpert.certification.bit_flip_terms import (
    cast_table,
    check_flip_args,
    encode_weights,
    flip_tables,
    with_combined_changes,
)
from art_weightpert.certification.precision import certification_rtol
from art_weightpert.certification.verdicts import VerificationResult
from art_weightpert.estimators.settings import Settings
from art_weightpert.estimators.wrapping import as_weight_classifier, effective_estimator, weights_version
from art_weightpert.float_bits import FloatWeights
from art_weightpert.network import Network, UnsupportedModelError, read_network
from art_weightpert.quantization import QuantizedWeights, effective_quantized_weights
from art_weightpert.rounding import exact_kernels
from art_weightpert.torch_tools import batch_slices, eval_mode, float64_copy
from art_weightpert.validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_positive,
    check_positive_int,
)

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


def _finite(tables: dict) -> bool:
    return all(bool(torch.isfinite(t.changes).all()) for t in tables.values())


def _check_normal_range(named: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The rounding terms of docs/theory.md §5 take every cast to ``dtype`` as a relative error: a certified weight,
    bias or batch-norm constant below ``dtype``'s normal range (a nonzero ``|v| < 2⁻¹²⁶`` in float32) would round by
    an absolute error that they do not count (the changes of flips are rounded away from zero: :func:`.cast_table`).

    :raises ValueError: naming the tensor and the float64 alternative.
    """
    tiny = torch.finfo(dtype).tiny
    for name, t in named.items():
        if t.is_floating_point() and bool(((t != 0) & (t.abs() < tiny)).any()):
            raise ValueError(
                f"`dtype={dtype}`: {name} holds values below {dtype}'s normal range ({tiny:.3g}), whose rounding the "
                "float32 bounds do not cover; certify with dtype=torch.float64."
            )


BOUND_DTYPES = (torch.float32, torch.float64)


def check_bound_dtype(dtype) -> torch.dtype:
    """Validate the floating-point type of the bounds (``dtype``).

    :raises TypeError: not a ``torch.dtype``.
    :raises ValueError: a dtype other than float32 and float64.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {type(dtype).__name__}.")
    if dtype not in BOUND_DTYPES:
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
    return dtype


class BitFlipCertifier(Settings):
    """
    Certificates of a quantized (``encoding="int"``) or float (``encoding="float"``) classifier against at most
    ``max_flips`` flipped bits of its weights.

    A sample is certified when every pairwise margin lower bound of the certified model's label (or the given label,
    if that model predicts it) exceeds ``certification_rtol(dtype) · (1 + max_i |f_i(x)|)`` (1e-9 in float64, 2⁻¹⁸ in
    float32).
    Settings: constructor arguments and :meth:`set_params` (assigning one goes through it); no cached encoding or
    bound outlives a change of settings or weights.
    """

    certifier_params = [
        "max_flips", "n_bits", "granularity", "layers", "method", "batch_size", "verbose", "encoding", "bits",
    ]  # fmt: skip
    # ``dtype`` is a constructor argument (read-only), as the weight-perturbation certifier's.
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
        dtype: torch.dtype = torch.float64,
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
        :param dtype: the floating-point type of the bounds: ``torch.float64`` (the default) or ``torch.float32``,
            whose bounds add the rounding-error terms of docs/theory.md §5 (sound for the exact network; a sample is
            certified above ``2⁻¹⁸ · (1 + max_i |f_i(x)|)``). In float32, :meth:`verify` does not branch on the
            placement of flips (the branches evaluate flips exactly, in float64): what it leaves open stays
            ``"unknown"``.
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
        self._dtype = check_bound_dtype(dtype)
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
    def dtype(self) -> torch.dtype:
        """The floating-point type of the bounds (a constructor argument)."""
        return self._dtype

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
        for xs, labels, tol, correct in self._batches(x, y, "certify"):
            ok = self._certified(xs, labels, tol, self.max_flips)
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
        for xs, labels, tol, correct in self._batches(x, y, "certified flips"):
            flips = torch.zeros(len(xs), dtype=torch.int64, device=xs.device)
            todo = correct.clone()
            for k in range(self.max_flips, 0, -1):  # downwards: each sample is decided at its largest certified k
                rows = todo.nonzero().flatten()
                if len(rows) == 0:
                    break
                ok = self._certified(xs[rows], labels[rows], tol[rows], k)
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
        out = [
            self._bounds(xs, labels, self.max_flips).to(torch.float64).cpu().numpy()
            for xs, labels, _, _ in self._batches(x, y)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.estimator.nb_classes))

    def verify(self, x: np.ndarray, y: np.ndarray | None = None, time_limit: float = 1.0) -> VerificationResult:
        """
        Complete verification against every set of at most ``max_flips`` flipped bits (docs/theory.md §11): per sample
        ``"certified"``, ``"falsified"`` (a concrete set of flips changes the prediction) or ``"unknown"``.

        First the certificate's bounds (every case of :func:`.flip_cases`, each on the samples the earlier cases left
        open; with integer codes a case whose first flipped layer is a convolution followed by an activation and a
        convolution has that layer's flips enumerated, :func:`.first_layer_margins`); then, for the samples they leave
        open, a greedy flip search on the sample's margin (:func:`.greedy_flip_search`) whose flips are checked by a
        forward pass of the flipped model; then, within ``time_limit`` seconds per sample, the open cases are branched
        on the placement of their flip (:func:`.enumerated_split_margins`: the largest single flips of the first
        flipped layer one by one, the rest per output row).

        :param x: inputs ``(N,) + input_shape``.
        :param y: labels; ``None``: the certified model's predictions. A sample it misclassifies is ``"falsified"``
            with an empty list of flips.
        :param time_limit: seconds per sample for the refinement (the bounds and the search of a batch are shared).
        :return: a :class:`.VerificationResult` whose ``counterexamples`` are ``{sample index: list of flips}``
            (:class:`.BitFlip`, or :class:`.FloatBitFlip` for float encodings), at most ``max_flips`` each.
        """
        time_limit = check_positive(time_limit, "time_limit")
        status, lower, seconds, counterexamples = [], [], [], {}
        offset = 0
        for xs, labels, tol, correct in self._batches(x, y, "verify"):
            start = time.perf_counter()
            n, k = len(xs), self.max_flips
            # Samples that k flips of the last layer alone break skip the bounds (the search finds those flips).
            alive = (correct & self._last_layer_survives(xs, labels, tol, k)).nonzero().flatten()
            worst = xs.new_full((n,), float("-inf"))
            cases, case_bounds = [], xs.new_zeros((0, n, self.estimator.nb_classes))
            if len(alive):
                cases, sub_bounds, bound = self._case_bounds(xs[alive], labels[alive], k, refine=True)
                worst[alive] = bound.amin(dim=1)
                case_bounds = xs.new_full((len(cases), n, self.estimator.nb_classes), float("-inf"))
                case_bounds[:, alive] = sub_bounds
            state = np.where(correct.cpu().numpy(), "unknown", "falsified").astype(object)
            state[(correct & (worst > tol)).cpu().numpy()] = "certified"
            spent = np.full(n, (time.perf_counter() - start) / max(n, 1))
            for i in np.flatnonzero(~correct.cpu().numpy()):
                counterexamples[offset + int(i)] = []
            for i in np.flatnonzero(state == "unknown"):
                begin = time.perf_counter()
                flips = self._falsify(xs[i : i + 1], labels[i : i + 1], k)
                if flips is not None:
                    state[i] = "falsified"
                    counterexamples[offset + int(i)] = flips
                else:
                    better = self._refine(
                        xs[i : i + 1], labels[i], tol[i], cases, case_bounds[:, i], k, begin, time_limit
                    )
                    worst[i] = torch.maximum(worst[i], better)
                    if better > tol[i]:
                        state[i] = "certified"
                spent[i] += time.perf_counter() - begin
            status.append(state)
            lower.append(torch.where(correct, worst, float("-inf")).cpu().numpy())
            seconds.append(spent)
            offset += n
        if not status:
            return VerificationResult(np.zeros(0, dtype=object), np.zeros(0), {}, np.zeros(0))
        return VerificationResult(
            np.concatenate(status), np.concatenate(lower), counterexamples, np.concatenate(seconds)
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_flips={self.max_flips}, n_bits={self.n_bits}, "
            f"granularity={self.granularity!r}, layers={self.layers!r}, method={self.method!r}, "
            f"batch_size={self.batch_size}, verbose={self.verbose}, encoding={self.encoding!r}, "
            f"bits={None if self.bits is None else list(self.bits)}, dtype={self.dtype})"
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
        model = float64_copy(effective.base_model)
        with torch.no_grad():
            for name, value in quantized.dequantize().items():
                model.get_parameter(name).copy_(value)
        if self.dtype != torch.float64:
            _check_normal_range(dict(model.named_parameters()) | dict(model.named_buffers()), self.dtype)
        # in float32 the weights' casts are within the rounding terms (docs/theory.md §5)
        self._network = read_network(model.to(self.dtype), self.estimator.input_shape)
        self._params = self._network.params(dtype=self.dtype)
        device = next(iter(self._params.values())).device
        tables = flip_tables(quantized, self._network.affine_layers, device, self._bits)
        combined = with_combined_changes(tables, quantized) if self.max_flips >= 2 else None
        # A flip to ±inf or NaN moves a margin arbitrarily far: nothing is certified against it (k ≥ 1), nor against
        # k ≥ 2 flips when several flips of one float weight can reach ±inf or NaN.
        self._tables = {name: cast_table(table, self.dtype) for name, table in tables.items()}
        self._combined = None if combined is None else {n: cast_table(t, self.dtype) for n, t in combined.items()}
        # (in the bounds' dtype: a change beyond float32's range, 3e38 flipped to −3e38, is infinite there too)
        self._unbounded = not _finite(self._tables)
        self._unbounded_combined = self._combined is not None and not _finite(self._combined)
        if self._unbounded:
            logger.warning("Some allowed flips give ±inf or NaN weights: no sample is certified against k >= 1 flips.")
        elif self._unbounded_combined:
            logger.warning("Flips of several bits of one weight can give ±inf or NaN: nothing is certified for k >= 2.")
        self._names = [layer.weight_name for layer in self._network.affine_layers if layer.weight_name in self._tables]
        self._effective = effective
        self._deltas = quantized.deltas(effective)
        self._quantized = quantized
        self._key = key

    def _batches(self, x: np.ndarray, y: np.ndarray | None, desc: str = "margin bounds"):
        """Batches ``(x, labels, tolerance, quantized prediction correct)``, ``x`` in the bounds' dtype."""
        self._refresh()
        x_t, y_t = self._effective.prepare_inputs(x, y)
        base = self._effective.base_model
        model_dtype = next(base.parameters()).dtype  # a float16 or float64 model predicts from its own dtype
        slices = batch_slices(len(x_t), self.batch_size)
        total = -(-len(x_t) // self.batch_size)
        for b in tqdm(slices, total=total, desc=f"Bit-flip certificates ({desc})", disable=not self.verbose):
            xb = x_t[b]
            with torch.no_grad(), eval_mode(base):
                logits = self._effective.logits(xb.to(model_dtype), self._deltas)
            pred = logits.argmax(dim=1)
            labels = pred if y_t is None else y_t[b]
            tol = certification_rtol(self.dtype) * (1.0 + logits.abs().amax(dim=1).to(self.dtype))
            yield xb.to(self.dtype), labels, tol, pred == labels

    def _tables_for(self, k: int) -> dict:
        """The flip tables of a bound against ``k`` flips: with the combined changes of float weights for ``k ≥ 2``
        (:func:`.with_combined_changes`)."""
        return self._combined if k >= 2 and self._combined is not None else self._tables

    def _unbounded_for(self, k: int) -> bool:
        """Whether some set of at most ``k ≥ 1`` flips reaches ``±inf`` or NaN: nothing is certified."""
        return k > 0 and (self._unbounded or (k >= 2 and self._unbounded_combined))

    def _case_bounds(self, xs: torch.Tensor, labels: torch.Tensor, k: int, refine: bool = False):
        """``(cases, per-case bounds (C, N, K), bound (N, K))``: the bound is the maximum of the interval bound and the
        minimum over the cases (``"linear"``; ``"interval"``: no case), ``+inf`` in the label's column."""
        net, params, tables, nb = self._network, self._params, self._tables_for(k), self.estimator.nb_classes
        if self._unbounded_for(k):
            bound = torch.full((len(xs), nb), float("-inf"), dtype=xs.dtype, device=xs.device)
            return [], bound.new_zeros((0, len(xs), nb)), bound.scatter(1, labels.unsqueeze(1), float("inf"))
        cases: list = []
        split = xs.new_zeros((0, len(xs), nb))
        try:
            with torch.no_grad(), exact_kernels():  # IEEE products, the rounding terms' model (docs/theory.md §5)
                case = dict.fromkeys(self._names, k)
                boxes = flip_boxes(net, params, tables, case, xs, xs)
                bound = interval_margins(net, params, tables, case, boxes, labels, nb)
                if self.method == "linear" and k > 0:
                    cases = flip_cases(self._names, k)
                    if refine:
                        split = self._refined_cases(cases, k, xs, labels, bound)
                    else:
                        split = torch.stack([case_margins(net, params, tables, c, k, xs, labels, nb) for c in cases])
                    split = split.scatter(2, labels.reshape(1, -1, 1).expand(len(cases), -1, 1), float("inf"))
                    bound = torch.maximum(bound, split.amin(dim=0))
        finally:
            for table in tables.values():  # the memo of neuron boxes holds for this computation only
                table.memo.clear()
        return cases, split, bound.scatter(1, labels.unsqueeze(1), float("inf"))

    def _refined_cases(self, cases: list, k: int, xs: torch.Tensor, labels: torch.Tensor, bound: torch.Tensor):
        """Per-case bounds ``(C, N, K)`` with the finer splits of :meth:`verify`, the cases in order, each on the
        samples that every earlier case (and the interval ``bound``) left open: a sample some case cannot certify is
        not certified, so the later cases skip it (``−inf`` there, a valid lower bound)."""
        net, params, tables, nb = self._network, self._params, self._tables_for(k), self.estimator.nb_classes
        split = xs.new_full((len(cases), len(xs), nb), float("-inf"))
        tol = certification_rtol(self.dtype) * (1.0 + net.forward(xs, params).abs().amax(dim=1))
        alive = torch.ones(len(xs), dtype=torch.bool, device=xs.device)
        additive = self.encoding == "int"
        for c, case in enumerate(cases):
            rows = alive.nonzero().flatten()
            if len(rows) == 0:
                break
            out = case_margins(net, params, tables, case, k, xs[rows], labels[rows], nb, refine=True, additive=additive)
            for table in tables.values():
                table.memo.clear()
            split[c, rows] = out
            margins = torch.maximum(out, bound[rows]).scatter(1, labels[rows].unsqueeze(1), float("inf"))
            alive[rows] = margins.amin(dim=1) > tol[rows]
        return split

    def _falsify(self, xs: torch.Tensor, labels: torch.Tensor, k: int) -> list | None:
        """A checked counterexample of one sample (a list of at most ``k`` flips whose flipped model predicts another
        class than ``labels``), or ``None``."""
        if k == 0 or self._unbounded:
            return None
        with torch.no_grad():
            flips = greedy_flip_search(
                self._network, self._params, self._tables, self._quantized, self._bits, xs, int(labels[0]), k
            )
        return flips if flips is not None and self._changes_prediction(xs, labels, flips) else None

    def _changes_prediction(self, xs: torch.Tensor, labels: torch.Tensor, flips: list) -> bool:
        """Whether the model with ``flips`` applied (through the estimator's own forward, float64 inputs cast to its
        dtype) predicts another class than ``labels`` for ``xs``: the check of every counterexample."""
        if not flips or len(flips) > self.max_flips or len(set(flips)) != len(flips):
            return False
        deltas = self._quantized.flip(flips).deltas(self._effective)
        base = self._effective.base_model
        dtype = next(base.parameters()).dtype
        with torch.no_grad(), eval_mode(base):
            logits = self._effective.logits(xs.to(dtype), deltas)
        return bool((logits.argmax(dim=1) != labels).all())

    def _refine(self, xs, label, tol, cases, case_bounds, k, begin: float, time_limit: float) -> torch.Tensor:
        """The smallest margin bound of one sample after branching every open case on the placement of its first
        flip (where it applies), within the time limit; ``−inf`` where a case stays open."""
        net, params, tables, nb = self._network, self._params, self._tables_for(k), self.estimator.nb_classes
        labels = label.reshape(1)
        best = case_bounds.amin(dim=1) if len(cases) else xs.new_full((1,), float("-inf"))
        open_cases = [c for c in range(len(cases)) if not best[c] > tol]
        if not all(self._refinable(cases[c]) for c in open_cases):
            return best.amin() if len(best) else xs.new_tensor(float("-inf"))  # some open case cannot be branched
        for c in open_cases:
            case = cases[c]
            if time.perf_counter() - begin > time_limit:
                return xs.new_tensor(float("-inf"))
            first = first_flipped(net, case)
            try:
                with torch.no_grad(), exact_kernels():
                    refined = enumerated_split_margins(net, params, tables, case, k, xs, labels, nb, first)
            finally:
                for table in tables.values():
                    table.memo.clear()
            refined = refined.scatter(1, labels.unsqueeze(1), float("inf")).amin()
            best[c] = torch.maximum(best[c], refined)
        return best.amin() if len(best) else xs.new_tensor(float("-inf"))

    def _refinable(self, case: dict) -> bool:
        """Whether :meth:`_refine` can branch ``case``: one flip in its first flipped layer, not the last layer (whose
        bound is exact already), with at most :data:`.MAX_REFINED_FLIPS` weight-bit pairs."""
        net = self._network
        first = first_flipped(net, case)
        if first is None or first == len(net.layers) - 1 or self.dtype != torch.float64:
            return False  # (the branches evaluate flips exactly: float64's)
        name = net.layers[first].weight_name
        if self.encoding == "int" and first_layer_applicable(net, self._tables, case, self.max_flips, first):
            return False  # bounded with its first layer's flips enumerated already
        small = self._tables[name].changes.numel() <= MAX_REFINED_FLIPS
        return case[name] == 1 and enumerable_layer(net.layers[first]) and small

    def _certified(self, xs: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor, k: int) -> torch.Tensor:
        """Whether the bound certifies each sample. The samples that ``k`` flips of the last layer alone break (its
        case, the clean activations feeding it, is exact and one of the cases) are not certified whatever the other
        cases give: the full bound runs on the others only."""
        ok = torch.zeros(len(xs), dtype=torch.bool, device=xs.device)
        alive = self._last_layer_survives(xs, labels, tol, k)
        rows = alive.nonzero().flatten()
        if len(rows):
            ok[rows] = self._bounds(xs[rows], labels[rows], k).amin(dim=1) > tol[rows]
        return ok

    def _last_layer_survives(self, xs: torch.Tensor, labels: torch.Tensor, tol: torch.Tensor, k: int) -> torch.Tensor:
        """``(N,)`` bool: the exact bound of at most ``k`` flips of the last layer alone exceeds ``tol`` (all ``True``
        when that layer cannot flip, for ``"interval"``, for ``k = 0`` and for unbounded flips)."""
        net = self._network
        last = net.layers[-1]
        if self.method != "linear" or k == 0 or self._unbounded_for(k) or last.weight_name not in self._names:
            return torch.ones(len(xs), dtype=torch.bool, device=xs.device)
        case = {name: (k if name == last.weight_name else 0) for name in self._names}
        tables = self._tables_for(k)
        try:
            with torch.no_grad(), exact_kernels():
                bound = case_margins(net, self._params, tables, case, k, xs, labels, self.estimator.nb_classes)
        finally:
            for table in tables.values():
                table.memo.clear()
        return bound.scatter(1, labels.unsqueeze(1), float("inf")).amin(dim=1) > tol

    def _bounds(self, xs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """Margin lower bounds ``(N, K)`` under at most ``k`` flips, ``+inf`` in the label's column."""
        return self._case_bounds(xs, labels, k)[2]
