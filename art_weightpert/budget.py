"""
The weight ball: which parameters may move, in which norm, and how far (docs/theory.md §2), and the perturbations that
live in it.

A :class:`PerturbationBudget` is a description. Operations that depend on the weights (relative radii need ``|W|``,
layer names are checked against the model) take the model. Attacks, certificates and the trainer get the resolved
per-parameter balls from :meth:`PerturbationBudget.parameter_balls` and never re-derive them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from art_weightpert.balls import BALLS, Ball
from art_weightpert.network import perturbable_modules
from art_weightpert.validation import check_bool, check_choice, check_non_negative

NORMS = tuple(BALLS)
"""The norms of a weight ball, one per class of :mod:`.balls`: ``"inf"``, ``"row_l1"``, ``"l2"``."""
NORM_LABELS = {name: ball.label for name, ball in BALLS.items()}
"""Per norm, the ball's name in words (``"box ℓ∞ ball"``, ...), for plots and reports."""
DISTRIBUTIONS = ("uniform", "extreme", "gaussian")


@dataclass
class ParameterBall:
    """One perturbed parameter with its resolved ball.

    :param param_name: name as in ``model.named_parameters()`` (e.g. ``"0.weight"``).
    :param layer_name: name of the module that owns it (e.g. ``"0"``).
    :param kind: ``"weight"`` or ``"bias"``.
    :param ball: the ball it lives in.
    :param radius: the ball's radius tensor (see :mod:`art_weightpert.balls`).
    :param eps: the layer's ε (absolute, or the relative factor).
    """

    param_name: str
    layer_name: str
    kind: str
    ball: Ball
    radius: torch.Tensor
    eps: float


