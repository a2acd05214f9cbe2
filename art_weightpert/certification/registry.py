"""
The registry of margin-bound methods: each method is declared once, here, with everything its users need. The
certifier, the trainer, the metrics and the command line read :data:`METHODS` (``tuple(METHODS)`` is the list of
names, in this order).

Every bound function has one signature (see :mod:`.common`)::

    bounds(network, param_balls, x, labels, dtype=torch.float64, scale=None, cache=None, **kw) -> (N, K) tensor

lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball, ``+inf`` in the label's own column,
differentiable in any ``dtype``; ``scale`` multiplies every radius per sample, ``cache`` is an optional
:class:`.BoundCache`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch

from art_weightpert.budget import ParameterBall
from art_weightpert.certification.alpha import alpha_margin_bounds
from art_weightpert.certification.common import BoundCache, ParamBalls
from art_weightpert.certification.interval import interval_margin_bounds
from art_weightpert.certification.linear import linear_margin_bounds
from art_weightpert.certification.paper import paper_margin_bounds
from art_weightpert.network import Network, UnsupportedModelError


class BoundFunction(Protocol):
    """The signature shared by every bound function of :data:`METHODS`."""

    def __call__(
        self,
        network: Network,
        param_balls: ParamBalls,
        x: torch.Tensor,
        labels: torch.Tensor,
        dtype: torch.dtype = torch.float64,
        scale: torch.Tensor | None = None,
        cache: BoundCache | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class BoundMethod:
    """
    One margin-bound method.

    :param name: its name (``method=`` of the certifier and the metrics, ``bound=`` of the trainer, CLI choices).
    :param bounds: the bound function (:class:`BoundFunction`).
    :param affine_in_radius: ``(network, param_balls) -> bool``: whether the lower bounds are affine in a common
        factor ``s`` of every radius for that network and budget; then the certified radius has a closed form (the
        root of ``lb(0) − s·(lb(0) − lb(1))``) instead of a bisection.
    :param description: one line for the docs and ``--help``.
    :param never_above: the name of a method whose bounds never exceed this one's (``"linear"`` takes the maximum
        with ``"interval"``): its certified radius, cheaper to find, starts the radius search.
    :param per_class: the bound function also takes ``classes=`` (``(N, J)`` class indices) and then bounds only
        those margins, ``(N, J)``; the radius search then evaluates only the margins that can decide, one row per
        (sample, class) sharing the sample's boxes (it needs ``takes_boxes`` too).
    :param takes_boxes: the bound function also takes ``boxes=`` (:func:`.interval_preactivation_bounds` at the same
        factors), so that a caller can compute them once, or with known centres (the radius search).
    :param clean_values: what the bound function can take of the caller's own clean forward pass instead of
        computing it again (``clean_values=``: ``{value index: tensor}``, indexed as
        :func:`.interval_preactivation_bounds`, the logits at ``len(network.layers)``): ``"logits"`` (the margins),
        ``"affine"`` (the outputs of the affine layers, the logits included: the centres of the boxes of affine layers
        on exact inputs) or ``None``; the trainer then shares its cross-entropy's forward (:mod:`.shared_forward`).
    :param applies_to: ``network -> None`` when the method bounds that network, else the reason why not (one line);
        the certifier, the trainer and the metrics call :meth:`check`.
    :param float64_centres: with rounding terms (float32) the bound computes its interval boxes with their affine
        centres in float64 (:func:`.linear_boxes`, docs/theory.md §5); a caller that passes ``boxes=`` computes them
        the same way (``float64_centres=`` of :func:`.interval_preactivation_bounds`).
    """

    name: str
    bounds: BoundFunction
    affine_in_radius: Callable[[Network, Mapping[str, ParameterBall]], bool]
    description: str
    never_above: str | None = None
    per_class: bool = False
    takes_boxes: bool = False
    clean_values: str | None = None
    applies_to: Callable[[Network], str | None] = lambda network: None
    float64_centres: bool = False

    def check(self, network: Network) -> None:
        """Raise :class:`.UnsupportedModelError` (with the reason) when the method does not apply to ``network``."""
        reason = self.applies_to(network)
        if reason is not None:
            raise UnsupportedModelError(f"method {self.name!r} cannot bound this model: {reason}")


def perturbed_layers(network: Network, param_balls: Mapping[str, ParameterBall]) -> set[str]:
    """Names of the affine layers of ``network`` with a perturbed weight or bias."""
    names = {t.layer_name for t in param_balls.values()}
    return {layer.name for layer in network.affine_layers if layer.name in names}


def _single_layer(network: Network, param_balls: Mapping[str, ParameterBall]) -> bool:
    # Formula B is affine in the radii when a single affine layer is perturbed (docs/theory.md §5, A and A').
    return len(perturbed_layers(network, param_balls)) <= 1


def _last_layer_only(network: Network, param_balls: Mapping[str, ParameterBall]) -> bool:
    # With only the last layer perturbed every box before it is exact and the bound is m − s·(P_y + P_i). For
    # "linear" the backward bound is then affine too (every relaxation is exact on the point boxes) and both lines
    # start at the exact margin m at s = 0, so their maximum is the line of the smaller slope: affine as well.
    return perturbed_layers(network, param_balls) <= {network.layers[-1].name}


def chains_only(network: Network) -> str | None:
    """``None`` for a chain; for a network with branches, why formula B (docs/theory.md §3, §9) does not apply."""
    if network.is_chain:
        return None
    return (
        "formula B multiplies operator norms along one chain of layers and is defined for chains only; this model "
        "has branches (residual additions): use method 'interval' or 'linear'."
    )


METHODS: Mapping[str, BoundMethod] = MappingProxyType(
    {
        method.name: method
        for method in (
            BoundMethod(
                "paper",
                paper_margin_bounds,
                _single_layer,
                "closed-form bound of Tsai et al. (formula B, norm products; docs/theory.md §3), chains only",
                clean_values="logits",
                applies_to=chains_only,
            ),
            BoundMethod(
                "interval",
                interval_margin_bounds,
                _last_layer_only,
                "interval bound propagation with weight intervals, last layer folded into the margins (§4)",
                takes_boxes=True,
                clean_values="affine",
            ),
            BoundMethod(
                "linear",
                linear_margin_bounds,
                _last_layer_only,
                "backward linear bounds with exact weight absorption, never looser than interval (§4b)",
                never_above="interval",
                per_class=True,
                takes_boxes=True,
                float64_centres=True,
            ),
            BoundMethod(
                "alpha",
                alpha_margin_bounds,
                _last_layer_only,
                "optimized linear bounds: intermediate boxes by backward passes and optimized ReLU slopes (α-CROWN), "
                "never looser than linear (§11)",
                never_above="linear",
                per_class=True,
                takes_boxes=True,
                float64_centres=True,
            ),
        )
    }
)
"""Method name → :class:`BoundMethod`, read-only."""
