"""
Plumbing shared by the margin bounds (docs/theory.md §3–§4b): the margin specification, per-sample radius factors,
batched contractions, and the memo of per-layer constants.

Every bound function of :data:`.METHODS` has the signature ``(network, param_balls, x, labels, dtype, scale, cache)``:
``param_balls`` maps parameter names to :class:`.ParameterBall` (a list is accepted too), ``scale`` holds optional
per-sample factors ``(N,)`` multiplying every radius (every perturbation term is linear in the radii), ``cache`` an
optional :class:`BoundCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch

from art_weightpert.budget import ParameterBall
from art_weightpert.operators.tensors import batched_dot, flatten_specs, sample_factors, sum_features
from art_weightpert.rounding import up_cast

__all__ = [  # the contractions of the operators' rules are shared with the bounds from here
    "BoundCache",
    "Boxes",
    "CentredBox",
    "ParamBalls",
    "batched_dot",
    "by_param_name",
    "cached",
    "centre_of",
    "check_batch",
    "compact_radius",
    "fill_label",
    "flatten_specs",
    "margin_matrix",
    "sample_factors",
    "slice_boxes",
    "sum_features",
    "times_sample_factors",
]

T = TypeVar("T")

ParamBalls = Iterable[ParameterBall] | Mapping[str, ParameterBall]
"""The parameter balls a bound accepts: ``{parameter name: ParameterBall}`` or a list of them."""

Boxes = list[tuple[torch.Tensor, torch.Tensor]]
"""Interval boxes ``(lo, hi)`` of the network's values: its input, then the output of every layer but the last (on a
chain, the input of every layer; :func:`.interval_preactivation_bounds`)."""


def by_param_name(param_balls: ParamBalls) -> dict[str, ParameterBall]:
    """``{parameter name: ParameterBall}`` from a mapping or a list of parameter balls."""
    if isinstance(param_balls, Mapping):
        return param_balls if isinstance(param_balls, dict) else dict(param_balls)
    return {t.param_name: t for t in param_balls}


class CentredBox(tuple):
    """A box ``(lo, hi)`` of an affine layer's output on a known input ``h``, with ``centre = W h + b``: the layer's
    value at the unperturbed weights, which the linear bound reuses instead of recomputing it; with rounding terms
    (docs/theory.md §5) also ``abs_product = |W||h|`` as computed in floating point, the magnitude both bounds' error
    terms are made of (:func:`.rounding_map` reuses it). Unpacks as ``lo, hi``."""

    centre: torch.Tensor
    abs_product: torch.Tensor | None

    def __new__(
        cls, lo: torch.Tensor, hi: torch.Tensor, centre: torch.Tensor, abs_product: torch.Tensor | None = None
    ) -> CentredBox:
        box = super().__new__(cls, (lo, hi))
        box.centre = centre
        box.abs_product = abs_product
        return box


def slice_boxes(boxes: Boxes, rows: slice | torch.Tensor) -> Boxes:
    """The boxes of the samples ``rows`` (a slice or an index tensor, repeats allowed); an exact value (``lo is hi``)
    stays one tensor, a :class:`CentredBox` keeps its centre."""
    out = []
    for box in boxes:
        lo, hi = box
        part = lo[rows]
        if isinstance(box, CentredBox):
            product = None if box.abs_product is None else box.abs_product[rows]
            out.append(CentredBox(part, hi[rows], box.centre[rows], product))
        else:
            out.append((part, part) if lo is hi else (part, hi[rows]))
    return out


def centre_of(boxes: Boxes, value: int) -> torch.Tensor | None:
    """The centre ``W h + b`` of value ``value`` when its box is a :class:`CentredBox`, else ``None``."""
    box = boxes[value] if value < len(boxes) else None
    return box.centre if isinstance(box, CentredBox) else None


def abs_product_of(boxes: Boxes, value: int) -> torch.Tensor | None:
    """The computed ``|W||h|`` of value ``value`` when its box is a :class:`CentredBox` that carries it, else
    ``None``."""
    box = boxes[value] if value < len(boxes) else None
    return box.abs_product if isinstance(box, CentredBox) else None


def margin_matrix(labels: torch.Tensor, nb_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Specification ``C`` of shape ``(N, K, K)``: row ``i`` is ``e_y − e_i`` (the row ``i = y`` is zero)."""
    eye = torch.eye(nb_classes, dtype=dtype, device=labels.device)
    return eye[labels].unsqueeze(1) - eye.unsqueeze(0)


