"""Shared test set-up: ART's data path in a temporary folder, fixed seeds, a headless matplotlib, small fixtures.

Other test modules may ADD fixtures here; keep the existing ones unchanged.
"""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import art.config  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from art_weightpert.data import load_digits_data  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _art_data_path(tmp_path_factory):
    """ART writes model files when a classifier is copied or pickled: keep them out of ``~/.art``."""
    os.environ["MPLBACKEND"] = "Agg"
    art.config.set_data_path(str(tmp_path_factory.mktemp("art_data")))
    torch.manual_seed(0)
    np.random.seed(0)
    # Small models on a shared 2-core machine: one intra-op thread is several times faster than two.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def digits():
    """``(x_train, y_train, x_test, y_test)`` of the digits data, flattened to 64 features."""
    return load_digits_data()


@pytest.fixture(scope="session")
def digits_images():
    """The digits data as ``(N, 1, 8, 8)`` images."""
    return load_digits_data(flatten=False)


def make_mlp(seed: int = 0, hidden: int = 16, bias: bool = True) -> nn.Sequential:
    """A small ReLU MLP 64-hidden-10 with a fixed initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, 10, bias=bias))


def random_mlp(sizes, bias: bool, seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A randomly initialised MLP with layer widths ``sizes`` and ``act`` between the Linear layers."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def random_cnn(seed: int, final_maxpool: bool = True) -> nn.Sequential:
    """A randomly initialised CNN on 1×6×6 inputs with 5 classes: conv, batch norm (random eval statistics), ReLU,
    average pooling, conv, ReLU, optionally max pooling, and a Linear layer; in eval mode."""
    torch.manual_seed(seed)
    pool: list[nn.Module] = [nn.MaxPool2d(2)] if final_maxpool else []
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 2),
        nn.ReLU(),
        *pool,
        nn.Flatten(),
        nn.Linear(4 if final_maxpool else 4 * 2 * 2, 5),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.2, 0.2)
    return model.eval()


def make_cnn(seed: int = 0) -> nn.Sequential:
    """A small CNN on 1×8×8 inputs with a fixed initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def make_classifier(model: nn.Module, input_shape=(64,), nb_classes: int = 10, lr: float = 0.01):
    """A :class:`PyTorchWeightClassifier` around ``model`` with cross-entropy and Adam, inputs in [0, 1] (on the GPU
    when there is one)."""
    from art_weightpert.zoo import make_classifier as zoo_classifier

    return zoo_classifier(model, input_shape, nb_classes, lr=lr, device_type="gpu")


@pytest.fixture(scope="module")
def tiny_mlp_classifier(digits):
    """A digits MLP 64-16-10 (about 96% test accuracy), wrapped as a :class:`PyTorchWeightClassifier`."""
    x_train, y_train, _, _ = digits
    clf = make_classifier(make_mlp(seed=0), lr=0.02)
    clf.fit(x_train, y_train, batch_size=128, nb_epochs=8, verbose=False)
    return clf


@pytest.fixture(scope="session")
def trained_digits_mlp(digits):
    """The reference digits MLP 64-128-64-10 (with biases) trained with a plain torch loop (~97% test accuracy, a
    couple of seconds), as a :class:`PyTorchWeightClassifier`. Shared: tests must not train or modify it."""
    from art_weightpert.zoo import digits_mlp
    from art_weightpert.zoo import make_classifier as zoo_classifier

    x_train, y_train, _, _ = digits
    model = digits_mlp(bias=True, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.as_tensor(x_train), torch.as_tensor(y_train)
    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is faster, and much faster on a busy machine
    try:
        for _ in range(15):
            perm = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), 64):
                idx = perm[start : start + 64]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return zoo_classifier(model, (64,))


@pytest.fixture(scope="module")
def clf(trained_digits_mlp):
    """The reference digits MLP under the name most attack tests use (read-only, like ``trained_digits_mlp``)."""
    return trained_digits_mlp


@pytest.fixture(scope="module")
def test_data(digits):
    """The digits test split ``(x_test, y_test)``."""
    _, _, x_test, y_test = digits
    return x_test, y_test


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state, to check later that nothing modified it (:func:`assert_identical`)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """``model``'s state equals the :func:`snapshot` ``before``, bit for bit."""
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def accuracy(classifier, x, y) -> float:
    """Share of ``x`` that ``classifier`` predicts as ``y``."""
    return float(np.mean(classifier.predict(x).argmax(1) == y))


@pytest.fixture(scope="session")
def attack_batch(digits):
    """128 random training points (seed 0), the bit-flip attacks' batch."""
    x_train, y_train, _, _ = digits
    idx = np.random.default_rng(0).choice(len(x_train), 128, replace=False)
    return x_train[idx], y_train[idx]