class PerturbationBudget:
    """
    A norm-bounded ball of weight perturbations.

    :param eps: radius; a float for every layer or a ``{layer_name: float}`` dict (the dict's keys are then the
        perturbed layers unless ``layers`` is given).
    :param norm: ``"inf"`` (entry-wise box), ``"row_l1"`` (max row ℓ1 norm = induced ℓ∞ operator norm; for a conv,
        a row is one output channel's kernel) or ``"l2"`` (Frobenius norm per layer).
    :param layers: names of the Linear/Conv modules to perturb (``None``: every Linear/Conv layer).
    :param relative: radii relative to the weights: ``ε·|W|`` per entry, ``ε·‖W_r‖₁`` per row, ``ε·‖W‖_F`` per layer.
    :param include_bias: also perturb the biases of those layers, each in a ball of its own with the same ε
        (a box for ``inf`` and ``row_l1``, a Euclidean ball for ``l2``; docs/theory.md §2).
    """

    def __init__(
        self,
        eps: float | Mapping[str, float],
        norm: str = "inf",
        layers: Iterable[str] | None = None,
        relative: bool = False,
        include_bias: bool = False,
    ) -> None:
        check_choice(norm, "norm", NORMS)
        if isinstance(eps, Mapping):
            if not eps:
                raise ValueError("`eps` dict must name at least one layer.")
            eps_value: float | dict[str, float] = {str(k): check_non_negative(v, f"eps[{k!r}]") for k, v in eps.items()}
        else:
            eps_value = check_non_negative(eps, "eps")
        if layers is not None:
            if isinstance(layers, str):
                layers = [layers]
            layers = [str(name) for name in layers]
            if not layers:
                raise ValueError("`layers` must name at least one layer, or be None for every layer.")
            if isinstance(eps_value, dict):
                missing = [name for name in layers if name not in eps_value]
                if missing:
                    raise ValueError(f"`eps` dict has no radius for layers {missing}.")
        elif isinstance(eps_value, dict):
            layers = list(eps_value)
        relative = check_bool(relative, "relative")
        include_bias = check_bool(include_bias, "include_bias")
        self.eps = eps_value
        self.norm = norm
        self.layers = None if layers is None else tuple(layers)
        self.relative = relative
        self.include_bias = include_bias

    # ------------------------------------------------------------------ description
    @property
    def ball(self) -> Ball:
        """The ball of the weights."""
        return BALLS[self.norm]

    @property
    def bias_ball(self) -> Ball:
        """The ball of the biases (a box for ``inf``/``row_l1``, Euclidean for ``l2``)."""
        return BALLS[self.ball.bias_norm]

    def layer_eps(self, layer_name: str) -> float:
        """The ε of one layer."""
        return self.eps[layer_name] if isinstance(self.eps, dict) else self.eps

    def scaled(self, factor: float) -> PerturbationBudget:
        """The same budget with every ε multiplied by ``factor``."""
        factor = check_non_negative(factor, "factor")
        eps = {k: v * factor for k, v in self.eps.items()} if isinstance(self.eps, dict) else self.eps * factor
        return PerturbationBudget(eps, self.norm, self.layers, self.relative, self.include_bias)

    def with_eps(self, eps: float | Mapping[str, float]) -> PerturbationBudget:
        """The same ball with another ε."""
        return PerturbationBudget(eps, self.norm, self.layers, self.relative, self.include_bias)

    def to_dict(self) -> dict:
        """A JSON-serializable description (inverse of :meth:`from_dict`)."""
        return {
            "eps": self.eps,
            "norm": self.norm,
            "layers": None if self.layers is None else list(self.layers),
            "relative": self.relative,
            "include_bias": self.include_bias,
        }

    @classmethod
    def from_dict(cls, config: Mapping) -> PerturbationBudget:
        """Rebuild a budget from :meth:`to_dict`'s output."""
        return cls(**dict(config))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerturbationBudget) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "PerturbationBudget(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    # ------------------------------------------------------------------ model-dependent
    def layer_names(self, model: torch.nn.Module) -> list[str]:
        """The perturbed layers of ``model``, checked against it (``ValueError`` lists the valid names)."""
        valid = perturbable_modules(model)
        if not valid:
            raise ValueError("the model has no Linear or Conv layer to perturb.")
        if self.layers is None:
            return list(valid)
        unknown = [name for name in self.layers if name not in valid]
        if unknown:
            raise ValueError(f"unknown layer name(s) {unknown} in the budget; valid layers are {list(valid)}.")
        return list(self.layers)

    def parameter_balls(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> list[ParameterBall]:
        """Resolve the budget on ``model``: one :class:`ParameterBall` per perturbed parameter, radii computed from the
        current weights (in ``dtype`` if given)."""
        modules = perturbable_modules(model)
        out = []
        for layer in self.layer_names(model):
            module = modules[layer]
            eps = self.layer_eps(layer)
            prefix = f"{layer}." if layer else ""
            params = [("weight", self.ball, module.weight)]
            if self.include_bias and getattr(module, "bias", None) is not None:
                params.append(("bias", self.bias_ball, module.bias))
            for kind, ball, param in params:
                p = param.detach() if dtype is None else param.detach().to(dtype)
                out.append(ParameterBall(prefix + kind, layer, kind, ball, ball.radius(p, eps, self.relative), eps))
        return out

    def radii(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """The radius of every perturbed parameter: per entry (``inf``), per row (``row_l1``) or per layer (``l2``)."""
        return {t.param_name: t.radius.cpu().numpy() for t in self.parameter_balls(model)}

    def row_l1_radii(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Per-row radius of the smallest row_l1 ball (of the weights) containing this ball (docs/theory.md §2):
        box δ → Σ_c δ_rc, l2 ε → √n·ε, row_l1 → itself."""
        return {
            t.param_name: t.ball.row_l1_radius(t.radius, _param(model, t.param_name).shape)
            for t in self.parameter_balls(model, dtype)
            if t.kind == "weight"
        }

    def project(self, delta: Mapping, model: torch.nn.Module) -> WeightPerturbation:
        """Exact Euclidean projection of ``delta`` onto the ball (parameters outside the budget are dropped)."""
        deltas = delta_tensors(delta, model, torch.float64)
        projected = {}
        for t in self.parameter_balls(model, torch.float64):
            d = deltas.get(t.param_name)
            if d is None:
                d = torch.zeros(_param(model, t.param_name).shape, dtype=torch.float64, device=t.radius.device)
            projected[t.param_name] = t.ball.project(d, t.radius)
        return WeightPerturbation({k: v.cpu().numpy() for k, v in projected.items()}, budget=self)

    def contains(self, delta: Mapping, model: torch.nn.Module, atol: float = 1e-6) -> bool:
        """True when ``delta`` lies in the ball up to ``atol`` (plus a relative ``1e-6`` of the radius), and perturbs
        no parameter outside the budget."""
        deltas = delta_tensors(delta, model, torch.float64)
        param_balls = self.parameter_balls(model, torch.float64)
        allowed = {t.param_name for t in param_balls}
        for name, d in deltas.items():
            if name not in allowed and d.numel() and float(d.abs().max()) > atol:
                return False
        for t in param_balls:
            d = deltas.get(t.param_name)
            if d is None:
                continue
            tol = atol + 1e-6 * float(t.radius.max()) if t.radius.numel() else atol
            if float(t.ball.excess(d.to(torch.float64), t.radius)) > tol:
                return False
        return True

    def sample(
        self, model: torch.nn.Module, distribution: str = "uniform", seed: int | None = None
    ) -> WeightPerturbation:
        """One random perturbation in the ball: ``uniform`` in it, its ``extreme`` points (box vertices, one ±r entry
        per row for row_l1, the sphere for l2) or a ``gaussian`` direction rescaled onto the boundary."""
        check_choice(distribution, "distribution", DISTRIBUTIONS)
        gen = torch.Generator()
        gen.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]) if seed is None else int(seed))
        out = {}
        for t in self.parameter_balls(model):
            shape = _param(model, t.param_name).shape
            out[t.param_name] = t.ball.sample(t.radius.cpu(), shape, distribution, gen).numpy()
        return WeightPerturbation(out, budget=self)

    def to_json(self) -> str:
        """JSON form of :meth:`to_dict`."""
        return json.dumps(self.to_dict())


def eps_for_inputs(eps: float, input_shape: tuple[int, ...], reference_inputs: int) -> float:
    """
    A row-ℓ1 ``eps`` chosen for a model of ``reference_inputs`` input features, scaled to inputs of ``input_shape``:
    ``eps · sqrt(reference_inputs / n_inputs)``, at most ``eps``, to 3 significant digits. The interval bounds that
    robust training tightens grow with the fan-in, so an ε that suits a 64-input MLP is far too large for 3x32x32
    images (3,072 inputs: 0.0144 instead of 0.1).
    """
    features = int(np.prod(input_shape))
    return float(f"{eps * min(1.0, (reference_inputs / features) ** 0.5):.3g}")


_BUDGET_KEY = "__budget__"


class WeightPerturbation(Mapping[str, np.ndarray]):
    """
    An additive perturbation of named parameters, relative to the original weights.

    :param deltas: ``{parameter name: array}``, names as in ``model.named_parameters()``.
    :param budget: the :class:`.PerturbationBudget` it was made for (``None`` if unknown).
    """

    def __init__(self, deltas: Mapping[str, np.ndarray], budget: PerturbationBudget | None = None) -> None:
        if not isinstance(deltas, Mapping):
            raise TypeError(f"`deltas` must be a mapping of parameter names to arrays, got {type(deltas).__name__}.")
        if budget is not None and not isinstance(budget, PerturbationBudget):
            raise TypeError("`budget` must be a PerturbationBudget or None.")
        arrays = {}
        for name, value in deltas.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            array = np.array(value, dtype=np.float64 if np.asarray(value).dtype == np.float64 else np.float32)
            if not np.all(np.isfinite(array)):
                raise ValueError(f"perturbation of {name!r} contains NaN or inf.")
            arrays[str(name)] = array
        self._deltas = arrays
        self._budget = budget

    @property
    def budget(self) -> PerturbationBudget | None:
        """The budget this perturbation was made for."""
        return self._budget

    def __getitem__(self, name: str) -> np.ndarray:
        return self._deltas[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._deltas)

    def __len__(self) -> int:
        return len(self._deltas)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self._deltas.items()}
        return f"WeightPerturbation({shapes}, budget={self._budget!r})"

    def norms(self) -> dict[str, float]:
        """Norm of each delta in its budget's ball norm (weights: the budget's norm; biases: the bias ball's);
        ``inf`` norm when there is no budget."""
        out = {}
        for name, value in self._deltas.items():
            if self._budget is None:
                ball = BALLS["inf"]
            else:
                ball = self._budget.bias_ball if value.ndim == 1 else self._budget.ball
            out[name] = float(ball.norm(torch.from_numpy(np.asarray(value, dtype=np.float64))))
        return out

    def scaled(self, factor: float) -> WeightPerturbation:
        """``factor`` times this perturbation (the budget is scaled too, when ``factor`` ≥ 0)."""
        factor = float(factor)
        budget = self._budget.scaled(abs(factor)) if self._budget is not None else None
        return WeightPerturbation({k: v * factor for k, v in self._deltas.items()}, budget=budget)

    def to_tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict:
        """``{name: torch.Tensor}`` on ``device``."""
        return {k: torch.as_tensor(v, device=device, dtype=dtype) for k, v in self._deltas.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Save as ``.npz`` (the budget travels as JSON)."""
        extra = {_BUDGET_KEY: np.array(self._budget.to_json() if self._budget is not None else "")}
        np.savez(path, **self._deltas, **extra)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightPerturbation:
        """Load a perturbation written by :meth:`save` (``np.savez`` appends ``.npz`` to a path without it; so does
        this)."""
        if not os.path.exists(path) and not str(path).endswith(".npz") and os.path.exists(f"{path}.npz"):
            path = f"{path}.npz"
        with np.load(path, allow_pickle=False) as data:
            budget_json = str(data[_BUDGET_KEY]) if _BUDGET_KEY in data.files else ""
            deltas = {k: data[k] for k in data.files if k != _BUDGET_KEY}
        budget = PerturbationBudget.from_dict(json.loads(budget_json)) if budget_json else None
        return cls(deltas, budget=budget)


def delta_tensors(delta: Mapping, model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """
    Check ``{parameter name: array or tensor}`` against ``model`` (known names, matching shapes, finite values) and
    return tensors on the parameters' device, in ``dtype`` (default: each parameter's dtype).
    """
    if not isinstance(delta, Mapping):
        raise TypeError(f"`delta` must be a WeightPerturbation or a mapping, got {type(delta).__name__}.")
    params = dict(model.named_parameters())
    out = {}
    for name, value in delta.items():
        if name not in params:
            raise ValueError(f"perturbation names unknown parameter {name!r}; parameters are {list(params)}.")
        t = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(
                f"perturbation of {name!r} has shape {tuple(t.shape)}; "
                f"the parameter has shape {tuple(params[name].shape)}."
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"perturbation of {name!r} contains NaN or inf.")
        out[name] = t.to(device=params[name].device, dtype=dtype or params[name].dtype)
    return out


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name)
