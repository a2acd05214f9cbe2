"""
The interface every operator (one layer type of a read network, docs/theory.md §1) implements, the error of the
reader, and the rule tables the bounds dispatch through.

An operator holds its forward (:meth:`Operator.apply`) and its rules: the box it maps a box to (``interval``, §4), its
backward linear rule (``backward``, §5), its step of formula B (``paper``, §3; a refusal where B has none), whether
its output is non-negative by construction and whether the Rademacher bound of §7 admits it. The affine operator is the
one *weighted* operator: its rules, where the weight ball enters, are the bound methods' own
(:func:`rule_table`'s ``entries``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.fx


class UnsupportedModelError(ValueError):
    """The model cannot be read as a graph of supported layers; the message names the module or node and the
    reason."""


def missing_rule(method: Callable) -> Callable:
    """Mark ``method`` as the stub of a rule an operator has not defined (:meth:`Operator.missing_rules`)."""
    method.missing_rule = True
    return method


def stubs(cls: type) -> list[str]:
    """The rules of ``cls.RULES`` still marked by :func:`missing_rule`."""
    return [rule for rule in cls.RULES if getattr(getattr(cls, rule), "missing_rule", False)]


def node_arg(node: torch.fx.Node, index: int | None, key: str, default: Any) -> Any:
    """Argument ``index`` (``None``: keyword-only) or keyword ``key`` of a call node, else ``default``."""
    if index is not None and len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


class Operator:
    """One layer type. Subclasses define :meth:`apply` and every rule of :attr:`RULES` (the stubs raise)."""

    name: str
    RULES: ClassVar[tuple[str, ...]] = ("interval", "backward", "paper")
    """The rules a bound may call; :meth:`missing_rules` lists those still stubs."""
    weighted: ClassVar[bool] = False
    """Whether the operator carries perturbable weights (the affine operator)."""
    elementwise: ClassVar[bool] = False
    """Whether the operator maps each entry on its own (the activations)."""
    modules: ClassVar[tuple[type, ...]] = ()
    """The torch modules the reader maps to the operator (:meth:`from_module`)."""

    @classmethod
    def from_module(cls, name: str, module: torch.nn.Module) -> Operator:
        """The operator of a module of :attr:`modules` named ``name`` (refusing what its rules do not cover)."""
        raise NotImplementedError

    @classmethod
    def from_node(cls, node: torch.fx.Node) -> Operator | None:
        """The operator of a call node (a functional form or a tensor method), else ``None``."""
        return None

    def apply(self, *hs: torch.Tensor) -> torch.Tensor:
        """The forward of a fixed operator on the values it reads."""
        raise NotImplementedError

    @missing_rule
    def interval(self, *ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` of the output over the boxes ``lo, hi`` of the values read, given end by end (§4)."""
        raise NotImplementedError

    @missing_rule
    def backward(self, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ctx: Any = None):
        """``(λ on the input, constant (N, K))`` of a lower bound ``λ·y ≥ λ_in·h + c`` over the input box (§5)."""
        raise NotImplementedError

    @missing_rule
    def paper(self, n: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Formula B's step (§3): ``(N, D)`` bounds of ``‖ĥ‖_∞`` and ``‖ĥ − h‖_∞`` through the operator."""
        raise NotImplementedError

    def output_nonnegative(self, inputs: tuple[bool, ...]) -> bool:
        """Whether the output is ≥ 0 by construction, given which of the values read are."""
        return False

    def rademacher_refusal(self, has_bias: bool) -> str | None:
        """Why the Rademacher bound of §7 does not admit the operator (``None``: it does)."""
        return (
            "generalization_bound supports Linear/Conv2d, activations, average pooling and flattening; "
            f"{self.name!r} is a {type(self).__name__}."
        )

    def missing_rules(self) -> list[str]:
        """The rules of :attr:`RULES` the operator has not defined."""
        return stubs(type(self))


def operator_classes() -> list[type[Operator]]:
    """Every subclass of :class:`Operator` defined so far (the bases included)."""
    found, todo = [], [Operator]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


class RuleTable(dict):
    """Operator class → one of its rules (the method named :attr:`rule`), called as ``rule(layer, ...)``: along the
    class's bases, the first entry set here or method defined. :func:`rule_table` sets the methods of the operators
    defined so far and the drivers' own rules (the weighted operator's); an entry set later (a test's reference rule)
    replaces the method for that class and its subclasses."""

    def __init__(self, rule: str, entries: dict[type, Callable]) -> None:
        super().__init__(entries)
        self.rule = rule

    def __missing__(self, cls: type) -> Callable:
        for base in cls.__mro__:
            if dict.__contains__(self, base):
                return dict.__getitem__(self, base)
            if self.rule in vars(base):
                return vars(base)[self.rule]
        raise KeyError(cls)


def rule_table(rule: str, entries: dict[type, Callable] | None = None) -> RuleTable:
    """The :class:`RuleTable` of ``rule`` (a method name of :class:`Operator`), with ``entries`` over the methods."""
    table = RuleTable(rule, {cls: cls.__dict__[rule] for cls in operator_classes() if rule in cls.__dict__})
    table.update(entries or {})
    return table
