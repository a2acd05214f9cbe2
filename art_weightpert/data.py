"""
Data: the embedded default data set (scikit-learn's handwritten digits, 8×8 images, ten classes) and user ``.npz``
files. Nothing is downloaded.
"""

from __future__ import annotations

import os

import numpy as np


def load_digits_data(
    test_fraction: float = 0.25, seed: int = 0, flatten: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """
    scikit-learn's handwritten digits scaled to [0, 1], split into train and test sets by a fixed seed.

    :param test_fraction: share of samples held out for testing.
    :param seed: seed of the stratified split.
    :param flatten: ``(N, 64)`` features if True, else ``(N, 1, 8, 8)`` images.
    :return: ``(x_train, y_train, x_test, y_test)``, float32 inputs and int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must lie in (0, 1), got {test_fraction}.")
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """
    Load a user data file: an ``.npz`` with arrays ``x`` and ``y`` (and optionally ``x_train``, ``y_train``).

    :raises FileNotFoundError: if the file does not exist.
    :raises ValueError: if ``x`` or ``y`` is missing or their lengths differ.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"data file {path} has no array(s) {missing}; it holds {sorted(arrays)}.")
    for xs, ys in (("x", "y"), ("x_train", "y_train")):
        if xs in arrays and ys in arrays and len(arrays[xs]) != len(arrays[ys]):
            raise ValueError(f"data file {path}: {xs} has {len(arrays[xs])} samples but {ys} has {len(arrays[ys])}.")
    arrays["x"] = arrays["x"].astype(np.float32)
    if "x_train" in arrays:
        arrays["x_train"] = arrays["x_train"].astype(np.float32)
    return arrays
