"""
:class:`PyTorchWeightClassifier`: an ART ``PyTorchClassifier`` that knows its weights can be perturbed.

A perturbation lives *inside* the torch module (:class:`WeightPerturbedModule`, which evaluates the base module with
``torch.func.functional_call`` and ``W + Δ``), so every ART code path sees it: ``predict``, ``loss_gradient``,
``class_gradient``, ART's attacks and trainers, and code that calls ``classifier.model(x)`` directly.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from art.estimators.classification import PyTorchClassifier
from torch import nn

from art_weightpert.budget import WeightPerturbation, delta_tensors
from art_weightpert.estimators import input_warnings as checks
from art_weightpert.estimators.input_warnings import out_of_range_warning, warn_once_per_call_site
from art_weightpert.network import perturbable_modules
from art_weightpert.torch_tools import batch_slices, eval_mode, run_with_parameters

logger = logging.getLogger(__name__)


class WeightPerturbedModule(nn.Module):
    """
    ``module`` evaluated with ``W + Δ`` for the perturbed parameters. The deltas are buffers (they move with
    ``.to()``, are saved in the state dict and survive pickling); ``module``'s own parameters are untouched.

    :param module: the base module.
    :param deltas: ``{parameter name of module: tensor}``.
    :param budget: the budget the perturbation was made for (kept for bookkeeping).
    """

    def __init__(self, module: nn.Module, deltas: Mapping[str, torch.Tensor], budget=None) -> None:
        super().__init__()
        self.module = module
        self.param_names = list(deltas)
        for i, name in enumerate(self.param_names):
            param = module.get_parameter(name)
            self.register_buffer(f"delta_{i}", deltas[name].detach().to(device=param.device, dtype=param.dtype).clone())
        self.budget = budget

    def deltas(self) -> dict[str, torch.Tensor]:
        """``{parameter name: delta buffer}``."""
        return {name: getattr(self, f"delta_{i}") for i, name in enumerate(self.param_names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {name: self.module.get_parameter(name) + delta for name, delta in self.deltas().items()}
        return run_with_parameters(self.module, params, *args, **kwargs)


class PyTorchWeightClassifier(PyTorchClassifier):
    """
    A ``PyTorchClassifier`` (same positional signature) whose weights can be perturbed without touching the user's
    module: :meth:`with_weight_perturbation` returns a new estimator carrying a :class:`.WeightPerturbation`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.modules.loss._Loss,
        input_shape: tuple[int, ...],
        nb_classes: int,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Create a :class:`.PyTorchWeightClassifier` instance. Arguments are those of ART's ``PyTorchClassifier``.

        :param model: the torch module (or a :class:`WeightPerturbedModule` wrapping one).
        :param loss: loss on logits and integer labels.
        :param input_shape: shape of one input.
        :param nb_classes: number of classes.
        :param optimizer: optimizer of the model's parameters (needed for training).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        super().__init__(model, loss, input_shape, nb_classes, optimizer=optimizer, **kwargs)
        self._check_output_size()

    def _check_output_size(self) -> None:
        """``ValueError`` when torch rejects a zero batch of ``input_shape`` as of the wrong shape, or when the model's
        output size disagrees with ``nb_classes``: one forward in eval mode, without gradients, on the estimator's
        device (weights, running statistics and train flags unchanged). Other failures of that forward (a model that
        needs other inputs, or non-zero ones) skip the check."""
        model = self.model
        zeros = torch.zeros((1, *self.input_shape), device=self._device, dtype=checks.parameter_dtype(model))
        try:
            with eval_mode(model), torch.no_grad():
                output = model(zeros)
        except Exception as err:  # pylint: disable=broad-except  # the probe is a courtesy, not a requirement
            if checks.is_shape_error(err):
                raise checks.input_shape_error(self.input_shape, self.base_model, err) from err
            logger.debug("output-size check skipped: the model's forward on a zero input failed (%s)", err)
            return
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            return
        size = int(output.shape[1])
        if size != self.nb_classes and not (size == 1 and self.nb_classes == 2):
            raise ValueError(
                f"`nb_classes={self.nb_classes}` disagrees with the model, which outputs {size} values per input "
                f"(probed with a zero input of shape {tuple(self.input_shape)}); pass nb_classes={size} or fix the "
                "model's last layer."
            )

    def _apply_preprocessing(self, x: Any, y: Any, fit: bool = False, no_grad: bool = True) -> tuple[Any, Any]:
        """ART's preprocessing, then float inputs cast to the model's dtype: every ART path passes here (``predict``,
        ``fit``, ``*_gradient``), with float64 from HopSkipJump, BoundaryAttack or FeatureSqueezing."""
        x, y = super()._apply_preprocessing(x, y, fit=fit, no_grad=no_grad)
        return checks.cast_floating(x, checks.parameter_dtype(self.model)), y

    # --------------------------------------------------------------------------------------- construction
    @classmethod
    def from_classifier(cls, classifier: PyTorchClassifier) -> PyTorchWeightClassifier:
        """Wrap an ART ``PyTorchClassifier`` (same module, loss, optimizer and preprocessing; nothing copied): the one
        wrapping function, :func:`.as_weight_classifier` (ART's ``EstimatorError`` for anything else)."""
        from art_weightpert.estimators.wrapping import as_weight_classifier  # pylint: disable=import-outside-toplevel

        return as_weight_classifier(classifier, "classifier")

    @classmethod
    def from_quantized(
        cls, qmodel: nn.Module, input_shape: tuple[int, ...], nb_classes: int, **classifier_kwargs: Any
    ) -> PyTorchWeightClassifier:
        """
        Wrap a deployed int8 model (torchao, ``torch.ao.quantization`` eager mode): its quantized layers become Linear
        /Conv layers holding the deployed weights ``s·(c − z)`` whose forward runs the deployed quantized operator, so
        bit flips and predictions are those of ``qmodel`` (see :mod:`.estimators.quantized`). ``qmodel`` is not
        modified.

        :param qmodel: the quantized model.
        :param input_shape: shape of one input.
        :param nb_classes: number of classes.
        :param classifier_kwargs: further arguments of the constructor (``loss`` defaults to cross-entropy).
        :return: the estimator.
        """
        from art_weightpert.estimators.quantized import deployed_module  # pylint: disable=import-outside-toplevel

        loss = classifier_kwargs.pop("loss", nn.CrossEntropyLoss())
        return cls(deployed_module(qmodel, input_shape), loss, input_shape, nb_classes, **classifier_kwargs)

    @property
    def base_model(self) -> nn.Module:
        """The unperturbed torch module (the user's, or this estimator's own copy when perturbed)."""
        model = self.model
        return model.module if isinstance(model, WeightPerturbedModule) else model

    @property
    def perturbable_parameters(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of the weights and biases of every Linear/Conv layer (names as
        ``base_model.named_parameters()``)."""
        out = {}
        for layer, module in perturbable_modules(self.base_model).items():
            prefix = f"{layer}." if layer else ""
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if isinstance(p, nn.Parameter):
                    out[prefix + kind] = tuple(p.shape)
        return out

    @property
    def weight_perturbation(self) -> WeightPerturbation | None:
        """The perturbation this estimator carries (``None`` when unperturbed)."""
        model = self.model
        if not isinstance(model, WeightPerturbedModule):
            return None
        return WeightPerturbation({k: v.cpu().numpy() for k, v in model.deltas().items()}, budget=model.budget)

    def with_weight_perturbation(self, delta: Mapping | None) -> PyTorchWeightClassifier:
        """
        A new estimator whose weights are the *original* weights plus ``delta`` (it replaces any perturbation this
        estimator carries). It owns a copy of the module, so neither this estimator nor the user's module changes,
        even if the new one is trained.

        :param delta: a :class:`.WeightPerturbation` or ``{parameter name: array}``; ``None`` for a clean copy.
        :return: the perturbed estimator.
        """
        deltas = self.check_deltas({} if delta is None else delta)
        base = copy.deepcopy(self.base_model)
        budget = delta.budget if isinstance(delta, WeightPerturbation) else None
        model = WeightPerturbedModule(base, deltas, budget) if deltas else base
        optimizer = None
        if self._optimizer is not None:
            optimizer = type(self._optimizer)(model.parameters(), **self._optimizer.defaults)
        return type(self)(
            model, self._loss, self.input_shape, self.nb_classes, optimizer=optimizer, **_init_kwargs(self)
        )

    def check_deltas(self, delta: Mapping) -> dict[str, torch.Tensor]:
        """Validate ``{name: array}`` against the base module (names and shapes) and return float tensors on the
        estimator's device."""
        return delta_tensors(delta, self.base_model)

    # --------------------------------------------------------------------------------------- ART plumbing
    def set_params(self, **kwargs: Any) -> None:
        """
        ART's ``set_params``. A ``model`` is wrapped as the constructor wraps it (ART 1.20.1 would store the bare
        module in place of its wrapper, so that ``set_params(**get_params())`` broke the estimator).

        :param kwargs: estimator parameters (see ``estimator_params``).
        """
        model = kwargs.pop("model", None)
        if model is not None and model is not self.model:
            if not isinstance(model, nn.Module):
                raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
            self._model = self._make_model_wrapper(model)
            self._layer_names = self._model.get_layers
            self._model.to(self._device)
        super().set_params(**kwargs)

    def predict(self, x: np.ndarray, batch_size: int = 128, training_mode: bool = False, **kwargs: Any) -> np.ndarray:
        """
        ART's ``predict``, warning first (once per call site) about inputs outside ``clip_values`` or 8-bit images
        without ``clip_values`` (see :meth:`warn_if_out_of_range`).

        :param x: inputs ``(N,) + input_shape``.
        :param batch_size: samples per forward.
        :param training_mode: run the model in train mode.
        :return: the logits ``(N, nb_classes)``.
        """
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.number):
            self.warn_if_out_of_range(x, x.dtype == np.uint8)
        return super().predict(x, batch_size=batch_size, training_mode=training_mode, **kwargs)

    def fit(self, x: np.ndarray, y: np.ndarray, *args: Any, **kwargs: Any) -> None:  # pylint: disable=arguments-differ
        """
        ART's ``fit``, warning first (once per call site) about inputs that are probably wrong, as :meth:`predict`.

        :param x: training inputs.
        :param y: labels.
        """
        if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.number):
            self.warn_if_out_of_range(x, x.dtype == np.uint8)
        super().fit(x, y, *args, **kwargs)

    def reduce_labels(self, y: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """ART's label reduction, also accepting integer class indices of shape ``(N,)`` (ART 1.20.1 takes their
        ``argmax(dim=1)`` and fails, e.g. in ``loss_gradient``)."""
        if len(y.shape) == 1 and self._int_labels:
            return y.long() if isinstance(y, torch.Tensor) else np.asarray(y).astype(np.int64)
        return super().reduce_labels(y)

    # --------------------------------------------------------------------------------------- torch helpers
    def prepare_inputs(
        self, x: np.ndarray, y: np.ndarray | None = None, require_labels: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Validate ``x`` (and labels), apply ART's preprocessing and return torch tensors on the estimator's device.

        :param x: inputs of shape ``(N,) + input_shape``.
        :param y: integer labels ``(N,)`` or one-hot ``(N, nb_classes)``, or ``None``.
        :param require_labels: raise if ``y`` is ``None``.
        :return: ``(x, labels)`` with labels as int64 class indices (or ``None``).
        """
        x = self.check_inputs(x)
        labels = self.check_labels(y, len(x), require_labels)
        x_pre, _ = self._apply_preprocessing(x, y=None, fit=False)
        x_t = torch.as_tensor(np.asarray(x_pre, dtype=np.float32), device=self._device)
        y_t = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=self._device)
        return x_t, y_t

    def check_inputs(self, x: Any) -> np.ndarray:
        """``x`` as a float32 array of shape ``(N,) + input_shape``, ``N ≥ 1``, with finite values (``ValueError``
        otherwise). Every attack, certificate and metric validates its inputs here."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if not isinstance(x, np.ndarray):
            raise TypeError(f"`x` must be a numpy array, got {type(x).__name__}.")
        if not np.issubdtype(x.dtype, np.number):
            raise TypeError(f"`x` must be numeric, got dtype {x.dtype}.")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"`x` has shape {x.shape}; expected (N, {', '.join(map(str, self.input_shape))}).")
        if len(x) == 0:
            raise ValueError(f"`x` is empty (shape {x.shape}): at least one sample is needed.")
        is_uint8 = x.dtype == np.uint8
        x = x.astype(np.float32, copy=False)
        if not np.all(np.isfinite(x)):
            raise ValueError("`x` contains NaN or inf values.")
        self.warn_if_out_of_range(x, is_uint8)
        return x

    def warn_if_out_of_range(self, x: np.ndarray, is_uint8: bool = False) -> None:
        """Warn (once per call site) about inputs that are probably wrong: values outside the classifier's
        ``clip_values``, or, without ``clip_values``, what looks like 8-bit images in 0–255 (models are usually
        trained on [0, 1]).

        :param x: raw (unpreprocessed) inputs.
        :param is_uint8: ``x`` was given as ``uint8``.
        """
        warning = out_of_range_warning(x, self.clip_values, is_uint8)
        if warning is not None:
            warn_once_per_call_site(*warning)

    def check_labels(self, y: Any, n: int, required: bool = False) -> np.ndarray | None:
        """Integer class indices from integer or one-hot labels, checked against ``n`` samples and the class
        count."""
        if y is None:
            if required:
                raise ValueError("labels `y` are required.")
            return None
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == self.nb_classes:
            y = np.argmax(y, axis=1)
        elif y.ndim != 1:
            raise ValueError(f"`y` must have shape (N,) or (N, {self.nb_classes}); got {y.shape}.")
        if len(y) != n:
            raise ValueError(f"`y` has {len(y)} labels for {n} inputs.")
        if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
            raise ValueError("`y` must hold integer class labels.")
        if n and (y.min() < 0 or y.max() >= self.nb_classes):
            raise ValueError(f"labels must lie in [0, {self.nb_classes}); got range [{y.min()}, {y.max()}].")
        return y.astype(np.int64)

    def logits(self, x: torch.Tensor, deltas: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Output of the *base* module on preprocessed ``x`` with weights ``W + deltas`` (differentiable in both);
        the caller chooses train/eval mode (see :func:`eval_mode`)."""
        if not deltas:
            return self.base_model(x)
        params = {name: self.base_model.get_parameter(name) + d for name, d in deltas.items()}
        return run_with_parameters(self.base_model, params, x)

    def current_deltas(self) -> dict[str, torch.Tensor]:
        """The carried perturbation as ``{name: tensor}`` (empty when unperturbed)."""
        model = self.model
        return dict(model.deltas()) if isinstance(model, WeightPerturbedModule) else {}

    def loss_gradient_weights(
        self, x: np.ndarray, y: np.ndarray, batch_size: int = 128, names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """
        Gradient of the mean loss over ``(x, y)`` with respect to the (perturbed) weights, in eval mode.

        :param x: inputs.
        :param y: integer or one-hot labels.
        :param batch_size: samples per forward pass (gradients are accumulated).
        :param names: parameters to differentiate (default: :attr:`perturbable_parameters`).
        :return: ``{parameter name: gradient}`` with the parameters' shapes.
        """
        x_t, y_t = self.prepare_inputs(x, y, require_labels=True)
        names = list(self.perturbable_parameters) if names is None else list(names)
        carried = self.current_deltas()
        zeros = {n: torch.zeros_like(self.base_model.get_parameter(n)) for n in names}
        grads = {n: torch.zeros_like(z) for n, z in zeros.items()}
        n_total = max(1, len(x_t))
        with eval_mode(self.base_model):
            for b in batch_slices(len(x_t), batch_size):
                probes = {n: z.clone().requires_grad_(True) for n, z in zeros.items()}
                deltas = {n: carried.get(n, 0) + probes.get(n, 0) for n in set(carried) | set(probes)}
                out = self.logits(x_t[b], deltas)
                loss = self._loss(out, y_t[b]) * (len(out) / n_total)
                for n, g in zip(probes, torch.autograd.grad(loss, list(probes.values()))):
                    grads[n] += g
        return {n: g.cpu().numpy() for n, g in grads.items()}


def _init_kwargs(classifier: PyTorchClassifier) -> dict[str, Any]:
    """The keyword arguments of ``PyTorchClassifier.__init__`` that ``classifier`` was built with."""
    return {
        "use_amp": classifier._use_amp,
        "opt_level": classifier._opt_level,
        "loss_scale": classifier._loss_scale,
        "channels_first": classifier.channels_first,
        "clip_values": classifier.clip_values,
        "preprocessing_defences": classifier.preprocessing_defences,
        "postprocessing_defences": classifier.postprocessing_defences,
        "preprocessing": classifier.preprocessing,
        "device_type": "gpu" if classifier._device.type == "cuda" else "cpu",
    }
