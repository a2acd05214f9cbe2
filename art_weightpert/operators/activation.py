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
        constant)``. One select of the slopes by the sign of ``λ`` and one product (fewer roundings than
        ``λ·u + λ⁺·(l − u)``); a constant only from the lines with a non-zero intercept."""
        (l_slope, l_icpt), (u_slope, u_icpt) = self.function.relaxation(lo, hi)
        alpha = None if ctx is None or not getattr(ctx, "lower_slopes", None) else ctx.lower_slopes.get(self.name)
        optimized = None if alpha is None else self.function.optimizable_lower(lo, hi, alpha)
        if optimized is not None:  # per specification row: (N, J) + value shape, through the origin
            a_in = torch.where(a >= 0, optimized, u_slope.unsqueeze(1)) * a
            return a_in, batched_dot(a.clamp_max(0), u_icpt)
        positive = a >= 0
        a_in = torch.where(positive, l_slope.unsqueeze(1), u_slope.unsqueeze(1))
        a_in = a_in * a if a.requires_grad or a_in.requires_grad else a_in.mul_(a)  # in place: one pass fewer
        if self.function.lower_through_origin:  # only λ⁻ meets an intercept
            return a_in, batched_dot(a.clamp_max(0), u_icpt)
        return a_in, batched_dot(a.clamp_min(0), l_icpt) + batched_dot(a.clamp_max(0), u_icpt)

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


def refuse(name: str, reason: str) -> UnsupportedModelError:
    """The reader's refusal of an activation's parameters."""
    return UnsupportedModelError(f"{name!r}: {reason}")
