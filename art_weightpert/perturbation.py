"""
:class:`WeightPerturbation`: per-parameter deltas (numpy, keyed as ``model.named_parameters()``) with the budget
they were made for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from art_weightpert.balls import BALLS
from art_weightpert.budget import PerturbationBudget

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