def fill_label(bounds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``bounds`` ``(N, K)`` with the label's own column set to ``+inf``."""
    return bounds.scatter(1, labels.unsqueeze(1), float("inf"))  # a scalar source: no (N, 1) tensor of +inf


def times_sample_factors(t: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` ``(N, ...)`` times the per-sample radius factors (``t`` itself when there are none or ``t`` is None)."""
    if scale is None or t is None:
        return t
    return t * sample_factors(scale, t.dim())


def check_batch(
    x: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Check the labels (and per-sample factors) against the batch; return the factors in ``dtype``."""
    if labels.dim() != 1 or len(labels) != len(x):
        raise ValueError(f"`labels` must have shape ({len(x)},), got {tuple(labels.shape)}.")
    if scale is None:
        return None
    if scale.shape != (len(x),):
        raise ValueError(f"`scale` must have shape ({len(x)},), got {tuple(scale.shape)}.")
    return scale.to(dtype)


# ------------------------------------------------------------------------------------------------------ the memo
class BoundCache:
    """
    Memo of per-layer constants of the bounds (``|W|/2``, ``‖W_y − W_i‖_1``, operator norms, …).

    An entry is keyed by a label and the *identity* of the tensors it is computed from, and it is valid for their
    *version*: a tensor changed in place (an optimizer step, the certifier copying new centre weights) has a new
    version and the entry is recomputed; a new tensor has a new identity. The entry keeps its tensors alive, so an
    identity cannot be reused by another tensor while the entry exists. No caller has to clear the cache when the
    weights change; dropping it only frees memory (the certifier starts a new one whenever it re-resolves the budget,
    whose radius tensors are then new).

    Pass ``None`` instead of a cache where gradients must flow through every constant (training).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[int, ...], object, tuple[torch.Tensor, ...]]] = {}

    def get(self, label: str, tensors: Iterable[torch.Tensor], compute: Callable[[], T]) -> T:
        """``compute()``, memoized under ``label`` for the current versions of ``tensors``."""
        tensors = tuple(tensors)
        key = (label,) + tuple(id(t) for t in tensors)
        versions = tuple(t._version for t in tensors)
        hit = self._entries.get(key)
        if hit is None or hit[0] != versions:
            hit = self._entries[key] = (versions, compute(), tensors)
        return hit[1]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._entries)


def cached(cache: BoundCache | None, label: str, tensors: Iterable[torch.Tensor], compute: Callable[[], T]) -> T:
    """``compute()``, memoized in ``cache`` (see :class:`BoundCache`) when one is given."""
    return compute() if cache is None else cache.get(label, tensors, compute)


def compact_radius(
    target: ParameterBall, dtype: torch.dtype, cache: BoundCache | None, rounding: bool = False
) -> torch.Tensor:
    """The parameter ball's :meth:`.Ball.compact_radius` in ``dtype``, memoized in ``cache`` (one entry shared by every
    bound). ``rounding``: a cast to a narrower dtype rounds the radius up, so that the ball is not shrunk
    (docs/theory.md §5)."""
    if rounding:
        compact = lambda: target.ball.compact_radius(up_cast(target.radius, dtype))  # noqa: E731
        return cached(cache, f"compact_radius/{dtype}/up", (target.radius,), compact)
    compact = lambda: target.ball.compact_radius(target.radius.to(dtype))  # noqa: E731
    return cached(cache, f"compact_radius/{dtype}", (target.radius,), compact)
