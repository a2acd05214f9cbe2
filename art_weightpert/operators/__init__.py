"""
The operators: one class per layer type of a read network (docs/theory.md §1), each holding everything the package
knows about that type: its forward, its rules for the bounds (:class:`.Operator`) and the torch modules, functions and
tensor methods the reader maps to it. The activations are one :class:`.ActivationFunction` each, applied by the
:class:`.Activation` operator.

Adding a layer type is adding one module here and its class to :data:`READERS` (or an activation to
:data:`ACTIVATIONS`); the reader (:mod:`art_weightpert.graph`) and the bounds dispatch on the operator.
"""

from art_weightpert.operators.activation import Activation, ActivationFunction
from art_weightpert.operators.add import Add
from art_weightpert.operators.affine import Affine, conv_padding
from art_weightpert.operators.base import Operator, RuleTable, UnsupportedModelError, rule_table
from art_weightpert.operators.batch_norm import BatchNorm
from art_weightpert.operators.elu import ELU
from art_weightpert.operators.flatten import Flatten
from art_weightpert.operators.gelu import GELU
from art_weightpert.operators.hardtanh import Hardtanh
from art_weightpert.operators.max_pool import MaxPool
from art_weightpert.operators.pooling import AvgPool, SpatialMean
from art_weightpert.operators.relu import LeakyReLU, ReLU
from art_weightpert.operators.s_shaped import Sigmoid, Tanh
from art_weightpert.operators.silu import SiLU
from art_weightpert.operators.softplus import Softplus

ACTIVATIONS: tuple[type[ActivationFunction], ...] = (
    ReLU,
    LeakyReLU,
    Hardtanh,
    Sigmoid,
    Tanh,
    ELU,
    Softplus,
    SiLU,
    GELU,
)
"""The activations the reader knows (modules, functions and tensor methods)."""

READERS = (Affine, BatchNorm, AvgPool, MaxPool, Flatten, *ACTIVATIONS)
"""Everything the reader maps torch modules (``modules``, ``from_module``) or call nodes (``from_node``) to."""

Layer = Affine | Activation | BatchNorm | AvgPool | MaxPool | Flatten | Add

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "GELU",
    "READERS",
    "Activation",
    "ActivationFunction",
    "Add",
    "Affine",
    "AvgPool",
    "BatchNorm",
    "Flatten",
    "Hardtanh",
    "Layer",
    "LeakyReLU",
    "MaxPool",
    "Operator",
    "ReLU",
    "RuleTable",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "SpatialMean",
    "Tanh",
    "UnsupportedModelError",
    "conv_padding",
    "rule_table",
]
