"""
:class:`ActivationClipping`: activation-range restriction against random faults in the weights (Ranger, Chen et al.
2021; docs/theory.md §8.4).

Every ``nn.ReLU`` module of the model is profiled on calibration data (the ``quantile`` of its outputs, per tensor or
per channel) and replaced, in a copy of the model, by a clipped ReLU ``min(max(z, 0), b)``: ``nn.Hardtanh(0, b)`` per
tensor (a standard torch module: ``torch.fx``, ``torch.export`` and the certificates read it, docs/theory.md §8.4), or
:class:`ChannelClippedReLU` per channel (fx-traceable; the certificates refuse it). With ``quantile=1`` (the maximum,
Ranger's choice) the clipped model computes exactly what the original computes on the calibration data; a fault that
blows up a weight then moves the next layer's input by at most the bound instead of without limit.

Only ``nn.ReLU`` modules are replaced: a ReLU applied as a function (``F.relu``, ``torch.relu``, ``x.relu()``) is left
as it is. A module used at several places gets one bound, the largest over its uses. The user's model and the given
estimator are never modified: the result is a new :class:`.PyTorchWeightClassifier` owning a copy of the module (any
weight perturbation the estimator carries is carried over).

| Paper link: https://arxiv.org/abs/2003.13874
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from art.defences.transformer.transformer import Transformer
from art.estimators.classification import PyTorchClassifier
from torch import nn

from art_weightpert.estimators.weight_classifier import PyTorchWeightClassifier
from art_weightpert.quantization import as_weight_classifier
from art_weightpert.torch_tools import batch_slices, eval_mode
from art_weightpert.validation import check_bool, check_number, check_positive_int

logger = logging.getLogger(__name__)

_SMALLEST_BOUND = float(torch.finfo(torch.float32).tiny)  # nn.Hardtanh needs max_val > min_val


class ChannelClippedReLU(nn.Module):
    """``min(max(z, 0), bound)`` with one bound per channel (dim 1): ``bound`` has the shape of one sample's channel
    axis and the dimensions after it (``(C,)`` after a Linear layer, ``(C, 1, 1)`` after a conv)."""

    def __init__(self, bound: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bound", torch.as_tensor(bound).detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(z), self.bound.to(z.dtype))


class ActivationClipping(Transformer):
    """
    Ranger's activation clipping as an ART ``Transformer``: :meth:`fit` profiles the ReLU outputs on calibration data,
    calling the transformer returns a new estimator whose ReLUs are clipped at the profiled bounds.
    """

    params = ["quantile", "per_channel", "batch_size"]

    def __init__(
        self, classifier: PyTorchClassifier, quantile: float = 1.0, per_channel: bool = False, batch_size: int = 128
    ) -> None:
        """
        Create a :class:`.ActivationClipping` instance.

        :param classifier: the trained model, a :class:`.PyTorchWeightClassifier` or any ART ``PyTorchClassifier``.
        :param quantile: the bound of each ReLU is this quantile of its outputs on the calibration data, in ``(0, 1]``
            (1: the maximum, so that the calibration data are computed exactly as before).
        :param per_channel: one bound per channel (dim 1) instead of one per ReLU.
        :param batch_size: samples per forward pass while profiling.
        """
        super().__init__(as_weight_classifier(classifier))
        _check(quantile, per_channel, batch_size)
        self.quantile = quantile
        self.per_channel = per_channel
        self.batch_size = batch_size
        _relu_names(self.classifier.base_model)  # a model without nn.ReLU is refused here
        self.bounds_: dict[str, float | torch.Tensor] = {}

    def set_params(self, **kwargs: Any) -> None:
        """
        Change settings (validated first: a rejected value leaves the transformer unchanged); the bounds are
        profiled again on the next :meth:`fit`.

        :param kwargs: any of :attr:`params`.
        """
        unknown = [k for k in kwargs if k not in self.params]
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown}; the settings are {self.params}.")
        merged = {k: getattr(self, k) for k in self.params} | kwargs
        _check(merged["quantile"], merged["per_channel"], merged["batch_size"])
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.bounds_, self._is_fitted = {}, False

    def fit(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> None:
        """
        Profile every ``nn.ReLU`` module's outputs on ``x`` (in eval mode, with any perturbation the estimator
        carries); the bounds go to :attr:`bounds_` (``{module name: float}``, or a tensor per channel).

        :param x: calibration inputs ``(N,) + input_shape``, N ≥ 1 (ART's preprocessing is applied).
        :param y: unused.
        """
        _check(self.quantile, self.per_channel, self.batch_size)
        estimator: PyTorchWeightClassifier = self.classifier
        x_t, _ = estimator.prepare_inputs(x)
        if len(x_t) == 0:
            raise ValueError("`x` (the calibration data) is empty.")
        names = _relu_names(estimator.base_model)
        outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        shapes: dict[str, tuple[int, ...]] = {}
        hooks = [
            estimator.base_model.get_submodule(name).register_forward_hook(self._recorder(name, outputs, shapes))
            for name in names
        ]
        try:
            with eval_mode(estimator.model), torch.no_grad():
                for b in batch_slices(len(x_t), self.batch_size):
                    estimator.model(x_t[b])
        finally:
            for hook in hooks:
                hook.remove()
        self.bounds_ = {name: self._bound(name, values, shapes.get(name)) for name, values in outputs.items()}
        self._is_fitted = True

    def __call__(
        self, x: np.ndarray | None = None, transformed_classifier: PyTorchClassifier | None = None
    ) -> PyTorchWeightClassifier:
        """
        The clipped model: a new estimator (the classifier's module copied, every profiled ``nn.ReLU`` replaced).

        :param x: calibration inputs: :meth:`fit` runs on them first (``None``: use the bounds already fitted).
        :param transformed_classifier: the estimator to clip (``None``: the one given at construction); it must have
            the profiled ReLU modules.
        :return: a :class:`.PyTorchWeightClassifier` with clipped ReLUs; the given estimators are unchanged.
        """
        if x is not None:
            self.fit(x)
        if not self._is_fitted:
            raise ValueError("ActivationClipping is not fitted: pass calibration data `x` or call fit(x) first.")
        target = self.classifier if transformed_classifier is None else as_weight_classifier(transformed_classifier)
        missing = [name for name in self.bounds_ if not isinstance(_submodule(target.base_model, name), nn.ReLU)]
        if missing:
            raise ValueError(f"`transformed_classifier` has no nn.ReLU module named {missing}.")
        clipped = target.with_weight_perturbation(target.weight_perturbation)  # owns a copy of the module
        for name, bound in self.bounds_.items():
            parent, _, child = name.rpartition(".")
            setattr(clipped.base_model.get_submodule(parent), child, _clipped_relu(bound))
        logger.info("ActivationClipping: %d ReLU module(s) clipped.", len(self.bounds_))
        return clipped

    # ------------------------------------------------------------------------------------------------ internals
    def _recorder(self, name: str, outputs: dict[str, list[torch.Tensor]], shapes: dict[str, tuple[int, ...]]):
        """A forward hook keeping what the bound needs of each output: its max (per channel) or all its values."""

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            out = output.detach()
            if self.per_channel:
                if out.dim() < 2:
                    raise ValueError("`per_channel=True` needs ReLU outputs with a channel dimension (dim 1).")
                out = out.transpose(0, 1).reshape(out.shape[1], -1)  # (C, values)
            else:
                out = out.reshape(1, -1)
            outputs[name].append(out.amax(dim=1) if self.quantile == 1.0 else out.float().cpu())
            shapes[name] = tuple(output.shape[1:2]) + (1,) * (output.dim() - 2)  # (C, 1, 1) or (C,)

        return hook

    def _bound(self, name: str, values: list[torch.Tensor], shape: tuple[int, ...] | None) -> float | torch.Tensor:
        if not values:
            raise ValueError(f"ReLU module {name!r} was not called on the calibration data.")
        if self.quantile == 1.0:
            bound = torch.stack(values).amax(dim=0).double().cpu()
        else:
            all_values = torch.cat(values, dim=1).numpy()
            bound = torch.as_tensor(np.quantile(all_values, self.quantile, axis=1), dtype=torch.float64)
        if not self.per_channel:
            value = float(bound[0])
            if value <= 0:
                logger.warning("ReLU %r is never positive on the calibration data: it is clipped to ~0.", name)
            return max(value, _SMALLEST_BOUND)
        return bound.reshape(shape)


def _check(quantile: Any, per_channel: Any, batch_size: Any) -> None:
    check_number(quantile, "quantile", 0.0, 1.0, strict_minimum=True)
    check_bool(per_channel, "per_channel")
    check_positive_int(batch_size, "batch_size")


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _relu_names(model: nn.Module) -> list[str]:
    """The names of the ``nn.ReLU`` modules of ``model`` (``ValueError`` when there is none)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.ReLU) and name]
    if not names:
        raise ValueError(
            f"the model ({type(model).__name__}) has no nn.ReLU module to clip (a ReLU applied as a function, "
            "F.relu or torch.relu, is not replaced)."
        )
    return names


def _clipped_relu(bound: float | torch.Tensor) -> nn.Module:
    if isinstance(bound, torch.Tensor):
        return ChannelClippedReLU(bound.to(torch.float32))
    return nn.Hardtanh(0.0, bound)


def clip_activations(
    estimator: PyTorchClassifier,
    x: np.ndarray,
    quantile: float = 1.0,
    per_channel: bool = False,
    batch_size: int = 128,
) -> PyTorchWeightClassifier:
    """
    Ranger's activation clipping in one call: ``ActivationClipping(estimator, quantile, per_channel, batch_size)(x)``.

    :param estimator: the trained model.
    :param x: calibration inputs.
    :param quantile: the quantile of each ReLU's outputs that bounds it, in ``(0, 1]``.
    :param per_channel: one bound per channel instead of one per ReLU.
    :param batch_size: samples per forward pass while profiling.
    :return: a new estimator with clipped ReLUs.
    """
    return ActivationClipping(estimator, quantile=quantile, per_channel=per_channel, batch_size=batch_size)(x)
