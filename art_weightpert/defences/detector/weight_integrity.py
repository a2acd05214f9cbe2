"""
:class:`WeightIntegrityDetector`: run-time detection of bit flips in quantized weights and recovery of the flipped
groups (RADAR, Li et al. 2021; docs/theory.md §8.4).

At construction the selected weights are quantized (:meth:`.QuantizedWeights.from_estimator`, docs/theory.md §8.1) and
split, tensor by tensor, into groups of ``group_size`` entries by a secret interleaving (a permutation drawn from
``seed``). Per group a signature of the ``msb`` most significant bits of its codes is stored. :meth:`detect` recomputes
the signatures of a deployed model and flags the groups whose signature changed; :meth:`recover` corrects them from
the signatures alone (``"correct"``, below), zeroes them (RADAR) or restores them from the codes recorded at
construction.

**Correction from the keyed signature.** When the top bits of one weight ``i`` of a group changed by ``Δt``, the
signature changed by ``k_i·Δt mod 2^32`` (the syndrome). Trying every member ``i`` and every ``Δt`` with
``0 < |Δt| < 2^msb`` that keeps the original field in range locates the weight and undoes the change; a false match
has probability about ``G·2^(msb+1)/2^32`` per group. A group where no candidate or more than one matches (flips in
several of its weights) is zeroed, as RADAR does. BFA's flips, one or two per group, are corrected exactly without a
trusted copy of the weights: only the 32-bit signatures are stored.

Signatures (``checksum``):

* ``"keyed"`` (default): ``Σ_i k_i·t_i mod 2^32`` over the group, ``t_i`` the top ``msb`` bits of code ``i`` read as an
  unsigned number and ``k_i`` a secret odd 32-bit key per weight (from ``seed``). A change of the top bits of *one*
  weight changes ``t_i`` by ``0 < |Δt| < 2^msb`` and ``k_i·Δt`` is never a multiple of ``2^32`` (``k_i`` is odd), so
  it is always detected; flips in several weights of one group cancel only when their keyed changes sum to a multiple
  of ``2^32``, which an attacker who does not know the keys hits with probability about ``2^-32``. The cost is one
  multiply-add per weight, as RADAR's addition checksum.
* ``"radar"``: a RADAR-style ``msb``-bit signature, ``Σ_i t_i mod 2^msb``. Cheaper to store (2 bits per group), but two
  sign-bit flips in one group always cancel (``±2 ± 2 ≡ 0 mod 4``): only the secret interleaving protects it.

Codes are read from a deployed estimator by requantizing its effective weights (original weights plus any carried
perturbation, e.g. :meth:`.BitFlipAttack.generate_estimator`'s result) with the scales recorded at construction: the
scales are part of the trusted reference, as RADAR's golden signatures, and never recomputed from a possibly flipped
model. A code outside the ``n_bits`` range (or a non-finite weight) flags its group as well.

| Paper link: https://arxiv.org/abs/2101.08254
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from art.estimators.classification import PyTorchClassifier

from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.quantization import QuantizedWeights, _signed, _unsigned, as_weight_classifier
from art_weightpert.validation import check_choice, check_int, check_non_negative_int, check_positive_int

logger = logging.getLogger(__name__)

CHECKSUMS = ("keyed", "radar")
RECOVERY_MODES = ("correct", "zero", "restore")
_KEY_MODULUS = 1 << 32


class WeightIntegrityDetector:
    """
    Checksums of the quantized weights' most significant bits over secretly interleaved groups: detects bit flips at
    run time (:meth:`detect`), locates them (:meth:`group_of`) and repairs the flagged groups (:meth:`recover`). The
    estimator and its module are never modified.
    """

    def __init__(
        self,
        estimator: PyTorchClassifier,
        n_bits: int = 8,
        group_size: int = 64,
        seed: int = 0,
        granularity: str = "tensor",
        layers: Iterable[str] | None = None,
        checksum: str = "keyed",
        msb: int = 2,
    ) -> None:
        """
        Create a :class:`.WeightIntegrityDetector` instance: quantize ``estimator``'s weights and record the
        signature of every group.

        :param estimator: the trusted model, a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``
            (its original weights are quantized; a carried perturbation is ignored).
        :param n_bits: bits per quantized weight, 2 to 16.
        :param group_size: weights per group (the last group of a tensor may be smaller).
        :param seed: the secret of the interleaving and of the keys.
        :param granularity: one quantization scale per ``"tensor"`` or per output ``"channel"``.
        :param layers: names of the Linear/Conv layers whose weights are protected (``None``: all).
        :param checksum: ``"keyed"`` (a keyed sum mod 2^32) or ``"radar"`` (the sum of the MSB fields mod 2^msb).
        :param msb: how many most significant bits of each code the signature covers, 1 to ``n_bits``.
        """
        self._estimator = as_weight_classifier(estimator)
        self.group_size = check_positive_int(group_size, "group_size")
        self.seed = check_non_negative_int(seed, "seed")
        self.checksum = check_choice(checksum, "checksum", CHECKSUMS)
        self._reference = QuantizedWeights.from_estimator(self._estimator, n_bits, granularity, layers)
        self.msb = check_int(msb, "msb", minimum=1, maximum=self._reference.n_bits)
        generator = torch.Generator().manual_seed(self.seed)
        self._groups: dict[str, torch.Tensor] = {}  # flat index -> group
        self._keys: dict[str, torch.Tensor] = {}  # flat index -> odd key
        for name, codes in self._reference.codes.items():
            n = codes.numel()
            order = torch.randperm(n, generator=generator)  # position k of the interleaving holds entry order[k]
            groups = torch.empty(n, dtype=torch.int64)
            groups[order] = torch.arange(n) // self.group_size
            self._groups[name] = groups
            self._keys[name] = 2 * torch.randint(0, _KEY_MODULUS // 2, (n,), generator=generator) + 1
        self._signatures = {name: self._signature(name, c) for name, c in self._reference.codes.items()}
        logger.info(
            "WeightIntegrityDetector: %d groups of up to %d weights in %d tensors.",
            self.nb_groups,
            self.group_size,
            len(self._signatures),
        )

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def n_bits(self) -> int:
        """Bits per quantized weight."""
        return self._reference.n_bits

    @property
    def quantized_(self) -> QuantizedWeights:
        """The trusted quantized weights recorded at construction."""
        return self._reference

    @property
    def nb_groups(self) -> int:
        """Number of groups over all protected tensors."""
        return sum(len(s) for s in self._signatures.values())

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("group_size", "seed", "checksum", "msb") and name in self.__dict__:
            raise AttributeError(
                f"`{name}` is fixed when the signatures are recorded (there is no set_params); create a new "
                "WeightIntegrityDetector."
            )
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        return (
            f"WeightIntegrityDetector(n_bits={self.n_bits}, group_size={self.group_size}, "
            f"granularity={self._reference.granularity!r}, checksum={self.checksum!r}, msb={self.msb}, "
            f"nb_groups={self.nb_groups})"
        )

    # ------------------------------------------------------------------------------------------------ public
    def group_of(self, param_name: str, index: int | tuple[int, ...]) -> int:
        """
        The group of one weight entry (the numbering :meth:`detect` reports).

        :param param_name: a protected weight, e.g. ``"0.weight"``.
        :param index: the entry: a tuple with one int per dimension, or a flat index.
        :return: the group, ``0 <= group < ceil(numel / group_size)``.
        """
        if param_name not in self._groups:
            raise ValueError(
                f"`param_name` {param_name!r} is not protected; the protected weights are {list(self._groups)}."
            )
        shape = tuple(self._reference.codes[param_name].shape)
        if isinstance(index, int) and not isinstance(index, bool):
            flat = check_int(index, "index", minimum=0, maximum=len(self._groups[param_name]) - 1)
        else:
            index = tuple(check_int(i, "index", minimum=0) for i in index)
            if len(index) != len(shape) or any(i >= n for i, n in zip(index, shape)):
                raise ValueError(f"`index` {index} is outside {param_name!r} of shape {shape}.")
            flat = sum(i * s for i, s in zip(index, _strides(shape)))
        return int(self._groups[param_name][flat])

    def detect(self, estimator: PyTorchClassifier | QuantizedWeights) -> dict[str, Any]:
        """
        Recompute the signatures of a deployed model and compare them with the recorded ones.

        :param estimator: the deployed model: an ART ``PyTorchClassifier`` (its effective weights are requantized with
            the recorded scales) or a :class:`.QuantizedWeights` of the same weights.
        :return: ``{"tampered": bool, "groups": [(param_name, group), ...], "nb_groups": int}`` (the flagged groups,
            sorted).
        """
        flagged = self._flagged(self._read_codes(estimator))
        groups = [(name, int(g)) for name, mask in flagged.items() for g in torch.nonzero(mask).flatten().tolist()]
        if groups:
            logger.warning("WeightIntegrityDetector: %d of %d groups changed.", len(groups), self.nb_groups)
        return {"tampered": bool(groups), "groups": groups, "nb_groups": self.nb_groups}

    def recover(
        self, estimator: PyTorchClassifier | QuantizedWeights, mode: str = "correct"
    ) -> PyTorchWeightClassifier:
        """
        The deployed quantized model with its flagged groups repaired: a new estimator; ``estimator`` and its module
        are not modified.

        :param estimator: the deployed model, as in :meth:`detect`; a :class:`.QuantizedWeights` is applied to the
            estimator given at construction.
        :param mode: ``"correct"`` undoes a change of one weight's top bits per group, located by the keyed syndrome
            (module docstring), and zeroes the groups it cannot correct (with ``checksum="radar"``: every flagged
            group); ``"zero"`` sets every weight of a flagged group to 0 (RADAR); ``"restore"`` puts back the codes
            recorded at construction (a trusted copy).
        :return: the quantized model (codes read from ``estimator`` times the recorded scales) with the flagged groups
            repaired; parameters that are not protected keep ``estimator``'s values.
        """
        mode = check_choice(mode, "mode", RECOVERY_MODES)
        codes = self._read_codes(estimator)
        flagged = self._flagged(codes)
        reference = self._reference.codes
        repaired = {}
        for name, (c, invalid) in codes.items():
            if mode == "correct" and self.checksum == "keyed":
                c = self._correct(name, c, invalid, flagged[name])
                flagged[name] = self._flagged({name: (c, invalid)})[name]
            bad = flagged[name][self._groups[name]].reshape(c.shape)
            replacement = reference[name] if mode == "restore" else torch.zeros_like(c)
            repaired[name] = torch.where(bad, replacement, c)
        quantized = QuantizedWeights(
            repaired, self._reference.scales, self.n_bits, self._reference.granularity, self._reference.zero_points
        )
        target = self._estimator if isinstance(estimator, QuantizedWeights) else as_weight_classifier(estimator)
        deltas = {name: d.detach() for name, d in target.current_deltas().items()}
        deltas.update(quantized.deltas(target))
        return target.with_weight_perturbation(deltas)

    # ------------------------------------------------------------------------------------------------ internals
    def _code_range(self) -> tuple[int, int]:
        return -(1 << (self.n_bits - 1)), (1 << (self.n_bits - 1)) - 1

    def _signature(self, name: str, codes: torch.Tensor) -> torch.Tensor:
        """The signature of every group of weight ``name`` with these codes (int64, one per group)."""
        fields = _unsigned(codes.reshape(-1).cpu(), self.n_bits) >> (self.n_bits - self.msb)
        groups = self._groups[name]
        nb = (len(groups) + self.group_size - 1) // self.group_size
        if self.checksum == "radar":
            return torch.zeros(nb, dtype=torch.int64).index_add_(0, groups, fields) % (1 << self.msb)
        terms = (self._keys[name] * fields) % _KEY_MODULUS  # < 2^32 each: a group of < 2^31 cannot overflow
        return torch.zeros(nb, dtype=torch.int64).index_add_(0, groups, terms) % _KEY_MODULUS

    def _correct(self, name: str, codes: torch.Tensor, invalid: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """``codes`` with the flips undone in every flagged group where the keyed syndrome has exactly one explanation
        (module docstring); the other groups are left as they are."""
        shift = self.n_bits - self.msb
        pattern = _unsigned(codes.reshape(-1).cpu(), self.n_bits)
        syndromes = (self._signature(name, codes) - self._signatures[name]) % _KEY_MODULUS
        fields = pattern >> shift
        for group in torch.nonzero(flagged).flatten().tolist():
            members = torch.nonzero(self._groups[name] == group).flatten()
            if bool(invalid.reshape(-1)[members].any()):
                continue
            masks = _explain(fields[members], self._keys[name][members], int(syndromes[group]), self.msb)
            if masks is not None:
                pattern[members] ^= masks << shift
        return _signed(pattern, self.n_bits).reshape(codes.shape).to(codes.device)

    def _flagged(self, codes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``{name: bool per group}``: the signature changed, or a group holds an invalid entry."""
        out = {}
        for name, (c, invalid) in codes.items():
            changed = self._signature(name, c) != self._signatures[name]
            if bool(invalid.any()):
                changed[self._groups[name][invalid.reshape(-1)]] = True
            out[name] = changed
        return out

    def _read_codes(self, estimator: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (codes clamped to the n_bits range, mask of invalid entries)}`` of a deployed model."""
        low, high = self._code_range()
        shapes = {name: tuple(c.shape) for name, c in self._reference.codes.items()}
        if isinstance(estimator, QuantizedWeights):
            if estimator.n_bits != self.n_bits or any(
                name not in estimator.codes or tuple(estimator.codes[name].shape) != shape
                for name, shape in shapes.items()
            ):
                raise ValueError(
                    f"`estimator`: the QuantizedWeights must hold {self.n_bits}-bit codes of the protected weights "
                    f"{shapes}."
                )
            codes = estimator.codes
            return {name: (codes[name].cpu(), torch.zeros(shape, dtype=torch.bool)) for name, shape in shapes.items()}
        if not isinstance(estimator, PyTorchClassifier):
            raise TypeError(
                f"`estimator` must be an ART PyTorchClassifier or a QuantizedWeights, got {type(estimator).__name__}."
            )
        estimator = as_weight_classifier(estimator)
        params = dict(estimator.base_model.named_parameters())
        carried = estimator.current_deltas()
        out = {}
        for name, shape in shapes.items():
            if name not in params or tuple(params[name].shape) != shape:
                raise ValueError(f"`estimator` has no weight {name!r} of shape {shape}: not the protected model.")
            w = params[name].detach()
            if name in carried:
                w = w + carried[name]  # the value the model computes with, in the weight's dtype
            ratio = self._reference.grid_position(name, w.cpu())
            invalid = ~torch.isfinite(ratio)
            codes = torch.round(torch.where(invalid, 0.0, ratio)) + self._reference.zero_point_like(name)
            invalid |= (codes < low) | (codes > high)
            out[name] = (codes.clamp(low, high).to(torch.int64), invalid)
        return out


def _explain(fields: torch.Tensor, keys: torch.Tensor, syndrome: int, msb: int) -> torch.Tensor | None:
    """
    The one set of flips of the top ``msb`` bits that explains a group's syndrome, as XOR masks of the fields (one per
    member), or ``None`` when there is no explanation or more than one. Candidates: any change of one member's field,
    or sign-bit flips of up to ``MAX_CORRECTED`` members (the bit-flip attack's flips); a change XOR ``m`` of field
    ``t`` moves the signature by ``k·(t − t XOR m)``.
    """
    masks = torch.arange(1, 1 << msb)
    terms = (keys[:, None] * (fields[:, None] - (fields[:, None] ^ masks[None, :]))) % _KEY_MODULUS
    found = {((int(i), int(masks[j])),) for i, j in torch.nonzero(terms == syndrome).tolist()}
    sign_mask = 1 << (msb - 1)  # the code's sign bit, the top bit of the field
    found |= _sign_subsets(terms[:, sign_mask - 1], syndrome, sign_mask)
    if len(found) != 1:
        return None
    out = torch.zeros(len(fields), dtype=torch.int64)
    for member, mask in found.pop():
        out[member] = mask
    return out


MAX_CORRECTED = 4
"""Most weights of one group whose sign-bit flips :meth:`WeightIntegrityDetector.recover` locates and undoes."""


def _sign_subsets(terms: torch.Tensor, syndrome: int, mask: int) -> set:
    """The sets of 2 to ``MAX_CORRECTED`` members whose sign-flip ``terms`` sum to ``syndrome`` mod 2^32 (meet in the
    middle over the sorted sums of pairs), each as a sorted tuple of ``(member, mask)``."""
    n = len(terms)
    if n < 2:
        return set()
    first, second = torch.triu_indices(n, n, offset=1)
    pair_sums = (terms[first] + terms[second]) % _KEY_MODULUS
    order = torch.argsort(pair_sums)
    sorted_sums = pair_sums[order]

    def pairs_summing_to(value: torch.Tensor) -> list[tuple[int, int]]:
        lo = torch.searchsorted(sorted_sums, value % _KEY_MODULUS)
        hi = torch.searchsorted(sorted_sums, value % _KEY_MODULUS, right=True)
        return [(int(first[order[k]]), int(second[order[k]])) for k in range(int(lo), int(hi))]

    found = set()
    partials = [((i,), terms[i]) for i in range(n)] + [((i, j), pair_sums[k]) for k, (i, j) in
                                                       enumerate(zip(first.tolist(), second.tolist()))]  # fmt: skip
    found |= {tuple(pair) for pair in pairs_summing_to(torch.tensor(syndrome))}
    for members, value in partials:
        for pair in pairs_summing_to(syndrome - value):
            subset = set(members) | set(pair)
            if len(subset) == len(members) + 2 <= MAX_CORRECTED:
                found.add(tuple(sorted(subset)))
    return {tuple((m, mask) for m in subset) for subset in found}


def _strides(shape: tuple[int, ...]) -> list[int]:
    """Row-major strides of ``shape`` (in entries)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]
