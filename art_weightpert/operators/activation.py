"""
The activation operator (docs/theory.md §1): an element-wise function applied to every entry, one
:class:`ActivationFunction` subclass per activation holding its forward, its box rule (§4), its linear relaxation (§5),
its step of formula B (§3), the properties the bounds and the metrics read, and the torch modules, functions and
tensor methods the reader maps to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.fx

from art_weightpert.operators.base import Operator, UnsupportedModelError, missing_rule, node_arg, stubs
from art_weightpert.operators.tensors import batched_dot

Line = tuple[torch.Tensor, torch.Tensor]
"""``(slope, intercept)`` per element of a box."""


class Parameter(NamedTuple):
    """A parameter of an activation: the module's attribute (also the functional form's keyword), its position in
    the functional call (``None``: keyword-only) and its default there."""

    attribute: str
    position: int | None
    default: Any


class ActivationFunction:
    """One activation. Subclasses set the class attributes and define :meth:`apply` and the rules of :attr:`RULES`
    (:class:`MonotoneActivation` gives a monotone function's box)."""

    kind: ClassVar[str]
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Callable, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    parameters: ClassVar[tuple[Parameter, ...]] = ()
    nonnegative: ClassVar[bool] = False
    """Whether every output is ≥ 0."""
    lower_through_origin: ClassVar[bool] = False
    """Whether the lower line of :meth:`relaxation` always passes through the origin (its constant is skipped)."""
    RULES: ClassVar[tuple[str, ...]] = ("interval", "relaxation", "paper")

    def __init__(self, name: str, **values: Any) -> None:
        for key, value in values.items():
            setattr(self, key, value)
        self.check(name)

    def check(self, name: str) -> None:
        """Refuse parameters the rules do not cover (:class:`.UnsupportedModelError` naming ``name``)."""

    @property
    def lipschitz(self) -> float:
        """A Lipschitz constant (an upper bound of ``|σ'|``)."""
        return 1.0

    @property
    def zero_at_zero(self) -> bool:
        """Whether ``σ(0) = 0``."""
        return True

    @property
    def fixes_one(self) -> bool:
        """Whether ``σ(1) = 1`` (a constant input feature 1 passes through: biases as weights, docs/theory.md §6)."""
        return False

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @missing_rule
    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box of the activation's values over ``[lo, hi]`` (§4)."""
        raise NotImplementedError

    @missing_rule
    def relaxation(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
        """``(lower line, upper line)`` enclosing the activation on ``[lo, hi]`` element-wise (§5)."""
        raise NotImplementedError

    def optimizable_lower(self, lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor | None:
        """The slope of the lower line through the origin picked by the free parameters ``alpha`` ``(N, J) + value
        shape`` in ``[0, 1]`` (α-CROWN, docs/theory.md §11): every value gives a sound line on ``[lo, hi]`` (``lo, hi``
        of shape ``(N,) + value shape``; exact where the box is stable); ``None`` when the activation's lower line has
        no free parameter."""
        return None

    @missing_rule
    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Formula B's step (§3.3): bounds of ``‖σ(ĥ)‖_∞`` and ``‖σ(ĥ) − σ(h)‖_∞`` from ``N`` and ``D``."""
        raise NotImplementedError

    @classmethod
    def read(cls, name: str, value: Callable[[Parameter], Any]) -> Activation:
        """The operator of this activation named ``name``, its parameters given by ``value``."""
        return Activation(name, cls(name, **{p.attribute: value(p) for p in cls.parameters}))

    @classmethod
    def from_module(cls, name: str, module: torch.nn.Module) -> Activation:
        return cls.read(name, lambda p: getattr(module, p.attribute))

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> Activation | None:
        """The operator of a call of one of :attr:`functions` or :attr:`methods`, else ``None``."""
        if (node.op == "call_function" and node.target in cls.functions) or (
            node.op == "call_method" and node.target in cls.methods
        ):
            return cls.read(node.name, lambda p: node_arg(node, p.position, p.attribute, p.default))
        return None


def split_by_sign(pos: torch.Tensor, neg: torch.Tensor, s_pos: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    """``λ⁺ s_pos + λ⁻ s_neg`` with ``λ⁺ = max(λ, 0)``, ``λ⁻ = min(λ, 0)`` (``pos``, ``neg``): each entry of ``λ`` is
    in one of them and exactly 0 in the other, so every entry is one rounded product plus an exact 0, the same value
    as selecting the slope by the sign of ``λ`` and multiplying (docs/theory.md §5). Three passes instead of a
    ``torch.where`` over the coefficients, which torch's CPU kernel runs about ten times slower than a product."""
    if pos.requires_grad or neg.requires_grad or s_pos.requires_grad or s_neg.requires_grad:
        return pos * s_pos + neg * s_neg
    return torch.addcmul(pos * s_pos, neg, s_neg)


class MonotoneActivation(ActivationFunction):
    """A non-decreasing activation: its box is ``[σ(lo), σ(hi)]``."""

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(lo), self.apply(hi)


@dataclass(eq=False)
class Activation(Operator):
    """An element-wise activation: the operator of an :class:`ActivationFunction` (``kind`` names it; its parameters,
    such as ``negative_slope``, read as attributes)."""

    name: str
    function: ActivationFunction

    elementwise: ClassVar[bool] = True

    def __getattr__(self, item: str) -> Any:
        function = self.__dict__.get("function")
        if function is None or item not in {p.attribute for p in function.parameters}:
            raise AttributeError(item)
        return getattr(function, item)

    @property
    def kind(self) -> str:
        return self.function.kind

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return self.function.apply(h)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.function.interval(lo, hi)

    def relaxation(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
        return self.function.relaxation(lo, hi)

    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        """``λ = λ⁺ + λ⁻``, ``λ⁺`` takes the lower line and ``λ⁻`` the upper one; returns ``(λ on the input,
        constant)``. The coefficients are ``λ⁺ s_l + λ⁻ s_u`` (:func:`split_by_sign`: one product per entry, the other
        term exactly 0); a constant only from the lines with a non-zero intercept."""
        if getattr(ctx, "rounding", False):
            return self._rounded_backward(a, lo, hi, ctx)
        (l_slope, l_icpt), (u_slope, u_icpt) = self.function.relaxation(lo, hi)
        alpha = None if ctx is None or not getattr(ctx, "lower_slopes", None) else ctx.lower_slopes.get(self.name)
        optimized = None if alpha is None else self.function.optimizable_lower(lo, hi, alpha)
        pos, neg = a.clamp_min(0), a.clamp_max(0)
        if optimized is not None:  # per specification row: (N, J) + value shape, through the origin
            return split_by_sign(pos, neg, optimized, u_slope.unsqueeze(1)), batched_dot(neg, u_icpt)
        a_in = split_by_sign(pos, neg, l_slope.unsqueeze(1), u_slope.unsqueeze(1))
        if self.function.lower_through_origin:  # only λ⁻ meets an intercept
            return a_in, batched_dot(neg, u_icpt)
        return a_in, batched_dot(pos, l_icpt) + batched_dot(neg, u_icpt)

    def _rounded_backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any):
        """:meth:`backward` sound for the exact activation despite floating-point evaluation (docs/theory.md §5): lines
        valid in real arithmetic (:func:`sound_relaxation`); each product ``λ s`` rounds by ``u|λ s|``, which costs
        ``u ⟨|λ|, |s| m⟩`` on the input box, and the constants' dot products ``γ_F ⟨|λ|, |t|⟩``: both taken in the
        one product per sign that computes the constant, ``⟨λ⁺, [t_l, |t_l| + |s_l| m]⟩`` (``λ⁻``: the upper line)."""
        from art_weightpert.rounding import error_factor  # the package imports the operators first

        (l_slope, l_icpt), (u_slope, u_icpt) = sound_relaxation(self.function, lo, hi)
        alpha = None if not getattr(ctx, "lower_slopes", None) else ctx.lower_slopes.get(self.name)
        optimized = None if alpha is None else self.function.optimizable_lower(lo, hi, alpha)
        pos, neg = a.clamp_min(0), a.clamp_max(0)  # exact: each entry of λ in one of them, 0 in the other
        if optimized is not None:  # lines through the origin with slopes in [0, 1]: |s| m ≤ m
            a_in = split_by_sign(pos, neg, optimized, u_slope.unsqueeze(1))
            l_slope = torch.ones_like(l_slope)
        else:
            a_in = split_by_sign(pos, neg, l_slope.unsqueeze(1), u_slope.unsqueeze(1))
        m = torch.maximum(lo.abs(), hi.abs())
        g = error_factor(a[0, 0].numel(), a.dtype)
        if self.kind == "relu" and optimized is None:  # λ⁺ takes slopes 0 or 1 (exact), and no intercept; λ⁻'s
            # terms ⟨λ⁻, t⟩ and u|λ⁻| s m (only where the box crosses 0, t > 0 there) share one sign: one product
            error = torch.where(u_icpt > 0, u_slope * m, torch.zeros_like(m)).mul_(torch.finfo(a.dtype).eps)
            return a_in, batched_dot(neg, u_icpt + error) * (1 + g)
        const = a.new_zeros(a.shape[:2])
        for part, slope, icpt in ((pos, l_slope, l_icpt), (neg, u_slope, u_icpt)):
            error = torch.addcmul(icpt.abs(), slope.abs(), m).mul_(g)
            both = torch.bmm(part.flatten(2), torch.stack((icpt.flatten(1), error.flatten(1)), dim=2))
            const = const + both[..., 0] - both[..., 1].abs()
        return a_in, const

    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.function.paper(n, d)

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        return self.function.nonnegative

    def rademacher_refusal(self, has_bias: bool) -> str | None:
        f = self.function
        if f.lipschitz > 1 or not f.zero_at_zero:
            return f"generalization_bound needs 1-Lipschitz activations with σ(0) = 0; {self.name!r} is {f.kind}."
        if has_bias and not f.fixes_one:
            return f"generalization_bound handles biases with activations where σ(1) = 1; {self.name!r} is {f.kind}."
        return None

    def missing_rules(self) -> list[str]:
        return stubs(type(self.function))


RELAXATION_SLACK = 2.0**-36
"""Relative slack (of ``|s| m + |t| + 1``) given to an activation's lines computed in float64, for the rounding of
torch's float64 functions and of the lines' own arithmetic (errors near ``2⁻⁵⁰``; docs/theory.md §5)."""


def sound_relaxation(function: ActivationFunction, lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
    """``(lower line, upper line)`` of ``function`` on ``[lo, hi]`` valid in exact arithmetic although computed in
    floating point (docs/theory.md §5). ReLU: the chord's slope rounded up from a width rounded down, its intercept
    rounded up (the lower lines are exact: slopes 0 or 1 through the origin). Other activations: the lines computed in
    float64, the intercepts moved outward by :data:`RELAXATION_SLACK` and by ``|s − s'| m`` for the slope ``s'`` in
    the box's dtype, then rounded outward to that dtype."""
    from art_weightpert.rounding import down_cast, up_cast

    if function.kind == "relu":
        return _relu_lines(lo, hi)
    dtype = lo.dtype
    lo64, hi64 = lo.double(), hi.double()
    m = torch.maximum(lo64.abs(), hi64.abs())
    lines = []
    for (slope, icpt), side in zip(function.relaxation(lo64, hi64), (-1.0, 1.0)):
        slope32 = slope.to(dtype)
        shift = (slope32.double() - slope).abs() * m + RELAXATION_SLACK * (slope.abs() * m + icpt.abs() + 1)
        icpt = icpt + side * shift
        lines.append((slope32, up_cast(icpt, dtype) if side > 0 else down_cast(icpt, dtype)))
    return lines[0], lines[1]


def _relu_lines(lo: torch.Tensor, hi: torch.Tensor) -> tuple[Line, Line]:
    """ReLU's lines (CROWN's, as :func:`.kinked`) valid after rounding: ``s ≥ hi / (hi − lo)`` and ``t ≥ −s lo`` give
    a line above the chord at both ends."""
    from art_weightpert.rounding import round_down, round_up

    active, inactive = lo >= 0, hi <= 0
    unstable = ~(active | inactive)
    width = torch.where(unstable, round_down(hi - lo), torch.ones_like(hi))
    slope = torch.where(unstable, round_up(hi / width), active.to(lo.dtype))
    icpt = torch.where(unstable, round_up(-slope * lo), torch.zeros_like(lo))
    lower = torch.where(unstable, (hi > -lo).to(lo.dtype), active.to(lo.dtype))
    return (lower, torch.zeros_like(lo)), (slope, icpt)


def refuse(name: str, reason: str) -> UnsupportedModelError:
    """The reader's refusal of an activation's parameters."""
    return UnsupportedModelError(f"{name!r}: {reason}")
