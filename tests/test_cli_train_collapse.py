"""`train` marks a run collapsed when the trained model, in eval mode as it is saved, is at chance, also when the
trainer's own train-mode check saw it learn (batch norm trained on batch statistics)."""

from __future__ import annotations

import numpy as np

from art_weightpert.cli.train import _check_collapse


class _ConstantClassifier:
    """Predicts class 0 for every input, as a batch-norm model at chance on its running statistics may."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), 10), dtype=np.float32)
        out[:, 0] = 1.0
        return out


class _PerfectClassifier:
    def __init__(self, y: np.ndarray) -> None:
        self.y = y

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.eye(10, dtype=np.float32)[self.y]


def test_eval_mode_chance_marks_the_run_collapsed():
    y = np.arange(200) % 10
    history = {"collapsed": False, "accuracy": [0.93], "warnings": []}
    _check_collapse(history, _ConstantClassifier(), np.zeros((200, 4)), y)
    assert history["collapsed"] and "eval mode" in history["warnings"][0]


def test_a_model_that_learned_is_not_marked():
    y = np.arange(200) % 10
    history = {"collapsed": False, "accuracy": [0.93], "warnings": []}
    _check_collapse(history, _PerfectClassifier(y), np.zeros((200, 4)), y)
    assert not history["collapsed"] and history["warnings"] == []
