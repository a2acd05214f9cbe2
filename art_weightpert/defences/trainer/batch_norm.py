"""
Batch norm while :class:`.WeightRobustTrainer` trains (docs/theory.md §13).

Certificates hold for the eval-mode network, where batch norm is the per-channel affine map ``s·h + t`` with
``s = γ / √(running_var + ε_bn)`` and ``t = β − running_mean · s``; ``s`` multiplies the perturbation of the layer
before it. The trainer's ``batch_norm`` setting says how the robust term sees it:

* ``"frozen"``: every batch-norm module stays in eval mode for the whole ``fit`` (also where something calls
  ``model.train()``), so its running statistics never change and the cross-entropy trains the very map that the
  certificates read. The statistics are the module's own: ``mean 0, var 1`` for a fresh module (``s = γ``),
  the trained ones for a trained model (:func:`fold_batch_norm_statistics` moves them into γ and β first). The
  records of :class:`TrainingNetwork` compute ``s`` and ``t`` from the live γ and β, so the robust term trains them.
* ``"train"``: the cross-entropy runs batch norm on batch statistics and updates the running statistics; the bound
  reads the running statistics at every step, as constants (no gradient reaches γ and β through it).
* ``"auto"``: ``"frozen"`` when the model has batch norm and the robust term is on (λ > 0), else ``"train"`` (plain
  training, λ = 0, is then ART's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from art_weightpert.network import BatchNorm, Network, read_network
from art_weightpert.torch_tools import kept_training_flags, replaced_method

BATCH_NORM_MODES = ("auto", "frozen", "train")

_BatchNormModule = nn.modules.batchnorm._BatchNorm  # pylint: disable=protected-access


def batch_norm_modules(model: nn.Module) -> list[nn.Module]:
    """The batch-norm modules of ``model`` (``BatchNorm1d``, ``BatchNorm2d``, ...)."""
    return [m for m in model.modules() if isinstance(m, _BatchNormModule)]


def resolve_batch_norm(mode: str, has_batch_norm: bool, lam: float) -> str:
    """``"frozen"`` or ``"train"``: the ``mode`` itself, or what ``"auto"`` means for a model with or without batch
    norm at λ = ``lam``."""
    if mode != "auto":
        return mode
    return "frozen" if lam > 0 and has_batch_norm else "train"


def _stays_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:  # pylint: disable=unused-argument
    return nn.Module.train(module, False)


@contextlib.contextmanager
def frozen_batch_norm(model: nn.Module, freeze: bool = True) -> Iterator[None]:
    """
    Within the block every batch-norm module of ``model`` is in eval mode and stays there when ``train()`` is called
    (its own ``train`` is overridden for the block): it normalizes with its running statistics and never updates
    them. On exit, also after an exception, every module of ``model`` gets its own training flag back and the
    overrides are removed. ``freeze=False``: nothing is frozen, the flags are restored on exit all the same.
    """
    with kept_training_flags(model):  # restored after the overrides are removed
        modules = batch_norm_modules(model) if freeze else []
        for m in modules:
            m.eval()
        with replaced_method(modules, "train", _stays_in_eval):
            yield


class TrainingNetwork:
    """
    The network a trainer's bound reads, step by step (:meth:`now`): ``model`` read once; with frozen batch norm, its
    batch-norm records recomputed from the modules' live γ and β and fixed running statistics, with gradients (the
    robust term then trains γ and β, the scale that multiplies the previous layer's perturbation, docs/theory.md
    §9); with batch norm in train mode, read again (the running statistics change at every step).

    :param model: the trainer's module.
    :param input_shape: its input shape.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.model, self.input_shape = model, input_shape
        self.network = read_network(model, input_shape)
        self.has_batch_norm = bool(batch_norm_modules(model))
        modules = dict(model.named_modules())
        self._records = [(layer, modules[layer.name]) for layer in self.network.layers if isinstance(layer, BatchNorm)]

    def frozen(self, mode: str, lam: float) -> bool:
        """Whether batch norm is frozen under the ``batch_norm`` setting ``mode`` at λ = ``lam``."""
        return self.has_batch_norm and resolve_batch_norm(mode, self.has_batch_norm, lam) == "frozen"

    def now(self, frozen: bool) -> Network:
        """The network as the bound reads it now (``frozen``: batch norm frozen in eval mode)."""
        if frozen:
            for layer, module in self._records:  # s = γ / √(var + ε), t = β − mean · s (statistics constant)
                inv_std = torch.rsqrt(module.running_var.detach() + module.eps)
                scale = inv_std if module.weight is None else module.weight * inv_std
                shift = -module.running_mean.detach() * scale
                layer.scale, layer.shift = scale, shift if module.bias is None else shift + module.bias
        elif self.has_batch_norm:
            return read_network(self.model, self.input_shape)
        return self.network


@torch.no_grad()
def fold_batch_norm_statistics(model: nn.Module) -> None:
    """
    Move the running statistics of every batch-norm module of ``model`` into its γ and β, in place: afterwards
    ``running_mean = 0`` and ``running_var = 1``, and the eval-mode map ``s·h + t`` is unchanged (up to rounding), so
    a frozen fine-tuning (``batch_norm="frozen"``) trains ``s`` and ``t`` themselves instead of ``γ`` and ``β``
    scaled by the statistics. Modules without γ and β (``affine=False``) are left as they are.
    """
    for m in batch_norm_modules(model):
        if m.weight is None or m.bias is None or m.running_var is None:
            continue
        scale = m.weight * torch.rsqrt(m.running_var + m.eps)
        m.bias.copy_(m.bias - m.running_mean * scale)
        m.weight.copy_(scale * torch.sqrt(torch.ones_like(m.running_var) + m.eps))
        m.running_mean.zero_()
        m.running_var.fill_(1.0)


__all__ = [
    "BATCH_NORM_MODES",
    "TrainingNetwork",
    "batch_norm_modules",
    "fold_batch_norm_statistics",
    "frozen_batch_norm",
    "resolve_batch_norm",
]
